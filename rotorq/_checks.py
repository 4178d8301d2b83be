"""Argument checks, norm storage and the score range shared by the quantizers.

:class:`rotorq.TurboQuant`, :class:`rotorq.QJL` and :class:`rotorq.KVCache` check their
arguments with the same functions, store norms with the same overflow rules and scale huge
query rows the same way, so one set of error messages serves them all.
"""

from __future__ import annotations

import math

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)
F32_MAX = float(np.finfo(np.float32).max)


SEED_RANGE = (0, 1 << 64)
"""Seeds are ints in ``[0, 2**64)``: each gives its own rotation and sketch (numpy's PCG64
is seeded with the 64-bit word), so no two accepted seeds give the same quantizer."""


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def seed_value(value, name="seed"):
    """``value`` as a seed: an int (not a bool) in :data:`SEED_RANGE`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    lo, hi = SEED_RANGE
    if not lo <= value < hi:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return int(value)


def flag(value, name):
    """``value`` as a bool; refuses anything else (a string such as "no" is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def norms_ok(norms, dtype):
    """Device (or numpy) boolean: every norm is finite and within ``dtype``'s range (one
    comparison decides both: ``norms <= limit`` is false for NaN and Inf)."""
    return (norms <= (FP16_MAX if dtype == "float16" else F32_MAX)).all()


def top_norm(xp, rows):
    """The largest row norm of finite ``rows`` as a Python float (float64, no overflow for
    values up to float64's range: the rows are divided by their largest magnitude first)."""
    top = float(xp.abs(rows).max())
    if top == 0.0:
        return 0.0
    return top * math.sqrt(float(((rows.astype(xp.float64) / top) ** 2).sum(axis=-1).max()))


def config_arguments(cls, config):
    """The constructor's keyword arguments in ``config`` (a quantizer's :attr:`config`),
    with clear errors for a non-dict, another method, missing or unknown keys."""
    import inspect

    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    cfg = dict(config)
    method = cfg.pop("method", cls.method)
    if method != cls.method:
        raise ValueError(f"config is not a {cls.__name__} config (method {method!r}): {config}")
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p != "self"]
    required = [p for p in allowed if params[p].default is inspect.Parameter.empty]
    unknown = sorted(str(k) for k in cfg if k not in allowed)
    if unknown:
        raise ValueError(f"config has unknown keys {unknown} for {cls.__name__}: {config}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config lacks {missing} for {cls.__name__}: {config}")
    return cfg


def store_norms(xp, norms, dtype, name="x", check=True, source=None):
    """Cast kernel norms (float32) to the stored dtype; refuse non-finite input or overflow
    (unless ``check`` is false).

    One reduction and, on a GPU, one device synchronization per call. ``check`` may be a
    list instead: the call appends ``(norms, dtype, name)`` to it and casts unchecked, and
    the caller checks them all with one synchronization before it keeps the result
    (:mod:`rotorq.kv.checks`). ``source`` (the rows whose norms these are) tells, when norms are not
    finite, NaN or Inf input from finite input whose norms overflow float32."""
    if isinstance(check, list):
        check.append((norms, dtype, name))
        check = False
    if not check:  # the caller opted out (or checks later): out-of-range norms become inf
        with np.errstate(over="ignore", invalid="ignore"):
            return norms.astype(dtype)
    if norms.size and not bool(norms_ok(norms, dtype)):
        finite = bool(xp.isfinite(norms).all())
        if source is not None and source.size:
            if not bool(xp.isfinite(source).all()):
                raise ValueError(f"{name} contains NaN or Inf; rotorq refuses non-finite input")
            top = top_norm(xp, source)
        elif not finite:
            raise ValueError(f"{name} contains NaN or Inf; rotorq refuses non-finite input")
        else:
            top = float(norms.max())
        if top > F32_MAX:
            raise ValueError(f"{name} has vector norms up to {top:.3g}, beyond float32's range "
                             "(3.4e+38), the widest norm_dtype")
        hint = "; use norm_dtype='float32'" if dtype == "float16" else ""
        if top > FP16_MAX and dtype == "float16":
            raise ValueError(f"{name} has vector norms up to {top:.3g}, beyond float16's range "
                             f"(65504){hint}")
        raise ValueError(f"{name} has vector norms up to {top:.3g}: its stored norms (corrected "
                         f"or residual) overflow {dtype}{hint}")
    return norms.astype(dtype)


BIG_ROW = 2.0 ** 40


def unit_rows(q):
    """Host queries ``q (..., dim)`` with every row whose largest magnitude exceeds 2**40
    scaled by a power of two to below 1, and the exponents ``(...)`` that undo it (None when
    no row is scaled). Scores are linear in each query row and a power of two scales float
    arithmetic exactly, so scaled rows give the same scores without overflowing inside the
    rotation or the dot products."""
    if not q.size:
        return q, None
    top = np.abs(q).max(axis=-1).astype(np.float64)
    if not (top > BIG_ROW).any():
        return q, None
    exps = np.where(top > BIG_ROW, np.frexp(top)[1], 0).astype(np.int32)
    return np.ldexp(q, -exps[..., None]).astype(q.dtype, copy=False), exps


def finish_scores(out, exps, queries, key_norms):
    """Host scores: undo :func:`unit_rows`'s scaling (``out (..., m, n)``, ``exps (..., m)``)
    and refuse scores beyond float32's range (inf, or NaN from inf - inf)."""
    if exps is not None:
        with np.errstate(over="ignore"):
            out = np.ldexp(out, exps[..., None]).astype(np.float32, copy=False)
    if out.size and not np.isfinite(out).all():
        k_top = float(np.asarray(key_norms, np.float64).max()) if key_norms.size else 0.0
        raise ValueError(f"scores exceed float32's range: queries with vector norms up to "
                         f"{top_norm(np, queries):.3g} against keys with norms up to "
                         f"{k_top:.3g}; scale the queries down")
    return out
