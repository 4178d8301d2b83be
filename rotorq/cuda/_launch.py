"""Kernel launches with low host overhead, on the caller's current stream.

Each kernel is compiled by Numba once per argument signature and device
(:func:`numba.cuda.compile_ptx`, types from :func:`rotorq.cuda._jit.kernel_signature`). The PTX
is loaded with the CUDA driver through cupy (one module per kernel, argument types and
device) and launched with a single packed parameter buffer (``CU_LAUNCH_PARAM_BUFFER_POINTER``),
skipping Numba's generic dispatcher and its per-launch host cost (docs/gpu.md).

Numba's kernel ABI flattens a C-contiguous array argument into
``(meminfo, parent, nitems, itemsize, data, shape…, strides…)``, all 64-bit; scalars travel
as int64 or float64. :func:`_compile` checks the PTX parameter list against that layout.
"""

import array
import contextlib
import hashlib
import os
import re
import struct
import sys
import threading
import warnings

import cupy as cp
import numpy as np
from cupy.cuda import driver
from numba import cuda, types

from .. import config
from ._jit import kernel_signature

SHARED_LIMIT = 48 * 1024
"""Dynamic shared memory a block may use without opting in to more."""

_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(([^)]*)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(\w+)\s")
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0

RECORDER = None
"""None, or a list to which every launch through the PTX route is also appended as
``(function, grid, block, shared, stream pointer, parameter buffer, extra pointer)``:
``benchmarks/gpu/bench.py`` replays these to time kernels without the host work of a call."""

_functions: dict = {}
_streams: dict = {}
_lock = threading.Lock()


def torch_stream(device_id):
    """Torch's current stream on ``device_id`` as a cupy stream, when work must go there:
    cupy's current stream is the legacy default stream and torch (imported and initialized)
    has made another stream current. Else None (cupy's current stream is the one)."""
    if cp.cuda.get_current_stream().ptr != 0:
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object per call
    ptr = raw(device_id) if raw is not None else torch.cuda.current_stream(device_id).cuda_stream
    if not ptr:
        return None
    key = (device_id, ptr)
    stream = _streams.get(key)
    if stream is None:
        with warnings.catch_warnings():  # cupy 14 deprecates it; still the plain wrapper
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _streams[key] = cp.cuda.ExternalStream(ptr, device_id)
    return stream


def current_stream(device_id):
    """The stream to issue work on: cupy's current stream, unless it is the legacy default
    stream while torch has made another stream current on that device — then torch's."""
    return torch_stream(device_id) or cp.cuda.get_current_stream()


_SOURCES = None


def _cache_path(kern, sig, cc):
    """File of ``kern``'s PTX in the PTX cache (None when disabled): keyed by the
    generated source of :mod:`rotorq.cuda.gen` kernels, else by every source file of this
    package, plus the signature, the compute capability, the numba-cuda version and the
    compile options (launch bounds: one source may be compiled under several).

    The cache directory is :func:`rotorq.config.ptx_cache_dir` (``$ROTORQ_PTX_CACHE``). The
    generated kernels take seconds to compile, once per shape and machine."""
    root = config.ptx_cache_dir()
    if root is None:
        return None
    global _SOURCES
    ident = getattr(kern, "source", None)
    if ident is None:
        if _SOURCES is None:
            here = os.path.dirname(os.path.abspath(__file__))
            h = hashlib.sha256()
            for name in sorted(os.listdir(here)):
                if name.endswith(".py"):
                    with open(os.path.join(here, name), "rb") as f:
                        h.update(f.read())
            _SOURCES = h.hexdigest()
        ident = _SOURCES + kern.__name__
    import numba_cuda
    parts = [ident, repr(sig), repr(cc), getattr(numba_cuda, "__version__", "")]
    if _options(kern):
        parts.append(repr(sorted(_options(kern).items())))
    key = "|".join(parts)
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:32] + ".ptx")


def _options(kern):
    """Extra :func:`numba.cuda.compile_ptx` options of a kernel: ``launch_bounds`` (generated
    kernels cap their registers this way)."""
    bounds = getattr(kern, "launch_bounds", None)
    return {"launch_bounds": bounds} if bounds else {}


def compile_ptx(kern, sig, cc):
    """PTX of ``kern`` for the Numba types ``sig`` and compute capability ``cc``, through the
    on-disk cache of :func:`_cache_path`. Cached PTX declares ISA 8.0 (what sm_90 needs) so
    that PTX from a newer NVVM loads on an older driver."""
    path = _cache_path(kern, sig, cc)
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=cc, **_options(kern))
    if path:
        ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.0", ptx, count=1, flags=re.M)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(ptx)
        os.replace(tmp, path)
    return ptx


