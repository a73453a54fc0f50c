"""Numba kernels for the K-quant GGML types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Every K-quant packs 256 weights into one super-block. The byte layouts follow ggml's
``block_qN_K`` structs as decoded by gguf-py's ``gguf/quants.py``; offsets are bytes from
the start of a block, ``f16`` fields are little-endian IEEE half floats:

- Q2_K (84 B):  scales[16] @0 (per 16 weights: low nibble scale, high nibble min),
                qs[64] @16 (2-bit), d @80, dmin @82.           w = d*sc*q - dmin*m
- Q3_K (110 B): hmask[32] @0 (third bit), qs[64] @32 (low 2 bits), scales[12] @96
                (sixteen 6-bit scales, biased by 32), d @108.   w = d*(sc-32)*(q-4)
- Q4_K (144 B): d @0, dmin @2, scales[12] @4 (eight 6-bit scales and eight 6-bit mins,
                per 32 weights), qs[128] @16 (4-bit).           w = d*sc*q - dmin*m
- Q5_K (176 B): like Q4_K, plus qh[32] @16 (fifth bit); qs[128] @48.
- Q6_K (210 B): ql[128] @0 (low 4 bits), qh[64] @128 (high 2 bits), scales[16] @192
                (int8, per 16 weights), d @208.                 w = d*sc*(q-32)

Bit planes: a run of 32 consecutive weights reads 32 consecutive bytes and takes one
bit-field of each. The 2-bit ``qs`` of Q2_K/Q3_K serve 4 runs (shifts 0, 2, 4, 6) per
32 bytes, the nibbles of Q4_K/Q5_K 2 runs (low, high), Q6_K's ``ql`` 2 runs and ``qh``
4 runs; Q3_K's ``hmask`` and Q5_K's ``qh`` give run ``n`` bit ``n`` of the same 32 bytes.

Mat-vec shape: each block is one loop over 16 lanes. Lane ``j`` handles weight ``j`` of
every 16-weight half-run, multiplies its quant by ``x`` and its group's scale, and sums
them all; LLVM turns the lane loop into one pass of 16-wide vector code with a single
horizontal sum per block (one per group would cost as much as the arithmetic). Quants are
unpacked with byte arithmetic truncated to ``np.uint8``/``np.int8``, which lets LLVM work
on byte lanes and widen only for the float conversion (numba's default int64 arithmetic
made it use 64-bit lanes at half the speed). Q3_K's -4 and Q6_K's -32 fit in int8 and are
applied there; the ``- dmin*m`` mins of Q2_K/Q4_K/Q5_K only need the sum of ``x`` over
each group, the same for every row, so those sums are computed once per call.

Blocks are passed to helpers as slices (``row[b:b+size]``): indexing a slice with
non-negative constants plus the loop index lets numba's negative-index wraparound fold
away, which keeps the loads contiguous (a computed base index made them gathers). The
block helpers are inlined in numba's IR so those slices cost no reference counting.

The f32 arithmetic is the exact dequantized weight times ``x``: no quantization of ``x``
as llama.cpp does, so results match ``dequantize(W) @ x`` to float32 rounding.
"""
from __future__ import annotations

import gguf
import numba
import numpy as np
from numba import prange

from .base import TypeKernels
from .floats import half_to_float

QK_K = 256  # weights per super-block, for every K-quant

Q2_K_BYTES = 84
Q3_K_BYTES = 110
Q4_K_BYTES = 144
Q5_K_BYTES = 176
Q6_K_BYTES = 210

_jit = numba.njit(nogil=True, cache=True, fastmath=True)
# Block-level helpers are inlined in numba's IR so the per-block slices they receive are
# seen as local views and their reference counting is pruned (an atomic inc/dec pair per
# slice per block otherwise costs more than the block's arithmetic).
_jit_inline = numba.njit(nogil=True, cache=True, fastmath=True, inline="always")
_jit_parallel = numba.njit(parallel=True, nogil=True, cache=True, fastmath=True)


# --------------------------------------------------------------------------- helpers


@_jit
def _f16_to_f32(blk, offset):
    """The little-endian IEEE half float at ``blk[offset]`` as float32 (exact)."""
    return half_to_float(np.uint16(blk[offset] | (blk[offset + 1] << 8)))


