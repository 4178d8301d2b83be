"""Vector building blocks of the CPU attention kernel, written as LLVM IR (Numba intrinsics).

Numba compiles loops without fastmath, so LLVM does not vectorize a float reduction, and it
does not turn a lookup in a 16-entry table into a register permute. These intrinsics spell
the vector code out in portable LLVM IR (vector types, ``shufflevector``, ``llvm.fmuladd``):
LLVM lowers each to the host's instructions (on AVX-512: ``vpermd`` for the table lookup,
``vpermt2*`` for the shuffles, ``vfmadd`` for the products) and to scalar code where a
target has no such instruction. Every sum runs in a fixed order (no reassociation).

Codes are ``bits``-bit fields, LSB first, packed in rows (:mod:`rotorq.cpu.bits`): eight
codes fill ``bits`` bytes, a *word*; code ``c`` of word ``w`` is coordinate ``8·w + c``
and sits at bit ``bits·c`` of the word read little-endian. Every intrinsic here handles
``1 <= bits <= 4``, so a code indexes a table of 16 float32 (``TABLE``), read from a
C-contiguous float32 array of at least 16 entries that repeats every ``2**bits`` entries
(on AVX-512 the fused intrinsics index it with the code's bits and whatever bits follow).

The kernels that use these intrinsics live in :mod:`rotorq.cpu.attention_fast`, and Numba's
disk cache keys them on that file alone: after editing this one, touch that file (or clear
its cache) so that they are compiled again.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TABLE = 16
BLOCK = 64  # coordinates (eight words) handled together by the fused intrinsics

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)


def _i64(v):
    return ir.Constant(_I64, v)


def _ptr(builder, data, offset, vtype):
    """``data + offset`` (elements of ``data``'s type) as a pointer to ``vtype``."""
    return builder.bitcast(builder.gep(data, [offset]), vtype.as_pointer())


def _native_permute(context):
    """Whether the compile target has AVX-512F, whose 16-lane permute reads only the low
    4 bits of each index (so codes need no mask when the table repeats every
    ``2**bits`` entries)."""
    features = getattr(context.codegen(), "_tm_features", "") or ""
    return "+avx512f" in features.split(",")


def _codes(builder, words, shift, bits, native):
    """The ``bits``-bit fields of ``words`` (i32 vector) from bit ``shift`` on (a constant
    or a vector), as table indices: masked unless ``native`` takes only their low bits."""
    if isinstance(shift, int):
        top = shift + bits >= 32
        shift = ir.Constant(words.type, [shift] * words.type.count)
    else:
        top = False
    v = builder.lshr(words, shift)
    if native or top:
        return v
    return builder.and_(v, ir.Constant(words.type, [(1 << bits) - 1] * words.type.count))


def _lookup(builder, table, idx, native=False):
    """``table[idx[l]]`` for every lane ``l`` (``table`` a float vector, ``idx`` an i32
    vector of as many lanes or fewer): a build_vector of extracts, which the x86 backend
    turns into one variable permute; with ``native`` (16 lanes, AVX-512F) the permute
    itself, which reads only the low 4 bits of each index."""
    if native and idx.type.count == 16 and table.type.count == 16:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16F, [_V16F, _V16I]),
            "llvm.x86.avx512.permvar.sf.512")
        return builder.call(fn, [table, idx])
    n = idx.type.count
    out = ir.Constant(ir.VectorType(_F32, n), None)
    for lane in range(n):
        e = builder.extract_element(idx, ir.Constant(_I32, lane))
        out = builder.insert_element(out, builder.extract_element(table, e),
                                     ir.Constant(_I32, lane))
    return out


def _splat(builder, scalar, vtype):
    v = builder.insert_element(ir.Constant(vtype, None), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vtype, None),
                                  ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count))