def _compile(kern, args, device_id):
    sig = kernel_signature(args)
    major, minor = divmod(int(cp.cuda.Device(device_id).compute_capability), 10)
    ptx = compile_ptx(kern, sig, (major, minor))
    entry = _ENTRY.search(ptx)
    params = _PARAM.findall(entry.group(2))
    expected = sum(5 + 2 * t.ndim if isinstance(t, types.Array) else 1 for t in sig)
    if len(params) != expected or any(p[1:] != "64" for p in params):
        raise RuntimeError(
            f"{kern.__name__}: unexpected PTX parameters {params} for {sig}")
    with cp.cuda.Device(device_id):
        try:
            module = driver.moduleLoadData(ptx.encode() + b"\0")
        except driver.CUDADriverError:
            if _cache_path(kern, sig, (major, minor)) is None:
                raise
            # a cached PTX this driver cannot load (e.g. from another NVVM): compile afresh
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(major, minor), **_options(kern))
            entry = _ENTRY.search(ptx)
            module = driver.moduleLoadData(ptx.encode() + b"\0")
        return module, driver.moduleGetFunction(module, entry.group(1))


_F64, _I64 = struct.Struct("<d"), struct.Struct("<q")
_NDARRAY = cp.ndarray
_TAIL = (_PARAM_BUFFER_POINTER, 0, _PARAM_BUFFER_SIZE, 0, _PARAM_END)


class View:
    """The C-contiguous cupy array ``base`` seen as ``dtype`` with ``shape``, as a kernel
    argument only: :func:`launch` packs it directly, where ``base.view(dtype).reshape(shape)``
    would build two cupy arrays (host time each).

    Parameters
    ----------
    base : cupy.ndarray
        C-contiguous.
    dtype : numpy.dtype
        Element type the kernel reads (a dtype instance).
    shape : tuple of int
        Shape in ``dtype`` elements, covering exactly ``base``'s bytes.

    Examples
    --------
    Packed code rows ``(BH, cap, nbytes)`` uint8 read as one row of uint32 words per head
    (needs a GPU)::

        words = View(codes, np.dtype(np.uint32), (n_bh, codes.nbytes // (4 * n_bh)))
    """

    __slots__ = ("base", "dtype", "itemsize", "ndim", "shape", "size", "strides")

    def __init__(self, base, dtype, shape):
        itemsize = dtype.itemsize
        if len(shape) == 2:  # the common case, without a loop
            size = shape[0] * shape[1]
            strides = (shape[1] * itemsize, itemsize)
        else:
            size, rev = 1, []
            for n in reversed(shape):
                rev.append(size * itemsize)
                size *= n
            strides = tuple(reversed(rev))
        if size * itemsize != base.nbytes or not base._c_contiguous:
            raise ValueError(f"View: shape {shape} of {dtype} does not cover the "
                             f"C-contiguous {base.nbytes} bytes of the base array")
        self.base, self.dtype, self.shape, self.ndim = base, dtype, shape, len(shape)
        self.itemsize, self.strides, self.size = itemsize, strides, size

    def array(self):
        """The same as a cupy array."""
        return self.base.view(self.dtype).reshape(self.shape)


def _pack(args):
    """One pass over ``args``: their type key (which compiled function), the parameter
    buffer followed by its size and the driver's ``extra`` list (int64), and ``extra``'s
    address."""
    vals = []
    ext = vals.extend
    key = []
    kadd = key.append
    for a in args:
        t = type(a)
        if t is _NDARRAY:
            ext((0, 0, a.size, a.itemsize, a.data.ptr))
            shape = a.shape
            ext(shape)
            ext(a.strides)
            kadd(a.dtype.char)
            kadd(len(shape))
        elif t is View:
            ext((0, 0, a.size, a.itemsize, a.base.data.ptr))
            ext(a.shape)
            ext(a.strides)
            kadd(a.dtype.char)
            kadd(a.ndim)
        elif t is int or t is bool:
            vals.append(int(a))
            kadd(False)
        elif isinstance(a, (float, np.floating)):  # float64, as kernel_signature types it
            vals.append(_I64.unpack(_F64.pack(float(a)))[0])
            kadd(True)
        else:
            vals.append(int(a))
            kadd(False)
    k = len(vals)
    vals.append(8 * k)
    ext(_TAIL)
    mem = array.array("q", vals)
    base = mem.buffer_info()[0]
    mem[k + 2] = base
    mem[k + 4] = base + 8 * k
    return tuple(key), mem, base + 8 * (k + 1)


def _function(kern, device_id, types_, args):
    """The driver function of ``kern`` for arguments of type key ``types_`` (from
    :func:`_pack`) on ``device_id``: ``(module, function)``, compiled on first use."""
    key = (kern, device_id, types_)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            if key not in _functions:
                _functions[key] = _compile(kern, args, device_id)
        fn = _functions[key]
    return fn


_CAPTURES: dict = {}


@contextlib.contextmanager
def capture():
    """Record instead of launch: within the block, every :func:`launch` on this thread is
    appended to the yielded list as ``(kern, grid, block, shared, args)`` and not issued
    (a dry run: the outputs a backend function allocates stay unwritten). Other threads
    launch as usual.

    Examples
    --------
    The launches of a backend call, to prepare them (needs a GPU)::

        with capture() as launches:
            out = api.scores(qrot, None, qmap, codes, norms, None, None, kmap, cent, 3, 0.0)
        prepared = [Prepared(*spec) for spec in launches]
    """
    ident = threading.get_ident()
    if ident in _CAPTURES:
        raise RuntimeError("capture() blocks do not nest")
    launches = _CAPTURES[ident] = []
    try:
        yield launches
    finally:
        del _CAPTURES[ident]