@_jit
def _group_sums(x, group_size):
    """Sum of ``x`` over each run of ``group_size`` values (what a group's min weighs)."""
    n_groups = x.shape[0] // group_size
    sums = np.empty(n_groups, dtype=np.float32)
    for g in range(n_groups):
        xg = x[g * group_size:(g + 1) * group_size]
        total = np.float32(0.0)
        for j in range(group_size):
            total += xg[j]
        sums[g] = total
    return sums


@_jit
def _blocks_per_row(raw, type_size, cols):
    """Super-blocks per row; raise when ``raw``'s row bytes do not hold ``cols`` weights."""
    n_blocks = raw.shape[1] // type_size
    if n_blocks * type_size != raw.shape[1] or n_blocks * QK_K != cols:
        raise ValueError("raw row bytes do not match the number of columns")
    return n_blocks


@_jit
def _k4_scale(blk, group):
    """Q4_K/Q5_K 6-bit scale of ``group`` 0..7 from the 12 packed bytes at ``blk[4:16]``.

    Bytes 4-7 hold scales 0-3 in their low 6 bits; scales 4-7 have their low 4 bits in the
    low nibbles of bytes 12-15 and their top 2 bits in the spare top bits of bytes 4-7.
    """
    if group < 4:
        return np.int32(blk[4 + group]) & 0x3F
    return (np.int32(blk[8 + group]) & 0x0F) | ((np.int32(blk[group]) >> 6) << 4)


@_jit
def _k4_min(blk, group):
    """Q4_K/Q5_K 6-bit min of ``group`` 0..7: laid out like the scales, from bytes 8-11
    and the high nibbles of bytes 12-15."""
    if group < 4:
        return np.int32(blk[8 + group]) & 0x3F
    return (np.int32(blk[8 + group]) >> 4) | ((np.int32(blk[4 + group]) >> 6) << 4)


@_jit
def _q3k_scale(blk, group):
    """Q3_K's unbiased 6-bit scale of ``group`` 0..15 from the 12 bytes at ``blk[96:108]``.

    Bytes 96-103 hold the low 4 bits (groups 0-7 low nibbles, 8-15 high nibbles); bytes
    104-107 the top 2 bits, group g at bit pair ``g // 4`` of byte ``104 + g % 4``.
    """
    low = (np.int32(blk[96 + (group & 7)]) >> (4 * (group >> 3))) & 0x0F
    high = (np.int32(blk[104 + (group & 3)]) >> (2 * (group >> 2))) & 0x03
    return (low | (high << 4)) - 32


@_jit
def _q6k_scale(blk, group):
    """Q6_K's signed 8-bit scale of ``group`` 0..15."""
    return np.int32(np.int8(blk[192 + group]))


# --------------------------------------------------------------------------- shared shapes
#
# A "column" is the set of quants one byte position of a block decodes to: the same byte
# offset ``j`` in each bit plane, covering weights 32 apart. Lane helpers combine the
# columns at ``j = lane`` and ``j = lane + 16`` (the two 16-weight groups of each run).


@_jit
def _column4_dot(q, scales, xb, x0):
    """sum_n scales[n] * q[n] * xb[x0 + 32n] over a column of 4 runs."""
    return (scales[0] * (np.float32(q[0]) * xb[x0])
            + scales[1] * (np.float32(q[1]) * xb[x0 + 32])
            + scales[2] * (np.float32(q[2]) * xb[x0 + 64])
            + scales[3] * (np.float32(q[3]) * xb[x0 + 96]))


@_jit
def _column4_store(dst, x0, q, scales):
    """dst[x0 + 32n] = scales[n] * q[n] over a column of 4 runs."""
    dst[x0] = scales[0] * np.float32(q[0])
    dst[x0 + 32] = scales[1] * np.float32(q[1])
    dst[x0 + 64] = scales[2] * np.float32(q[2])
    dst[x0 + 96] = scales[3] * np.float32(q[3])


@_jit
def _column4_store_with_mins(dst, x0, q, scales, offsets):
    """dst[x0 + 32n] = scales[n] * q[n] - offsets[n] over a column of 4 runs."""
    dst[x0] = scales[0] * np.float32(q[0]) - offsets[0]
    dst[x0 + 32] = scales[1] * np.float32(q[1]) - offsets[1]
    dst[x0 + 64] = scales[2] * np.float32(q[2]) - offsets[2]
    dst[x0 + 96] = scales[3] * np.float32(q[3]) - offsets[3]


