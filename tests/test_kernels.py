"""Kernels against gguf-py's reference dequantization, for every supported GGML type."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from pagellm import kernels
from pagellm.kernels import activations

TYPES = sorted(kernels.SUPPORTED_TYPES, key=lambda t: t.value)
FLOAT_TYPES = {T.F32, T.F16, T.BF16}

# Byte offsets of the f16 scale fields inside one block (ggml's block_* structs). Random bytes
# are valid blocks once these hold finite, moderate values: every other bit pattern is a quant.
F16_FIELDS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def reference_dequantize(raw: np.ndarray, t: T, cols: int) -> np.ndarray:
    """gguf-py's float32 weights [rows, cols] for raw bytes [rows, row_bytes]."""
    if t == T.BF16:
        return gguf.quants.BF16.dequantize(raw).reshape(-1, cols)
    if t in (T.F32, T.F16):
        return gguf.quants.dequantize(raw.view(np.float32 if t == T.F32 else np.float16), t).reshape(-1, cols)
    return gguf.quants.dequantize(raw, t).reshape(-1, cols)


def quantized_tensor(t: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray | None:
    """Raw bytes [rows, row_bytes] from quantizing random floats with gguf-py, or None if it cannot."""
    weights = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, size=(rows, 1))).astype(np.float32)
    if t == T.F32:
        return weights.view(np.uint8)
    if t == T.F16:
        return weights.astype(np.float16).view(np.uint8)
    try:
        return gguf.quants.quantize(weights, t)
    except NotImplementedError:
        return None


def random_bytes_tensor(t: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes [rows, row_bytes]: random quants with the f16 scales set to finite, moderate values."""
    if t in FLOAT_TYPES:  # every field is a float: draw floats spanning many binades instead
        weights = (rng.standard_normal((rows, cols)) * 2.0 ** rng.integers(-20, 10, size=(rows, cols))).astype(np.float32)
        if t == T.F32:
            return weights.view(np.uint8)
        if t == T.F16:
            return weights.astype(np.float16).view(np.uint8)
        return gguf.quants.BF16.quantize(weights)
    block_size, type_size = gguf.GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[t]:
        scales = (rng.uniform(-1.0, 1.0, size=blocks.shape[0]) * 2.0 ** rng.integers(-12, 2, size=blocks.shape[0]))
        blocks[:, offset:offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def make_inputs(t: T, rows: int, blocks_per_row: int, rng: np.random.Generator):
    """Every raw tensor to test for ``t``: quantized floats (when gguf-py can) and random bytes."""
    block_size = gguf.GGML_QUANT_SIZES[t][0]
    cols = blocks_per_row * (block_size if block_size > 1 else 43)  # 43: a float row not a multiple of anything
    tensors = [random_bytes_tensor(t, rows, cols, rng)]
    quantized = quantized_tensor(t, rows, cols, rng)
    if quantized is not None:
        tensors.append(quantized)
    return cols, tensors


SHAPES = [(1, 1), (7, 3), (37, 2)]  # (rows, blocks per row): one row, odd row counts


def llama_cpp_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x's Q8_0 blocks as llama.cpp makes them (fixtures/README.md): quants [..., cols], scales [..., cols/32]."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(largest > 0, np.float32(127) / largest, np.float32(0)).astype(np.float32)
    quants = np.rint(blocks * inverse).astype(np.int8)  # numpy's rint rounds half to even
    scales = (largest / np.float32(127)).astype(np.float16).astype(np.float32)
    return quants.reshape(x.shape), scales[..., 0]


def multiplied_x(t: T, x: np.ndarray) -> np.ndarray:
    """The activations a product with ``t`` weights multiplies by: x itself, or its Q8_0 blocks for llama.cpp's integer types."""
    if not kernels.KERNELS[t].quantizes_activations:
        return x
    quants, scales = llama_cpp_q8_0(np.asarray(x, dtype=np.float32))
    return (quants.reshape(*x.shape[:-1], -1, 32) * scales[..., None]).reshape(x.shape).astype(np.float32)


def assert_close_product(actual: np.ndarray, weights: np.ndarray, x: np.ndarray, t: T | None = None) -> None:
    """actual ~ x @ weights.T within float32 summation error (rtol 1e-4 of sum |w| |x|), x as type ``t`` multiplies it."""
    if t is not None:
        x = multiplied_x(t, x)
    expected = x.astype(np.float64) @ weights.T.astype(np.float64)
    bound = 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(weights).T.astype(np.float64)) + 1e-30
    assert actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= bound), np.max(np.abs(actual - expected) / bound)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,blocks_per_row", SHAPES)
