"""The CUDA backend functions: the same names, signatures and results as :mod:`rotorq.cpu`,
on cupy arrays, computed by the ``@cuda.jit`` kernels of this package.

Inputs are cupy arrays (:func:`view` turns torch tensors and other DLPack / CUDA-array-interface
objects into cupy arrays without copying). Work runs on the input's device and on the
caller's current stream (:func:`rotorq.cuda._launch.current_stream`); outputs are new cupy
arrays. Kernels read float16, float32 and float64 directly; bfloat16 is widened to float32 by
:func:`view`.
"""

import dataclasses
import functools
import sys

import cupy as cp
import numpy as np
from array_api_compat import is_torch_array

from .. import tiles as _tiles
from .._ops import Partial, RotatedQuery
from . import attention as _att
from . import bits as _bits
from . import dequantize as _dq
from . import merge as _merge
from . import qjl as _qjl
from . import quantize as _q
from . import rotate as _rot
from . import rotor as _rotor
from . import scores as _sc
from . import wht as _wht
from ._launch import SHARED_LIMIT, View, current_stream, launch, torch_stream
from ._threads import MAX_QUERIES, row_scratch_bytes
from .gen import attention as _gen_att
from .gen import key_bias as _gen_bias
from .gen import quantize as _gen_quantize
from .gen import quantize_rotor as _gen_rotor
from .gen import row_tiles as _row_tiles
from .gen import score_tiles as _score_tiles
from .gen import scores_group as _gen_group
from .gen import scores_one as _gen_one
from .gen import scores_rows as _gen_rows
from .gen import wht as _gen_wht

xp = cp
name = "cuda"

THREADS = 256
"""Threads per block of row kernels."""
ELEMENTS_PER_LANE = 16
"""Coordinates per lane in row kernels (lanes per row: a power of two, at most 32)."""
KEY_THREADS = 128
"""Threads (keys) per block of score kernels."""
MAX_GRID_YZ = 65535

_FLOATS = (cp.dtype(cp.float16), cp.dtype(cp.float32), cp.dtype(cp.float64))
_bf16_to_f32 = cp.ElementwiseKernel(
    "uint16 h", "float32 f", "f = __uint_as_float(((unsigned int)h) << 16)",
    "rotorq_bfloat16_to_float32")


def view(x, name="x"):
    """``x`` as a cupy array on its device, without copying (bfloat16: widened to float32).

    Accepts cupy arrays, torch CUDA tensors, and objects with ``__dlpack__`` or
    ``__cuda_array_interface__``.
    """
    if isinstance(x, cp.ndarray):
        return x
    if is_torch_array(x):
        torch = sys.modules["torch"]
        if x.requires_grad:
            x = x.detach()
        if x.dtype == torch.bfloat16:
            with cp.cuda.Device(x.device.index or 0):
                return _bf16_to_f32(cp.from_dlpack(x.view(torch.int16)).view(cp.uint16))
        return cp.from_dlpack(x)
    try:
        if hasattr(x, "__dlpack__"):
            return cp.from_dlpack(x)
        return cp.asarray(x)
    except (TypeError, BufferError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name}: cannot view this array as a cupy array: {exc}") from exc


def _on_device(fn):
    """Run a backend function on its first argument's device and the caller's stream."""
    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device_id = first.device.id
        if device_id != cp.cuda.runtime.getDevice():
            with cp.cuda.Device(device_id), current_stream(device_id):
                return fn(first, *args, **kwargs)
        stream = torch_stream(device_id)
        if stream is None:  # the common case: no context to enter
            return fn(first, *args, **kwargs)
        with stream:
            return fn(first, *args, **kwargs)
    return run


def _empty(shape, dtype):
    """Every output array is allocated here (the GPU tests poison it)."""
    return cp.empty(shape, dtype)


def _rows(x):
    if x.dtype not in _FLOATS:
        x = x.astype(cp.float32)
    return cp.ascontiguousarray(x)