@_jit
def _nibble_pair_dot(q_first, q_second, scale_low, scale_high, xb, x0):
    """Bytes ``j`` and ``j+16`` of a nibble plane: low nibbles weigh xb[x0], xb[x0+16]
    (one 32-weight group), high nibbles xb[x0+32], xb[x0+48] (the next group)."""
    low = np.float32(q_first[0]) * xb[x0] + np.float32(q_second[0]) * xb[x0 + 16]
    high = np.float32(q_first[1]) * xb[x0 + 32] + np.float32(q_second[1]) * xb[x0 + 48]
    return scale_low * low + scale_high * high


# --------------------------------------------------------------------------- Q2_K


@_jit
def _q2k_column(blk, half, j):
    """Unsigned 2-bit quants of qs byte ``j`` of ``half``: weights 128*half + 32n + j."""
    byte = blk[16 + 32 * half + j]
    return np.uint8(byte & 3), np.uint8((byte >> 2) & 3), np.uint8((byte >> 4) & 3), np.uint8(byte >> 6)


@_jit
def _q2k_scales(blk, group):
    """Scales of groups ``group + 2n`` (the 4 runs of a column), d not applied."""
    return (np.float32(blk[group] & 0x0F), np.float32(blk[group + 2] & 0x0F),
            np.float32(blk[group + 4] & 0x0F), np.float32(blk[group + 6] & 0x0F))


@_jit
def _q2k_lane_dot(blk, xb, half, sub, lane):
    """Scaled dot of the column at byte ``16*sub + lane`` of ``half`` with x."""
    j = 16 * sub + lane
    return _column4_dot(_q2k_column(blk, half, j), _q2k_scales(blk, 8 * half + sub), xb, 128 * half + j)


@_jit_inline
def _q2k_block_dot(blk, xb, x_sums16):
    """Dot product of one Q2_K block with its 256 values of ``x``."""
    d = _f16_to_f32(blk, 80)
    dmin = _f16_to_f32(blk, 82)
    acc = np.float32(0.0)
    for lane in range(16):
        scaled = (_q2k_lane_dot(blk, xb, 0, 0, lane) + _q2k_lane_dot(blk, xb, 0, 1, lane)
                  + _q2k_lane_dot(blk, xb, 1, 0, lane) + _q2k_lane_dot(blk, xb, 1, 1, lane))
        # 16 groups, 16 lanes: lane doubles as the group whose min it subtracts, so the
        # mins ride in the same vector pass instead of a serial chain of scalar FMAs
        acc += d * scaled - dmin * (np.float32(blk[lane] >> 4) * x_sums16[lane])
    return acc


@_jit_inline
def _q2k_block_dequantize(blk, dst):
    """Write the 256 weights of one Q2_K block to ``dst``."""
    d = _f16_to_f32(blk, 80)
    dmin = _f16_to_f32(blk, 82)
    for half in range(2):
        for sub in range(2):
            g = 8 * half + sub
            s = _q2k_scales(blk, g)
            scales = (d * s[0], d * s[1], d * s[2], d * s[3])
            offsets = (dmin * np.float32(blk[g] >> 4), dmin * np.float32(blk[g + 2] >> 4),
                       dmin * np.float32(blk[g + 4] >> 4), dmin * np.float32(blk[g + 6] >> 4))
            for lane in range(16):
                j = 16 * sub + lane
                _column4_store_with_mins(dst, 128 * half + j, _q2k_column(blk, half, j), scales, offsets)


@_jit_parallel
def q2_k_matvec(raw, x, out):
    """out[r] = sum_c W[r, c] * x[c] for Q2_K weights ``raw``, never materialising W."""
    n_blocks = _blocks_per_row(raw, Q2_K_BYTES, x.shape[0])
    x_sums16 = _group_sums(x, 16)
    for r in prange(raw.shape[0]):
        row = raw[r]
        acc = np.float32(0.0)
        for b in range(n_blocks):
            acc += _q2k_block_dot(row[b * Q2_K_BYTES:(b + 1) * Q2_K_BYTES],
                                  x[b * QK_K:(b + 1) * QK_K], x_sums16[b * 16:(b + 1) * 16])
        out[r] = acc


