"""How the generated quantize kernels decide a code: source lines of three bisections.

Each function returns source lines that set ``{c}`` (uint32) to the code of the float32
``{y}``: the number of decision boundaries ``<= y``, which is what the CPU twin's binary
search over the sorted boundaries gives.

* :func:`register_decide`: the boundaries in registers ``bd0, bd1, …``, a bisection by
  compares and selects (no shared memory, no branch after NVVM), for up to :data:`REG_BITS`
  bits.
* :func:`symmetric_decide`: fp16 rows of 2 to :data:`SYM_BITS` bits, by sign and magnitude
  over the positive half of the boundaries (one level fewer).
* :func:`heap_decide`: the boundaries in shared memory in heap order (:func:`heap_order`).

:func:`decision` picks one for a bit width and input dtype.
"""

REG_BITS = 3
"""Up to this many bits the quantize kernels keep their ``2^bits − 1`` decision boundaries in
registers and count the boundaries ``<= y`` with branch-free compares; above (15 boundaries
would not fit the register cap), a bisection over boundaries in shared memory, stored in heap
order (:func:`heap_decide`) — except for fp16 rows up to :data:`SYM_BITS` bits."""


def register_decide(y, c, bits):
    """``{c}`` (uint32) = the number of boundaries ``bd0 … bd{L-2}`` (registers) that are
    ``<= {y}``, by bisection: level ``l`` compares with ``bd[prefix·2^(l+1) + 2^l − 1]``, the
    boundary picked by selects on the decided bits ``prefix`` (no shared memory, no branch
    after NVVM). Over sorted boundaries this is the CPU's count, ties (``y`` equal to a
    boundary counts it) and NaN (code 0) included."""
    out, preds = [], []
    def pick(level, prefix, depth):
        if depth == len(preds):
            return f"bd{(prefix << (level + 1)) + (1 << level) - 1}"
        hi, lo = pick(level, 2 * prefix + 1, depth + 1), pick(level, 2 * prefix, depth + 1)
        return f"({hi} if {preds[depth]} else {lo})"

    for level in range(bits - 1, -1, -1):
        out.append(f"{c}_{level} = {y} >= {pick(level, 0, 0)}")
        preds.append(f"{c}_{level}")
    out.append(f"{c} = " + " | ".join(f"(U32({c}_{lv}) << U32({lv}))" for lv in range(bits)))
    return out


SYM_BITS = 4
"""fp16 rows of 2 to this many bits decide in registers on the unscaled transform by sign and
magnitude (:func:`symmetric_decide`: half the boundaries in registers, one bisection level fewer).
SASS loop of the quantize kernels at d = 128 (``benchmarks/tools/sass_count.py``), against the
register bisection of every boundary (2, 3 bits) or the heap bisection on scaled coordinates
(4 bits): Hadamard 476 → 459, 557 → 538, 858 → 642; rotor 548 → 520, 677 → 654, 1062 → 792."""


def decision(bits, half):
    """How a kernel decides its codes: ``"regs"`` (:func:`register_decide`), ``"sym"``
    (:func:`symmetric_decide`: fp16 rows at :data:`SYM_BITS`) or ``"heap"`` (:func:`heap_decide`)."""
    if half and 2 <= bits <= SYM_BITS:
        return "sym"
    return "regs" if bits <= REG_BITS else "heap"


def register_boundaries(bits, kind):
    """Indices into ``boundaries`` of the registers ``bd0, bd1, …`` a decision compares with:
    every boundary, or for ``"sym"`` the positive half (above the middle one, which is 0)."""
    if kind == "sym":
        return list(range(1 << (bits - 1), (1 << bits) - 1))
    return list(range((1 << bits) - 1))


def symmetric_decide(y, c, bits):
    """``{c}`` (uint32) and its bits ``{c}_l``: the code of ``{y}`` for a codebook symmetric
    about 0 (``boundaries[i] == -boundaries[L - 2 - i]``, the middle one 0: every rotorq
    codebook is symmetrized so), from the sign ``s = y >= 0`` and the count ``m`` of positive
    boundaries ``bd0 … bd{L/2-2}`` (registers) that are ``<= |y|``, by the bisection of
    :func:`register_decide` with one level fewer: the code is ``L/2 + m`` for ``s``, else
    ``L/2 - 1 - m`` — bit ``l < bits - 1`` is ``m_l == s``, the top bit ``s``. This is the
    count of boundaries ``<= y`` except where ``-y`` equals a boundary exactly (the count
    excludes it there): only fp16 rows use it, compared unscaled with per-row boundaries, whose
    codes already differ from the CPU's within float32 rounding of a boundary (the documented
    flips). NaN is not refused here (the public API refuses non-finite rows)."""
    out = [f"{c}_s = {y} >= np.float32(0.0)", f"{c}_a = abs({y})"]
    out += register_decide(f"{c}_a", f"{c}_m", bits - 1)[:-1]
    out += [f"{c}_{lv} = {c}_m_{lv} == {c}_s" for lv in range(bits - 1)]
    out.append(f"{c}_{bits - 1} = {c}_s")
    out.append(f"{c} = " + " | ".join(f"(U32({c}_{lv}) << U32({lv}))" for lv in range(bits)))
    return out


def heap_order(bits):
    """Boundary index of each node ``j = 1 … 2^bits − 1`` of the bisection tree in heap order
    (children ``2j, 2j + 1``): node ``2^depth + prefix`` is the boundary
    ``prefix·2^(l+1) + 2^l − 1`` that level ``l = bits − 1 − depth`` compares with."""
    out = []
    for j in range(1, 1 << bits):
        depth = j.bit_length() - 1
        lv = bits - 1 - depth
        out.append(((j - (1 << depth)) << (lv + 1)) + (1 << lv) - 1)
    return tuple(out)


def heap_decide(y, c, bits):
    """``{c}`` (uint32) = the number of boundaries ``<= {y}``, by the bisection of
    :func:`register_decide` over boundaries in shared memory in heap order (``bs[j]``, node
    ``j`` as :func:`heap_order`): per level one load, one compare and ``j = 2j + (y >= bs[j])``
    (no index arithmetic beyond that). NaN compares false at every level: code 0."""
    out = [f"{c} = U32(2) | U32({y} >= bs[1])"]
    for _ in range(bits - 1):
        out.append(f"{c} = U32({c} + {c} + U32({y} >= bs[{c}]))")
    out.append(f"{c} = {c} & U32({(1 << bits) - 1})")
    return out


LINES = {"regs": register_decide, "sym": symmetric_decide, "heap": heap_decide}
"""The source-line function of each :func:`decision`."""