def _words(builder, data, offset, bits, n_words):
    """The ``n_words`` words of ``bits`` bytes at byte ``offset``, zero-extended to i32."""
    nbytes = bits * n_words
    vb = ir.VectorType(_I8, nbytes)
    raw = builder.load(_ptr(builder, data, offset, vb), align=1)
    mask = [w * bits + k if k < bits else nbytes for w in range(n_words) for k in range(4)]
    w8 = builder.shuffle_vector(raw, ir.Constant(vb, [0] * nbytes),
                                ir.Constant(ir.VectorType(_I32, 4 * n_words), mask))
    return builder.bitcast(w8, ir.VectorType(_I32, n_words))


def _fmuladd(builder):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]), "llvm.fmuladd.v16f32")


def _arrays(context, builder, signature, args, which):
    return [context.make_array(signature.args[i])(context, builder, args[i]).data
            for i in which]


@intrinsic
def f32_bits(typingctx, bits):
    """The float32 whose IEEE bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, _I32)
        return builder.bitcast(v, _F32)

    return sig, codegen


def decoder(bits, lanes):
    """Intrinsic ``dec(codes, off, table, out, o0)``: the ``8·lanes`` codes at byte ``off``
    of ``codes`` (``lanes`` words) as ``table[code]`` into ``out.flat[o0 : o0 + 8·lanes]``,
    code ``c`` of word ``w`` at ``lanes·c + w``."""
    tsize = TABLE if (bits == 4 or lanes == 16) else 8

    @intrinsic
    def dec(typingctx, codes, off, table, out, o0):
        sig = types.void(codes, off, table, out, o0)

        def codegen(context, builder, signature, args):
            codes_p, table_p, out_p = _arrays(context, builder, signature, args, (0, 2, 3))
            vw = ir.VectorType(_I32, lanes)
            words = _words(builder, codes_p, args[1], bits, lanes)
            tab = builder.load(_ptr(builder, table_p, _i64(0), ir.VectorType(_F32, tsize)),
                               align=4)
            code_mask = ir.Constant(vw, [(1 << bits) - 1] * lanes)
            for c in range(8):
                idx = builder.and_(builder.lshr(words, ir.Constant(vw, [bits * c] * lanes)),
                                   code_mask)
                o = builder.add(args[4], _i64(c * lanes))
                builder.store(_lookup(builder, tab, idx),
                              _ptr(builder, out_p, o, ir.VectorType(_F32, lanes)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dec


def key_scores(bits, rows):
    """Intrinsic ``ks(codes, off0, stride, n_blocks, q, qoff, dq, table, scale, soff, out,
    ooff, ostride)``: scores of ``rows`` query rows against 16 key rows of codes.

    Key ``t < 16`` is the codes at byte ``off0 + t·stride`` (``n_blocks`` blocks of
    ``BLOCK`` coordinates, ``8·bits`` bytes each); query row ``r`` is
    ``q.flat[qoff + r·dq :]`` in natural coordinate order. Writes
    ``out.flat[ooff + r·ostride + t] = scale.flat[soff + t] · Σ_i q_ri · table[code_ti]``.
    The 16 keys are the vector lanes: their words are transposed in registers, each word
    gives eight codes, and a code's 16 table values meet one broadcast query coordinate
    per row in a multiply-add (sums in coordinate order).
    """
    wbytes = 8 * bits

    @intrinsic
    def ks(typingctx, codes, off0, stride, n_blocks, q, qoff, dq, table, scale, soff, out,
           ooff, ostride):
        sig = types.void(codes, off0, stride, n_blocks, q, qoff, dq, table, scale, soff,
                         out, ooff, ostride)

        def codegen(context, builder, signature, args):
            codes_p, q_p, table_p, scale_p, out_p = _arrays(context, builder, signature,
                                                            args, (0, 4, 7, 8, 10))
            off0, stride, n_blocks, qoff, dq, soff, ooff, ostride = (
                args[1], args[2], args[3], args[5], args[6], args[9], args[11], args[12])
            fma = _fmuladd(builder)
            native = _native_permute(context)
            tab = builder.load(_ptr(builder, table_p, _i64(0), _V16F), align=4)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
                    for _ in range(rows)]
            words = cgutils.alloca_once(builder, _V16I, size=8)  # word w of the 16 keys
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                base = builder.add(off0, builder.mul(b, _i64(wbytes)))
                level = [_words(builder, codes_p, builder.add(base, builder.mul(_i64(t), stride)),
                                bits, 8) for t in range(16)]
                while len(level) > 1:  # concatenate: key t's word w at 8·t + w
                    n = 2 * level[0].type.count
                    m = ir.Constant(ir.VectorType(_I32, n), list(range(n)))
                    level = [builder.shuffle_vector(level[i], level[i + 1], m)
                             for i in range(0, len(level), 2)]
                every = level[0]
                for w in range(8):
                    builder.store(builder.shuffle_vector(
                        every, ir.Constant(every.type, None),
                        ir.Constant(_V16I, [8 * t + w for t in range(16)])),
                        builder.gep(words, [_i64(w)]))
                with cgutils.for_range(builder, _i64(8)) as wl:
                    w = wl.index
                    word = builder.load(builder.gep(words, [w]))
                    qb = builder.add(qoff, builder.add(builder.mul(b, _i64(BLOCK)),
                                                       builder.mul(w, _i64(8))))
                    cur = [builder.load(a) for a in accs]
                    for c in range(8):
                        kv = _lookup(builder, tab, _codes(builder, word, bits * c, bits, native),
                                     native)
                        for r in range(rows):
                            qi = builder.add(qb, builder.add(builder.mul(_i64(r), dq), _i64(c)))
                            qv = _splat(builder, builder.load(builder.gep(q_p, [qi])), _V16F)
                            cur[r] = builder.call(fma, [qv, kv, cur[r]])
                    for a, v in zip(accs, cur, strict=True):
                        builder.store(v, a)
            sv = builder.load(_ptr(builder, scale_p, soff, _V16F), align=4)
            for r in range(rows):
                o = builder.add(ooff, builder.mul(_i64(r), ostride))
                builder.store(builder.fmul(builder.load(accs[r]), sv),
                              _ptr(builder, out_p, o, _V16F), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return ks


def value_position(dim):
    """Coordinate held at each position of a :func:`value_sums` accumulator row: position
    ``64·b + 16·k + l`` holds coordinate ``64·b + 8·(l mod 8) + 2·k + l // 8``."""
    pos = np.arange(dim, dtype=np.int64)
    b, rest = np.divmod(pos, BLOCK)
    k, lane = np.divmod(rest, 16)
    return BLOCK * b + 8 * (lane % 8) + 2 * k + lane // 8