@_jit_parallel
def q2_k_dequantize(raw, out):
    """Write the float32 weights of Q2_K ``raw`` to ``out[rows, cols]``."""
    n_blocks = _blocks_per_row(raw, Q2_K_BYTES, out.shape[1])
    for r in prange(raw.shape[0]):
        for b in range(n_blocks):
            _q2k_block_dequantize(raw[r, b * Q2_K_BYTES:(b + 1) * Q2_K_BYTES],
                                  out[r, b * QK_K:(b + 1) * QK_K])


# --------------------------------------------------------------------------- Q3_K


@_jit
def _q3k_column(blk, half, j):
    """Signed 3-bit quants (-4..3) of byte ``j`` of ``half``: weights 128*half + 32n + j.

    The low 2 bits come from qs, the third from hmask bit ``4*half + n``. ggml subtracts 4
    when that bit is *clear*, so the quant is (low | bit << 2) - 4.
    """
    low = blk[32 + 32 * half + j]
    high = blk[j] >> (4 * half)
    return (np.int8(((low & 3) | ((high & 1) << 2)) - 4),
            np.int8((((low >> 2) & 3) | ((high & 2) << 1)) - 4),
            np.int8((((low >> 4) & 3) | (high & 4)) - 4),
            np.int8(((low >> 6) | ((high & 8) >> 1)) - 4))


@_jit
def _q3k_scales(blk, group):
    """Signed scales of groups ``group + 2n`` (the 4 runs of a column), d not applied."""
    return (np.float32(_q3k_scale(blk, group)), np.float32(_q3k_scale(blk, group + 2)),
            np.float32(_q3k_scale(blk, group + 4)), np.float32(_q3k_scale(blk, group + 6)))


@_jit
def _q3k_lane_dot(blk, xb, half, sub, lane):
    """Scaled dot of the column at byte ``16*sub + lane`` of ``half`` with x."""
    j = 16 * sub + lane
    return _column4_dot(_q3k_column(blk, half, j), _q3k_scales(blk, 8 * half + sub), xb, 128 * half + j)


@_jit_inline
def _q3k_block_dot(blk, xb):
    """Dot product of one Q3_K block with its 256 values of ``x``."""
    scaled = np.float32(0.0)
    for lane in range(16):
        scaled += (_q3k_lane_dot(blk, xb, 0, 0, lane) + _q3k_lane_dot(blk, xb, 0, 1, lane)
                   + _q3k_lane_dot(blk, xb, 1, 0, lane) + _q3k_lane_dot(blk, xb, 1, 1, lane))
    return _f16_to_f32(blk, 108) * scaled


@_jit_inline
def _q3k_block_dequantize(blk, dst):
    """Write the 256 weights of one Q3_K block to ``dst``."""
    d = _f16_to_f32(blk, 108)
    for half in range(2):
        for sub in range(2):
            s = _q3k_scales(blk, 8 * half + sub)
            scales = (d * s[0], d * s[1], d * s[2], d * s[3])
            for lane in range(16):
                j = 16 * sub + lane
                _column4_store(dst, 128 * half + j, _q3k_column(blk, half, j), scales)


@_jit_parallel
def q3_k_matvec(raw, x, out):
    """out[r] = sum_c W[r, c] * x[c] for Q3_K weights ``raw``, never materialising W."""
    n_blocks = _blocks_per_row(raw, Q3_K_BYTES, x.shape[0])
    for r in prange(raw.shape[0]):
        row = raw[r]
        acc = np.float32(0.0)
        for b in range(n_blocks):
            acc += _q3k_block_dot(row[b * Q3_K_BYTES:(b + 1) * Q3_K_BYTES], x[b * QK_K:(b + 1) * QK_K])
        out[r] = acc


@_jit_parallel
def q3_k_dequantize(raw, out):
    """Write the float32 weights of Q3_K ``raw`` to ``out[rows, cols]``."""
    n_blocks = _blocks_per_row(raw, Q3_K_BYTES, out.shape[1])
    for r in prange(raw.shape[0]):
        for b in range(n_blocks):
            _q3k_block_dequantize(raw[r, b * Q3_K_BYTES:(b + 1) * Q3_K_BYTES],
                                  out[r, b * QK_K:(b + 1) * QK_K])


