"""Calls into the CPU backend from several Python threads at once, under every Numba
threading layer.

Numba runs ``parallel=True`` kernels on one of three threading layers. ``tbb`` and ``omp``
accept launches from several threads at the same time; ``workqueue`` (the one that is always
available) does not: two overlapping launches abort the whole process. Under ``workqueue``,
and only there, :func:`serialized` entry points therefore take one process-wide lock, so
concurrent calls on a shared quantizer run one after the other instead of crashing. Under the
other layers nothing is locked. rotorq sets no threading option of its own (docs/threading.md).
"""

import contextlib
import functools
import threading

import numba

_LOCK = threading.RLock()  # reentrant: an entry point may call another (quantize -> rotate)
_guard = None


def guard():
    """The context every parallel launch runs in: the lock under ``workqueue``, else a no-op.

    Decided once, at the first call: asking Numba for its thread count starts the threading
    layer (as the first parallel kernel would), which then cannot change in this process.

    Examples
    --------
    >>> from rotorq.cpu import _threads
    >>> with _threads.guard():
    ...     pass
    """
    global _guard
    if _guard is None:
        numba.get_num_threads()
        _guard = _LOCK if numba.threading_layer() == "workqueue" else contextlib.nullcontext()
    return _guard


def serialized(fn):
    """Decorate a backend function that launches parallel kernels: it runs in :func:`guard`.

    Examples
    --------
    >>> from rotorq.cpu import _threads
    >>> _threads.serialized(lambda x: x + 1)(1)
    2
    """
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with guard():
            return fn(*args, **kwargs)

    return call
