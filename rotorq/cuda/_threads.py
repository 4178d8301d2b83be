"""How threads share work: row groups for per-vector kernels, key tiles for scoring kernels.

Row kernels (quantize, dequantize, rotate, WHT, QJL quantize) run on 2-D blocks:
``blockDim.x`` *lanes* (a power of two) cooperate on one vector and ``blockDim.y`` vectors
share a block. Each vector owns a slice of the block's dynamic shared memory
(:func:`row_scratch`). Functions that contain block barriers say so: every thread of the
block must call them, so rows past the end are *clamped* to the last row (``rr``) and only
``active`` threads write outputs.

Score kernels run on 1-D blocks of key threads: ``blockIdx.x`` is the key tile, ``blockIdx.y``
strides over output batches and ``blockIdx.z`` picks a chunk of at most :data:`MAX_QUERIES`
query rows, staged in shared memory once per (block, batch).

Lanes walk their share with ``while`` loops: ``range`` with a runtime step costs a 64-bit
division per loop on the GPU.
"""

import numba
from numba import cuda

from ._jit import device

MAX_QUERIES = 8
"""Query rows scored per code read (one register accumulator each)."""


@device
def row_thread(n):
    """This thread's ``(lane, lanes, row, clamped_row, active)`` in a row kernel over ``n`` rows."""
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    return lane, cuda.blockDim.x, row, min(row, n - 1), row < n


def row_scratch_bytes(lanes, rows, width):
    """Dynamic shared memory of a row kernel: per row ``lanes`` float64 + ``width`` float32 + uint8."""
    return rows * (8 * lanes + 5 * width)


@device
def row_scratch(width):
    """This row's views of the block's dynamic shared memory.

    Returns ``red`` float64 (lanes,) for :func:`row_sum`, ``buf`` float32 (width,) and ``idx``
    uint8 (width,). Block layout: ``[rows·lanes f64 | rows·width f32 | rows·width u8]``.
    """
    lanes = cuda.blockDim.x
    rows = cuda.blockDim.y
    t = cuda.threadIdx.y
    f64 = cuda.shared.array(0, numba.float64)
    f32 = cuda.shared.array(0, numba.float32)
    u8 = cuda.shared.array(0, numba.uint8)
    red = f64[t * lanes:(t + 1) * lanes]
    o32 = 2 * rows * lanes + t * width
    o8 = 8 * rows * lanes + 4 * rows * width + t * width
    return red, f32[o32:o32 + width], u8[o8:o8 + width]


@device
def row_sum(value, red, lane, lanes):
    """Sum ``value`` over the lanes of a row (float64, fixed tree order). Block barriers."""
    red[lane] = value
    cuda.syncthreads()
    h = lanes >> 1
    while h > 0:
        if lane < h:
            red[lane] += red[lane + h]
        cuda.syncthreads()
        h >>= 1
    total = red[0]
    cuda.syncthreads()
    return total


@device
def key_thread(n_keys, n_queries):
    """This thread's work in a score kernel (grid: key tiles × batches × query chunks).

    Returns ``(tid, threads, key, first_query, queries)``: the key index (may be ``>= n_keys``
    in the last tile) and the block's chunk of query rows. Blocks visit output batches
    ``blockIdx.y, blockIdx.y + gridDim.y, …``.
    """
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    key = cuda.blockIdx.x * threads + tid
    chunk = (n_queries + cuda.gridDim.z - 1) // cuda.gridDim.z
    first = cuda.blockIdx.z * chunk
    return tid, threads, key, first, max(0, min(chunk, n_queries - first))


@device
def stage_rows(src, batch, first, count, dst, tid, threads):
    """Block-cooperative copy ``dst[i·w + k] = src[batch, first + i, k]`` for ``i < count``."""
    w = src.shape[2]
    for i in range(count):
        k = tid
        while k < w:
            dst[i * w + k] = src[batch, first + i, k]
            k += threads
