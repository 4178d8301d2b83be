"""The one module of rotorq that reads environment variables.

Each setting is read when it is asked for, so a process may set the variable before the first
use.

=====================  ======================================================================
``ROTORQ_PTX_CACHE``   Directory of the on-disk cache of compiled CUDA kernels (PTX); by
                       default ``$XDG_CACHE_HOME/rotorq/ptx`` or ``~/.cache/rotorq/ptx``; the
                       empty string disables the cache.
=====================  ======================================================================
"""

import os


def ptx_cache_dir():
    """Directory of the PTX cache of :mod:`rotorq.cuda`, or None when it is disabled.

    Returns
    -------
    str or None
        ``$ROTORQ_PTX_CACHE`` when set (None when set to the empty string), else
        ``$XDG_CACHE_HOME/rotorq/ptx`` (``~/.cache/rotorq/ptx`` without ``XDG_CACHE_HOME``).

    Examples
    --------
    >>> import os
    >>> from rotorq import config
    >>> saved = os.environ.get("ROTORQ_PTX_CACHE")
    >>> os.environ["ROTORQ_PTX_CACHE"] = "/tmp/ptx"
    >>> config.ptx_cache_dir()
    '/tmp/ptx'
    >>> os.environ["ROTORQ_PTX_CACHE"] = ""
    >>> config.ptx_cache_dir() is None
    True
    >>> if saved is None:
    ...     del os.environ["ROTORQ_PTX_CACHE"]
    ... else:
    ...     os.environ["ROTORQ_PTX_CACHE"] = saved
    """
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "rotorq", "ptx")
    return os.environ.get("ROTORQ_PTX_CACHE", default) or None
