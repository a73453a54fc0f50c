"""Numba kernels for the 32-weight block types Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1.

Block layouts (ggml's ``block_q*`` structs, as decoded by gguf-py's ``gguf/quants.py``);
offsets are bytes from the block start, ``f16`` fields are little-endian IEEE half floats:

- Q8_0 (34 B): d f16 @0, qs int8[32] @2.                            w = d*q
- Q4_0 (18 B): d @0, qs[16] @2; byte j holds weight j in its low
               nibble and weight j+16 in its high nibble.             w = d*(q-8)
- Q4_1 (20 B): d @0, m @2, qs[16] @4.                                w = d*q + m
- Q5_0 (22 B): d @0, qh u32 @2 (bit j: fifth bit of weight j),
               qs[16] @6 (low four bits, as Q4_0).                   w = d*(q-16)
- Q5_1 (24 B): d @0, m @2, qh @4, qs[16] @8.                         w = d*q + m

Why LLVM IR rather than numba loops: numba fully unrolls a 16- or 32-step loop over one
block's lanes and then vectorizes across blocks with 18-byte-strided gathers, which measured
about 8x slower than straight 16-lane vector code. So each type supplies an ``unpack``
function that emits IR turning one block into 16-lane float vectors of its dequantized
weights (computed exactly as gguf-py does, so ``dequantize`` matches it bit for bit), and
``make_dot_row`` and ``make_dequantize_row`` wrap it into row-level intrinsics: one dots a row
with up to four vectors of x per pass (vector accumulators, one horizontal sum per row and
vector), one stores the row dequantized. The numba kernels only loop over rows with ``prange``.

Q8_0, Q4_0 and Q5_0 mat-vecs multiply in integers, as llama.cpp does: x is first quantized to
Q8_0 blocks (``activations``), each type supplies an ``unpack_quants`` giving a block's scale
and its 32 signed quants as bytes, and ``make_quant_dot_row`` sums byte products per block
(``vpmaddubsw``/``vpmaddwd`` with AVX2, portable IR elsewhere). On one core this measured
1.3-1.4x (Q8_0), 1.4x (Q5_0) and 1.6-1.7x (Q4_0) the float kernels. Q4_1 and Q5_1 (llama.cpp: Q8_1) still
dequantize to floats.

The intrinsics read memory without bounds checks; the kernels validate shapes first.
Editing the IR helpers here or in ``floats.py`` does not invalidate numba's on-disk cache of
kernels compiled from them in other files: clear ``__pycache__`` after such an edit.
"""
from __future__ import annotations

import platform
from typing import Callable

import gguf
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .activations import quantize_q8_0
from .base import TypeKernels
from .floats import HARDWARE_HALF, emit_half_to_float, target_features

LANES = 16  # floats per vector: one AVX-512 register, two AVX2 / four NEON registers
MAX_VECTORS_PER_PASS = 4  # x vectors dotted per pass over a row (accumulators stay in registers)

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_BYTES = ir.VectorType(_I8, LANES)
_INTS = ir.VectorType(_I32, LANES)
_FLOATS = ir.VectorType(_F32, LANES)

_jit_parallel = numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)

# unpack(builder, block_ptr) -> the block's weights as float vectors of LANES, in order
Unpack = Callable[[ir.IRBuilder, ir.Value], list]


# --------------------------------------------------------------------------- IR helpers


def _declare(builder: ir.IRBuilder, name: str, result: ir.Type, arguments: list) -> ir.Function:
    """The LLVM function ``name``, declared in this module on first use."""
    return builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(result, arguments), name)


def _ints(value: int) -> ir.Constant:
    return ir.Constant(_INTS, [value] * LANES)


def _splat(builder: ir.IRBuilder, scalar: ir.Value, lanes: int = LANES) -> ir.Value:
    """A vector of ``lanes`` copies of ``scalar``."""
    empty = ir.Constant(ir.VectorType(scalar.type, lanes), ir.Undefined)
    one = builder.insert_element(empty, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, empty, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))


def _load(builder: ir.IRBuilder, block: ir.Value, offset: int, ty: ir.Type) -> ir.Value:
    """Unaligned load of ``ty`` at byte ``offset`` of ``block`` (an i8 pointer)."""
    address = builder.gep(block, [ir.Constant(_I64, offset)])
    return builder.load(builder.bitcast(address, ty.as_pointer()), align=1)


