"""Activations quantized to Q8_0 blocks, as llama.cpp does before every Q8_0, Q4_0 and Q5_0 product.

llama.cpp converts x to its weight type's "vec_dot" type and multiplies block by block in
integers. For these three types that is Q8_0: blocks of 32, ``d = max|x| / 127`` stored as an
IEEE half, ``q = round_half_even(x * (127 / max|x|))`` (the unrounded ``d`` sets the quants).
Doing the same makes the integer kernels in ``legacy`` possible (1.3-1.7x the float kernels
on one AVX2 core) and keeps our logits on llama.cpp's side of every rounding.
"""
from __future__ import annotations

import math

import numba
import numpy as np

QK8_0 = 32  # activations per block

# Exact float32 arithmetic (no fastmath): the quants must land where llama.cpp's do.
_jit = numba.njit(nogil=True, cache=True)


@_jit
def _half_rounded(value):
    """``value`` (>= 0, float32) rounded to the nearest IEEE half, to even on ties; normal and subnormal halves."""
    if value == 0:
        return np.float32(0)
    _, exponent = math.frexp(value)  # value lies in [2**(exponent-1), 2**exponent)
    step = math.ldexp(1.0, max(exponent - 1, -14) - 10)  # a half's spacing there (2**-24 below its normals)
    return np.float32(np.rint(value / step) * step)  # power-of-two scaling is exact in float64


@_jit
def quantize_q8_0(xs):
    """Q8_0 blocks of float32 ``xs[n, cols]``: (quants int8 [n, cols], scales float32 [n, cols // 32])."""
    n, cols = xs.shape
    blocks = cols // QK8_0
    quants = np.empty((n, cols), dtype=np.int8)
    scales = np.empty((n, blocks), dtype=np.float32)
    for v in range(n):
        for b in range(blocks):
            first = b * QK8_0
            largest = np.float32(0)
            for j in range(first, first + QK8_0):
                largest = max(largest, abs(xs[v, j]))
            scales[v, b] = _half_rounded(largest / np.float32(127))
            inverse = np.float32(127) / largest if largest > 0 else np.float32(0)
            for j in range(first, first + QK8_0):
                quants[v, j] = np.int8(np.rint(xs[v, j] * inverse))
    return quants, scales


@_jit
def round_trip_q8_0(xs):
    """``xs[n, cols]`` as the float32 values of its Q8_0 blocks (what the integer kernels multiply by)."""
    quants, scales = quantize_q8_0(xs)
    out = np.empty(xs.shape, dtype=np.float32)
    for v in range(xs.shape[0]):
        for j in range(xs.shape[1]):
            out[v, j] = np.float32(quants[v, j]) * scales[v, j // QK8_0]
    return out