def _contiguous(a):
    return cp.ascontiguousarray(a)


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _row_launch(kern, n, width, args, scratch=True):
    """Launch a row kernel over ``n`` rows: about :data:`ELEMENTS_PER_LANE` coordinates per
    lane, :data:`THREADS` threads per block and, with ``scratch``, the shared memory of
    ``width``-long rows."""
    if n == 0:
        return
    lanes = min(32, _pow2(-(-width // ELEMENTS_PER_LANE)))
    rows = THREADS // lanes
    shared = 0
    if scratch:
        per_row = row_scratch_bytes(lanes, 1, width)
        if per_row > SHARED_LIMIT:
            raise ValueError(f"{kern.__name__}: rows of {width} coordinates exceed the CUDA "
                             f"kernels' shared-memory limit ({SHARED_LIMIT // 5} coordinates)")
        rows = min(rows, SHARED_LIMIT // per_row)
        shared = rows * per_row
    launch(kern, (-(-n // rows), 1, 1), (lanes, rows), shared, args)


def _score_launch(kern, out, per_query, levels, args):
    """Launch a score kernel writing ``out`` (B, M, N); ``per_query`` float32 staged per query."""
    n_b, n_m, n_keys = out.shape
    if out.size == 0:
        return
    chunk = min(MAX_QUERIES, n_m, (SHARED_LIMIT // 4 - levels) // per_query)
    if chunk < 1:
        raise ValueError(f"{kern.__name__}: {per_query} query coordinates exceed the CUDA "
                         "kernels' shared-memory limit")
    chunks = -(-n_m // chunk)
    if chunks > MAX_GRID_YZ:
        raise ValueError(f"{kern.__name__}: at most {MAX_GRID_YZ * chunk} query rows per call")
    chunk = -(-n_m // chunks)  # the kernel's own chunk (key_thread), never larger
    launch(kern, (-(-n_keys // KEY_THREADS), min(n_b, MAX_GRID_YZ), chunks), (KEY_THREADS, 1),
           4 * (chunk * per_query + levels), args)


GENERATED_MIN_ROWS = 8192
"""Rows from which the WHT and quantize run the generated tiled kernels
(:mod:`rotorq.cuda.gen.wht`, :mod:`~rotorq.cuda.gen.quantize`,
:mod:`~rotorq.cuda.gen.quantize_rotor`) where they apply; each shape compiles once, and below
this size the generic kernels are as fast."""
GENERATED_MIN_KEYS = 8192
"""Keys from which MSE scores run the generated kernels (:func:`_generated_score_kernel`)."""
ROWS_SCORE_THREADS = 128
"""Threads per block of the unrolled score kernel (:mod:`rotorq.cuda.gen.scores_rows`)."""
ROWS_SCORE_BLOCKS_PER_SM = 16
"""Resident blocks per SM the persistent grid of that kernel aims at."""


@cp.memoize(for_each_device=True)
def _sm_count():
    """Streaming multiprocessors of the current device (cached per device)."""
    return cp.cuda.Device().attributes["MultiProcessorCount"]


_U32, _U16 = np.dtype(np.uint32), np.dtype(np.uint16)


def _flat(a, dtype=None):
    """Kernel argument: the C-contiguous ``a`` as one axis of ``dtype`` (default its own),
    packed without building cupy views (:class:`rotorq.cuda._launch.View`)."""
    dtype = a.dtype if dtype is None else dtype
    return View(a, dtype, (a.nbytes // dtype.itemsize,))


def _rows_of(a, dtype, lead):
    """Kernel argument: the C-contiguous ``a`` as ``(lead, ·)`` elements of ``dtype``."""
    return View(a, dtype, (lead, a.nbytes // (lead * dtype.itemsize)))


def codes_words(codes):
    """Packed code rows (…, nbytes), nbytes a multiple of 4, as uint32 words."""
    return _contiguous(codes).view(cp.uint32)


def _words(rows):
    """Packed rows (…, nbytes) as uint32 words when whole words (fewer loads), else bytes."""
    rows = _contiguous(rows)
    return rows.view(cp.uint32) if rows.shape[-1] % 4 == 0 else rows


def _tiled_launch(kern, n, args):
    """Launch a tiled row kernel (:mod:`rotorq.cuda.gen.row_tiles`) over ``n`` rows: a
    persistent grid of the blocks that fit on the device at once (each strides over tiles)."""
    tiles = -(-n // kern.rows_per_tile)
    grid = max(1, min(tiles, _sm_count() * kern.blocks_per_sm))
    launch(kern, (grid, 1, 1), (kern.threads, 1), 0, args)


@_on_device
def rotate(x, rot, scale=1.0):
    """Rows ``x`` (n, d) → rotated rows (n, D) float32, times ``scale`` (in the kernel)."""
    x = _rows(x)
    p = rot.params(cp)
    if rot.kind == "dense":
        out = _contiguous(x.astype(cp.float32, copy=False) @ p["matrix"].T)
        if scale != 1.0:
            out *= np.float32(scale)
        return out
    out = _empty((x.shape[0], rot.stored_dim), cp.float32)
    if rot.kind == "hadamard":
        _row_launch(_rot.rotate_hadamard, x.shape[0], rot.stored_dim,
                    (x, p["signs"], float(scale), out))
    else:
        _row_launch(_rot.rotate_rotor, x.shape[0], rot.stored_dim,
                    (x, p["mats"], float(scale), out), scratch=False)
    return out


@_on_device
def unrotate(y, rot):
    """Rotated rows ``y`` (n, D) → rows (n, d) float32."""
    y = _contiguous(y.astype(cp.float32, copy=False))
    p = rot.params(cp)
    if rot.kind == "dense":
        return _contiguous(y @ p["matrix"])
    out = _empty((y.shape[0], rot.dim), cp.float32)
    if rot.kind == "hadamard":
        _row_launch(_rot.unrotate_hadamard, y.shape[0], rot.stored_dim, (y, p["signs"], out))
    else:
        _row_launch(_rot.unrotate_rotor, y.shape[0], rot.stored_dim, (y, p["mats"], out),
                    scratch=False)
    return out


@_on_device
def quantize(x, rot, boundaries, centroids, bits, norm_correction, sketch):
    """Fused quantization of rows ``x``; ``sketch`` (m, D) float32 or None.

    Returns ``codes, norms, qjl_signs, qjl_norms`` (the last two empty without a sketch).
    """
    x = _rows(x)
    n = x.shape[0]
    stored_dim = rot.stored_dim
    sk = _empty((0, 1), cp.float32) if sketch is None else _contiguous(sketch)
    m = sk.shape[0]
    nbytes = (stored_dim * bits + 7) // 8
    norms = _empty(n, cp.float32)
    signs = _empty((n, (m + 7) // 8), cp.uint8)
    qjl_norms = _empty(n, cp.float32)
    p = rot.params(cp)
    if n >= GENERATED_MIN_ROWS and x.ndim == 2 and _gen_rotor.applies(
            rot.kind, x.shape[1], stored_dim, bits, x.dtype, m):
        half = x.dtype == cp.float16
        kern = _gen_rotor.kernel(x.shape[1], int(bits), half, bool(norm_correction))
        whole = _empty((_gen_rotor.padded_rows(n), nbytes), cp.uint8)  # whole tiles written
        _tiled_launch(kern, n, (_flat(x, _U32 if half else None), _flat(_contiguous(p["mats"])),
                                _contiguous(boundaries), _contiguous(centroids),
                                _flat(whole, _U32), norms))
        qjl_norms.fill(0)
        return (whole if whole.shape[0] == n else whole[:n]), norms, signs, qjl_norms
    codes = _empty((n, nbytes), cp.uint8)
    tail = (_contiguous(boundaries), _contiguous(centroids), int(bits), int(norm_correction),
            sk, codes, norms, signs, qjl_norms)
    if n >= GENERATED_MIN_ROWS and x.ndim == 2 and _gen_quantize.applies(
            rot.kind, x.shape[1], stored_dim, bits, x.dtype, m):
        half = x.dtype == cp.float16
        word_out = codes.shape[1] % 4 == 0
        kern = _gen_quantize.kernel(x.shape[1], stored_dim, int(bits), half,
                                    bool(norm_correction), word_out)
        _tiled_launch(kern, n, (_flat(x, _U32 if half else None), p["signs"],
                                _contiguous(boundaries), _contiguous(centroids),
                                _flat(codes, _U32 if word_out else None), norms))
        qjl_norms.fill(0)
        return codes, norms, signs, qjl_norms
    if rot.kind == "hadamard":
        _row_launch(_q.quantize_hadamard, n, stored_dim, (x, p["signs"]) + tail)
    elif rot.kind == "rotor":
        _row_launch(_q.quantize_rotor, n, stored_dim, (x, p["mats"]) + tail)
    else:
        _row_launch(_q.quantize_rotated, n, stored_dim, (rotate(x, rot),) + tail)
    return codes, norms, signs, qjl_norms


@_on_device
def dequantize(codes, norms, rot, centroids, bits):
    """Reconstruct rows (n, d) float32 from packed codes and norms."""
    codes, norms, centroids = _contiguous(codes), _contiguous(norms), _contiguous(centroids)
    n = codes.shape[0]
    p = rot.params(cp)
    if rot.kind == "dense":
        return unrotate(dequantize_rotated(codes, norms, rot.stored_dim, centroids, bits), rot)
    out = _empty((n, rot.dim), cp.float32)
    if rot.kind == "hadamard":
        _row_launch(_dq.dequantize_hadamard, n, rot.stored_dim,
                    (codes, norms, p["signs"], centroids, int(bits), out))
    else:
        _row_launch(_dq.dequantize_rotor, n, rot.stored_dim,
                    (codes, norms, p["mats"], centroids, int(bits), out))
    return out


@_on_device
def dequantize_rotated(codes, norms, stored_dim, centroids, bits):
    """Reconstructions in the rotated domain, (n, D) float32 (``stored_dim``: the stored
    dimension D; the name is the backend contract's)."""
    codes = _contiguous(codes)
    out = _empty((codes.shape[0], stored_dim), cp.float32)
    _row_launch(_dq.dequantize_rotated, codes.shape[0], stored_dim,
                (codes, _contiguous(norms), _contiguous(centroids), int(bits), out), scratch=False)
    return out


@functools.cache
def _generated_score_kernel(stored_dim, bits, n_m):
    """``(kernel, query rows per z-block or 0)`` of the generated MSE score kernel for ``n_m``
    query rows (``n_m`` up to 8; more take chunks of 8), or None where none applies.

    The tiled kernels (:mod:`rotorq.cuda.gen.score_tiles`: codes staged through shared memory
    with coalesced loads; one query row: lookup tables, float32 at 2 and 4 bits, float16 at 3
    bits; 2–8 rows per pass: tensor cores; float16 paths score within ~1e-3 of the float32
    path relative to the largest score, :func:`~rotorq.cuda.gen.score_tiles.tolerance`) take
    every shape they apply to: they are the faster where both apply (benchmarks/RESULTS.md,
    "GPU kernels"). The
    unrolled one-key-per-thread kernel (:mod:`rotorq.cuda.gen.scores_rows`) takes the other
    MSE shapes it applies to (1-bit codes; 2–8 rows where ``D·bits`` is not a multiple of 128,
    e.g. D = 64 at 3 bits), where it is faster than the generic kernel of
    :mod:`rotorq.cuda.scores`."""
    if _score_tiles.applies(stored_dim, bits, n_m):
        if n_m == 1:
            return _gen_one.kernel(stored_dim, bits), 1
        return _gen_group.kernel(stored_dim, bits), _score_tiles.MAX_ROWS
    queries = _gen_rows.score_queries(stored_dim, bits, n_m)
    if queries:
        return _gen_rows.kernel(stored_dim, bits, queries), queries
    return None


def _generated_scores(kern, per_z, qrot, qmap, codes, norms, kmap, centroids, out):
    """Launch a generated score kernel on a persistent grid (blocks stride over key tiles)."""
    n_b, n_m, n_keys = out.shape
    chunks = -(-n_m // per_z)
    if isinstance(kern.spec, _gen_rows.ScoresRowsSpec):  # codes as (Bk, N, W) words
        threads, per_sm = ROWS_SCORE_THREADS, ROWS_SCORE_BLOCKS_PER_SM
        per_block = threads * kern.keys_per_thread
        words = codes_words(codes)
    else:  # tiled: the codes as one flat array of words
        per_block, threads, per_sm = kern.keys_per_tile, kern.threads, kern.launch_bounds[1]
        words = _flat(_contiguous(codes), _U32)
    tiles = -(-n_keys // per_block)
    gx = max(1, min(tiles, _sm_count() * per_sm // max(1, n_b * chunks)))
    launch(kern, (gx, min(n_b, MAX_GRID_YZ), chunks), (threads, 1), 0,
           (qrot, _contiguous(qmap), words, _contiguous(norms), _contiguous(kmap),
            _contiguous(centroids), out))


@_on_device
def scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, bits,
           qjl_scale):
    """Scores (B, M, N) of rotated queries (Bq, M, D) against packed keys (Bk, N, ·)."""
    qrot = _contiguous(qrot.astype(cp.float32, copy=False))
    out = _empty((qmap.shape[0], qrot.shape[1], codes.shape[1]), cp.float32)
    head = (qrot,)
    keys = (_contiguous(qmap), _words(codes), _contiguous(norms))
    tail = (_contiguous(kmap), _contiguous(centroids), int(bits))
    levels = centroids.shape[0]
    _, n_m, n_keys = out.shape
    words_ok = (codes.shape[-1] % 4 == 0 and codes.shape[-1] * 8 == qrot.shape[2] * int(bits))
    if qsketch is None and n_keys >= GENERATED_MIN_KEYS and words_ok:
        chosen = _generated_score_kernel(qrot.shape[2], int(bits), min(n_m, 8))
        if chosen is not None:
            if out.size:
                _generated_scores(*chosen, qrot, qmap, codes, norms, kmap, centroids, out)
            return out
    if qsketch is None:
        _score_launch(_sc.scores_mse, out, qrot.shape[2], levels, head + keys + tail + (out,))
    else:
        qsketch = _contiguous(qsketch.astype(cp.float32, copy=False))
        _score_launch(_sc.scores_prod, out, qrot.shape[2] + qsketch.shape[2], levels,
                      (qrot, qsketch) + keys + (_words(signs), _contiguous(qjl_norms)) + tail
                      + (float(qjl_scale), out))
    return out


_F32 = np.dtype(np.float32)


@_on_device
def qjl_quantize(x, sketch):
    """Packed ``sign(sketch @ x)`` and norms of rows ``x``."""
    x = _rows(x)
    sketch = _contiguous(sketch)
    signs = _empty((x.shape[0], (sketch.shape[0] + 7) // 8), cp.uint8)
    norms = _empty(x.shape[0], cp.float32)
    _row_launch(_qjl.qjl_quantize, x.shape[0], x.shape[1], (x, sketch, signs, norms))
    return signs, norms


@_on_device
def qjl_scores(qsketch, qmap, signs, norms, kmap, scale):
    """QJL estimates (B, M, N) from sketched queries (Bq, M, m) and packed signs."""
    qsketch = _contiguous(qsketch.astype(cp.float32, copy=False))
    out = _empty((qmap.shape[0], qsketch.shape[1], signs.shape[1]), cp.float32)
    _score_launch(_qjl.qjl_scores, out, qsketch.shape[2], 0,
                  (qsketch, _contiguous(qmap), _words(signs), _contiguous(norms),
                   _contiguous(kmap), float(scale), out))
    return out


@_on_device
def wht(x, out_dtype=None):
    """Orthonormal WHT of rows (n, D), D a power of two; float32 out (or ``out_dtype``:
    float16 input may give float16 output, rounded once from the float32 result)."""
    x = _rows(x)
    out = _empty(x.shape, cp.float32 if out_dtype is None else out_dtype)
    n, width = x.shape
    half_in, half_out = x.dtype == cp.float16, out.dtype == cp.float16
    if (n >= GENERATED_MIN_ROWS and _row_tiles.applies(width)
            and x.dtype in (cp.float16, cp.float32) and out.dtype in (cp.float16, cp.float32)):
        kern = _gen_wht.kernel(width, half_in, half_out)
        _tiled_launch(kern, n, (_flat(x, _U32 if half_in else None),
                                _flat(out, _U32 if half_out else None)))
    else:
        _row_launch(_wht.wht, n, width, (x, out))
    return out


@_on_device
def unpack_codes(codes, bits, count):
    """Unpack rows of packed codes into uint8 (n, count)."""
    codes = _contiguous(codes)
    out = _empty((codes.shape[0], count), cp.uint8)
    _row_launch(_bits.unpack_codes, codes.shape[0], count, (codes, int(bits), int(count), out),
                scratch=False)
    return out


@_on_device
def rotor_roundtrip(x, rot, boundaries, centroids, norm_correction):
    """Rotor-quantized reconstructions (n, d) float32 of rows ``x``, in one fused kernel."""
    x = _rows(x)
    out = _empty((x.shape[0], rot.dim), cp.float32)
    _row_launch(_rotor.rotor_roundtrip, x.shape[0], rot.stored_dim,
                (x, rot.params(cp)["mats"], _contiguous(boundaries), _contiguous(centroids),
                 int(norm_correction), out))
    return out



ATTENTION_THREADS = 64
"""Threads (tokens per tile) of the general decode-attention kernel."""
ATTENTION_FAST = True
"""Use the generated tensor-core kernel (:mod:`rotorq.cuda.gen.attention`) where it applies
(fp16 MMA inputs, fp32 accumulation: outputs within ~1e-3 of the float32 path); ``False``:
always the general float32 kernel (:func:`rotorq.cuda.attention.decode_attention`)."""
KEY_BIAS_MMA = True
"""On the tensor-core path, compute the RoPE-aware key-offset term with
:mod:`rotorq.cuda.gen.key_bias` (fp16 MMAs) where it applies; ``False``: one thread per key,
float32 sines and cosines (:func:`rotorq.cuda.attention.key_bias_scores`)."""


@functools.cache
def _attention_kernel(key_dim, key_bits, value_dim, value_bits, bias, tiled):
    """The tensor-core attention kernel of one shape (looked up once per decode call)."""
    return _gen_att.kernel(key_dim, key_bits, value_dim, value_bits, bias=bias, tiled=tiled)


@cp.memoize(for_each_device=True)
def _att_placeholders(n_bh, n_rows):
    """Arguments standing for absent parts of :func:`decode_attention` on the current device
    (uint8 codes, float16 norms, float32 centroids, a (BH, R, 0) query), cached per device."""
    return (cp.zeros((1, 1, 1), cp.uint8), cp.zeros((1, 1), cp.float16), cp.zeros(1, cp.float32),
            cp.zeros((n_bh, n_rows, 0), cp.float32))


def _contiguous_f16(a):
    if a.dtype == cp.float16 and a.flags.c_contiguous:
        return a
    return _contiguous(a.astype(cp.float16))


def _contiguous_f32(a):
    if a.dtype == cp.float32 and a.flags.c_contiguous:
        return a
    return _contiguous(a.astype(cp.float32))


def _att_splits(n_keys, n_bh, per_block, min_chunk, per_sm):
    """Tokens per split: about ``per_sm`` blocks per SM in all, at least ``min_chunk`` tokens
    each, a multiple of ``per_block``."""
    splits = max(1, min(-(-n_keys // min_chunk), -(-per_sm * _sm_count() // max(1, n_bh))))
    chunk = -(-n_keys // splits)
    return max(per_block, -(-chunk // per_block) * per_block)


def _key_bias_scores(key_bias, n_bh, n_rows, n_keys):
    """The RoPE-aware key-offset term of every key and row, (BH, n_keys, 8) float32 (rows
    past ``n_rows`` zero): on tensor cores (:mod:`rotorq.cuda.gen.key_bias`)
    up to 64 frequencies, else one thread per key
    (:func:`rotorq.cuda.attention.key_bias_scores`)."""
    ba, bb = _contiguous_f32(key_bias.cos_coef), _contiguous_f32(key_bias.sin_coef)
    freqs, pos0 = cp.ascontiguousarray(key_bias.freqs, dtype=cp.float64), key_bias.pos0
    n_freq = ba.shape[2]
    if KEY_BIAS_MMA and 0 < n_freq <= _gen_bias.BIAS_MAX_FREQ:
        kb = _empty((n_bh, n_keys, 8), cp.float32)
        tiles = _gen_bias.bias_tiles(n_keys, n_bh, _sm_count())
        n_tiles = -(-n_keys // 16)
        warps = -(-n_tiles // tiles)
        launch(_gen_bias.kernel(n_freq), (-(-warps // _gen_bias.BIAS_WARPS), n_bh, 1),
               (32 * _gen_bias.BIAS_WARPS, 1), 0,
               (ba, bb, freqs, int(pos0), int(n_keys), int(tiles), _flat(kb), int(n_keys)))
    else:
        kb = (_empty if n_rows == 8 else cp.zeros)((n_bh, n_keys, 8), cp.float32)
        launch(_att.key_bias_scores, (-(-n_keys // _att.BIAS_THREADS), n_bh, 1),
               (_att.BIAS_THREADS, 1), 8 * ba.shape[1] * max(1, n_freq),
               (ba, bb, freqs, int(pos0), int(n_keys), kb))
    return kb


def attention_layout(key_dim, key_bits, key_mode, value_dim, value_bits):
    """Storage layout of a KV cache's packed codes for :func:`decode_attention`: "tiles"
    (:mod:`rotorq.tiles`) when the tensor-core kernel takes the cache's single MSE key part
    and single value part, else "rows"."""
    if not (ATTENTION_FAST and key_mode == "mse" and _tiles.supported(key_dim, key_bits)
            and _tiles.supported(value_dim, value_bits)):
        return "rows"
    cfg = _gen_att.config(key_dim, key_bits, value_dim, value_bits,
                           key_dim * key_bits // 8, value_dim * value_bits // 8)
    return "rows" if cfg is None else "tiles"


def _row_groups(queries, keys, values, n_keys, n_q, causal_offset, key_bias, layout):
    """:func:`decode_attention` of more rows than the tensor-core kernel takes, as groups
    of at most :data:`~rotorq.cuda.gen.attention.ROWS` rows that keep a query head's
    queries together (``n_q ≤ 8``: whole heads; else runs of 8 queries of one head, the
    causal offset moved to the run's first query), results concatenated."""
    q0 = queries[0].rotated
    n_rows, cap = q0.shape[1], _gen_att.ROWS
    if n_q <= cap:
        step = cap // n_q * n_q
        groups = [(a, min(n_rows, a + step), n_q, causal_offset)
                  for a in range(0, n_rows, step)]
    else:  # row r = head·n_q + i sees keys t ≤ i + causal_offset
        groups = [(a, min(a + cap, (a // n_q + 1) * n_q), cap, causal_offset + a % n_q)
                  for h in range(0, n_rows, n_q) for a in range(h, h + n_q, cap)]
    outs, ms, ls = [], [], []
    for a, b, nq, off in groups:
        bias = None
        if key_bias is not None:
            bias = dataclasses.replace(key_bias, cos_coef=key_bias.cos_coef[:, a:b],
                                       sin_coef=key_bias.sin_coef[:, a:b])
        part = decode_attention((RotatedQuery(_contiguous(q0[:, a:b])),), keys, values, n_keys,
                                nq, off, key_bias=bias, layout=layout)
        outs.append(part.accs[0])
        ms.append(part.max)
        ls.append(part.sum)
    return Partial((cp.concatenate(outs, axis=1),), cp.concatenate(ms, axis=1),
                   cp.concatenate(ls, axis=1))


def decode_attention(queries, keys, values, n_keys, n_q, causal_offset, key_bias=None,
                     layout="rows"):
    """Fused attention of rotated queries over packed keys and values (split-K, merged on
    the device); the contract is :func:`rotorq._ops.decode_attention`, on cupy arrays.
    With ``key_bias`` on the tensor-core path, the term is first computed for every key
    (:func:`_key_bias_scores`) and added to the MMA scores; more than 8 rows per KV head
    run as groups of rows (:func:`_row_groups`). ``layout="tiles"``: the codes and norms
    are in the tile layout (:mod:`rotorq.tiles`); read in place by the tensor-core kernel,
    converted to rows for the general one."""
    q0, qs0 = queries[0].rotated, queries[0].sketch
    device = q0.device
    if layout not in ("rows", "tiles"):
        raise ValueError(f"layout must be 'rows' or 'tiles', got {layout!r}")
    with device, current_stream(device.id):
        n_bh, n_rows = q0.shape[0], q0.shape[1]
        u8, f16, f32, empty_q = _att_placeholders(n_bh, n_rows)
        q1, qs1 = ((queries[1].rotated, queries[1].sketch) if len(queries) > 1
                   else (empty_q, None))

        def qarr(a):
            return empty_q if a is None else _contiguous_f32(a)

        def kpart(i):
            if i >= len(keys):
                return u8, f16, u8, f16, f32, 1, 0.0
            k = keys[i]
            signs, qn, scale = u8, f16, 0.0
            if k.prod:
                signs, qn, scale = _words(k.signs), _contiguous_f16(k.qjl_norms), k.qjl_scale
            return (_words(k.codes), _contiguous_f16(k.norms), signs, qn,
                    _contiguous_f32(k.centroids), int(k.bits), float(scale))

        def vpart(i):
            if i >= len(values):
                return u8, f16, f32, 1, 0
            v = values[i]
            codes = v.codes if v.codes.flags.c_contiguous else _contiguous(v.codes)
            return (codes, _contiguous_f16(v.norms), _contiguous_f32(v.centroids), int(v.bits),
                    int(v.stored_dim))

        v0, v1 = vpart(0), vpart(1)
        qargs = (qarr(q0), qarr(q1), qarr(qs0), qarr(qs1))
        k0, k1 = kpart(0), kpart(1)
        dk0, dk1 = qargs[0].shape[2], qargs[1].shape[2]
        fast = None
        if (ATTENTION_FAST and len(keys) == 1 and len(values) == 1 and qs0 is None
                and n_keys > 0):
            fast = _gen_att.config(dk0, k0[5], v0[4], v0[3], keys[0].codes.shape[-1],
                                    values[0].codes.shape[-1])
        if fast is not None and n_rows > _gen_att.ROWS:
            return _row_groups(queries, keys, values, n_keys, n_q, causal_offset, key_bias,
                               layout)
        tiled = layout == "tiles"
        if tiled and fast is None:
            keys, values = _tiles.attention_rows(cp, keys, values, n_keys, dk0)
            k0, v0, tiled = kpart(0), vpart(0), False
        if fast is not None:
            per_block = _gen_att.WARPS * 16
            chunk = _att_splits(n_keys, n_bh, per_block, 2 * per_block,
                                _gen_att.SPLIT_BLOCKS_PER_SM)
        else:
            threads = ATTENTION_THREADS
            chunk = _att_splits(n_keys, n_bh, threads, 256, 4)
        n_split = max(1, -(-n_keys // chunk))
        acc0 = _empty((n_bh, n_split, n_rows, v0[4]), cp.float32)
        acc1 = _empty((n_bh, n_split, n_rows, v1[4]), cp.float32)
        mx = _empty((n_bh, n_split, n_rows), cp.float32)
        sm = _empty((n_bh, n_split, n_rows), cp.float32)
        if fast is not None:
            kbias = ()
            if key_bias is not None:  # the key-offset term of every key, then the MMA kernel
                kbias = (_key_bias_scores(key_bias, n_bh, n_rows, n_keys),)
            kern = _attention_kernel(*fast, bool(kbias), tiled)
            scalars = (int(n_keys), int(n_q), int(causal_offset), int(chunk))
            if tiled:
                _tiled_attention(kern, n_split, qargs[0], k0[0], k0[1], k0[4], v0[0], v0[1],
                                 v0[2], kbias, scalars, acc0, mx, sm)
            else:
                launch(kern, (n_split, n_bh, 1), (32 * _gen_att.WARPS, 1), 0,
                       (qargs[0], _rows_of(k0[0], _U32, n_bh), k0[1], k0[4],
                        _rows_of(v0[0], _U16, n_bh), v0[1], v0[2],
                        *(_rows_of(b, _F32, n_bh) for b in kbias), *scalars, acc0, mx, sm))
        else:
            if key_bias is None:
                bias = (empty_q, empty_q, _empty((0,), cp.float64), 0)
            else:
                bias = (_contiguous_f32(key_bias.cos_coef), _contiguous_f32(key_bias.sin_coef),
                        cp.ascontiguousarray(key_bias.freqs, dtype=cp.float64),
                        int(key_bias.pos0))
            shared = 4 * _att.shared_floats(threads, dk0, dk1, qargs[2].shape[2],
                                            qargs[3].shape[2], v0[4], v1[4], 0,
                                            bias[2].shape[0])
            if shared > SHARED_LIMIT:
                raise ValueError("decode_attention: head dimensions too large for the CUDA "
                                 f"kernel's shared memory ({shared} > {SHARED_LIMIT} bytes)")
            launch(_att.decode_attention, (n_split, n_bh, 1), (threads, 1), shared,
                   (*qargs, *bias, *k0, *k1, *v0[:4], *v1[:4], int(n_keys), int(n_q),
                    int(causal_offset), int(chunk), acc0, acc1, mx, sm))
        out0 = _empty((n_bh, n_rows, v0[4]), cp.float32)
        out1 = _empty((n_bh, n_rows, v1[4]), cp.float32)
        m = _empty((n_bh, n_rows), cp.float32)
        lsum = _empty((n_bh, n_rows), cp.float32)
        cols, ys = _merge.MERGE_COLS, _merge.MERGE_ROWS
        launch(_merge.merge_splits, (max(1, -(-(v0[4] + v1[4]) // cols)), n_rows, n_bh),
               (cols, ys), 4 * _merge.merge_shared_floats(n_split, cols * ys),
               (mx, sm, acc0, acc1, out0, out1, m, lsum))
        return Partial((out0, out1)[:len(values)], m, lsum)


TILED_MAX_WORDS = 2**32 - 1
"""Most uint32 words of one flat code or norm array the tile-layout attention kernel indexes
(its offsets are 32-bit); tests lower it to exercise the launch per group of heads."""


def _tiled_attention(kern, n_split, q, kc, kn, kcent, vc, vn, vcent, kbias, scalars, acc, mx,
                     sm):
    """Launch the tensor-core kernel on a tile-layout cache: codes and norms as flat uint32
    words (the norms of tokens g, g + 8 in one word), which it indexes with 32-bit offsets —
    so heads go in groups whose arrays stay below 2^32 words (one launch below 16 GB)."""
    n_bh = q.shape[0]
    per = min(n_bh, max(1, TILED_MAX_WORDS // max(a.nbytes // (4 * n_bh) for a in (kc, vc, kn))))
    for lo in range(0, n_bh, per):
        hi = min(n_bh, lo + per)
        heads = [a if per == n_bh else a[lo:hi]
                 for a in (q, kc, kn, vc, vn, *kbias, acc, mx, sm)]
        qh, kch, knh, vch, vnh = heads[:5]
        flat = [View(a, _U32, (a.nbytes // 4,)) for a in (kch, knh, vch, vnh)]
        launch(kern, (n_split, hi - lo, 1), (32 * _gen_att.WARPS, 1), 0,
               (qh, flat[0], flat[1], kcent, flat[2], flat[3], vcent,
                *(_rows_of(b, _F32, hi - lo) for b in heads[5:-3]), *scalars, *heads[-3:]))


def _prefix_buffer(a):
    """``(buffer, n)``: a C-contiguous float32 array whose first ``n`` rows along axis 1 are
    ``a`` — ``a`` itself, the buffer ``a`` is a prefix view of (the KV cache's window), or
    a copy."""
    if a.dtype == cp.float32:
        if a.flags.c_contiguous:
            return a, a.shape[1]
        base = a.base
        if (base is not None and base.flags.c_contiguous and base.ndim == a.ndim
                and base.dtype == a.dtype and base.data.ptr == a.data.ptr
                and base.strides == a.strides and base.shape[0] == a.shape[0]
                and base.shape[2:] == a.shape[2:]):
            return base, a.shape[1]
    return _contiguous_f32(a), a.shape[1]


def exact_attention(q, ke, ve, pos, scale, n_q, offset, causal, partial=None):
    """Attention over uncompressed keys and values merged with the compressed part's
    partial sums, one launch; the contract is :func:`rotorq._ops.exact_attention`, on cupy
    arrays. Beyond the shared memory of one block (about 12K tokens) it runs as
    array operations (:func:`rotorq.reference.exact_attention`)."""
    device = q.device
    with device, current_stream(device.id):
        threads = _merge.EXACT_THREADS
        n_e = ke.shape[1]
        if 4 * _merge.exact_shared_floats(n_e, threads) > SHARED_LIMIT:
            from ..reference import exact_attention as ref
            merged = None if partial is None else (partial.accs[0], partial.max, partial.sum)
            return ref(cp, q, ke, ve, pos, scale, n_q, offset, causal, merged)
        q = _contiguous_f32(q)
        kb, _ = _prefix_buffer(ke)
        vb, _ = _prefix_buffer(ve)
        n_bh, n_rows = q.shape[0], q.shape[1]
        if partial is None:
            ph = _att_placeholders(1, 1)[2]
            acc_c, m_c, l_c, has_c = ph.reshape(1, 1, 1), ph.reshape(1, 1), ph.reshape(1, 1), 0
        else:
            acc_c, m_c, l_c = (_contiguous_f32(a)
                               for a in (partial.accs[0], partial.max, partial.sum))
            has_c = 1
        if pos.dtype != cp.int64 or not pos.flags.c_contiguous:
            pos = cp.ascontiguousarray(pos, dtype=cp.int64)
        out = _empty((n_bh, n_rows, vb.shape[2]), cp.float32)
        launch(_merge.exact_attention, (n_rows, n_bh, 1), (threads, 1),
               4 * _merge.exact_shared_floats(n_e, threads),
               (q, kb, vb, pos, int(n_e), float(scale), int(n_q), int(offset), int(bool(causal)),
                acc_c, m_c, l_c, has_c, out))
        return out



__all__ = [
    "attention_layout",
    "decode_attention",
    "dequantize",
    "dequantize_rotated",
    "exact_attention",
    "name",
    "qjl_quantize",
    "qjl_scores",
    "quantize",
    "rotate",
    "rotor_roundtrip",
    "scores",
    "unpack_codes",
    "unrotate",
    "view",
    "wht",
    "xp",
]