def _f16(builder: ir.IRBuilder, block: ir.Value, offset: int) -> ir.Value:
    """The half float at byte ``offset`` as a float32 scalar."""
    if not HARDWARE_HALF:
        return emit_half_to_float(builder, _load(builder, block, offset, _I16))
    # Convert the two halves of a 4-byte load and keep the first: a scalar half load becomes
    # vpinsrw, which merges into a register LLVM may also use as an accumulator, chaining every
    # block's scale onto the previous block's FMAs (measured 2x slower Q8_0 with znver4 tuning).
    pair = builder.bitcast(_load(builder, block, offset, _I32), ir.VectorType(ir.HalfType(), 2))
    return builder.extract_element(builder.fpext(pair, ir.VectorType(_F32, 2)), ir.Constant(_I32, 0))


def _nibbles(builder: ir.IRBuilder, block: ir.Value, offset: int) -> tuple[ir.Value, ir.Value]:
    """The 16 low and 16 high nibbles of the bytes at ``offset``: weights 0..15 and 16..31."""
    packed = builder.zext(_load(builder, block, offset, _BYTES), _INTS)
    return builder.and_(packed, _ints(0x0F)), builder.lshr(packed, _ints(4))


def _fifth_bits(builder: ir.IRBuilder, block: ir.Value, offset: int) -> tuple[ir.Value, ir.Value]:
    """Weight j's fifth bit (bit j of the u32 at ``offset``) as 16 or 0, for j in 0..15 and in 16..31."""
    lanes = _splat(builder, _load(builder, block, offset, _I32))
    halves = []
    for first in (0, LANES):
        # a mask test and a select: one instruction each with AVX-512, cheaper than shifting
        masks = ir.Constant(_INTS, [1 << j for j in range(first, first + LANES)])
        is_set = builder.icmp_unsigned("!=", builder.and_(lanes, masks), _ints(0))
        halves.append(builder.select(is_set, _ints(16), _ints(0)))
    return halves[0], halves[1]


def _scaled(builder: ir.IRBuilder, quants: ir.Value, d: ir.Value, offset: ir.Value | None = None) -> ir.Value:
    """``d * float(quants) + offset`` per lane, bit-identical to gguf-py's dequantization.

    gguf-py computes ``d * (q - k)`` or ``d * q + m``; here ``d * q`` is always exact in
    float32 (an 11-bit half significand times a quant of at most 8 bits), so the single
    rounding of the fused ``d*q + offset`` (offset ``-k*d``, also exact, or ``m``) gives the
    same float, with one instruction fewer than integer subtract, convert, multiply.
    """
    weights = builder.sitofp(quants, _FLOATS)
    if offset is None:
        return builder.fmul(_splat(builder, d), weights)
    return _fmuladd(builder, _splat(builder, d), weights, _splat(builder, offset))