# --------------------------------------------------------------------------- Q4_K


@_jit
def _q4k_column(blk, pair, j):
    """Unsigned 4-bit quants of qs byte ``j`` of ``pair``: weights 64*pair + j and + 32."""
    byte = blk[16 + 32 * pair + j]
    return np.uint8(byte & 0x0F), np.uint8(byte >> 4)


@_jit
def _q4k_lane_dot(blk, xb, pair, lane):
    """Scaled dot of bytes ``lane`` and ``lane + 16`` of ``pair`` (groups 2*pair, 2*pair+1)."""
    return _nibble_pair_dot(_q4k_column(blk, pair, lane), _q4k_column(blk, pair, lane + 16),
                            np.float32(_k4_scale(blk, 2 * pair)), np.float32(_k4_scale(blk, 2 * pair + 1)),
                            xb, 64 * pair + lane)


@_jit
def _k4_mins_dot(blk, x_sums32):
    """sum_g min[g] * (sum of x over group g) for a Q4_K/Q5_K block, dmin not applied."""
    mins = np.float32(0.0)
    for i in range(4):  # groups i and i + 4 side by side, so the loop has no branch
        low_group = blk[8 + i] & 0x3F
        high_group = (blk[12 + i] >> 4) | ((blk[8 + i] >> 6) << 4)
        mins += (np.float32(np.uint8(low_group)) * x_sums32[i]
                 + np.float32(np.uint8(high_group)) * x_sums32[4 + i])
    return mins


@_jit_inline
def _q4k_block_dot(blk, xb, x_sums32):
    """Dot product of one Q4_K block with its 256 values of ``x``."""
    scaled = np.float32(0.0)
    for lane in range(16):
        scaled += (_q4k_lane_dot(blk, xb, 0, lane) + _q4k_lane_dot(blk, xb, 1, lane)
                   + _q4k_lane_dot(blk, xb, 2, lane) + _q4k_lane_dot(blk, xb, 3, lane))
    return _f16_to_f32(blk, 0) * scaled - _f16_to_f32(blk, 2) * _k4_mins_dot(blk, x_sums32)


@_jit_inline
def _q4k_block_dequantize(blk, dst):
    """Write the 256 weights of one Q4_K block to ``dst``."""
    d = _f16_to_f32(blk, 0)
    dmin = _f16_to_f32(blk, 2)
    for pair in range(4):
        scale_low = d * np.float32(_k4_scale(blk, 2 * pair))
        scale_high = d * np.float32(_k4_scale(blk, 2 * pair + 1))
        offset_low = dmin * np.float32(_k4_min(blk, 2 * pair))
        offset_high = dmin * np.float32(_k4_min(blk, 2 * pair + 1))
        for j in range(32):
            low, high = _q4k_column(blk, pair, j)
            dst[64 * pair + j] = scale_low * np.float32(low) - offset_low
            dst[64 * pair + 32 + j] = scale_high * np.float32(high) - offset_high


@_jit_parallel
def q4_k_matvec(raw, x, out):
    """out[r] = sum_c W[r, c] * x[c] for Q4_K weights ``raw``, never materialising W."""
    n_blocks = _blocks_per_row(raw, Q4_K_BYTES, x.shape[0])
    x_sums32 = _group_sums(x, 32)
    for r in prange(raw.shape[0]):
        row = raw[r]
        acc = np.float32(0.0)
        for b in range(n_blocks):
            acc += _q4k_block_dot(row[b * Q4_K_BYTES:(b + 1) * Q4_K_BYTES],
                                  x[b * QK_K:(b + 1) * QK_K], x_sums32[b * 8:(b + 1) * 8])
        out[r] = acc


@_jit_parallel
def q4_k_dequantize(raw, out):
    """Write the float32 weights of Q4_K ``raw`` to ``out[rows, cols]``."""
    n_blocks = _blocks_per_row(raw, Q4_K_BYTES, out.shape[1])
    for r in prange(raw.shape[0]):
        for b in range(n_blocks):
            _q4k_block_dequantize(raw[r, b * Q4_K_BYTES:(b + 1) * Q4_K_BYTES],
                                  out[r, b * QK_K:(b + 1) * QK_K])