def test_dequantize_matches_gguf(t, rows, blocks_per_row):
    rng = np.random.default_rng([t.value, rows, blocks_per_row])
    cols, tensors = make_inputs(t, rows, blocks_per_row, rng)
    for raw in tensors:
        ours = kernels.dequantize(raw, t, cols)
        reference = reference_dequantize(raw, t, cols)
        assert ours.dtype == np.float32 and ours.shape == (rows, cols)
        if t in FLOAT_TYPES:
            np.testing.assert_array_equal(ours, reference)
        else:
            scale = np.abs(reference).max()
            np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * scale)
        # the whole tensor as one flat byte buffer, as the pager hands it over
        np.testing.assert_array_equal(kernels.dequantize(raw.reshape(-1), t, cols), ours)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,blocks_per_row", SHAPES)
def test_matvec_matches_dequantized_product(t, rows, blocks_per_row):
    rng = np.random.default_rng([t.value, rows, blocks_per_row, 1])
    cols, tensors = make_inputs(t, rows, blocks_per_row, rng)
    for raw in tensors:
        weights = reference_dequantize(raw, t, cols)
        x = rng.standard_normal(cols).astype(np.float32)
        assert_close_product(kernels.matvec(raw, t, cols, x), weights, x, t)
        out = np.full(rows, np.nan, dtype=np.float32)
        assert kernels.matvec(raw, t, cols, x, out=out) is out
        assert_close_product(out, weights, x, t)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 64])
def test_matmul_matches_dequantized_product(t, n):
    rng = np.random.default_rng([t.value, n, 2])
    cols, tensors = make_inputs(t, 37, 2, rng)
    for raw in tensors:
        weights = reference_dequantize(raw, t, cols)
        X = rng.standard_normal((n, cols)).astype(np.float32)
        result = kernels.matmul(raw, t, cols, X)
        assert result.dtype == np.float32 and result.shape == (n, 37)
        assert_close_product(result, weights, X, t)


@pytest.mark.parametrize("t,n", [
    (T.Q8_0, kernels.FUSED_MATMUL_MAX_VECTORS), (T.Q8_0, kernels.FUSED_MATMUL_MAX_VECTORS + 1),
    (T.Q6_K, kernels.LOOPED_MATVEC_MAX_VECTORS), (T.Q6_K, kernels.LOOPED_MATVEC_MAX_VECTORS + 1),
], ids=str)
def test_matmul_on_both_sides_of_the_crossover(t, n, monkeypatch):
    # a tiny tile budget makes the BLAS path cross several row tiles, the last one partial
    monkeypatch.setattr(kernels, "_TILE_BYTES", 4 * 256 * 16)
    rng = np.random.default_rng(n)
    cols, (raw, *_) = make_inputs(t, 37, 1 if t == T.Q6_K else 8, rng)
    weights = reference_dequantize(raw, t, cols)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    assert_close_product(kernels.matmul(raw, t, cols, X), weights, X, t)


def test_activations_quantize_to_q8_0_as_llama_cpp_does():
    rng = np.random.default_rng(11)
    # blocks of magnitudes from 2**-30 (scales below the smallest half) to 2**12
    X = (rng.standard_normal((3, 64 * 32)) * 2.0 ** rng.integers(-30, 13, size=(3, 64)).repeat(32, axis=1)).astype(np.float32)
    X[0, :32] = 0  # an all-zero block: scale 0, quants 0
    X[1, :32] = np.arange(32) - 15.5  # x * 127/max lands on ties: half to even
    X[1, 31] = 127
    quants, scales = activations.quantize_q8_0(X)
    want_quants, want_scales = llama_cpp_q8_0(X)
    np.testing.assert_array_equal(quants, want_quants)
    np.testing.assert_array_equal(scales.view(np.uint32), want_scales.view(np.uint32))
    assert list(quants[1, :4]) == [-16, -14, -14, -12]  # -15.5, -14.5, -13.5, -12.5
    assert (scales == 0).any() and (scales[(scales > 0)] < 2.0 ** -14).any()  # zero and subnormal-half scales occur
    np.testing.assert_array_equal(activations.round_trip_q8_0(X), multiplied_x(T.Q8_0, X))