def _horizontal_sum(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """Sum of a vector's lanes by halving (log2(LANES) shuffles and adds)."""
    width = vector.type.count
    while width > 1:
        width //= 2
        mask = ir.VectorType(_I32, width)
        low = builder.shuffle_vector(vector, vector, ir.Constant(mask, list(range(width))))
        high = builder.shuffle_vector(vector, vector, ir.Constant(mask, list(range(width, 2 * width))))
        vector = builder.fadd(low, high)
    return builder.extract_element(vector, ir.Constant(_I32, 0))


def _fmuladd(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a*b + c on float32 vectors, fused where the target has FMA."""
    return builder.call(_declare(builder, f"llvm.fmuladd.v{a.type.count}f32", a.type, [a.type] * 3), [a, b, c])


# --------------------------------------------------------------------------- row intrinsics

# Prefetch distance ahead of the block being read. The hardware prefetcher alone left long rows
# (5632 columns) ~15% slower than short ones when streaming from DRAM; 2 KiB ahead closed the gap
# (512 B / 1 KiB / 4 KiB measured worse or equal).
PREFETCH_BYTES = 2048


def _prefetch(builder: ir.IRBuilder, address: ir.Value) -> None:
    """Hint a read of ``address`` into all cache levels (a prefetch never faults, even past the end)."""
    fn = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    builder.call(fn, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _is_c_array(ty, dtype, ndim: int) -> bool:
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


def _emit_row_dot_pass(builder, unpack, block_bytes, block_size, row, n_blocks, x_rows, out_slots):
    """Emit one pass over a row's blocks, storing its dot product with each ``x_rows[v]`` to ``out_slots[v]``."""
    zero = ir.Constant(_FLOATS, [0.0] * LANES)
    # For one vector, two accumulators so consecutive FMAs do not wait on each other; with more,
    # the vectors' chains interleave already and one each keeps the registers for them (AVX2 has
    # 16, and a 16-lane vector takes two).
    per_vector = 2 if len(x_rows) == 1 else 1
    accumulators = [[cgutils.alloca_once_value(builder, zero) for _ in range(per_vector)] for _ in x_rows]
    with cgutils.for_range(builder, n_blocks) as loop:
        block = builder.gep(row, [builder.mul(loop.index, ir.Constant(_I64, block_bytes))])
        first_weight = builder.mul(loop.index, ir.Constant(_I64, block_size))
        _prefetch(builder, builder.gep(block, [ir.Constant(_I64, PREFETCH_BYTES)]))
        parts = unpack(builder, block)
        for x_row, accs in zip(x_rows, accumulators):
            x_block = builder.gep(x_row, [first_weight])
            for k, weights in enumerate(parts):
                x_part = builder.gep(x_block, [ir.Constant(_I64, k * LANES)])
                x_vector = builder.load(builder.bitcast(x_part, _FLOATS.as_pointer()), align=4)
                acc = accs[k % per_vector]
                builder.store(_fmuladd(builder, weights, x_vector, builder.load(acc)), acc)
    for accs, slot in zip(accumulators, out_slots):
        total = builder.load(accs[0])
        for acc in accs[1:]:
            total = builder.fadd(total, builder.load(acc))
        builder.store(_horizontal_sum(builder, total), slot)


def _row_pointer(context, builder, raw_type, raw, r):
    """Address of row ``r`` of the uint8 [rows, row_bytes] array ``raw``."""
    raw_array = context.make_array(raw_type)(context, builder, raw)
    row_bytes = builder.extract_value(raw_array.strides, 0)
    return builder.gep(raw_array.data, [builder.mul(r, row_bytes)])


def _emit_vector_passes(builder, n_vectors, emit_pass) -> None:
    """Call ``emit_pass(first_vector, count)`` over ``n_vectors`` in groups of MAX_VECTORS_PER_PASS, then the rest."""
    full_passes = builder.udiv(n_vectors, ir.Constant(_I64, MAX_VECTORS_PER_PASS))
    with cgutils.for_range(builder, full_passes) as loop:
        emit_pass(builder.mul(loop.index, ir.Constant(_I64, MAX_VECTORS_PER_PASS)), MAX_VECTORS_PER_PASS)
    remainder = builder.urem(n_vectors, ir.Constant(_I64, MAX_VECTORS_PER_PASS))
    first_left = builder.mul(full_passes, ir.Constant(_I64, MAX_VECTORS_PER_PASS))
    for count in range(1, MAX_VECTORS_PER_PASS):
        with builder.if_then(builder.icmp_unsigned("==", remainder, ir.Constant(_I64, count))):
            emit_pass(first_left, count)


def make_dot_row(unpack: Unpack, block_bytes: int, block_size: int):
    """Build the intrinsic ``dot_row(raw, r, xs, outs)`` for one block type, on float x.

    It sets ``outs[v, r] = sum_c W[r, c] * xs[v, c]`` for every v, going over row r's blocks once
    per MAX_VECTORS_PER_PASS vectors. Arrays: raw uint8 [rows, row_bytes], xs float32 [n, cols],
    outs float32 [n, rows], all C order.
    """
    assert block_size % LANES == 0

    @intrinsic
    def dot_row(typingctx, raw, r, xs, outs):
        if not (_is_c_array(raw, types.uint8, 2) and isinstance(r, types.Integer)
                and _is_c_array(xs, types.float32, 2) and _is_c_array(outs, types.float32, 2)):
            return None

        def codegen(context, builder, signature, args):
            raw_v, r_v, xs_v, outs_v = args
            r_v = context.cast(builder, r_v, signature.args[1], types.intp)
            row = _row_pointer(context, builder, signature.args[0], raw_v, r_v)
            xs_array = context.make_array(signature.args[2])(context, builder, xs_v)
            outs_array = context.make_array(signature.args[3])(context, builder, outs_v)
            cols = builder.extract_value(xs_array.shape, 1)
            rows = builder.extract_value(outs_array.shape, 1)
            n_blocks = builder.udiv(cols, ir.Constant(_I64, block_size))

            def emit_pass(first_vector, count):
                x_rows, out_slots = [], []
                for v in range(count):
                    vector = builder.add(first_vector, ir.Constant(_I64, v))
                    x_rows.append(builder.gep(xs_array.data, [builder.mul(vector, cols)]))
                    out_slots.append(builder.gep(outs_array.data, [builder.add(builder.mul(vector, rows), r_v)]))
                _emit_row_dot_pass(builder, unpack, block_bytes, block_size, row, n_blocks, x_rows, out_slots)

            _emit_vector_passes(builder, builder.extract_value(xs_array.shape, 0), emit_pass)
            return context.get_dummy_value()

        return types.void(raw, r, xs, outs), codegen

    return dot_row


def make_dequantize_row(unpack: Unpack, block_bytes: int, block_size: int):
    """Build the intrinsic ``dequantize_row(raw, r, out)``: W[r, :] as float32 into ``out[r]`` (out [rows, cols])."""
    assert block_size % LANES == 0

    @intrinsic
    def dequantize_row(typingctx, raw, r, out):
        if not (_is_c_array(raw, types.uint8, 2) and isinstance(r, types.Integer)
                and _is_c_array(out, types.float32, 2)):
            return None

        def codegen(context, builder, signature, args):
            raw_v, r_v, out_v = args
            r_v = context.cast(builder, r_v, signature.args[1], types.intp)
            row = _row_pointer(context, builder, signature.args[0], raw_v, r_v)
            out_array = context.make_array(signature.args[2])(context, builder, out_v)
            cols = builder.extract_value(out_array.shape, 1)
            out_row = builder.gep(out_array.data, [builder.mul(r_v, cols)])
            n_blocks = builder.udiv(cols, ir.Constant(_I64, block_size))
            with cgutils.for_range(builder, n_blocks) as loop:
                block = builder.gep(row, [builder.mul(loop.index, ir.Constant(_I64, block_bytes))])
                out_block = builder.gep(out_row, [builder.mul(loop.index, ir.Constant(_I64, block_size))])
                for k, weights in enumerate(unpack(builder, block)):
                    out_part = builder.gep(out_block, [ir.Constant(_I64, k * LANES)])
                    builder.store(weights, builder.bitcast(out_part, _FLOATS.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(raw, r, out), codegen

    return dequantize_row


# --------------------------------------------------------------------------- integer dot products
# Q8_0, Q4_0 and Q5_0 rows multiply x quantized to Q8_0 blocks (``activations``), as llama.cpp
# does: per block, 32 byte products summed in integers, then one float multiply-add by the two
# scales. One block's quants are a vector of 32 signed bytes.

_QUANTS = ir.VectorType(_I8, 32)
_PAIR_SUMS = ir.VectorType(_I16, 16)
_QUAD_SUMS = ir.VectorType(_I32, 8)
_QUAD_FLOATS = ir.VectorType(_F32, 8)

# unpack_quants(builder, block_ptr) -> (the block's scale as a float32 scalar, its 32 quants, signed)
UnpackQuants = Callable[[ir.IRBuilder, ir.Value], tuple]


def _has_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2 (the byte multiply-adds ``vpmaddubsw``/``vpmaddwd``)."""
    return platform.machine().lower() in ("x86_64", "amd64") and "+avx2" in target_features().split(",")


AVX2 = _has_avx2()


def _quant_products(builder: ir.IRBuilder, weights: ir.Value, xs: ir.Value) -> ir.Value:
    """Products of two blocks of 32 signed bytes, summed in fours: lane i = sum of w[j] * x[j] for j in 4i..4i+3.

    ``xs`` are Q8_0 activations, so never -128; the weights may be anything. Both ways give
    exactly the same integers: a lane sums at most 4 * 128 * 127.
    """
    if AVX2:
        sign = _declare(builder, "llvm.x86.avx2.psign.b", _QUANTS, [_QUANTS, _QUANTS])
        # vpmaddubsw multiplies unsigned by signed bytes: |w| (-128 reads as 128) times x with w's sign
        magnitudes, signed_xs = builder.call(sign, [weights, weights]), builder.call(sign, [xs, weights])
        pairs = builder.call(_declare(builder, "llvm.x86.avx2.pmadd.ub.sw", _PAIR_SUMS, [_QUANTS, _QUANTS]),
                             [magnitudes, signed_xs])  # |pair sum| <= 2 * 128 * 127 < 2**15: no saturation
        ones = ir.Constant(_PAIR_SUMS, [1] * 16)
        return builder.call(_declare(builder, "llvm.x86.avx2.pmadd.wd", _QUAD_SUMS, [_PAIR_SUMS, _PAIR_SUMS]),
                            [pairs, ones])
    wide = ir.VectorType(_I32, 32)
    products = builder.mul(builder.sext(weights, wide), builder.sext(xs, wide))
    lanes = [builder.shuffle_vector(products, products, ir.Constant(_QUAD_SUMS, list(range(k, 32, 4))))
             for k in range(4)]
    return builder.add(builder.add(lanes[0], lanes[1]), builder.add(lanes[2], lanes[3]))


def _emit_row_quant_dot_pass(builder, unpack, block_bytes, row, n_blocks, quant_rows, scale_rows, out_slots):
    """Emit one pass over a row's blocks, storing its dot product with each Q8_0 vector to ``out_slots[v]``.

    Two blocks per step into two accumulators per vector, so one block's multiply-add does not
    wait on the previous one's (measured 1.2x on one core).
    """
    zero = ir.Constant(_QUAD_FLOATS, [0.0] * 8)
    accumulators = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in quant_rows]

    def emit_block(index, which):
        block = builder.gep(row, [builder.mul(index, ir.Constant(_I64, block_bytes))])
        _prefetch(builder, builder.gep(block, [ir.Constant(_I64, PREFETCH_BYTES)]))
        d, weights = unpack(builder, block)
        for quants, scales, accs in zip(quant_rows, scale_rows, accumulators):
            x_block = builder.gep(quants, [builder.mul(index, ir.Constant(_I64, QK))])
            xs = builder.load(builder.bitcast(x_block, _QUANTS.as_pointer()), align=1)
            sums = builder.sitofp(_quant_products(builder, weights, xs), _QUAD_FLOATS)
            scale = builder.fmul(d, builder.load(builder.gep(scales, [index])))
            acc = accs[which]
            builder.store(_fmuladd(builder, sums, _splat(builder, scale, 8), builder.load(acc)), acc)

    two = ir.Constant(_I64, 2)
    with cgutils.for_range(builder, builder.udiv(n_blocks, two)) as loop:
        first = builder.mul(loop.index, two)
        emit_block(first, 0)
        emit_block(builder.add(first, ir.Constant(_I64, 1)), 1)
    with builder.if_then(builder.icmp_unsigned("!=", builder.urem(n_blocks, two), ir.Constant(_I64, 0))):
        emit_block(builder.sub(n_blocks, ir.Constant(_I64, 1)), 0)
    for accs, slot in zip(accumulators, out_slots):
        builder.store(_horizontal_sum(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1]))), slot)


def make_quant_dot_row(unpack: UnpackQuants, block_bytes: int):
    """Build ``dot_row(raw, r, quants, scales, outs)``: ``outs[v, r]`` = row r of W dotted with Q8_0 vector v.

    Arrays: raw uint8 [rows, row_bytes], quants int8 [n, cols] and scales float32 [n, cols/32]
    (``activations.quantize_q8_0``), outs float32 [n, rows], all C order.
    """

    @intrinsic
    def dot_row(typingctx, raw, r, quants, scales, outs):
        if not (_is_c_array(raw, types.uint8, 2) and isinstance(r, types.Integer)
                and _is_c_array(quants, types.int8, 2) and _is_c_array(scales, types.float32, 2)
                and _is_c_array(outs, types.float32, 2)):
            return None

        def codegen(context, builder, signature, args):
            raw_v, r_v, quants_v, scales_v, outs_v = args
            r_v = context.cast(builder, r_v, signature.args[1], types.intp)
            row = _row_pointer(context, builder, signature.args[0], raw_v, r_v)
            quants_array = context.make_array(signature.args[2])(context, builder, quants_v)
            scales_array = context.make_array(signature.args[3])(context, builder, scales_v)
            outs_array = context.make_array(signature.args[4])(context, builder, outs_v)
            cols = builder.extract_value(quants_array.shape, 1)
            rows = builder.extract_value(outs_array.shape, 1)
            n_blocks = builder.udiv(cols, ir.Constant(_I64, QK))

            def emit_pass(first_vector, count):
                quant_rows, scale_rows, out_slots = [], [], []
                for v in range(count):
                    vector = builder.add(first_vector, ir.Constant(_I64, v))
                    quant_rows.append(builder.gep(quants_array.data, [builder.mul(vector, cols)]))
                    scale_rows.append(builder.gep(scales_array.data, [builder.mul(vector, n_blocks)]))
                    out_slots.append(builder.gep(outs_array.data, [builder.add(builder.mul(vector, rows), r_v)]))
                _emit_row_quant_dot_pass(builder, unpack, block_bytes, row, n_blocks, quant_rows, scale_rows, out_slots)

            _emit_vector_passes(builder, builder.extract_value(quants_array.shape, 0), emit_pass)
            return context.get_dummy_value()

        return types.void(raw, r, quants, scales, outs), codegen

    return dot_row


# --------------------------------------------------------------------------- block types

QK = 32  # weights per block, for every type here
Q8_0_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES = 34, 18, 20, 22, 24


def _unpack_q8_0(builder, block):
    d = _f16(builder, block, 0)
    return [_scaled(builder, builder.sext(_load(builder, block, 2 + k * LANES, _BYTES), _INTS), d) for k in (0, 1)]


def _unpack_q4_0(builder, block):
    d = _f16(builder, block, 0)
    minus_8d = builder.fmul(d, ir.Constant(_F32, -8.0))
    return [_scaled(builder, q, d, minus_8d) for q in _nibbles(builder, block, 2)]


def _unpack_q4_1(builder, block):
    d, m = _f16(builder, block, 0), _f16(builder, block, 2)
    return [_scaled(builder, q, d, m) for q in _nibbles(builder, block, 4)]


def _unpack_q5_0(builder, block):
    d = _f16(builder, block, 0)
    quants = [builder.or_(low, high) for low, high in zip(_nibbles(builder, block, 6), _fifth_bits(builder, block, 2))]
    minus_16d = builder.fmul(d, ir.Constant(_F32, -16.0))
    return [_scaled(builder, q, d, minus_16d) for q in quants]


def _unpack_q5_1(builder, block):
    d, m = _f16(builder, block, 0), _f16(builder, block, 2)
    quants = [builder.or_(low, high) for low, high in zip(_nibbles(builder, block, 8), _fifth_bits(builder, block, 4))]
    return [_scaled(builder, q, d, m) for q in quants]


def _quants_q8_0(builder, block):
    return _f16(builder, block, 0), _load(builder, block, 2, _QUANTS)


def _quant_nibbles(builder, block, offset):
    """The 32 nibbles of the 16 bytes at ``offset`` as bytes, low nibbles (weights 0..15) first."""
    packed = _load(builder, block, offset, _BYTES)
    low = builder.and_(packed, ir.Constant(_BYTES, [0x0F] * LANES))
    high = builder.lshr(packed, ir.Constant(_BYTES, [4] * LANES))
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


def _quants_q4_0(builder, block):
    quants = builder.sub(_quant_nibbles(builder, block, 2), ir.Constant(_QUANTS, [8] * 32))
    return _f16(builder, block, 0), quants


def _quants_q5_0(builder, block):
    # Weight j's fifth bit is bit j % 8 of byte j // 8 of qh: spread the bytes and test in bytes
    # (testing bits of a splatted u32 in 32-bit lanes ran at half the speed).
    qh = builder.bitcast(_load(builder, block, 2, _I32), ir.VectorType(_I8, 4))
    spread = builder.shuffle_vector(qh, qh, ir.Constant(ir.VectorType(_I32, 32), [j // 8 for j in range(32)]))
    bits = builder.and_(spread, ir.Constant(_QUANTS, [1 << (j % 8) for j in range(32)]))
    is_set = builder.icmp_unsigned("!=", bits, ir.Constant(_QUANTS, [0] * 32))
    fifth = builder.select(is_set, ir.Constant(_QUANTS, [16] * 32), ir.Constant(_QUANTS, [0] * 32))
    quants = builder.sub(builder.or_(_quant_nibbles(builder, block, 6), fifth), ir.Constant(_QUANTS, [16] * 32))
    return _f16(builder, block, 0), quants


_q8_0_dequantize_row = make_dequantize_row(_unpack_q8_0, Q8_0_BYTES, QK)
_q4_0_dequantize_row = make_dequantize_row(_unpack_q4_0, Q4_0_BYTES, QK)
_q4_1_dequantize_row = make_dequantize_row(_unpack_q4_1, Q4_1_BYTES, QK)
_q5_0_dequantize_row = make_dequantize_row(_unpack_q5_0, Q5_0_BYTES, QK)
_q5_1_dequantize_row = make_dequantize_row(_unpack_q5_1, Q5_1_BYTES, QK)
_q8_0_dot_row = make_quant_dot_row(_quants_q8_0, Q8_0_BYTES)
_q4_0_dot_row = make_quant_dot_row(_quants_q4_0, Q4_0_BYTES)
_q5_0_dot_row = make_quant_dot_row(_quants_q5_0, Q5_0_BYTES)
_q4_1_dot_row = make_dot_row(_unpack_q4_1, Q4_1_BYTES, QK)
_q5_1_dot_row = make_dot_row(_unpack_q5_1, Q5_1_BYTES, QK)


# --------------------------------------------------------------------------- kernels
# Written out per type rather than made by a factory: numba's on-disk cache keys functions by
# name and source line, so factory-made twins would overwrite each other's cache entries.


@numba.njit(nogil=True, cache=True)
def _check_row_bytes(raw, block_bytes, cols):
    """Raise unless each row of ``raw`` holds exactly ``cols`` weights in blocks of ``block_bytes``."""
    if cols % QK != 0 or raw.shape[1] != cols // QK * block_bytes:
        raise ValueError("raw row bytes do not match the number of columns")


@numba.njit(nogil=True, cache=True)
def _check_matvec_shapes(raw, block_bytes, xs, outs):
    """Raise unless raw [rows, row_bytes], xs [n, cols] and outs [n, rows] agree."""
    _check_row_bytes(raw, block_bytes, xs.shape[1])
    if outs.shape[0] != xs.shape[0] or outs.shape[1] != raw.shape[0]:
        raise ValueError("out does not match the rows of raw and the vectors of x")


@numba.njit(nogil=True, cache=True)
def _check_dequantize_shapes(raw, block_bytes, out):
    """Raise unless out [rows, cols] matches raw [rows, row_bytes]."""
    _check_row_bytes(raw, block_bytes, out.shape[1])
    if out.shape[0] != raw.shape[0]:
        raise ValueError("out does not have the rows of raw")


@_jit_parallel
def q8_0_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * q8_0(x)[v, c] for Q8_0 weights (x [cols] or [n, cols])."""
    xs, outs = x.reshape((-1, x.shape[-1])), out.reshape((-1, raw.shape[0]))
    _check_matvec_shapes(raw, Q8_0_BYTES, xs, outs)
    quants, scales = quantize_q8_0(xs)
    for r in prange(raw.shape[0]):
        _q8_0_dot_row(raw, r, quants, scales, outs)


@_jit_parallel
def q8_0_dequantize(raw, out):
    """Write the float32 weights of Q8_0 ``raw`` to ``out[rows, cols]``."""
    _check_dequantize_shapes(raw, Q8_0_BYTES, out)
    for r in prange(raw.shape[0]):
        _q8_0_dequantize_row(raw, r, out)


@_jit_parallel
def q4_0_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * q8_0(x)[v, c] for Q4_0 weights (x [cols] or [n, cols])."""
    xs, outs = x.reshape((-1, x.shape[-1])), out.reshape((-1, raw.shape[0]))
    _check_matvec_shapes(raw, Q4_0_BYTES, xs, outs)
    quants, scales = quantize_q8_0(xs)
    for r in prange(raw.shape[0]):
        _q4_0_dot_row(raw, r, quants, scales, outs)


@_jit_parallel
def q4_0_dequantize(raw, out):
    """Write the float32 weights of Q4_0 ``raw`` to ``out[rows, cols]``."""
    _check_dequantize_shapes(raw, Q4_0_BYTES, out)
    for r in prange(raw.shape[0]):
        _q4_0_dequantize_row(raw, r, out)


@_jit_parallel
def q4_1_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * x[v, c] for Q4_1 weights (x [cols] or [n, cols])."""
    xs, outs = x.reshape((-1, x.shape[-1])), out.reshape((-1, raw.shape[0]))
    _check_matvec_shapes(raw, Q4_1_BYTES, xs, outs)
    for r in prange(raw.shape[0]):
        _q4_1_dot_row(raw, r, xs, outs)


@_jit_parallel
def q4_1_dequantize(raw, out):
    """Write the float32 weights of Q4_1 ``raw`` to ``out[rows, cols]``."""
    _check_dequantize_shapes(raw, Q4_1_BYTES, out)
    for r in prange(raw.shape[0]):
        _q4_1_dequantize_row(raw, r, out)


@_jit_parallel
def q5_0_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * q8_0(x)[v, c] for Q5_0 weights (x [cols] or [n, cols])."""
    xs, outs = x.reshape((-1, x.shape[-1])), out.reshape((-1, raw.shape[0]))
    _check_matvec_shapes(raw, Q5_0_BYTES, xs, outs)
    quants, scales = quantize_q8_0(xs)
    for r in prange(raw.shape[0]):
        _q5_0_dot_row(raw, r, quants, scales, outs)


@_jit_parallel
def q5_0_dequantize(raw, out):
    """Write the float32 weights of Q5_0 ``raw`` to ``out[rows, cols]``."""
    _check_dequantize_shapes(raw, Q5_0_BYTES, out)
    for r in prange(raw.shape[0]):
        _q5_0_dequantize_row(raw, r, out)


@_jit_parallel
def q5_1_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * x[v, c] for Q5_1 weights (x [cols] or [n, cols])."""
    xs, outs = x.reshape((-1, x.shape[-1])), out.reshape((-1, raw.shape[0]))
    _check_matvec_shapes(raw, Q5_1_BYTES, xs, outs)
    for r in prange(raw.shape[0]):
        _q5_1_dot_row(raw, r, xs, outs)


@_jit_parallel
def q5_1_dequantize(raw, out):
    """Write the float32 weights of Q5_1 ``raw`` to ``out[rows, cols]``."""
    _check_dequantize_shapes(raw, Q5_1_BYTES, out)
    for r in prange(raw.shape[0]):
        _q5_1_dequantize_row(raw, r, out)


# --------------------------------------------------------------------------- registry

_T = gguf.GGMLQuantizationType

KERNELS: dict[gguf.GGMLQuantizationType, TypeKernels] = {
    _T.Q8_0: TypeKernels(QK, Q8_0_BYTES, q8_0_dequantize, q8_0_matvec, quantizes_activations=True),
    _T.Q4_0: TypeKernels(QK, Q4_0_BYTES, q4_0_dequantize, q4_0_matvec, quantizes_activations=True),
    _T.Q4_1: TypeKernels(QK, Q4_1_BYTES, q4_1_dequantize, q4_1_matvec),
    _T.Q5_0: TypeKernels(QK, Q5_0_BYTES, q5_0_dequantize, q5_0_matvec, quantizes_activations=True),
    _T.Q5_1: TypeKernels(QK, Q5_1_BYTES, q5_1_dequantize, q5_1_matvec),
}

# Types whose matvec also takes x [n, cols] with out [n, rows], reading the weights once.
MULTI_VECTOR_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(KERNELS)
