"""The ``"rotorq"`` logger, and the Numba compile events of rotorq's CPU kernels sent to it.

rotorq prints nothing by itself. The first call of a kernel for a new argument signature
compiles it (or loads it from Numba's on-disk cache, which logs nothing); each compile is
logged on the ``logging`` logger ``"rotorq"``: at INFO for a kernel that a call compiled,
at DEBUG for the kernels compiled inside it. To see them::

    import logging
    logging.basicConfig()
    logging.getLogger("rotorq").setLevel(logging.INFO)
"""

from __future__ import annotations

import logging
import threading
import time

from numba.core import event

logger = logging.getLogger("rotorq")
logger.addHandler(logging.NullHandler())

_compile_seconds = 0.0


def compile_seconds():
    """Seconds this process has spent compiling rotorq's CPU kernels (outermost compiles).

    Returns
    -------
    float
        The sum of the durations of the compiles logged at INFO so far; it stays 0.0
        while every kernel comes from Numba's on-disk cache.

    Examples
    --------
    >>> from rotorq._log import compile_seconds
    >>> compile_seconds() >= 0.0
    True
    """
    return _compile_seconds


def _is_rotorq(dispatcher):
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module == "rotorq" or module.startswith("rotorq.")


class _CompileListener(event.Listener):
    """Times each ``numba:compile`` event of a rotorq dispatcher and logs it on end.

    Events nest (a kernel's callees compile while it is typed), so starts are kept on a
    per-thread stack; every event is pushed, rotorq's or not, to keep starts and ends paired.
    """

    def __init__(self):
        self._local = threading.local()

    def _stack(self):
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def on_start(self, ev):
        self._stack().append((time.perf_counter(), _is_rotorq(ev.data["dispatcher"])))

    def on_end(self, ev):
        global _compile_seconds
        stack = self._stack()
        if not stack:
            return
        start, ours = stack.pop()
        # Event.is_failed is inverted in Numba (True when no exception); read the details.
        if not ours or getattr(ev, "_exc_details", None) is not None:
            return
        seconds = time.perf_counter() - start
        outermost = not any(is_ours for _, is_ours in stack)
        if outermost:
            _compile_seconds += seconds
        if logger.isEnabledFor(logging.INFO if outermost else logging.DEBUG):
            func = ev.data["dispatcher"].py_func
            signature = ", ".join(str(a) for a in ev.data["args"])
            logger.log(logging.INFO if outermost else logging.DEBUG,
                       "compiled %s.%s for (%s) in %.2f s",
                       func.__module__, func.__qualname__, signature, seconds)


_listener = _CompileListener()
event.register("numba:compile", _listener)
