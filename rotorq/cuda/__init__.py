"""CUDA backend: Numba ``@cuda.jit`` kernels behind the same functions as :mod:`rotorq.cpu`.

The kernel modules mirror :mod:`rotorq.cpu` module by module and function by function
(``bits``, ``wht``, ``rotate``, ``quantize``, ``dequantize``, ``scores``, ``qjl``, ``rotor``,
``attention``, with the split merge and the window attention in ``merge``); the kernels
generated per shape for the hot paths are in :mod:`rotorq.cuda.gen`. The backend functions
(defined in :mod:`rotorq.cuda.api`, re-exported here) take cupy arrays and launch the kernels
on the caller's current stream (:mod:`rotorq.cuda._launch`); :mod:`rotorq.cuda.plans` prepares
repeated score calls. Importing this package
imports cupy and numba.cuda, which is why :mod:`rotorq` imports it only when a GPU array arrives.

Without cupy, or under the Numba simulator (``NUMBA_ENABLE_CUDASIM=1``), only the kernel
modules are usable (tests: simulator runs, PTX compilation); asking for a backend function
then raises ``ImportError``.
"""

from numba import config as _config

_UNAVAILABLE = None
if _config.ENABLE_CUDASIM:
    _UNAVAILABLE = "the Numba CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1)"
else:
    try:
        from .api import *  # noqa: F403
        from .api import __all__ as _api_all
        from .plans import prepare_scores

        __all__ = [*_api_all, "prepare_scores"]
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "cupy":
            raise
        _UNAVAILABLE = "cupy is not installed"

if _UNAVAILABLE:
    # The backend's names: those :mod:`rotorq.cuda.api` exports and ``prepare_scores`` of
    # :mod:`rotorq.cuda.plans` (a test checks this list against the sources).
    BACKEND_FUNCTIONS = frozenset({
        "attention_layout", "decode_attention", "dequantize", "dequantize_rotated",
        "exact_attention", "name", "prepare_scores", "qjl_quantize", "qjl_scores", "quantize",
        "rotate", "rotor_roundtrip", "scores", "unpack_codes", "unrotate", "view", "wht", "xp",
    })

    def __getattr__(attr):
        if attr not in BACKEND_FUNCTIONS:
            raise AttributeError(f"module 'rotorq.cuda' has no attribute {attr!r}")
        raise ImportError(f"rotorq.cuda.{attr}: the CUDA backend is unavailable "
                          f"({_UNAVAILABLE}); install it with pip install 'rotorq[cuda13]' "
                          "(or [cuda12])")