def value_sums(bits, rows):
    """Intrinsic ``vs(codes, off0, stride, n_tok, n_blocks, table, p, poff, pstride, scale,
    acc, aoff, astride)``: ``acc.flat[aoff + r·astride + i] += Σ_t (p.flat[poff + r·pstride
    + t] · scale.flat[t]) · table[code_t,i]`` for ``rows`` rows and the ``n_tok`` value
    rows of codes at byte ``off0 + t·stride`` (sums in token order), positions ``i`` in
    the order of :func:`value_position`. Per block of ``BLOCK`` coordinates the
    ``4·rows`` accumulator vectors stay in registers across the tokens."""
    shifts = [[bits * 2 * k] * 8 + [bits * (2 * k + 1)] * 8 for k in range(4)]

    @intrinsic
    def vs(typingctx, codes, off0, stride, n_tok, n_blocks, table, p, poff, pstride, scale,
           acc, aoff, astride):
        sig = types.void(codes, off0, stride, n_tok, n_blocks, table, p, poff, pstride, scale,
                         acc, aoff, astride)

        def codegen(context, builder, signature, args):
            codes_p, table_p, p_p, scale_p, acc_p = _arrays(context, builder, signature, args,
                                                            (0, 5, 6, 9, 10))
            off0, stride, n_tok, n_blocks, poff, pstride, aoff, astride = (
                args[1], args[2], args[3], args[4], args[7], args[8], args[11], args[12])
            fma = _fmuladd(builder)
            native = _native_permute(context)
            tab = builder.load(_ptr(builder, table_p, _i64(0), _V16F), align=4)
            twice = ir.Constant(_V16I, list(range(8)) * 2)
            accs = [[cgutils.alloca_once(builder, _V16F) for _ in range(4)] for _ in range(rows)]
            with cgutils.for_range(builder, n_blocks) as bl:
                b = bl.index
                addrs = [[_ptr(builder, acc_p, builder.add(
                    aoff, builder.add(builder.mul(_i64(r), astride),
                                      builder.add(builder.mul(b, _i64(BLOCK)), _i64(16 * k)))),
                    _V16F) for k in range(4)] for r in range(rows)]
                for r in range(rows):
                    for k in range(4):
                        builder.store(builder.load(addrs[r][k], align=4), accs[r][k])
                base = builder.add(off0, builder.mul(b, _i64(8 * bits)))
                with cgutils.for_range(builder, n_tok) as tl:
                    t = tl.index
                    w8 = _words(builder, codes_p, builder.add(base, builder.mul(t, stride)),
                                bits, 8)
                    words = builder.shuffle_vector(w8, ir.Constant(w8.type, None), twice)
                    nu = builder.load(builder.gep(scale_p, [t]))
                    pv = [_splat(builder, builder.fmul(builder.load(builder.gep(
                        p_p, [builder.add(poff, builder.add(builder.mul(_i64(r), pstride), t))])),
                        nu), _V16F) for r in range(rows)]
                    for k in range(4):
                        kv = _lookup(builder, tab, _codes(
                            builder, words, ir.Constant(_V16I, shifts[k]), bits, native), native)
                        for r in range(rows):
                            a = accs[r][k]
                            builder.store(builder.call(fma, [pv[r], kv, builder.load(a)]), a)
                for r in range(rows):
                    for k in range(4):
                        builder.store(builder.load(accs[r][k]), addrs[r][k], align=4)
            return context.get_dummy_value()

        return sig, codegen

    return vs


