"""Numba kernels for the unquantized GGML types F32, F16 and BF16.

Rows are plain arrays of 4-byte floats, 2-byte IEEE half floats or 2-byte bfloat16 (the top
half of a float32), so numba's loop vectorizer handles the long row loops by itself; the only
help it needs is a half -> float conversion it can vectorize, which numba lacks (no float16
type). ``emit_half_to_float`` writes that conversion as LLVM IR and is shared with the
quantized kernels, whose block scales are half floats.

Every ``*_matvec`` takes ``x`` as ``[cols]`` with ``out[rows]`` (the ``TypeKernels`` contract)
or as ``[n, cols]`` with ``out[n, rows]``: the weights are then read once for all n vectors,
one row at a time, while the row sits in the L1/L2 cache.
"""
from __future__ import annotations

import platform

import gguf
import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .base import TypeKernels

_jit_parallel = numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)


# --------------------------------------------------------------------------- half floats


def target_features() -> str:
    """The CPU features numba compiles for (NUMBA_CPU_FEATURES can narrow them below the host's)."""
    from numba.core.registry import cpu_target

    features = getattr(cpu_target.target_context.codegen(), "_tm_features", None)
    if isinstance(features, str):
        return features
    return llvmlite.binding.get_host_cpu_features().flatten()


def _has_hardware_half() -> bool:
    """Whether LLVM lowers ``fpext half`` to one instruction rather than a libcall numba cannot link."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return "+f16c" in target_features().split(",")
    return machine in ("aarch64", "arm64")


HARDWARE_HALF = _has_hardware_half()

_I16, _I32 = ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()


def emit_half_to_float(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """LLVM IR converting the IEEE half float held in integer ``bits`` to an exact float32."""
    width = bits.type.width
    if width > 16:
        bits = builder.trunc(bits, _I16)
    elif width < 16:
        bits = builder.zext(bits, _I16)
    if HARDWARE_HALF:
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), _F32)
    # Portable path: move exponent and mantissa into float32 position; multiplying by 2^112
    # rebiases the exponent (15 -> 127) exactly and also normalises half subnormals.
    half = builder.zext(bits, _I32)
    sign = builder.shl(builder.and_(half, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    magnitude = builder.shl(builder.and_(half, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
    rebiased = builder.fmul(builder.bitcast(magnitude, _F32), ir.Constant(_F32, 2.0**112))
    is_inf_or_nan = builder.icmp_unsigned(">=", magnitude, ir.Constant(_I32, 0x0F800000))
    inf_or_nan = builder.or_(magnitude, ir.Constant(_I32, 0x7F800000))
    unsigned = builder.select(is_inf_or_nan, inf_or_nan, builder.bitcast(rebiased, _I32))
    return builder.bitcast(builder.or_(unsigned, sign), _F32)


@intrinsic
def half_to_float(typingctx, bits):
    """float32 value of the IEEE half float whose 16 bits are the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return emit_half_to_float(builder, args[0])

    return types.float32(bits), codegen


@intrinsic
def bfloat16_to_float(typingctx, bits):
    """float32 value of the bfloat16 whose 16 bits are the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 16:
            value = builder.trunc(value, _I16)
        high_half = builder.shl(builder.zext(value, _I32), ir.Constant(_I32, 16))
        return builder.bitcast(high_half, _F32)

    return types.float32(bits), codegen


# --------------------------------------------------------------------------- kernels


@numba.njit(nogil=True, cache=True)
def _check_shapes(weights, xs, outs):
    """Raise unless ``xs [n, cols]`` and ``outs [n, rows]`` fit ``weights [rows, cols]``."""
    if xs.shape[1] != weights.shape[1] or outs.shape[0] != xs.shape[0]:
        raise ValueError("x does not match the weights' row length or out's vector count")
# Each kernel body is the same loop over a typed view of the row bytes; only the element
# conversion differs. They are written out per type (not made by a factory) because numba's
# on-disk cache keys functions by name and source line, so factory-made twins would collide.


@_jit_parallel
def f32_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * x[v, c] for F32 weights (x [cols] or [n, cols])."""
    weights = raw.view(np.float32)
    xs = x.reshape((-1, x.shape[-1]))
    outs = out.reshape((-1, raw.shape[0]))
    _check_shapes(weights, xs, outs)
    for r in prange(weights.shape[0]):
        row = weights[r]
        for v in range(xs.shape[0]):
            xv = xs[v]
            acc = np.float32(0.0)
            for c in range(row.shape[0]):
                acc += row[c] * xv[c]
            outs[v, r] = acc


@_jit_parallel
def f32_dequantize(raw, out):
    """Write the float32 weights of F32 ``raw`` to ``out[rows, cols]``."""
    weights = raw.view(np.float32)
    for r in prange(weights.shape[0]):
        for c in range(weights.shape[1]):
            out[r, c] = weights[r, c]


@_jit_parallel
def f16_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * x[v, c] for F16 weights (x [cols] or [n, cols])."""
    weights = raw.view(np.uint16)
    xs = x.reshape((-1, x.shape[-1]))
    outs = out.reshape((-1, raw.shape[0]))
    _check_shapes(weights, xs, outs)
    for r in prange(weights.shape[0]):
        row = weights[r]
        for v in range(xs.shape[0]):
            xv = xs[v]
            acc = np.float32(0.0)
            for c in range(row.shape[0]):
                acc += half_to_float(row[c]) * xv[c]
            outs[v, r] = acc


@_jit_parallel
def f16_dequantize(raw, out):
    """Write the float32 weights of F16 ``raw`` to ``out[rows, cols]``."""
    weights = raw.view(np.uint16)
    for r in prange(weights.shape[0]):
        for c in range(weights.shape[1]):
            out[r, c] = half_to_float(weights[r, c])


@_jit_parallel
def bf16_matvec(raw, x, out):
    """out[v, r] = sum_c W[r, c] * x[v, c] for BF16 weights (x [cols] or [n, cols])."""
    weights = raw.view(np.uint16)
    xs = x.reshape((-1, x.shape[-1]))
    outs = out.reshape((-1, raw.shape[0]))
    _check_shapes(weights, xs, outs)
    for r in prange(weights.shape[0]):
        row = weights[r]
        for v in range(xs.shape[0]):
            xv = xs[v]
            acc = np.float32(0.0)
            for c in range(row.shape[0]):
                acc += bfloat16_to_float(row[c]) * xv[c]
            outs[v, r] = acc


@_jit_parallel
def bf16_dequantize(raw, out):
    """Write the float32 weights of BF16 ``raw`` to ``out[rows, cols]``."""
    weights = raw.view(np.uint16)
    for r in prange(weights.shape[0]):
        for c in range(weights.shape[1]):
            out[r, c] = bfloat16_to_float(weights[r, c])


# --------------------------------------------------------------------------- registry

_T = gguf.GGMLQuantizationType

KERNELS: dict[gguf.GGMLQuantizationType, TypeKernels] = {
    _T.F32: TypeKernels(1, 4, f32_dequantize, f32_matvec),
    _T.F16: TypeKernels(1, 2, f16_dequantize, f16_matvec),
    _T.BF16: TypeKernels(1, 2, bf16_dequantize, bf16_matvec),
}

# Types whose matvec also takes x [n, cols] with out [n, rows] (see the module docstring).
MULTI_VECTOR_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(KERNELS)
