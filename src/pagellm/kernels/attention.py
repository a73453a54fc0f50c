"""Attention over a float16 KV cache: a fused kernel for decoding, and the conversion BLAS needs.

The cache holds keys and values as IEEE halves ``[positions, kv heads, dim]`` (as llama.cpp
stores them). numpy's float16 cast runs element by element here, and a decode step converted
the whole cache of every layer to float32 before two small products: 1.2 ms per 7B layer at 33
positions, 180 ms at 2048. Decoding reads each cached half once instead, converting it in
registers (F16C); a prompt's many queries share one vectorised conversion and BLAS.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .floats import half_to_float

# Reassociation and fused multiply-adds (the sums vectorise); not "no infinities", which would let
# LLVM drop the running maximum's -inf start.
_FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}

# Up to this many queries the fused kernel runs (each query reads the cache again); beyond it,
# the cache is converted once and BLAS multiplies.
FUSED_MAX_QUERIES = 4


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def _halves_heads_first(bits, out):
    """out[h, s, d] = float(bits[s, h, d]) for IEEE half ``bits`` (uint16) [S, H, D]."""
    for h in range(bits.shape[1]):
        for s in range(bits.shape[0]):
            for d in range(bits.shape[2]):
                out[h, s, d] = half_to_float(bits[s, h, d])


def halves_heads_first(cache: np.ndarray) -> np.ndarray:
    """A float16 KV-cache slice ``[positions, heads, dim]`` as float32 ``[heads, positions, dim]``
    (each head's rows contiguous, as BLAS wants them)."""
    bits = np.ascontiguousarray(cache).view(np.uint16)
    out = np.empty((bits.shape[1], bits.shape[0], bits.shape[2]), dtype=np.float32)
    _halves_heads_first(bits, out)
    return out


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def _attend_head(q, keys, values, h, kv, t, n, scale, scores, out):
    """out[t, h] = softmax(q[t, h] . keys[:n, kv] * scale) @ values[:n, kv], the cache in halves."""
    dim = q.shape[2]
    best = -np.inf
    for s in range(n):
        acc = np.float32(0.0)
        for d in range(dim):
            acc += q[t, h, d] * half_to_float(keys[s, kv, d])
        acc *= scale
        scores[s] = acc
        best = max(best, acc)
    total = np.float32(0.0)
    for s in range(n):
        p = np.float32(math.exp(scores[s] - best))
        scores[s] = p
        total += p
    for d in range(dim):
        out[t, h, d] = 0.0
    for s in range(n):
        w = scores[s] / total
        for d in range(dim):
            out[t, h, d] += w * half_to_float(values[s, kv, d])


@numba.njit(nogil=True, cache=True, parallel=True, fastmath=_FAST)
def _attend(q, keys, values, start, scale, out):
    """Causal attention of queries ``q [T, H, D]`` at positions start.. over cached halves, by head."""
    n_head, n_kv = q.shape[1], keys.shape[1]
    group = n_head // n_kv
    for h in prange(n_head):
        scores = np.empty(keys.shape[0], dtype=np.float32)
        for t in range(q.shape[0]):
            n = min(start + t + 1, keys.shape[0])  # query t sees keys up to its own position
            _attend_head(q, keys, values, h, h // group, t, n, scale, scores, out)


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention for a few queries ``q [T, heads, dim]`` (positions start ..
    start+T-1) over the float16 cache ``keys``/``values [positions, kv heads, dim]``: ``[T, heads, dim]``.

    Query head h reads KV head h // (heads / kv heads).
    """
    out = np.empty(q.shape, dtype=np.float32)
    scale = np.float32(1.0 / math.sqrt(q.shape[2]))
    _attend(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(keys).view(np.uint16),
            np.ascontiguousarray(values).view(np.uint16), start, scale, out)
    return out
