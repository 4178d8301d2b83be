"""rotorq: compress vectors and KV caches to 2–4 bits per coordinate and compute on the codes.

Importing rotorq loads numpy, scipy and Numba's CPU compiler only; the CUDA side
(:mod:`rotorq.cuda`, cupy, numba.cuda) is imported when a GPU array first arrives.
"""

from . import clifford
from .codebook import lloyd_max
from .kv import KVCache
from .qjl import QJL
from .quantized import QuantizedVectors, concatenate, load
from .transforms import wht
from .turboquant import TurboQuant

__version__ = "0.1.0"

__all__ = ["QJL", "KVCache", "QuantizedVectors", "TurboQuant", "clifford", "concatenate", "lloyd_max",
           "load", "wht"]
