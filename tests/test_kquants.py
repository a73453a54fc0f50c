"""K-quant kernels (Q2_K..Q6_K) against gguf-py's reference dequantization."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from pagellm.kernels import kquants
from pagellm.kernels.kquants import KERNELS

K_TYPES = [
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
]

# byte offsets of each block's f16 super-scales (d, and dmin where the type has one)
HALF_FIELD_OFFSETS = {
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
}

SHAPES = [(1, 1), (5, 1), (7, 3), (33, 4)]  # (rows, blocks per row)


def random_blocks(qtype, rows, blocks_per_row, rng):
    """Random raw K-quant rows whose f16 scales are finite and moderate (signs included)."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for offset in HALF_FIELD_OFFSETS[qtype]:
        halves = rng.uniform(-0.05, 0.05, size=(rows, blocks_per_row)).astype(np.float16)
        raw[:, :, offset:offset + 2] = halves.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def check_dequantize(qtype, raw):
    """Kernel dequantize matches gguf-py to float32 rounding (FMA contraction allowed)."""
    reference = gguf_dequantize(raw, qtype).astype(np.float32)
    out = np.full(reference.shape, np.nan, dtype=np.float32)
    KERNELS[qtype].dequantize(raw, out)
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-7 * float(np.abs(reference).max()))
    return reference


def check_matvec(qtype, raw, reference, rng):
    """Fused mat-vec matches the dequantized matrix times x (float64 reference)."""
    x = rng.standard_normal(reference.shape[1]).astype(np.float32)
    out = np.full(reference.shape[0], np.nan, dtype=np.float32)
    KERNELS[qtype].matvec(raw, x, out)
    expected = reference.astype(np.float64) @ x.astype(np.float64)
    assert np.linalg.norm(out - expected) <= 1e-4 * np.linalg.norm(expected)


def test_registry_matches_gguf_sizes():
    assert set(KERNELS) == set(K_TYPES)
    for qtype, kernels in KERNELS.items():
        assert (kernels.block_size, kernels.type_size) == GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,blocks_per_row", SHAPES)
def test_random_blocks(qtype, rows, blocks_per_row):
    rng = np.random.default_rng(1000 * int(qtype) + 10 * rows + blocks_per_row)
    raw = random_blocks(qtype, rows, blocks_per_row, rng)
    reference = check_dequantize(qtype, raw)
    check_matvec(qtype, raw, reference, rng)


@functools.lru_cache(maxsize=1)
def fixture_k_tensors(max_rows=64):
    """Per K-quant type, raw rows of a wide tensor of that type in the llama.cpp-made fixtures."""
    from shared_paths import fixtures_dir

    paths = sorted(fixtures_dir().glob("*_K*.gguf"))  # the K-quant mixes hold all five types
    widest = {}
    for path in paths:
        if len(widest) == len(KERNELS):
            break  # reading a GGUF's metadata takes seconds: stop once every type is found
        for tensor in GGUFReader(path).tensors:
            qtype = tensor.tensor_type
            if qtype in KERNELS and (qtype not in widest or tensor.data.shape[1] > widest[qtype].shape[1]):
                widest[qtype] = np.ascontiguousarray(tensor.data[:max_rows])
    return widest


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_llama_cpp_quantized_blocks(qtype):
    """Real blocks written by llama.cpp's quantizer (scales, mins and bits as models have them)."""
    raw = fixture_k_tensors().get(qtype)
    assert raw is not None, f"no {qtype.name} tensor in the shared fixtures"
    reference = check_dequantize(qtype, raw)
    check_matvec(qtype, raw, reference, np.random.default_rng(int(qtype)))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_special_scales(qtype):
    """Zero, subnormal and large-magnitude d/dmin decode exactly like gguf-py."""
    rng = np.random.default_rng(7)
    specials = np.array([0.0, -0.0, 6e-8, -3e-6, 1e-4, 0.5, -2.0, 60000.0], dtype=np.float16)
    raw = random_blocks(qtype, len(specials), 2, rng).reshape(len(specials), 2, -1)
    for offset in HALF_FIELD_OFFSETS[qtype]:
        raw[:, :, offset:offset + 2] = np.repeat(specials[:, None], 2, axis=1).view(np.uint8).reshape(-1, 2, 2)
    check_dequantize(qtype, raw.reshape(len(specials), -1))


def test_half_float_reads_are_exact():
    """Every one of the 65536 half-float bit patterns, read little-endian from block bytes."""
    bits = np.arange(65536, dtype=np.uint32)
    raw = np.stack([bits & 0xFF, bits >> 8], axis=1).astype(np.uint8)
    expected = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    got = np.array([kquants._f16_to_f32(raw[i], 0) for i in range(65536)], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)


def test_mismatched_columns_raise():
    kernels = KERNELS[GGMLQuantizationType.Q4_K]
    raw = random_blocks(GGMLQuantizationType.Q4_K, 2, 2, np.random.default_rng(0))
    with pytest.raises(ValueError):
        kernels.matvec(raw, np.zeros(256, dtype=np.float32), np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError):
        kernels.dequantize(raw, np.zeros((2, 768), dtype=np.float32))
