"""Prepared score calls on the GPU: :class:`ScoresPlan` and :class:`QueryScoresPlan` run the
launches that :func:`rotorq.cuda.api.scores` (and :func:`~rotorq.cuda.api.rotate`) would
issue, packed once and patched with new data pointers per call
(:class:`rotorq.cuda._launch.Prepared`)."""

import math
import sys

import cupy as cp
import numpy as np
from array_api_compat import is_torch_array

from .._arrays import Origin, prepared_mismatch
from . import _launch as _ln
from . import api
from ._launch import Prepared, View, current_stream, torch_stream

_F32 = np.dtype(np.float32)


def _bind(launches, variables, device_id):
    """:class:`~rotorq.cuda._launch.Prepared` launches of ``launches`` (from
    :func:`~rotorq.cuda._launch.capture`): each array argument whose data pointer is that of
    one of ``variables`` is patched per call. Returns ``[(prepared, indices into variables),
    …]``."""
    where = {v.data.ptr: i for i, v in enumerate(variables) if v.size}
    bound, seen = [], set()
    for kern, grid, block, shared, args in launches:
        patch, which = [], []
        for j, a in enumerate(args):
            t = type(a)
            if t is cp.ndarray or t is View:
                i = where.get((a.base if t is View else a).data.ptr)
                if i is not None:
                    patch.append(j)
                    which.append(i)
        seen.update(which)
        bound.append((Prepared(kern, grid, block, shared, args, patch, device_id), tuple(which)))
    if bound and len(seen) != len(where):
        raise RuntimeError("prepared call: an array of the call does not reach its kernels in "
                           "place (converted or copied)")
    return bound


def _run(bound, stream_ptr, ptrs):
    for prep, which in bound:
        prep(stream_ptr, *[ptrs[i] for i in which])


def _mismatch(x, name, framework, device_id, shape, dtype):
    prepared_mismatch(x, name, Origin(framework, "cuda", device_id), shape,
                               dtype, True)


def _on_device_call(device_id, fn, *args):
    """``fn(stream pointer, *args)`` on ``device_id`` and the stream :func:`_on_device` runs
    backend functions on."""
    if device_id != cp.cuda.runtime.getDevice():
        with cp.cuda.Device(device_id):
            stream = current_stream(device_id)
            with stream:
                return fn(stream.ptr, *args)
    stream = torch_stream(device_id)
    if stream is None:
        return fn(cp.cuda.get_current_stream().ptr, *args)
    with stream:
        return fn(stream.ptr, *args)