def test_integer_products_without_avx2():
    # the portable IR that replaces vpmaddubsw/vpmaddwd on CPUs without AVX2 gives the same products
    script = """
import platform, numpy as np, gguf
from gguf import GGMLQuantizationType as Q
from pagellm import kernels
from pagellm.kernels import activations
from pagellm.kernels import activations, legacy
assert not legacy.AVX2 or platform.machine().lower() not in ("x86_64", "amd64")
rng = np.random.default_rng(5)
for t in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
    blocks = rng.integers(0, 256, size=(9 * 4, gguf.GGML_QUANT_SIZES[t][1]), dtype=np.uint8)
    blocks[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # each block starts with its f16 scale
    raw = blocks.reshape(9, -1)
    X = rng.standard_normal((3, 128)).astype(np.float32)
    want = activations.round_trip_q8_0(X).astype(np.float64) @ gguf.quants.dequantize(raw, t).reshape(9, 128).T
    print(float(np.abs(kernels.matmul(raw, t, 128, X) - want).max() / np.abs(want).max()))
"""
    env = dict(os.environ)
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES="+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+f16c,+fma")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = [float(e) for e in out.stdout.split()]
    assert len(errors) == 3 and max(errors) < 1e-5, errors


def test_every_half_float_converts_exactly():
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(256, 512)
    ours = kernels.dequantize(every_half, T.F16, 256).reshape(-1)
    reference = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(reference)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), reference[~nan].view(np.uint32))


def test_non_contiguous_inputs():
    rng = np.random.default_rng(7)
    raw = quantized_tensor(T.Q4_0, 8, 64, rng)
    weights = reference_dequantize(raw, T.Q4_0, 64)
    # strided raw bytes would need a hidden copy of the weights: refused
    with pytest.raises(ValueError, match="contiguous"):
        kernels.matvec(raw[::2], T.Q4_0, 64, np.ones(64, np.float32))
    # strided or float64 activations are small: converted
    x_strided = rng.standard_normal(128).astype(np.float32)[::2]
    assert_close_product(kernels.matvec(raw, T.Q4_0, 64, x_strided), weights, x_strided, T.Q4_0)
    X_fortran = np.asfortranarray(rng.standard_normal((3, 64)))
    assert_close_product(kernels.matmul(raw, T.Q4_0, 64, X_fortran), weights, X_fortran.astype(np.float32), T.Q4_0)


def test_float_tensors_given_as_float_arrays():
    # gguf's reader hands F32/F16 tensors over as float arrays rather than bytes
    weights = np.random.default_rng(3).standard_normal((5, 9)).astype(np.float32)
    np.testing.assert_array_equal(kernels.dequantize(weights, T.F32, 9), weights)
    np.testing.assert_array_equal(kernels.dequantize(weights.astype(np.float16), T.F16, 9),
                                  weights.astype(np.float16).astype(np.float32))


