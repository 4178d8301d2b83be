"""Scores and attention of query rows over one state of a KV cache, on the codes.

Attention never materialises the decompressed base tier:

- scores: ``n_t · ⟨Π q, c[idx_t]⟩`` (+ the QJL term in prod mode) with the query rotated
  once per call, plus the key offset's term ``q·m_t`` (exact);
- values: ``Σ_t p_t · ν_t · c[jdx_t]`` accumulated in the rotated domain, then one inverse
  rotation per output row (linearity; works for every rotation kind);
- softmax: online (running max), exact over the base tier plus the small float32 part
  (pending tokens, or the sinks and the window: :class:`rotorq.kv.exact.ExactRows`),
  merged with the log-sum-exp rule.

The fused pass is the backend's ``decode_attention`` (:mod:`rotorq.cpu` on the CPU,
:mod:`rotorq.cuda` for GPU arrays). Query rows are ``(BH, R, d)`` float32: row ``r`` of
sequence·KV head ``b`` is query ``r % n_q`` of the ``r // n_q``-th query head of its group.
"""

from __future__ import annotations

import numpy as np

from .._ops import KeyBias, Partial, RotatedQuery


def rotated_queries(state, q, scale):
    """Per base key part, a :class:`~rotorq._ops.RotatedQuery`: rotated rows × scale
    (BH, R, D) and, in prod mode, their QJL sketch."""
    setup = state.setup
    xp, be = setup.xp, setup.be
    n_bh, n_rows, _ = q.shape
    q = state.frame.query_rows(q)
    out = []
    for part in state.base.keys.parts:
        tq = part.tq
        rows = xp.ascontiguousarray(q[:, :, part.offset:part.offset + part.dim])
        qrot = be.rotate(rows.reshape(-1, part.dim), tq.rotation, scale)
        qrot = qrot.reshape(n_bh, n_rows, tq.stored_dim)
        qsk = None
        if tq.mode == "prod":
            qsk = xp.ascontiguousarray(qrot @ tq.device_constants(xp)["sketch"].T)
        out.append(RotatedQuery(qrot, qsk))
    return out


def scores(state, exact, q):
    """Estimated ``⟨q, k_t⟩`` of query rows ``q`` (BH, R, d) with every token, in token
    order (sinks, base tier, window; or the pending tokens): (BH, R, T) float32."""
    setup, frame = state.setup, state.frame
    xp, be = setup.xp, setup.be
    n_bh = q.shape[0]
    rows = exact.rows(state)
    c = state.base.count
    comp = None
    if c:
        keys = state.base.keys
        bmap = xp.arange(n_bh, dtype=xp.int64)
        for i, (part, rq) in enumerate(zip(keys.parts, rotated_queries(state, q, 1.0),
                                           strict=True)):
            tq, qrot, qsk = part.tq, rq.rotated, rq.sketch
            signs = qn = None
            if tq.mode == "prod":
                signs = xp.ascontiguousarray(keys.array(i, "qjl_signs", 0, c))
                qn = keys.array(i, "qjl_norms", 0, c).astype(xp.float32)
            codes, norms = keys.rows(xp, i, 0, c)
            s = be.scores(qrot, qsk, bmap, xp.ascontiguousarray(codes),
                          norms.astype(xp.float32), signs, qn, bmap,
                          tq.device_constants(xp)["centroids"], tq.mse_bits,
                          tq.qjl_scale if qsk is not None else 0.0)
            comp = s if comp is None else comp + s
        if frame.mu is not None:
            comp = comp + frame.offset_scores(q, state.sinks.count, c)
    if rows is None:
        return comp.astype(xp.float32)
    se = q @ xp.swapaxes(rows[0], 1, 2)
    if frame is not None and frame.post_rope_offset and not state.pending.count:
        se = se + frame.offset_scores(q, 0, 1)
    if comp is None:
        return se.astype(xp.float32)
    n_s = state.sinks.count
    return xp.concatenate([se[:, :, :n_s], comp, se[:, :, n_s:]], axis=2).astype(xp.float32)


def fused_arguments(state, q, scale, n_q, offset):
    """The backend's ``decode_attention`` call for the base tier of ``state``: ``(args,
    kwargs)`` — rotated queries, key parts, value parts, tokens, ``n_q``, causal offset;
    the RoPE-aware offset's key bias and the codes' layout (query rows ``q`` (BH, R, d),
    row ``r`` sees tokens up to ``r % n_q + offset`` of the whole cache)."""
    xp, frame, base = state.setup.xp, state.frame, state.base
    bias = None
    if frame.freqs is not None:
        bias = KeyBias(*frame.bias_coefficients(q * np.float32(scale)), frame.freqs,
                       state.sinks.count)
    args = (tuple(rotated_queries(state, q, scale)), base.keys.kernel_keys(xp),
            base.values.kernel_values(xp), base.count, n_q, offset - state.sinks.count)
    return args, {"key_bias": bias, "layout": base.layout}


def attend(state, exact, q, scale, n_q, offset, causal):
    """Softmax attention of query rows ``q`` (BH, R, d) over every token: (BH, R, d)
    float32 (``offset``, ``causal``: row ``r`` sees tokens ``0 … r % n_q + offset`` when
    causal)."""
    setup, frame = state.setup, state.frame
    xp, be = setup.xp, setup.be
    n_bh, n_rows, _ = q.shape
    base = state.base
    c = base.count
    rows = exact.rows(state)
    partial = None
    if c:  # base tier: fused kernel → (acc, m, l), acc in the value rotations' domains
        args, kwargs = fused_arguments(state, q, scale, n_q, offset)
        part = be.decode_attention(*args, **kwargs)
        m_c, l_c = part.max, part.sum
        pieces = [be.unrotate(a.reshape(n_bh * n_rows, -1), p.tq.rotation)
                  .reshape(n_bh, n_rows, p.dim) for a, p in zip(part.accs, base.values.parts,
                                                                 strict=True)]
        acc_c = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=2)
        if frame.vinv is not None:
            acc_c = xp.take_along_axis(acc_c, frame.vinv[:, None, :], axis=2)
        if rows is None:
            return (acc_c / l_c[:, :, None]).astype(xp.float32)
        partial = Partial((acc_c,), m_c, l_c)
    # pending, sinks, window: float32 attention on their (decoded) keys and values, merged
    # with the base tier's partial sums (every row sees at least token 0), one kernel
    ke, ve, pos = rows
    return be.exact_attention(q, ke, ve, pos, scale, n_q, offset, causal, partial)