def _arg_words(a):
    t = type(a)
    if t is _NDARRAY or t is View:
        return 5 + 2 * a.ndim
    return 1


class Prepared:
    """One kernel launch packed once, relaunched with new data pointers of chosen arguments.

    Built from the arguments of :func:`launch` on the device current at construction; the
    kernel is compiled or looked up as :func:`launch` does. A call writes the given
    pointers into the packed parameter buffer (the data word of each argument in
    ``patch``, nothing else) and launches. The arrays of ``args`` outside ``patch`` are
    kept alive (``args``); those in ``patch`` stand for arrays of the same shape, dtype and
    device passed per call, which the caller keeps alive until the kernel has run.

    Parameters
    ----------
    kern, grid, block, shared, args
        As :func:`launch`.
    patch : sequence of int
        Positions in ``args`` of the array arguments whose data pointer changes per call.
    device_id : int, optional
        The device the launches go to (default: the current one).

    Examples
    --------
    Score other queries of the same shape into another output (needs a GPU)::

        p = Prepared(kern, grid, block, shared, (qrot, qmap, codes, norms, out), patch=(0, 4))
        p(cp.cuda.get_current_stream().ptr, qrot2.data.ptr, out2.data.ptr)
    """

    __slots__ = ("args", "block", "device_id", "extra", "fn", "grid", "kern", "mem", "shared",
                 "words")

    def __init__(self, kern, grid, block, shared, args, patch=(), device_id=None):
        types_, self.mem, self.extra = _pack(args)
        self.device_id = cp.cuda.runtime.getDevice() if device_id is None else device_id
        self.fn = _function(kern, self.device_id, types_, args)[1]
        starts, at = [], 0
        for a in args:
            starts.append(at)
            at += _arg_words(a)
        words = []
        for i in patch:
            if _arg_words(args[i]) == 1:
                raise TypeError(f"Prepared: argument {i} of {kern.__name__} is not an array")
            words.append(starts[i] + 4)  # (meminfo, parent, nitems, itemsize, data, …)
        self.words = tuple(words)
        self.args = tuple(None if i in patch else a for i, a in enumerate(args))
        self.kern, self.grid, self.block, self.shared = kern, grid, block, shared

    def __call__(self, stream_ptr, *ptrs):
        """Launch on the stream ``stream_ptr`` (an int; 0: the legacy default stream) with
        the data pointers ``ptrs``, one per position of ``patch`` in its order."""
        mem = self.mem
        for w, p in zip(self.words, ptrs, strict=True):
            mem[w] = p
        g, b = self.grid, self.block
        driver.launchKernel(self.fn, g[0], g[1], g[2], b[0], b[1], 1, self.shared, stream_ptr,
                            0, self.extra)
        if RECORDER is not None:  # a copy: later calls patch this buffer
            mem = array.array("q", mem)
            k = mem[-6] // 8
            base = mem.buffer_info()[0]
            mem[k + 2], mem[k + 4] = base, base + 8 * k
            RECORDER.append((self.fn, g, b, self.shared, stream_ptr, mem, base + 8 * (k + 1)))


def launch(kern, grid, block, shared, args):
    """Launch the Numba kernel ``kern`` on cupy's current device and stream.

    Parameters
    ----------
    kern : numba.cuda dispatcher
        A ``@cuda.jit`` kernel of :mod:`rotorq.cuda`.
    grid : tuple of int
        ``(x, y, z)`` grid dimensions.
    block : tuple of int
        ``(x, y)`` block dimensions.
    shared : int
        Dynamic shared memory in bytes.
    args : tuple
        C-contiguous cupy arrays, :class:`View` of them, ints (bools included) and floats.

    Within :func:`capture` on this thread the launch is recorded and not issued.
    """
    if _CAPTURES:
        cap = _CAPTURES.get(threading.get_ident())
        if cap is not None:
            cap.append((kern, grid, block, shared, args))
            return
    stream = cp.cuda.get_current_stream()
    types_, _keepalive, extra = _pack(args)  # the buffer lives until the driver copied it
    fn = _function(kern, cp.cuda.runtime.getDevice(), types_, args)
    driver.launchKernel(fn[1], grid[0], grid[1], grid[2], block[0], block[1], 1, shared,
                        stream.ptr, 0, extra)
    if RECORDER is not None:
        RECORDER.append((fn[1], grid, block, shared, stream.ptr, _keepalive, extra))


def registers():
    """Registers per thread of every kernel compiled so far: ``{kernel name: [counts]}``."""
    out: dict = {}
    for (kern, _, _), (_, fn) in _functions.items():
        out.setdefault(kern.__name__, []).append(driver.funcGetAttribute(4, fn))  # NUM_REGS
    return out
