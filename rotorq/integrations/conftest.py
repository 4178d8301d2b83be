"""pytest (``--doctest-modules``): the transformers integration's doctests need the
``transformers`` extra; without torch or transformers they are not collected."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    collect_ignore = ["transformers.py", "_hf_layer.py", "_hf_mask.py", "_hf_config.py"]