# --------------------------------------------------------------------------- Q5_K


@_jit
def _q5k_column(blk, pair, j):
    """Unsigned 5-bit quants of byte ``j`` of ``pair``: weights 64*pair + j and + 32.

    The fifth bit of run n (= group n) is bit n of qh[j].
    """
    byte = blk[48 + 32 * pair + j]
    high = blk[16 + j] >> (2 * pair)
    return np.uint8((byte & 0x0F) | ((high & 1) << 4)), np.uint8((byte >> 4) | ((high & 2) << 3))


@_jit
def _q5k_lane_dot(blk, xb, pair, lane):
    """Scaled dot of bytes ``lane`` and ``lane + 16`` of ``pair`` (groups 2*pair, 2*pair+1)."""
    return _nibble_pair_dot(_q5k_column(blk, pair, lane), _q5k_column(blk, pair, lane + 16),
                            np.float32(_k4_scale(blk, 2 * pair)), np.float32(_k4_scale(blk, 2 * pair + 1)),
                            xb, 64 * pair + lane)


@_jit_inline
def _q5k_block_dot(blk, xb, x_sums32):
    """Dot product of one Q5_K block with its 256 values of ``x``."""
    scaled = np.float32(0.0)
    for lane in range(16):
        scaled += (_q5k_lane_dot(blk, xb, 0, lane) + _q5k_lane_dot(blk, xb, 1, lane)
                   + _q5k_lane_dot(blk, xb, 2, lane) + _q5k_lane_dot(blk, xb, 3, lane))
    return _f16_to_f32(blk, 0) * scaled - _f16_to_f32(blk, 2) * _k4_mins_dot(blk, x_sums32)


@_jit_inline
def _q5k_block_dequantize(blk, dst):
    """Write the 256 weights of one Q5_K block to ``dst``."""
    d = _f16_to_f32(blk, 0)
    dmin = _f16_to_f32(blk, 2)
    for pair in range(4):
        scale_low = d * np.float32(_k4_scale(blk, 2 * pair))
        scale_high = d * np.float32(_k4_scale(blk, 2 * pair + 1))
        offset_low = dmin * np.float32(_k4_min(blk, 2 * pair))
        offset_high = dmin * np.float32(_k4_min(blk, 2 * pair + 1))
        for j in range(32):
            low, high = _q5k_column(blk, pair, j)
            dst[64 * pair + j] = scale_low * np.float32(low) - offset_low
            dst[64 * pair + 32 + j] = scale_high * np.float32(high) - offset_high


@_jit_parallel
def q5_k_matvec(raw, x, out):
    """out[r] = sum_c W[r, c] * x[c] for Q5_K weights ``raw``, never materialising W."""
    n_blocks = _blocks_per_row(raw, Q5_K_BYTES, x.shape[0])
    x_sums32 = _group_sums(x, 32)
    for r in prange(raw.shape[0]):
        row = raw[r]
        acc = np.float32(0.0)
        for b in range(n_blocks):
            acc += _q5k_block_dot(row[b * Q5_K_BYTES:(b + 1) * Q5_K_BYTES],
                                  x[b * QK_K:(b + 1) * QK_K], x_sums32[b * 8:(b + 1) * 8])
        out[r] = acc


@_jit_parallel
def q5_k_dequantize(raw, out):
    """Write the float32 weights of Q5_K ``raw`` to ``out[rows, cols]``."""
    n_blocks = _blocks_per_row(raw, Q5_K_BYTES, out.shape[1])
    for r in prange(raw.shape[0]):
        for b in range(n_blocks):
            _q5k_block_dequantize(raw[r, b * Q5_K_BYTES:(b + 1) * Q5_K_BYTES],
                                  out[r, b * QK_K:(b + 1) * QK_K])


# --------------------------------------------------------------------------- Q6_K


