"""Synthetic llama-family GGUF files: a real tokenizer and random but valid weights, written fast.

The files are for demos, tests and benchmarks: they load in llama.cpp and in pagellm, they have
the tensor names, shapes and layout of a real llama model, and their dequantized weights have a
sensible scale (std ~ 1/sqrt(fan_in)) so activations stay O(1) over many layers.

Speed comes from never quantizing anything: the quantized payload is random bytes (every bit
pattern is a valid quant) and only the per-block f16 scale fields are overwritten. Memory stays
bounded because tensors are generated and written in chunks of whole rows.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

QT = GGMLQuantizationType
ProgressFn = Callable[[int, int], None]

VOCAB_FILE = "llama-spm-vocab.npz"
_CHUNK_BYTES = 32 << 20  # rows are generated and written in pieces of about this size


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a llama-family decoder."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        """Output width of the K and V projections (grouped-query attention)."""
        return self.head_dim * self.n_head_kv


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(n_layer=4, n_embd=256, n_ff=768, n_head=8, n_head_kv=2, n_vocab=32000, n_ctx=2048),
    "tinyllama-1b": ModelShape(
        n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000, n_ctx=2048
    ),
    "llama-7b": ModelShape(
        n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000, n_ctx=4096
    ),
}


# ----------------------------------------------------------------------------- block recipes


def _mean_square(lo: int, hi: int) -> float:
    """E[q^2] for q uniform over the integers lo..hi."""
    q = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.mean(q * q))


def _variance(n_levels: int) -> float:
    """Variance of q uniform over 0..n_levels-1 (a quant whose mean is cancelled by its min)."""
    return (n_levels * n_levels - 1) / 12.0


def _tie_k_scale_mins(blocks: np.ndarray, at: int = 4) -> None:
    """Q4_K/Q5_K: make every sub-block's 6-bit min equal to its 6-bit scale.

    With m == sc and dmin = (levels-1)/2 * d, each weight is d*sc*(q - mid): zero-mean.
    Packing (gguf quants.Q4_K.get_scale_min): bytes 0-3 hold sc0-3 (+ top bits of sc4-7),
    bytes 4-7 hold m0-3 (+ top bits of m4-7), bytes 8-11 hold sc4-7 | m4-7 << 4.
    """
    blocks[:, at + 4 : at + 8] = blocks[:, at : at + 4]
    low = blocks[:, at + 8 : at + 12] & np.uint8(0x0F)
    blocks[:, at + 8 : at + 12] = low | (low << np.uint8(4))


def _tie_q2k_scale_mins(blocks: np.ndarray) -> None:
    """Q2_K: each of the 16 scale bytes is sc | m << 4; set m = sc so dmin = 1.5*d centres q."""
    low = blocks[:, 0:16] & np.uint8(0x0F)
    blocks[:, 0:16] = low | (low << np.uint8(4))


@dataclass(frozen=True)
class _BlockRecipe:
    """How to turn random bytes into a valid block of one quantized type."""

    unit_rms: float  # rms of the dequantized weights of random bytes when |d| == 1
    d_at: int  # byte offset of the f16 (super-)block scale d
    min_at: int | None = None  # byte offset of the f16 min (m or dmin), if the type has one
    min_per_d: float = 0.0  # min = min_per_d * d cancels the mean of the unsigned quants
    tie_mins: Callable[[np.ndarray], None] | None = None  # K-quants: set sub-block mins = scales


# Each unit_rms is sqrt(E[(sub-scale)^2] * E[q^2]) for uniformly random bits; layouts follow
# gguf-py's quants.py (block bytes in file order).
_RECIPES: dict[QT, _BlockRecipe] = {
    QT.Q8_0: _BlockRecipe(math.sqrt(_mean_square(-128, 127)), d_at=0),  # d, qs[32]
    QT.Q4_0: _BlockRecipe(math.sqrt(_mean_square(-8, 7)), d_at=0),  # d, qs[16]
    QT.Q4_1: _BlockRecipe(math.sqrt(_variance(16)), d_at=0, min_at=2, min_per_d=-7.5),  # d, m, qs
    QT.Q5_0: _BlockRecipe(math.sqrt(_mean_square(-16, 15)), d_at=0),  # d, qh[4], qs[16]
    QT.Q5_1: _BlockRecipe(math.sqrt(_variance(32)), d_at=0, min_at=2, min_per_d=-15.5),
    # scales[16] (sc | m<<4), qs[64], d, dmin
    QT.Q2_K: _BlockRecipe(
        math.sqrt(_mean_square(0, 15) * _variance(4)), d_at=80, min_at=82, min_per_d=1.5,
        tie_mins=_tie_q2k_scale_mins,
    ),
    # hmask[32], qs[64], scales[12] (signed 6-bit), d
    QT.Q3_K: _BlockRecipe(math.sqrt(_mean_square(-32, 31) * _mean_square(-4, 3)), d_at=108),
    # d, dmin, scales[12], qs[128]
    QT.Q4_K: _BlockRecipe(
        math.sqrt(_mean_square(0, 63) * _variance(16)), d_at=0, min_at=2, min_per_d=7.5,
        tie_mins=_tie_k_scale_mins,
    ),
    # d, dmin, scales[12], qh[32], qs[128]
    QT.Q5_K: _BlockRecipe(
        math.sqrt(_mean_square(0, 63) * _variance(32)), d_at=0, min_at=2, min_per_d=15.5,
        tie_mins=_tie_k_scale_mins,
    ),
    # ql[128], qh[64], scales[16] (int8), d
    QT.Q6_K: _BlockRecipe(math.sqrt(_mean_square(-128, 127) * _mean_square(-32, 31)), d_at=208),
}
_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
SUPPORTED_TYPES: tuple[QT, ...] = _FLOAT_TYPES + tuple(_RECIPES)

_FILE_TYPES: dict[QT, LlamaFileType] = {
    QT.F32: LlamaFileType.ALL_F32,
    QT.F16: LlamaFileType.MOSTLY_F16,
    QT.BF16: LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    QT.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    QT.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    QT.Q3_K: LlamaFileType.MOSTLY_Q3_K_S,  # the _S variants are the "all tensors this type" ones
    QT.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    QT.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    QT.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}

_SPREAD_RMS = math.sqrt(1.0 + 0.5**2 / 12.0)  # rms of the 0.75..1.25 per-block scale spread
_INT16_RMS = math.sqrt(_mean_square(-32768, 32767))


def parse_type(ggml_type: str | QT) -> QT:
    """Resolve 'Q8_0' / 'q4_k' / a GGMLQuantizationType to a type synth can write."""
    if isinstance(ggml_type, QT):
        qtype = ggml_type
    else:
        try:
            qtype = QT[ggml_type.strip().upper()]
        except KeyError:
            qtype = None  # type: ignore[assignment]
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"unsupported weight type {ggml_type!r}; choose one of {names}")
    return qtype


# ----------------------------------------------------------------------------- weights


def _random_bytes(bitgen: np.random.SFC64, n: int) -> np.ndarray:
    """n random bytes as a writable uint8 array (SFC64 raw output: ~3 GB/s, GIL released)."""
    return bitgen.random_raw((n + 7) // 8).view(np.uint8)[:n]


def _f16_field(blocks: np.ndarray, at: int) -> np.ndarray:
    """Writable uint16 view of the 2-byte field at byte offset `at` of every block."""
    return blocks[:, at : at + 2].view(np.uint16)[:, 0]


def _block_scales(noise: np.ndarray, base: float) -> np.ndarray:
    """Per-block scales of magnitude ~base, drawn from the random bits already in the field.

    The random sign cancels the bias of asymmetric quants (Q4_0's -8..7); the ±25 % spread makes
    blocks differ, so a kernel that applies the wrong block's scale fails its tests.
    """
    sign = np.where(noise & np.uint16(0x8000), np.float32(-1.0), np.float32(1.0))
    spread = np.float32(0.75) + (noise & np.uint16(0xFF)).astype(np.float32) * np.float32(0.5 / 255)
    return sign * spread * np.float32(base / _SPREAD_RMS)


def _quant_rows(bitgen: np.random.SFC64, qtype: QT, n_weights: int, sigma: float) -> np.ndarray:
    """Raw blocks for n_weights weights of a quantized type, dequantizing to std ~sigma."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    recipe = _RECIPES[qtype]
    raw = _random_bytes(bitgen, n_weights // block_size * type_size)
    blocks = raw.reshape(-1, type_size)
    if recipe.tie_mins is not None:
        recipe.tie_mins(blocks)
    d_field = _f16_field(blocks, recipe.d_at)
    d = _block_scales(d_field, sigma / recipe.unit_rms)
    d_field[:] = d.astype(np.float16).view(np.uint16)
    if recipe.min_at is not None:
        min_field = _f16_field(blocks, recipe.min_at)
        min_field[:] = (d * np.float32(recipe.min_per_d)).astype(np.float16).view(np.uint16)
    return raw


@lru_cache(maxsize=8)
def _f16_table(scale: float) -> np.ndarray:
    """f16 bits of k*scale for every int16 k, indexed by k's uint16 bit pattern."""
    k = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.float32)
    return (k * np.float32(scale)).astype(np.float16).view(np.uint16)


def _float_rows(bitgen: np.random.SFC64, qtype: QT, n_weights: int, sigma: float) -> np.ndarray:
    """Raw F32/F16/BF16 weights, uniform with std sigma (from int16 noise: cheap and fine-grained)."""
    noise = _random_bytes(bitgen, 2 * n_weights).view(np.uint16)
    scale = sigma / _INT16_RMS
    if qtype == QT.F16:
        # A table lookup is ~2x faster than numpy's float32 -> float16 conversion.
        return _f16_table(scale)[noise].view(np.uint8)
    w = noise.view(np.int16).astype(np.float32)
    w *= np.float32(scale)
    if qtype == QT.F32:
        return w.view(np.uint8)
    return (w.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.uint8)  # BF16: truncate


def _norm_rows(bitgen: np.random.SFC64, n_weights: int) -> np.ndarray:
    """RMSNorm weights in F32, uniform in 0.9..1.1 (not exactly 1, so ignoring them is caught)."""
    u = _random_bytes(bitgen, 2 * n_weights).view(np.uint16).astype(np.float32)
    return (np.float32(0.9) + u * np.float32(0.2 / 65535)).view(np.uint8)


# ----------------------------------------------------------------------------- tensor plan


@dataclass(frozen=True)
class _TensorSpec:
    """One tensor to write: name, numpy-order shape (ne reversed), type and role."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    is_norm: bool = False

    @property
    def cols(self) -> int:
        """GGUF ne0: the input dimension of a weight matrix."""
        return self.shape[-1]

    @property
    def rows(self) -> int:
        """Number of rows of ne0 weights."""
        return math.prod(self.shape[:-1])

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file (before alignment padding)."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.rows * self.cols // block_size * type_size

    def make_rows(self, bitgen: np.random.SFC64, n_rows: int) -> np.ndarray:
        """Raw bytes for the next n_rows rows of this tensor."""
        n = n_rows * self.cols
        if self.is_norm:
            return _norm_rows(bitgen, n)
        sigma = 1.0 / math.sqrt(self.cols)  # keeps W @ x at O(1) for O(1) inputs
        if self.qtype in _FLOAT_TYPES:
            return _float_rows(bitgen, self.qtype, n, sigma)
        return _quant_rows(bitgen, self.qtype, n, sigma)


def random_weights(ggml_type: str | QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid raw weights of a type as uint8 [rows, row_bytes], std ~1/sqrt(cols) (for kernel tests)."""
    qtype = parse_type(ggml_type)
    if cols % GGML_QUANT_SIZES[qtype][0]:
        raise ValueError(f"cols {cols} is not a multiple of the {qtype.name} block size")
    spec = _TensorSpec("weight", (rows, cols), qtype)
    return spec.make_rows(np.random.SFC64(np.random.SeedSequence(seed)), rows).reshape(rows, -1)


def _tensor_plan(shape: ModelShape, qtype: QT) -> list[_TensorSpec]:
    """Every tensor in file order; each blk.N group is contiguous so the pager reads it at once."""
    e, kv, ff = shape.n_embd, shape.n_embd_kv, shape.n_ff
    specs = [_TensorSpec("token_embd.weight", (shape.n_vocab, e), qtype)]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        specs += [
            _TensorSpec(p + "attn_norm.weight", (e,), QT.F32, is_norm=True),
            _TensorSpec(p + "attn_q.weight", (e, e), qtype),
            _TensorSpec(p + "attn_k.weight", (kv, e), qtype),
            _TensorSpec(p + "attn_v.weight", (kv, e), qtype),
            _TensorSpec(p + "attn_output.weight", (e, e), qtype),
            _TensorSpec(p + "ffn_norm.weight", (e,), QT.F32, is_norm=True),
            _TensorSpec(p + "ffn_gate.weight", (ff, e), qtype),
            _TensorSpec(p + "ffn_up.weight", (ff, e), qtype),
            _TensorSpec(p + "ffn_down.weight", (e, ff), qtype),
        ]
    specs += [
        _TensorSpec("output_norm.weight", (e,), QT.F32, is_norm=True),
        _TensorSpec("output.weight", (shape.n_vocab, e), qtype),
    ]
    return specs


def _check_shape(shape: ModelShape, qtype: QT, n_tokens: int) -> None:
    """Reject shapes that llama.cpp or the chosen type cannot represent, with a clear message."""
    if shape.n_head <= 0 or shape.n_embd % shape.n_head:
        raise ValueError(f"n_embd {shape.n_embd} is not a multiple of n_head {shape.n_head}")
    if shape.n_head_kv <= 0 or shape.n_head % shape.n_head_kv:
        raise ValueError(f"n_head {shape.n_head} is not a multiple of n_head_kv {shape.n_head_kv}")
    if shape.head_dim % 2:
        raise ValueError(f"head_dim {shape.head_dim} must be even for RoPE")
    block_size = GGML_QUANT_SIZES[qtype][0]
    for name, width in (("n_embd", shape.n_embd), ("n_ff", shape.n_ff)):
        if width % block_size:
            raise ValueError(f"{name} {width} is not a multiple of the {qtype.name} block size {block_size}")
    if shape.n_vocab != n_tokens:
        raise ValueError(f"n_vocab must be {n_tokens}, the size of the bundled tokenizer vocabulary")
    if shape.n_layer <= 0 or shape.n_ctx <= 0:
        raise ValueError("n_layer and n_ctx must be positive")


# ----------------------------------------------------------------------------- vocabulary

_KV = tuple[str, Any, GGUFValueType, GGUFValueType | None]  # key, value, type, array element type


def extract_vocab(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Save every tokenizer.* key of a GGUF file into a compressed .npz (how the bundled vocab is made)."""
    reader = GGUFReader(src)
    meta: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        entry: dict[str, Any] = {"key": key, "type": vtype.name}
        if vtype != GGUFValueType.ARRAY:
            value = field.contents()
            entry["value"] = value.item() if isinstance(value, np.generic) else value
        elif field.types[-1] == GGUFValueType.STRING:
            # Raw bytes, not decoded text: a vocabulary may hold byte pieces that are not UTF-8.
            pieces = [bytes(field.parts[i]) for i in field.data]
            arrays[f"{len(meta)}.blob"] = np.frombuffer(b"".join(pieces), dtype=np.uint8)
            arrays[f"{len(meta)}.lengths"] = np.array([len(p) for p in pieces], dtype=np.uint32)
            entry["sub_type"] = "STRING"
        else:
            # The parts keep the file's element dtype (float32 scores, int32 types), so no widening.
            arrays[f"{len(meta)}.values"] = np.concatenate([field.parts[i] for i in field.data])
            entry["sub_type"] = field.types[-1].name
        meta.append(entry)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as f:
        np.savez_compressed(f, **arrays)


@lru_cache(maxsize=1)
def bundled_vocab() -> tuple[_KV, ...]:
    """The tokenizer.* key/values of llama.cpp's 32000-token SentencePiece llama vocabulary."""
    with resources.as_file(resources.files("pagellm") / "data" / VOCAB_FILE) as path, np.load(path) as npz:
        meta = json.loads(npz["meta"].tobytes())
        kvs: list[_KV] = []
        for i, entry in enumerate(meta):
            vtype = GGUFValueType[entry["type"]]
            sub_type = GGUFValueType[entry["sub_type"]] if "sub_type" in entry else None
            if sub_type is None:
                value = entry["value"]
            elif sub_type == GGUFValueType.STRING:
                blob = npz[f"{i}.blob"].tobytes()
                ends = np.cumsum(npz[f"{i}.lengths"]).tolist()
                value = [blob[a:b] for a, b in zip([0] + ends[:-1], ends)]
            else:
                value = npz[f"{i}.values"].tolist()
            kvs.append((entry["key"], value, vtype, sub_type))
    return tuple(kvs)


def _vocab_size(vocab: tuple[_KV, ...]) -> int:
    """Number of tokens in a vocabulary's tokenizer.ggml.tokens."""
    return next(len(v) for k, v, _, _ in vocab if k == "tokenizer.ggml.tokens")


# ----------------------------------------------------------------------------- writing


def _add_metadata(writer: GGUFWriter, shape: ModelShape, qtype: QT, name: str, vocab: tuple[_KV, ...]) -> None:
    """general.*, llama.* and tokenizer.* key/values, as llama.cpp's converter writes them."""
    writer.add_name(name)
    writer.add_file_type(int(_FILE_TYPES[qtype]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    for key, value, vtype, sub_type in vocab:
        writer.add_key_value(key, value, vtype, sub_type)


class _PipelinedFile:
    """Writes buffers in order on one background thread, so the next chunk is generated meanwhile."""

    def __init__(self, fout: Any) -> None:
        self._fout = fout
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future[Any] | None = None

    def write(self, buf: Any) -> None:
        """Queue buf after the previous write; waits for that one first so at most one is in flight."""
        self.wait()
        self._pending = self._pool.submit(self._fout.write, buf)

    def wait(self) -> None:
        """Block until the queued write (if any) is done, re-raising its error."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        """Finish the queued write and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _chunks(spec: _TensorSpec, bitgen: np.random.SFC64) -> Iterator[np.ndarray]:
    """The tensor's raw bytes in pieces of whole rows, about _CHUNK_BYTES each."""
    rows_per_chunk = max(1, _CHUNK_BYTES // (spec.nbytes // spec.rows))
    for start in range(0, spec.rows, rows_per_chunk):
        yield spec.make_rows(bitgen, min(rows_per_chunk, spec.rows - start))


def _write_tensor_data(
    fout: Any, specs: list[_TensorSpec], seed: int, alignment: int, progress: ProgressFn | None
) -> None:
    """Stream every tensor's data after the tensor infos, padded to `alignment` like GGUFWriter."""
    out = _PipelinedFile(fout)
    total = sum(spec.nbytes for spec in specs)
    done = 0
    try:
        out.write(bytes(-fout.tell() % alignment))
        for index, spec in enumerate(specs):
            # One independent stream per tensor: the bytes of a tensor depend only on (seed, index).
            bitgen = np.random.SFC64(np.random.SeedSequence([seed, index]))
            for chunk in _chunks(spec, bitgen):
                out.write(chunk)
                done += chunk.nbytes
                if progress is not None:
                    progress(done, total)
            out.write(bytes(-spec.nbytes % alignment))
    finally:
        out.close()


def make_model(
    path: str | os.PathLike[str],
    shape: str | ModelShape = "tiny",
    ggml_type: str | QT = "Q8_0",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Path:
    """Write a llama GGUF v3 file with the bundled tokenizer and random valid weights; return its path."""
    # progress(bytes_done, bytes_total) counts tensor data bytes, which is nearly all of the file.
    qtype = parse_type(ggml_type)
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)} or pass a ModelShape")
        shape_name, model_shape = shape, SHAPES[shape]
    else:
        shape_name, model_shape = "custom", shape
    if seed < 0:
        raise ValueError("seed must be >= 0")
    vocab = bundled_vocab()
    _check_shape(model_shape, qtype, _vocab_size(vocab))
    specs = _tensor_plan(model_shape, qtype)

    path = Path(path)
    # Write beside the target and rename at the end: an interrupted run never leaves a file
    # that looks complete (benchmarks skip files that exist).
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(tmp, arch="llama")
    try:
        _add_metadata(writer, model_shape, qtype, f"pagellm-synth-{shape_name}-{qtype.name}", vocab)
        for spec in specs:
            writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes, raw_dtype=spec.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1
        _write_tensor_data(writer.fout[0], specs, seed, writer.data_alignment, progress)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
