"""PTX intrinsics of the generated kernels, each with its simulator twin.

On the device each name is a Numba ``intrinsic`` that emits a few LLVM instructions or one
line of inline PTX (``mma.sync``, ``cvt.rn.f16x2.f32``, ``shf.r.clamp.b32``,
``ex2.approx.ftz.f32``); under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same name is
a Python function with the same result, and the warp-level operations (the MMA, the reductions
over a row's lanes, the warp vote) are emulated through block-shared scratch with block
barriers — so a generated kernel calls them only where every thread of the block does.

:data:`NAMES` is the namespace the builder (:mod:`rotorq.cuda.gen.build`) gives every
generated source.
"""

import math

import numpy as np
from numba import cuda

from .._jit import SIMULATOR, device

if SIMULATOR:
    def half_bits(f):
        """The float16 bits (uint32, round to nearest even) of the float32 ``f``."""
        return np.uint32(np.array(np.float16(f)).view(np.uint16))

    def half_float(u):
        """The float32 value of the float16 bits in the low 16 bits of ``u``."""
        return np.float32(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))

    def half_lo(u):
        """float32 of the float16 in the low 16 bits of the uint32 ``u``."""
        return np.float32(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))

    def half_hi(u):
        """float32 of the float16 in bits 16–31 of the uint32 ``u``."""
        return np.float32(np.array((int(u) >> 16) & 0xFFFF, np.uint16).view(np.float16))

    def load_f2(arr, i):
        """``(arr[i], arr[i + 1])`` (one 8-byte load on the device; ``i`` even)."""
        return arr[i], arr[i + np.uint64(1)]

    def store_f2(arr, i, a, b):
        """``arr[i], arr[i + 1] = a, b`` (one 8-byte store on the device; ``i`` even)."""
        arr[i] = a
        arr[i + np.uint64(1)] = b

    def half2_bits(lo, hi):
        """The float16 bits of ``lo`` (low half) and ``hi`` (high half) in one uint32."""
        return np.uint32(int(half_bits(lo)) | (int(half_bits(hi)) << 16))

    def load_u4(arr, i, c):
        """``arr[i + c : i + c + 4]`` of a uint32 array (one 16-byte load on the device;
        ``i + c`` a multiple of 4)."""
        k = int(i) + int(c)
        return arr[k], arr[k + 1], arr[k + 2], arr[k + 3]

    def load_u2(arr, i, c):
        """``arr[i + c : i + c + 2]`` of a uint32 array (one 8-byte load on the device;
        ``i + c`` even)."""
        k = int(i) + int(c)
        return arr[k], arr[k + 1]

    def load_u1(arr, i, c):
        """``arr[i + c]`` of a uint32 array."""
        return arr[int(i) + int(c)]

    def _half_of(u):
        return np.float64(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))

    @device
    def mma_sim(sa, sb, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``mma.sync.m16n8k16.row.col.f32.f16.f16.f32`` of one warp, emulated through the
        block-shared scratch ``sa`` (uint32, 4/lane), ``sb`` (uint32, 2/lane) — every thread of
        the block calls it (block barriers)."""
        tid = cuda.threadIdx.x
        base = tid - (tid & 31)
        lane = tid & 31
        sa[4 * tid], sa[4 * tid + 1], sa[4 * tid + 2], sa[4 * tid + 3] = a0, a1, a2, a3
        sb[2 * tid], sb[2 * tid + 1] = b0, b1
        cuda.syncthreads()
        g, t = lane >> 2, lane & 3
        out = [c0, c1, c2, c3]
        for i in range(4):
            row = g + 8 * (i >> 1)
            col = 2 * t + (i & 1)
            acc = np.float64(out[i])
            for k in range(16):
                ta = base + 4 * (row & 7) + ((k & 7) >> 1)
                areg = sa[4 * ta + (row >> 3) + 2 * (k >> 3)]
                tb = base + 4 * col + ((k & 7) >> 1)
                breg = sb[2 * tb + (k >> 3)]
                acc += _half_of(int(areg) >> (16 * (k & 1))) * _half_of(int(breg) >> (16 * (k & 1)))
            out[i] = np.float32(acc)
        cuda.syncthreads()
        return out[0], out[1], out[2], out[3]

    @device
    def lanes_max(sx, x):
        """Max of ``x`` over the 8 lanes of a warp with this lane's ``lane % 4`` (emulated)."""
        tid = cuda.threadIdx.x
        sx[tid] = x
        cuda.syncthreads()
        base = tid - (tid & 31) + (tid & 3)
        v = sx[base]
        for gg in range(1, 8):
            v = max(v, sx[base + 4 * gg])
        cuda.syncthreads()
        return np.float32(v)

    @device
    def block_any(sx, p):
        """Whether ``p`` holds on any thread of the block (emulates ``any_sync`` of the warp
        with block barriers: a block-uniform, hence warp-uniform, answer)."""
        tid = cuda.threadIdx.x
        sx[tid] = np.float32(1.0) if p else np.float32(0.0)
        cuda.syncthreads()
        v = np.float32(0.0)
        for i in range(cuda.blockDim.x):
            v = max(v, sx[i])
        cuda.syncthreads()
        return v > np.float32(0.0)

    @device
    def lanes_sum(sx, x):
        tid = cuda.threadIdx.x
        sx[tid] = x
        cuda.syncthreads()
        base = tid - (tid & 31) + (tid & 3)
        v = np.float32(0.0)
        for gg in range(8):
            v += sx[base + 4 * gg]
        cuda.syncthreads()
        return np.float32(v)
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def half_bits(typingctx, f):
        def codegen(context, builder, signature, args):
            h = builder.fptrunc(args[0], ir.HalfType())
            return builder.zext(builder.bitcast(h, ir.IntType(16)), ir.IntType(32))
        return types.uint32(types.float32), codegen

    @intrinsic
    def half_float(typingctx, u):
        """The float32 value of the float16 bits ``u`` (uint16: a 16-bit load, one
        conversion)."""
        def codegen(context, builder, signature, args):
            h = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(h, ir.FloatType())
        if not isinstance(u, types.Integer) or u.bitwidth != 16:
            return None
        return types.float32(u), codegen

    def _half_of_word(shift):
        def impl(typingctx, u):
            def codegen(context, builder, signature, args):
                v = args[0]
                if shift:
                    v = builder.lshr(v, ir.Constant(v.type, shift))
                h = builder.bitcast(builder.trunc(v, ir.IntType(16)), ir.HalfType())
                return builder.fpext(h, ir.FloatType())
            return types.float32(u), codegen
        return impl

    half_lo = intrinsic(_half_of_word(0))
    half_lo.__doc__ = """float32 of the float16 in the low 16 bits of the uint32 ``u`` (one
    truncation, one conversion: no scalar fp16 load)."""
    half_hi = intrinsic(_half_of_word(16))
    half_hi.__doc__ = """float32 of the float16 in bits 16–31 of the uint32 ``u``."""

    def _f2_pointer(context, builder, arrty, arr, idx):
        ary = context.make_array(arrty)(context, builder, arr)
        ptr = builder.gep(ary.data, [idx], inbounds=True)
        return builder.bitcast(ptr, ir.VectorType(ir.FloatType(), 2).as_pointer())

    def _f2_array(arr):
        return (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1
                and arr.layout == "C")

    @intrinsic
    def load_f2(typingctx, arr, i):
        """``(arr[i], arr[i + 1])`` of a float32 array in one 8-byte load (``i``: uint64,
        even; the array 8-byte aligned, as every device allocation is)."""
        if not _f2_array(arr):
            return None

        def codegen(context, builder, signature, args):
            v = builder.load(_f2_pointer(context, builder, signature.args[0], *args), align=8)
            vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in (0, 1)]
            return context.make_tuple(builder, signature.return_type, vals)
        return types.UniTuple(types.float32, 2)(arr, types.uint64), codegen

    @intrinsic
    def store_f2(typingctx, arr, i, a, b):
        """``arr[i], arr[i + 1] = a, b`` in one 8-byte store (as :func:`load_f2`)."""
        if not _f2_array(arr):
            return None

        def codegen(context, builder, signature, args):
            vty = ir.VectorType(ir.FloatType(), 2)
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), args[2],
                                       ir.Constant(ir.IntType(32), 0))
            v = builder.insert_element(v, args[3], ir.Constant(ir.IntType(32), 1))
            builder.store(v, _f2_pointer(context, builder, signature.args[0], args[0], args[1]),
                          align=8)
            return context.get_dummy_value()
        return types.none(arr, types.uint64, types.float32, types.float32), codegen

    @intrinsic
    def half2_bits(typingctx, lo, hi):
        """``cvt.rn.f16x2.f32``: the float16 bits of ``lo`` (low half) and ``hi`` (high half)
        in one uint32, one instruction."""
        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fn = ir.InlineAsm(ir.FunctionType(i32, [f32, f32]), "cvt.rn.f16x2.f32 $0, $2, $1;",
                              "=r,f,f")
            return builder.call(fn, args)
        return types.uint32(types.float32, types.float32), codegen

    def _u32_array(arr):
        return (isinstance(arr, types.Array) and arr.dtype == types.uint32 and arr.ndim == 1
                and arr.layout == "C")

    def _load_words(n):
        def typer(typingctx, arr, i, c):
            if not _u32_array(arr):
                return None

            def codegen(context, builder, signature, args):
                ary = context.make_array(signature.args[0])(context, builder, args[0])
                i64 = ir.IntType(64)
                # the 32-bit offset widened once (one wide multiply-add onto the row's
                # pointer), the constant apart: it folds into the load's immediate
                ptr = builder.gep(ary.data, [builder.zext(args[1], i64)], inbounds=True)
                ptr = builder.gep(ptr, [builder.zext(args[2], i64)], inbounds=True)
                if n == 1:
                    return builder.load(ptr, align=4)
                vty = ir.VectorType(ir.IntType(32), n)
                v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4 * n)
                vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), k))
                        for k in range(n)]
                return context.make_tuple(builder, signature.return_type, vals)
            ret = types.uint32 if n == 1 else types.UniTuple(types.uint32, n)
            return ret(arr, types.uint32, types.uint32), codegen
        return typer

    load_u4 = intrinsic(_load_words(4))
    load_u4.__doc__ = """``arr[i + c : i + c + 4]`` of a 1-D uint32 array in one 16-byte load
    (``i``, ``c``: uint32, ``c`` a constant, ``i + c`` a multiple of 4; the array 16-byte
    aligned)."""
    load_u2 = intrinsic(_load_words(2))
    load_u1 = intrinsic(_load_words(1))

    @intrinsic
    def mma16816(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (inline PTX)."""
        ret = types.UniTuple(types.float32, 4)
        sig = ret(*([types.uint32] * 6 + [types.float32] * 4))

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                   "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
            fn = ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            res = builder.call(fn, args)
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, signature.return_type, vals)
        return sig, codegen


if SIMULATOR:
    def shr32(a, s):
        """32-bit logical ``a >> s`` (uint32)."""
        return np.uint32(int(a) >> int(s))

    def shl32(a, s):
        """32-bit ``a << s`` (uint32, truncated)."""
        return np.uint32((int(a) << int(s)) & 0xFFFFFFFF)

    def fshr32(lo, hi, s):
        """The low word of the 64-bit ``(hi:lo) >> s`` (``s`` < 32; uint32)."""
        return np.uint32((((int(hi) << 32) | int(lo)) >> int(s)) & 0xFFFFFFFF)

    def and32(a, b):
        return np.uint32(int(a) & int(b))

    def or32(a, b):
        return np.uint32(int(a) | int(b))

    def add32(a, b):
        """32-bit ``a + b`` (uint32, wrapping)."""
        return np.uint32((int(a) + int(b)) & 0xFFFFFFFF)

    def mul32(a, b):
        """32-bit ``a · b`` (uint32, wrapping)."""
        return np.uint32((int(a) * int(b)) & 0xFFFFFFFF)

    def min32(a, b):
        """Unsigned 32-bit ``min(a, b)``."""
        return np.uint32(min(int(a), int(b)))

    def exp2f(x):
        """``2 ** x`` in float32 (``ex2.approx.ftz.f32`` on the device)."""
        return np.float32(math.pow(2.0, float(x)))

    def word_at(arr, off):
        """The uint32 word of ``arr`` at byte offset ``off`` (a multiple of 4)."""
        return arr[int(off) >> 2]

    def f32_at(arr, off, c):
        """The float32 of ``arr`` at byte offset ``off + c``."""
        return arr[(int(off) + int(c)) >> 2]

    def set_f32_at(arr, off, c, v):
        """``arr`` at byte offset ``off + c`` = ``v`` (float32)."""
        arr[(int(off) + int(c)) >> 2] = v
else:
    def _binop32(op):
        def typer(typingctx, a, b):
            def codegen(context, builder, signature, args):
                return getattr(builder, op)(args[0], args[1])
            return types.uint32(types.uint32, types.uint32), codegen
        return intrinsic(typer)

    shr32 = _binop32("lshr")


    @intrinsic
    def fshr32(typingctx, lo, hi, s):
        """``shf.r.clamp.b32``: the low word of the 64-bit ``(hi:lo) >> s`` (one funnel
        shift: a field across two words)."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            fn = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]),
                              "shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(fn, args)
        return types.uint32(types.uint32, types.uint32, types.uint32), codegen
    shl32 = _binop32("shl")
    and32 = _binop32("and_")
    or32 = _binop32("or_")
    add32 = _binop32("add")
    mul32 = _binop32("mul")

    @intrinsic
    def min32(typingctx, a, b):
        """Unsigned 32-bit ``min(a, b)`` (one instruction; Numba's ``min`` widens)."""
        def codegen(context, builder, signature, args):
            return builder.select(builder.icmp_unsigned("<", args[0], args[1]), args[0], args[1])
        return types.uint32(types.uint32, types.uint32), codegen

    @intrinsic
    def word_at(typingctx, arr, off):
        """The uint32 word of the 1-D uint32 array ``arr`` at byte offset ``off`` (uint32, a
        multiple of 4): a table index built at bit 2 goes to the load as it is, where
        ``arr[off >> 2]`` would be re-scaled (LLVM folds the shift back into the fields)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint32 and arr.ndim == 1):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
            ptr = builder.gep(base, [builder.zext(args[1], ir.IntType(64))], inbounds=True)
            return builder.load(builder.bitcast(ptr, ir.IntType(32).as_pointer()))
        return types.uint32(arr, types.uint32), codegen

    def _f32_ptr(context, builder, arrty, arr, off, c):
        ary = context.make_array(arrty)(context, builder, arr)
        i64 = ir.IntType(64)
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        ptr = builder.gep(base, [builder.zext(off, i64)], inbounds=True)
        ptr = builder.gep(ptr, [builder.zext(c, i64)], inbounds=True)
        return builder.bitcast(ptr, ir.FloatType().as_pointer())

    def _f32_array(arr):
        return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1

    @intrinsic
    def f32_at(typingctx, arr, off, c):
        """The float32 of the 1-D ``arr`` at byte offset ``off + c`` (uint32; ``c`` a
        constant: it folds into the load's immediate)."""
        if not _f32_array(arr):
            return None

        def codegen(context, builder, signature, args):
            return builder.load(_f32_ptr(context, builder, signature.args[0], *args))
        return types.float32(arr, types.uint32, types.uint32), codegen

    @intrinsic
    def set_f32_at(typingctx, arr, off, c, v):
        """Store the float32 ``v`` at byte offset ``off + c`` of the 1-D ``arr``."""
        if not _f32_array(arr):
            return None

        def codegen(context, builder, signature, args):
            builder.store(args[3], _f32_ptr(context, builder, signature.args[0], *args[:3]))
            return context.get_dummy_value()
        return types.none(arr, types.uint32, types.uint32, types.float32), codegen

    @intrinsic
    def exp2f(typingctx, x):
        """``ex2.approx.ftz.f32``: ``2 ** x`` in one MUFU instruction (``math.exp`` takes
        about eight: a range reduction around the same MUFU)."""
        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            fn = ir.InlineAsm(ir.FunctionType(f32, [f32]), "ex2.approx.ftz.f32 $0, $1;", "=f,f")
            return builder.call(fn, args)
        return types.float32(types.float32), codegen


NAMES = {
    "half_bits": half_bits, "half_float": half_float, "half_lo": half_lo, "half_hi": half_hi,
    "half2_bits": half2_bits, "load_f2": load_f2, "store_f2": store_f2, "load_u4": load_u4,
    "load_u2": load_u2, "load_u1": load_u1, "shr32": shr32, "shl32": shl32, "fshr32": fshr32,
    "and32": and32, "or32": or32, "add32": add32, "mul32": mul32, "min32": min32,
    "exp2f": exp2f, "word_at": word_at, "f32_at": f32_at, "set_f32_at": set_f32_at,
}
"""Every intrinsic by name (the generated sources call them by these names)."""
if SIMULATOR:
    mma = mma_sim
    NAMES.update(mma_sim=mma_sim, lanes_max=lanes_max, lanes_sum=lanes_sum, block_any=block_any)
else:
    mma = mma16816
    NAMES.update(mma16816=mma16816)