@_jit
def _q6k_column(blk, half, j):
    """Signed 6-bit quants (-32..31) of byte ``j`` of ``half``: weights 128*half + 32n + j.

    Runs 0 and 1 take the low nibbles of ql[j] and ql[j + 32], runs 2 and 3 their high
    nibbles; the top 2 bits of run n are bits 2n, 2n+1 of qh[j].
    """
    first = blk[64 * half + j]
    second = blk[64 * half + 32 + j]
    high = blk[128 + 32 * half + j]
    return (np.int8(((first & 0x0F) | ((high & 0x03) << 4)) - 32),
            np.int8(((second & 0x0F) | ((high & 0x0C) << 2)) - 32),
            np.int8(((first >> 4) | (high & 0x30)) - 32),
            np.int8(((second >> 4) | ((high & 0xC0) >> 2)) - 32))


@_jit
def _q6k_scales(blk, group):
    """Signed scales of groups ``group + 2n`` (the 4 runs of a column), d not applied."""
    return (np.float32(_q6k_scale(blk, group)), np.float32(_q6k_scale(blk, group + 2)),
            np.float32(_q6k_scale(blk, group + 4)), np.float32(_q6k_scale(blk, group + 6)))


@_jit
def _q6k_lane_dot(blk, xb, half, sub, lane):
    """Scaled dot of the column at byte ``16*sub + lane`` of ``half`` with x."""
    j = 16 * sub + lane
    return _column4_dot(_q6k_column(blk, half, j), _q6k_scales(blk, 8 * half + sub), xb, 128 * half + j)


@_jit_inline
def _q6k_block_dot(blk, xb):
    """Dot product of one Q6_K block with its 256 values of ``x``."""
    scaled = np.float32(0.0)
    for lane in range(16):
        scaled += (_q6k_lane_dot(blk, xb, 0, 0, lane) + _q6k_lane_dot(blk, xb, 0, 1, lane)
                   + _q6k_lane_dot(blk, xb, 1, 0, lane) + _q6k_lane_dot(blk, xb, 1, 1, lane))
    return _f16_to_f32(blk, 208) * scaled


@_jit_inline
def _q6k_block_dequantize(blk, dst):
    """Write the 256 weights of one Q6_K block to ``dst``."""
    d = _f16_to_f32(blk, 208)
    for half in range(2):
        for sub in range(2):
            s = _q6k_scales(blk, 8 * half + sub)
            scales = (d * s[0], d * s[1], d * s[2], d * s[3])
            for lane in range(16):
                j = 16 * sub + lane
                _column4_store(dst, 128 * half + j, _q6k_column(blk, half, j), scales)


@_jit_parallel
def q6_k_matvec(raw, x, out):
    """out[r] = sum_c W[r, c] * x[c] for Q6_K weights ``raw``, never materialising W."""
    n_blocks = _blocks_per_row(raw, Q6_K_BYTES, x.shape[0])
    for r in prange(raw.shape[0]):
        row = raw[r]
        acc = np.float32(0.0)
        for b in range(n_blocks):
            acc += _q6k_block_dot(row[b * Q6_K_BYTES:(b + 1) * Q6_K_BYTES], x[b * QK_K:(b + 1) * QK_K])
        out[r] = acc


@_jit_parallel
def q6_k_dequantize(raw, out):
    """Write the float32 weights of Q6_K ``raw`` to ``out[rows, cols]``."""
    n_blocks = _blocks_per_row(raw, Q6_K_BYTES, out.shape[1])
    for r in prange(raw.shape[0]):
        for b in range(n_blocks):
            _q6k_block_dequantize(raw[r, b * Q6_K_BYTES:(b + 1) * Q6_K_BYTES],
                                  out[r, b * QK_K:(b + 1) * QK_K])


# --------------------------------------------------------------------------- registry

_T = gguf.GGMLQuantizationType

KERNELS: dict[gguf.GGMLQuantizationType, TypeKernels] = {
    _T.Q2_K: TypeKernels(QK_K, Q2_K_BYTES, q2_k_dequantize, q2_k_matvec),
    _T.Q3_K: TypeKernels(QK_K, Q3_K_BYTES, q3_k_dequantize, q3_k_matvec),
    _T.Q4_K: TypeKernels(QK_K, Q4_K_BYTES, q4_k_dequantize, q4_k_matvec),
    _T.Q5_K: TypeKernels(QK_K, Q5_K_BYTES, q5_k_dequantize, q5_k_matvec),
    _T.Q6_K: TypeKernels(QK_K, Q6_K_BYTES, q6_k_dequantize, q6_k_matvec),
}