def test_shape_errors():
    raw = np.zeros((4, 34), np.uint8)
    with pytest.raises(ValueError, match="whole blocks"):
        kernels.row_bytes(T.Q8_0, 48)
    with pytest.raises(ValueError, match="whole rows"):
        kernels.dequantize(raw.reshape(-1)[:100], T.Q8_0, 32)
    with pytest.raises(ValueError, match="cols=32"):
        kernels.matvec(raw, T.Q8_0, 32, np.zeros(31, np.float32))
    with pytest.raises(ValueError, match="out"):
        kernels.matvec(raw, T.Q8_0, 32, np.zeros(32, np.float32), out=np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        kernels.matmul(raw, T.Q8_0, 32, np.zeros(32, np.float32))  # X must be 2-D


def test_direct_kernels_validate_shapes():
    # the per-type kernels themselves refuse mismatched shapes instead of reading out of bounds
    raw = np.zeros((4, 34), np.uint8)
    with pytest.raises(ValueError):
        kernels.KERNELS[T.Q8_0].matvec(raw, np.zeros(64, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        kernels.KERNELS[T.Q8_0].dequantize(raw, np.zeros((4, 64), np.float32))


def test_unsupported_types():
    assert kernels.is_supported(T.Q4_0) and kernels.is_supported(int(T.Q4_0))
    assert not kernels.is_supported(T.IQ2_XXS)
    assert not kernels.is_supported(12345)
    for call in (
        lambda: kernels.row_bytes(T.IQ2_XXS, 256),
        lambda: kernels.dequantize(np.zeros(66, np.uint8), T.IQ2_XXS, 256),
        lambda: kernels.matvec(np.zeros(66, np.uint8), T.IQ2_XXS, 256, np.zeros(256, np.float32)),
        lambda: kernels.matmul(np.zeros(66, np.uint8), T.IQ2_XXS, 256, np.zeros((1, 256), np.float32)),
    ):
        with pytest.raises(ValueError, match="IQ2_XXS"):
            call()


def test_supported_types_cover_the_fixtures():
    expected = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    assert expected <= kernels.SUPPORTED_TYPES
    for t in expected:
        block_size, type_size = gguf.GGML_QUANT_SIZES[t]
        assert kernels.row_bytes(t, 256) == 256 // block_size * type_size


def test_compiler_pages_go_back_after_warm_up_and_kernels_still_run():
    # a fresh process, so the compiler's pages are resident from loading the kernels
    script = """
import numpy as np, gguf
from gguf import GGMLQuantizationType as Q
from pagellm import kernels
from pagellm.kernels import activations
from pagellm.offload.pressure import DEFAULT_ROOT, _mapped_rss_bytes, release_compiler_pages
from pagellm.synth import random_weights
kernels.warm_up([Q.Q8_0, Q.Q4_K])
before = _mapped_rss_bytes(DEFAULT_ROOT, ("libllvmlite",))
released = release_compiler_pages()
after = _mapped_rss_bytes(DEFAULT_ROOT, ("libllvmlite",))
raw = random_weights("Q4_K", 8, 512, seed=3)
x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
want = x @ gguf.quants.dequantize(raw, Q.Q4_K).reshape(8, 512).T
got = kernels.matmul(raw, Q.Q4_K, 512, x)
print(before, released, after, float(np.abs(got - want).max()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, released, after, err = out.stdout.split()
    assert int(before) > 16 << 20  # LLVM's code was resident after loading the kernels
    # pages this process alone maps go back (those the test runner maps too are shared and stay)
    assert int(after) < int(before) and int(released) > 0
    assert float(err) < 1e-3  # the loaded kernels run without the compiler's pages


def test_threads_limited_sets_and_restores_the_callers_threads():
    before = kernels.get_num_threads()
    with kernels.threads_limited(None):
        assert kernels.get_num_threads() == before
    if before > 1:
        with kernels.threads_limited(1):
            assert kernels.get_num_threads() == 1
    assert kernels.get_num_threads() == before


def _attention_reference(q, keys, values, start):
    """Causal grouped-query attention in float64 from the halves' exact values."""
    T, H, D = q.shape
    group = H // keys.shape[1]
    k, v = keys.astype(np.float64), values.astype(np.float64)
    out = np.empty((T, H, D))
    for t in range(T):
        n = start + t + 1
        for h in range(H):
            s = k[:n, h // group] @ q[t, h].astype(np.float64) / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:n, h // group]
    return out


@pytest.mark.parametrize("heads,kv_heads,positions,queries", [(4, 4, 1, 1), (8, 2, 37, 1), (8, 2, 40, 4), (6, 3, 300, 2)])
def test_attention_over_half_cache_matches_reference(heads, kv_heads, positions, queries):
    rng = np.random.default_rng(positions)
    D = 64
    cache_k = (rng.standard_normal((positions, kv_heads, D)) * 2).astype(np.float16)
    cache_v = rng.standard_normal((positions, kv_heads, D)).astype(np.float16)
    q = rng.standard_normal((queries, heads, D)).astype(np.float32)
    # the queries are the last positions filled; each sees the keys up to its own position only
    start = positions - queries
    got = kernels.attend(q, cache_k, cache_v, start)
    want = _attention_reference(q, cache_k, cache_v, start)
    assert got.shape == (queries, heads, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the prompt path (float32 copy for BLAS) agrees with the fused one
    heads_first = kernels.halves_heads_first(cache_k)
    assert heads_first.shape == (kv_heads, positions, D)
    assert np.array_equal(heads_first, cache_k.astype(np.float32).transpose(1, 0, 2))


def test_kernels_run_on_tbb_wherever_the_tbb_wheel_is_installed():
    """pip puts libtbb.so.12 where the loader does not look; without it numba falls back to OpenMP,
    whose static schedule waits on a core another process holds (decode here 12.9 tokens/s
    against 28.7 with TBB, one core busy). A fresh process, so no earlier launch chose the layer."""
    from importlib import metadata

    try:
        wheel = any(f.name == "libtbb.so.12" for f in metadata.files("tbb") or [])
    except metadata.PackageNotFoundError:
        wheel = False
    code = """
import numpy as np, numba
from gguf import GGMLQuantizationType as Q
from pagellm import kernels
from pagellm.synth import random_weights
w = random_weights("Q8_0", 64, 256, seed=1)
kernels.matvec(w, Q.Q8_0, 256, np.ones(256, np.float32))
print(numba.threading_layer())
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    layer = out.stdout.split()[-1]
    if platform.machine() in ("x86_64", "AMD64"):  # where pyproject asks for the wheel
        assert wheel
    assert layer == "tbb" if wheel else layer in ("omp", "workqueue")