class ScoresPlan:
    """:func:`~rotorq.cuda.api.scores` prepared for fixed keys and a fixed query shape: the checks, the choice
    of kernel and the packing of its arguments are done once; a call patches the query and
    output pointers into the packed arguments and launches.

    Parameters
    ----------
    qrot, qsketch : cupy.ndarray
        Examples of the rotated (and, in prod mode, sketched; else None) queries: only their
        shape, dtype and device count.
    qmap, codes, norms, signs, qjl_norms, kmap, centroids, nbits, qjl_scale
        As :func:`~rotorq.cuda.api.scores`; they must not change while the plan is used (``norms`` of
        another dtype or layout are converted once, here).

    Notes
    -----
    Calls on one device. The kernel and launch geometry are the ones :func:`~rotorq.cuda.api.scores` chooses
    (it runs once without launching, :func:`rotorq.cuda._launch.capture`), so the results
    are the same.

    Examples
    --------
    Score new rotated queries of the same shape (needs a GPU)::

        plan = ScoresPlan(qrot, None, qmap, codes, norms, None, None, kmap, cent, 3, 0.0)
        out = plan(qrot2)            # == api.scores(qrot2, None, qmap, codes, …)
        plan(qrot3, out=out)         # into a preallocated (B, M, N) float32 array
    """

    def __init__(self, qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids,
                 nbits, qjl_scale):
        self.device_id = dev = qrot.device.id
        self.qrot_spec = (tuple(qrot.shape), qrot.dtype)
        self.qsketch_spec = None if qsketch is None else (tuple(qsketch.shape), qsketch.dtype)
        self._keys = (qmap, codes, norms, signs, qjl_norms, kmap, centroids, nbits, qjl_scale)
        with cp.cuda.Device(dev):
            t_q = cp.empty(qrot.shape, cp.float32)
            t_s = None if qsketch is None else cp.empty(qsketch.shape, cp.float32)
            with _ln.capture() as launches:
                t_out = api.scores(t_q, t_s, *self._keys)
            self.out_shape = tuple(t_out.shape)
            variables = (t_q, t_out) if t_s is None else (t_q, t_s, t_out)
            self._launches = _bind(launches, variables, dev)

    def _operand(self, x, spec, name):
        shape, dtype = spec
        if (type(x) is not cp.ndarray or x.shape != shape or x.dtype != dtype
                or not x._c_contiguous or x.data.device_id != self.device_id):
            _mismatch(x, name, "cupy", self.device_id, shape, dtype)
        return x

    def __call__(self, qrot, qsketch=None, out=None):
        """Scores (B, M, N) float32 of ``qrot`` (and ``qsketch``), as :func:`~rotorq.cuda.api.scores`; into
        ``out`` when given (C-contiguous float32 of that shape on the plan's device).

        Raises
        ------
        TypeError, ValueError
            An array of another framework, device, shape, dtype or not C-contiguous.
        """
        self._operand(qrot, self.qrot_spec, "qrot")
        if self.qsketch_spec is not None:
            self._operand(qsketch, self.qsketch_spec, "qsketch")
        elif qsketch is not None:
            raise ValueError("qsketch: the plan was prepared without a sketch (MSE scores)")
        if out is not None:
            self._operand(out, (self.out_shape, _F32), "out")
        return _on_device_call(self.device_id, self._call, qrot, qsketch, out)

    def _call(self, stream_ptr, qrot, qsketch, out):
        if qrot.dtype != _F32:
            qrot = api._contiguous(qrot.astype(cp.float32))
        if out is None:
            out = api._empty(self.out_shape, cp.float32)
        if qsketch is None:
            _run(self._launches, stream_ptr, (qrot.data.ptr, out.data.ptr))
        else:
            if qsketch.dtype != _F32:
                qsketch = api._contiguous(qsketch.astype(cp.float32))
            _run(self._launches, stream_ptr, (qrot.data.ptr, qsketch.data.ptr, out.data.ptr))
        return out


