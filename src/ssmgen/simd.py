"""Explicit SIMD vectors for numba kernels: 16 float32 lanes held in registers.

LLVM vectorizes a simple loop by itself, but not the register blocking a small matrix product
needs: accumulators that stay in registers across the whole loop over the inputs, each weight
vector loaded once and used for every batch row. (An axpy over the rows of the weight loads and
stores the outputs at every input; per-row scalar accumulators were left scalar, 7 GFLOP/s.)
These intrinsics give numba a vector type, `F32x16` (LLVM's <16 x float>: one AVX-512 register,
two AVX2 registers, four SSE registers: correct on any x86, fastest where 512-bit registers exist),
and the operations such a product (and a state update over the N modes of a channel) needs:

    a = vload(arr, i)        # arr[i:i + 16]; arr a float32 array, i a flat index
    vstore(arr, i, a)        # arr[i:i + 16] = a
    x = vsplat(value)        # 16 copies of a scalar
    a = vfma(x, w, a)        # x * w + a, one fused multiply-add per lane
    vmul(a, b), vadd(a, b), vsub(a, b), vdiv(a, b)
    s = vsum(a)              # the sum of the lanes (a fixed pairwise tree), a float32
    s = vlane(a, k)          # lane k, a float32
    vmax(a, b), vfloor(a)    # lane max, lane floor
    vscale2(a, k)            # a * 2^k, k whole numbers in [-126, 127] (built in the exponent bits)
    vkeep_ge(x, a, b)        # x where a >= b, 0 elsewhere

(the last three are what a branch-free exp needs: `vecmath.vexp_floored`).

Indices are not checked (the caller keeps i + 16 within the array) and are never wrapped around
(a negative index is an error, as in C). A local of type F32x16 is an SSA value: numba keeps it in
a register. tests/test_simd.py checks each operation against numpy.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

#: Lanes per vector.
LANES = 16

_LV = ir.VectorType(ir.FloatType(), LANES)


class F32x16(types.Type):
    """16 float32 lanes (LLVM <16 x float>)."""

    def __init__(self) -> None:
        super().__init__(name=f"f32x{LANES}")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _LV)


def _is_f32_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32


def _vector_ptr(context, builder, aryty, ary, idx):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [idx], inbounds=True), _LV.as_pointer())


@intrinsic
def vload(typingctx, arr, idx):
    """arr[idx:idx + 16] as a vector (arr: float32, contiguous along the flat index)."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(_vector_ptr(context, builder, sig.args[0], args[0], i), align=4)

    return f32x16(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """arr[idx:idx + 16] = v."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        builder.store(args[2], _vector_ptr(context, builder, sig.args[0], args[0], i), align=4)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector of 16 copies of the scalar x (converted to float32)."""
    if not isinstance(x, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[0], sig.args[0], types.float32)
        undef = ir.Constant(_LV, ir.Undefined)
        v = builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        return builder.shuffle_vector(v, undef, zeros)

    return f32x16(x), codegen


@intrinsic
def vfma(typingctx, x, w, a):
    """x * w + a lane by lane, fused (llvm.fma: one rounding)."""
    if not (x == f32x16 and w == f32x16 and a == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_LV, [_LV] * 3),
                                             f"llvm.fma.v{LANES}f32")
        return builder.call(fma, args)

    return f32x16(x, w, a), codegen


def _binary_codegen(op: str):
    def codegen(context, builder, sig, args):
        return getattr(builder, op)(*args)
    return codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b lane by lane."""
    if a == f32x16 and b == f32x16:
        return f32x16(a, b), _binary_codegen("fmul")


@intrinsic
def vadd(typingctx, a, b):
    """a + b lane by lane."""
    if a == f32x16 and b == f32x16:
        return f32x16(a, b), _binary_codegen("fadd")


@intrinsic
def vsub(typingctx, a, b):
    """a - b lane by lane."""
    if a == f32x16 and b == f32x16:
        return f32x16(a, b), _binary_codegen("fsub")


@intrinsic
def vdiv(typingctx, a, b):
    """a / b lane by lane."""
    if a == f32x16 and b == f32x16:
        return f32x16(a, b), _binary_codegen("fdiv")


@intrinsic
def vsum(typingctx, a):
    """The sum of the 16 lanes: halves added pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1)."""
    if a != f32x16:
        return None

    def codegen(context, builder, sig, args):
        v, n = args[0], LANES
        while n > 1:
            n //= 2
            undef = ir.Constant(v.type, ir.Undefined)
            lo = builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                              list(range(n))))
            hi = builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                              list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(a), codegen


@intrinsic
def vlane(typingctx, a, k):
    """Lane k of a (0 <= k < 16), a float32."""
    if not (a == f32x16 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i = context.cast(builder, args[1], sig.args[1], types.int32)
        return builder.extract_element(args[0], i)

    return types.float32(a, k), codegen


def _call_codegen(name: str, nargs: int):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_LV, [_LV] * nargs),
                                            f"llvm.{name}.v{LANES}f32")
        return builder.call(fn, args)
    return codegen


@intrinsic
def vmax(typingctx, a, b):
    """The larger of a and b lane by lane (llvm.maxnum)."""
    if a == f32x16 and b == f32x16:
        return f32x16(a, b), _call_codegen("maxnum", 2)


@intrinsic
def vfloor(typingctx, a):
    """floor(a) lane by lane."""
    if a == f32x16:
        return f32x16(a), _call_codegen("floor", 1)


@intrinsic
def vscale2(typingctx, a, k):
    """a * 2^k lane by lane, for lanes of k that are whole numbers in [-126, 127] (2^k is built in
    the exponent bits: no call, no branch)."""
    if not (a == f32x16 and k == f32x16):
        return None

    def codegen(context, builder, sig, args):
        iv = ir.VectorType(ir.IntType(32), LANES)
        e = builder.add(builder.fptosi(args[1], iv), ir.Constant(iv, [127] * LANES))
        pow2 = builder.bitcast(builder.shl(e, ir.Constant(iv, [23] * LANES)), _LV)
        return builder.fmul(args[0], pow2)

    return f32x16(a, k), codegen


@intrinsic
def vkeep_ge(typingctx, x, a, b):
    """x where a >= b, 0.0 elsewhere, lane by lane."""
    if not (x == f32x16 and a == f32x16 and b == f32x16):
        return None

    def codegen(context, builder, sig, args):
        keep = builder.fcmp_ordered(">=", args[1], args[2])
        return builder.select(keep, args[0], ir.Constant(_LV, [0.0] * LANES))

    return f32x16(x, a, b), codegen