@intrinsic
def halves16(typingctx, bits16, off, out, ooff):
    """``out.flat[ooff + i]`` = float32 value of the float16 bit pattern
    ``bits16.flat[off + i]`` for ``i < 16`` (exact: integer operations and one
    int-to-float conversion for subnormals, no F16C instruction needed)."""
    sig = types.void(bits16, off, out, ooff)

    def codegen(context, builder, signature, args):
        src, dst = _arrays(context, builder, signature, args, (0, 2))
        v16h = ir.VectorType(ir.IntType(16), 16)
        h = builder.zext(builder.load(_ptr(builder, src, args[1], v16h), align=2), _V16I)

        def const(v):
            return ir.Constant(_V16I, [v] * 16)

        sign = builder.shl(builder.and_(h, const(0x8000)), const(16))
        em = builder.and_(h, const(0x7FFF))
        normal = builder.add(builder.shl(em, const(13)), const(0x38000000))
        special = builder.or_(builder.shl(builder.and_(em, const(0x3FF)), const(13)),
                              const(0x7F800000))
        sub = builder.fmul(builder.sitofp(em, _V16F),
                           ir.Constant(_V16F, [5.9604644775390625e-08] * 16))  # · 2^-24
        bits = builder.select(builder.icmp_unsigned(">=", em, const(0x7C00)), special, normal)
        bits = builder.select(builder.icmp_unsigned("<", em, const(0x400)),
                              builder.bitcast(sub, _V16I), bits)
        val = builder.bitcast(builder.or_(bits, sign), _V16F)
        builder.store(val, _ptr(builder, dst, args[3], _V16F), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fetch_add(typingctx, counter, value):
    """Atomically add ``value`` to ``counter[0]`` (an int64 array) and return the value it
    had before: threads running the same kernel share out its tasks this way."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None
    sig = types.int64(counter, types.int64)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, args[1], "monotonic")

    return sig, codegen


def _vconst(v):
    return ir.Constant(_V16F, [v] * 16)


def _hsum(builder, v):
    """The 16 lanes of ``v`` added pairwise (lane i + lane i+8, then +4, +2, +1)."""
    n = 16
    while n > 1:
        n //= 2
        hi = builder.shuffle_vector(v, ir.Constant(_V16F, None),
                                    ir.Constant(_V16I, list(range(n, 2 * n)) + [0] * (16 - n)))
        v = builder.fadd(v, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def max16(typingctx, arr, off, n16):
    """Largest of ``arr.flat[off : off + 16·n16]`` under ``>`` (NaN never chosen;
    ``-inf`` if nothing is larger)."""
    sig = types.float32(arr, off, n16)

    def codegen(context, builder, signature, args):
        data = _arrays(context, builder, signature, args, (0,))[0]
        acc = cgutils.alloca_once_value(builder, _vconst(float("-inf")))
        with cgutils.for_range(builder, args[2]) as loop:
            v = builder.load(_ptr(builder, data, builder.add(args[1], builder.mul(
                loop.index, _i64(16))), _V16F), align=4)
            m = builder.load(acc)
            builder.store(builder.select(builder.fcmp_ordered(">", v, m), v, m), acc)
        m = builder.load(acc)
        n = 16
        while n > 1:
            n //= 2
            hi = builder.shuffle_vector(m, ir.Constant(_V16F, None),
                                        ir.Constant(_V16I, list(range(n, 2 * n)) + [0] * (16 - n)))
            m = builder.select(builder.fcmp_ordered(">", hi, m), hi, m)
        return builder.extract_element(m, ir.Constant(_I32, 0))

    return sig, codegen


@intrinsic
def exp_sum16(typingctx, arr, off, n16, mx):
    """``arr.flat[i] = exp(arr.flat[i] − mx)`` for the ``16·n16`` elements from ``off``
    (the polynomial of :func:`rotorq.cpu.attention_fast._exp`, same operations in the same
    order, 16 lanes at a time); returns their sum (16 running sums, added pairwise)."""
    sig = types.float32(arr, off, n16, types.float32)

    def codegen(context, builder, signature, args):
        data = _arrays(context, builder, signature, args, (0,))[0]
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F]),
                                               "llvm.floor.v16f32")
        mx = _splat(builder, args[3], _V16F)
        total = cgutils.alloca_once_value(builder, _vconst(0.0))
        with cgutils.for_range(builder, args[2]) as loop:
            ptr = _ptr(builder, data, builder.add(args[1], builder.mul(loop.index, _i64(16))),
                       _V16F)
            x = builder.fsub(builder.load(ptr, align=4), mx)
            under = builder.fcmp_ordered("<", x, _vconst(-87.0))
            xc = builder.select(under, _vconst(-87.0), x)
            n = builder.call(floor, [builder.fadd(builder.fmul(xc, _vconst(1.44269504088896341)),
                                                  _vconst(0.5))])
            r = builder.fsub(builder.fsub(xc, builder.fmul(n, _vconst(0.693359375))),
                             builder.fmul(n, _vconst(-2.12194440e-4)))
            p = _vconst(1.9875691500e-4)
            for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                      5.0000001201e-1):
                p = builder.fadd(builder.fmul(p, r), _vconst(c))
            p = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r)), r), _vconst(1.0))
            n = builder.select(builder.fcmp_ordered("==", n, n), n, _vconst(0.0))  # NaN: 0
            two_n = builder.bitcast(builder.shl(builder.add(builder.fptosi(n, _V16I),
                                                            ir.Constant(_V16I, [127] * 16)),
                                                ir.Constant(_V16I, [23] * 16)), _V16F)
            val = builder.select(under, _vconst(0.0), builder.fmul(p, two_n))
            builder.store(val, ptr, align=4)
            builder.store(builder.fadd(builder.load(total), val), total)
        return _hsum(builder, builder.load(total))

    return sig, codegen


@intrinsic
def out_of_line(typingctx):
    """Mark the compiled function that calls this as never inlined into its callers. A
    function holding many of these intrinsics is large: inlined, it would be optimized
    again inside every caller up the call chain (most of the kernel's first-call compile
    time); called, it costs one call."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.function.attributes.add("noinline")
        return context.get_dummy_value()

    return sig, codegen