class QueryScoresPlan:
    """TurboQuant scores of raw queries, prepared (the GPU side of
    :meth:`rotorq.TurboQuant.prepare_scores`): the rotation of the queries is a prepared
    launch of the kernel :func:`~rotorq.cuda.api.rotate` uses (the dense rotation stays a matrix product), the
    prod mode's sketch a matrix product, and the scores a :class:`ScoresPlan`.

    Parameters
    ----------
    queries : cupy.ndarray or torch.Tensor
        Example of the queries (…, m, d) on the device: its framework, shape, dtype and
        device are those of every call.
    rows : cupy.ndarray
        ``queries`` as :func:`~rotorq.cuda.api.view` sees it.
    rot : rotorq.rotation.Rotation
        The quantizer's rotation.
    sketch : cupy.ndarray or None
        The QJL matrix (m, D) in prod mode.
    qmap, codes, norms, signs, qjl_norms, kmap, centroids, nbits, qjl_scale
        As :func:`~rotorq.cuda.api.scores` (keys flattened to (Bk, N, ·)).
    out_shape : tuple of int
        Shape of the scores returned, ``(…, m, N)``.

    Notes
    -----
    The rotated queries go to a buffer per stream that every call reuses.
    """

    def __init__(self, queries, rows, rot, sketch, qmap, codes, norms, signs, qjl_norms, kmap,
                 centroids, nbits, qjl_scale, out_shape):
        self.device_id = dev = rows.device.id
        self.shape, self.dtype = tuple(queries.shape), queries.dtype
        self._torch = sys.modules["torch"] if is_torch_array(queries) else None
        self._widen = self._torch is not None and queries.dtype == self._torch.bfloat16
        if self._torch is not None:
            self._tdevice = queries.device
        self.out_shape = tuple(out_shape)
        self._rot = rot
        dim = self.shape[-1]
        n_rows = math.prod(self.shape[:-1])
        self._qrot_shape = (math.prod(self.shape[:-2]), self.shape[-2], rot.stored_dim)
        self._sketch_t = None if sketch is None else sketch.T
        self._scratch: dict = {}
        with cp.cuda.Device(dev):
            self._rotation = None
            if rot.kind != "dense":
                t_rows = cp.empty((n_rows, dim), rows.dtype)
                with _ln.capture() as launches:
                    t_rot = api.rotate(t_rows, rot)
                self._rotation = _bind(launches, (t_rows, t_rot), dev)
            t_qrot = cp.empty(self._qrot_shape, cp.float32)
            t_qsk = None if sketch is None else cp.empty(self._qrot_shape[:2] + sketch.shape[:1],
                                                         cp.float32)
            self._scores = ScoresPlan(t_qrot, t_qsk, qmap, codes, norms, signs, qjl_norms,
                                      kmap, centroids, nbits, qjl_scale)

    def __call__(self, queries, out=None):
        """Scores ``(…, m, N)`` float32 of ``queries`` in their framework, as
        :meth:`rotorq.TurboQuant.scores`; into ``out`` when given (C-contiguous float32 of
        that shape, same framework and device).

        Raises
        ------
        TypeError, ValueError
            An array of another framework, device, shape, dtype or not C-contiguous.
        """
        torch, dev = self._torch, self.device_id
        if torch is None:
            if (type(queries) is not cp.ndarray or queries.shape != self.shape
                    or queries.dtype != self.dtype or not queries._c_contiguous
                    or queries.data.device_id != dev):
                _mismatch(queries, "queries", "cupy", dev, self.shape, self.dtype)
            if out is not None and (type(out) is not cp.ndarray or out.shape != self.out_shape
                                    or out.dtype != _F32 or not out._c_contiguous
                                    or out.data.device_id != dev):
                _mismatch(out, "out", "cupy", dev, self.out_shape, _F32)
            return _on_device_call(dev, self._call, queries, queries.data.ptr, out)
        if (not isinstance(queries, torch.Tensor) or queries.shape != self.shape
                or queries.dtype != self.dtype or not queries.is_contiguous()
                or queries.get_device() != dev):
            _mismatch(queries, "queries", "torch", dev, self.shape, self.dtype)
        if out is not None and (not isinstance(out, torch.Tensor) or out.shape != self.out_shape
                                or out.dtype != torch.float32 or not out.is_contiguous()
                                or out.get_device() != dev):
            _mismatch(out, "out", "torch", dev, self.out_shape, torch.float32)
        if self._widen:  # widened to float32 in the call's stream
            return _on_device_call(dev, self._call, queries, None, out)
        return _on_device_call(dev, self._call, queries, queries.data_ptr(), out)

    def _call(self, stream_ptr, queries, qptr, out):
        torch = self._torch
        if qptr is None:
            queries = api.view(queries)
            qptr = queries.data.ptr
        if out is None:
            out = (api._empty(self.out_shape, cp.float32) if torch is None
                   else torch.empty(self.out_shape, dtype=torch.float32, device=self._tdevice))
        optr = out.data.ptr if torch is None else out.data_ptr()
        if self._rotation is None:
            rows = api.view(queries).reshape(-1, self.shape[-1])
            qrot = api.rotate(rows, self._rot).reshape(self._qrot_shape)
        else:
            qrot = self._scratch.get(stream_ptr)
            if qrot is None:
                if len(self._scratch) >= 8:
                    self._scratch.clear()
                qrot = self._scratch[stream_ptr] = cp.empty(self._qrot_shape, cp.float32)
            _run(self._rotation, stream_ptr, (qptr, qrot.data.ptr))
        if self._sketch_t is None:
            qsk = None
        else:
            qsk = cp.ascontiguousarray(qrot @ self._sketch_t)
        if qsk is None:
            _run(self._scores._launches, stream_ptr, (qrot.data.ptr, optr))
        else:
            _run(self._scores._launches, stream_ptr, (qrot.data.ptr, qsk.data.ptr, optr))
        return out


def prepare_scores(queries, rows, rot, sketch, qmap, codes, norms, signs, qjl_norms, kmap,
                   centroids, bits, qjl_scale, out_shape):
    """A :class:`QueryScoresPlan` for cupy arrays and torch CUDA tensors
    (launches packed once, called on the current stream); None for other arrays."""
    if not (isinstance(queries, cp.ndarray) or is_torch_array(queries)):
        return None
    return QueryScoresPlan(queries, rows, rot, sketch, qmap, codes, norms, signs, qjl_norms,
                           kmap, centroids, bits, qjl_scale, out_shape)
