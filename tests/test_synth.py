"""Synthetic GGUF models: valid metadata, layout and blocks; deterministic for a seed."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from pagellm.synth import SHAPES, SUPPORTED_TYPES, ModelShape, bundled_vocab, make_model, random_weights

TINY = SHAPES["tiny"]
LAYER_ORDER = [
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _check_values(name: str, w: np.ndarray, fan_in: int) -> None:
    """Finite, with the intended scale: norms ~1, weights zero-mean with std ~1/sqrt(fan_in)."""
    assert np.isfinite(w).all(), name
    if "norm" in name:
        assert 0.85 < w.min() and w.max() < 1.15, name
        return
    scaled_std = float(w.std()) * np.sqrt(fan_in)
    assert 0.8 < scaled_std < 1.25, (name, scaled_std)
    assert abs(float(w.mean())) * np.sqrt(fan_in) < 0.1, name


@functools.lru_cache(maxsize=4)
def _reader(path: Path) -> gguf.GGUFReader:
    """One parse per file: GGUFReader spends ~1.5 s on the 32000-entry token arrays."""
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("synth") / "tiny-q8.gguf", "tiny", "Q8_0", seed=0)


@pytest.fixture(scope="module")
def q4k_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("synth") / "tiny-q4k.gguf", "tiny", "Q4_K", seed=2)


def test_metadata(q8_model: Path) -> None:
    r = _reader(q8_model)
    assert _value(r, "GGUF.version") == 3
    assert _value(r, "general.architecture") == "llama"
    assert _value(r, "general.name")
    assert _value(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.context_length": TINY.n_ctx,
        "llama.embedding_length": TINY.n_embd,
        "llama.block_count": TINY.n_layer,
        "llama.feed_forward_length": TINY.n_ff,
        "llama.rope.dimension_count": TINY.n_embd // TINY.n_head,
        "llama.attention.head_count": TINY.n_head,
        "llama.attention.head_count_kv": TINY.n_head_kv,
        "llama.vocab_size": TINY.n_vocab,
    }
    for key, value in expected.items():
        assert _value(r, key) == value, key
    assert _value(r, "llama.rope.freq_base") == pytest.approx(TINY.rope_base)
    assert _value(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(TINY.rms_eps)


def test_tokenizer_copied_from_llama_cpp_vocab(q8_model: Path) -> None:
    from shared_paths import tokenizer_vectors_dir

    r = _reader(q8_model)
    source = gguf.GGUFReader(tokenizer_vectors_dir() / "ggml-vocab-llama-spm.gguf")
    source_keys = [k for k in source.fields if k.startswith("tokenizer.")]
    assert [k for k in r.fields if k.startswith("tokenizer.")] == source_keys
    for key in source_keys:
        assert r.fields[key].types == source.fields[key].types, key
        assert r.fields[key].contents() == source.fields[key].contents(), key
    assert len(bundled_vocab()) == len(source_keys)


def test_tensor_names_shapes_types_and_layout(q8_model: Path) -> None:
    r = _reader(q8_model)
    names = [t.name for t in r.tensors]
    expected_names = ["token_embd.weight"]
    for i in range(TINY.n_layer):
        expected_names += [f"blk.{i}.{part}.weight" for part in LAYER_ORDER]
    expected_names += ["output_norm.weight", "output.weight"]
    assert names == expected_names

    e, kv, ff, v = TINY.n_embd, TINY.n_embd // TINY.n_head * TINY.n_head_kv, TINY.n_ff, TINY.n_vocab
    ne = {  # GGUF order: ne0 = input dimension
        "token_embd": [e, v], "output": [e, v], "output_norm": [e],
        "attn_norm": [e], "ffn_norm": [e], "attn_q": [e, e], "attn_k": [e, kv], "attn_v": [e, kv],
        "attn_output": [e, e], "ffn_gate": [e, ff], "ffn_up": [e, ff], "ffn_down": [ff, e],
    }
    for t in r.tensors:
        part = t.name.split(".")[-2]
        assert t.shape.tolist() == ne[part], t.name
        assert t.tensor_type == (QT.F32 if "norm" in part else QT.Q8_0), t.name
        assert t.data_offset % 32 == 0, t.name

    # A layer's tensors are back to back (up to alignment), so one read fetches the group.
    for i in range(TINY.n_layer):
        group = [t for t in r.tensors if t.name.startswith(f"blk.{i}.")]
        for a, b in zip(group, group[1:]):
            assert b.data_offset == a.data_offset + -(-a.n_bytes // 32) * 32, (a.name, b.name)


@pytest.mark.parametrize("ggml_type", [t.name for t in SUPPORTED_TYPES])
def test_every_type_makes_valid_blocks(ggml_type: str) -> None:
    # Straight from the row generator (no file): opening a GGUF costs ~1.5 s per 32000-token vocab.
    rows, cols = 768, 256
    raw = random_weights(ggml_type, rows, cols, seed=7)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT[ggml_type]]
    assert raw.shape == (rows, cols // block_size * type_size) and raw.dtype == np.uint8
    w = dequantize(raw, QT[ggml_type])
    assert w.shape == (rows, cols)
    _check_values("ffn_up", w, fan_in=cols)


def test_every_tensor_dequantizes(q8_model: Path, q4k_model: Path) -> None:
    file_types = {QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S}
    for path, qtype in ((q8_model, QT.Q8_0), (q4k_model, QT.Q4_K)):
        r = _reader(path)
        assert _value(r, "general.file_type") == file_types[qtype]
        for t in r.tensors:
            assert t.tensor_type == (QT.F32 if "norm" in t.name else qtype), t.name
            _check_values(t.name, dequantize(t.data, t.tensor_type), fan_in=int(t.shape[0]))


def test_deterministic_for_a_seed(tmp_path: Path, q8_model: Path) -> None:
    same = make_model(tmp_path / "same.gguf", "tiny", "Q8_0", seed=0)
    other = make_model(tmp_path / "other.gguf", "tiny", "Q8_0", seed=1)
    assert _sha256(same) == _sha256(q8_model)
    assert _sha256(other) != _sha256(q8_model)
    assert same.stat().st_size == other.stat().st_size


def test_progress_and_custom_shape(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    shape = ModelShape(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=4, n_vocab=32000, n_ctx=128)
    path = make_model(tmp_path / "c.gguf", shape, "q4_0", progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    r = gguf.GGUFReader(path)
    assert sum(t.n_bytes for t in r.tensors) == calls[-1][1]
    assert _value(r, "llama.block_count") == 1
    assert not list(tmp_path.glob("*.partial"))


def test_rejects_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported weight type"):
        make_model(tmp_path / "x.gguf", "tiny", "IQ2_XS")
    with pytest.raises(ValueError, match="unknown shape"):
        make_model(tmp_path / "x.gguf", "huge")
    odd = ModelShape(n_layer=1, n_embd=96, n_ff=128, n_head=4, n_head_kv=4, n_vocab=32000, n_ctx=128)
    with pytest.raises(ValueError, match="block size"):
        make_model(tmp_path / "x.gguf", odd, "Q4_K")
    assert not list(tmp_path.iterdir())
