"""Model arguments read from GGUF metadata, for the llama family."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagellm.modelfile import ModelFile, ModelFileError

# Architectures one decoder covers, and how each rotates pairs: llama.cpp's "normal" RoPE rotates
# adjacent elements (x[2i], x[2i+1]); NeoX-style rotates x[i] with x[i + n_rot/2].
SUPPORTED_ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True, "qwen3": True}


@dataclass(frozen=True)
class ModelArgs:
    """Shape and numerics of a llama-family decoder."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    rope_base: float
    n_rot: int
    rope_neox: bool
    rope_scale: float  # linear position scaling (1.0: none)
    rms_eps: float
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_model_file(cls, mf: ModelFile) -> "ModelArgs":
        """Read the arguments, with a clear error for an unsupported architecture or a missing key."""
        arch = mf.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFileError(
                f"{mf.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def get(key: str, kind: type = int, default: int | float | None = None) -> int | float:
            return _positive(mf, f"{arch}.{key}", kind, default)

        n_embd = int(get("embedding_length"))
        n_head = int(get("attention.head_count"))
        n_layer = int(get("block_count"))
        # Checked before expected_tensors() enumerates every layer: a hostile count of 2**32 layers
        # must fail here, not after building billions of names.
        if n_layer > len(mf.block_groups):
            raise ModelFileError(f"{mf.path}: metadata {arch}.block_count is {n_layer}, but the file has "
                                 f"{len(mf.block_groups)} blocks")
        n_head_kv = int(get("attention.head_count_kv", int, n_head))
        if n_embd < n_head and mf.arch_get("attention.key_length") is None:
            raise ModelFileError(f"{mf.path}: {n_head} heads do not fit embedding length {n_embd}")
        head_dim = int(get("attention.key_length", int, n_embd // n_head))
        n_rot = int(get("rope.dimension_count", int, head_dim))
        if n_head % n_head_kv:
            raise ModelFileError(f"{mf.path}: {n_head} heads cannot share {n_head_kv} KV heads")
        if n_rot > head_dim or n_rot % 2:
            raise ModelFileError(f"{mf.path}: rope.dimension_count {n_rot} does not fit head dimension {head_dim}")
        embd = mf.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFileError(f"{mf.path}: tensor token_embd.weight is missing")
        if len(embd.shape) != 2:
            raise ModelFileError(f"{mf.path}: tensor token_embd.weight has shape {list(embd.shape)}, expected 2 dimensions")
        scaling = mf.arch_get("rope.scaling.type", "none")
        if not isinstance(scaling, str) or scaling not in ("none", "linear"):
            raise ModelFileError(f"{mf.path}: rope scaling {_short(scaling)} is not supported (none, linear)")
        factor = float(get("rope.scaling.factor", float, 1.0)) if scaling == "linear" else 1.0
        args = cls(
            architecture=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=int(get("feed_forward_length")),
            n_vocab=int(embd.shape[1]),
            context_length=int(get("context_length", int, 2048)),
            rope_base=float(get("rope.freq_base", float, 10000.0)),
            n_rot=n_rot,
            rope_neox=SUPPORTED_ARCHITECTURES[arch],
            rope_scale=factor,
            rms_eps=float(get("attention.layer_norm_rms_epsilon", float)),
            tied_embeddings="output.weight" not in mf.tensors,
            qkv_bias="blk.0.attn_q.bias" in mf.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in mf.tensors,
        )
        args.check_tensors(mf)
        return args

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """GGUF shapes (ne0 first) of every tensor the forward pass reads."""
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.n_embd, self.n_vocab),
            "output_norm.weight": (self.n_embd,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.n_embd, self.n_vocab)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            shapes |= {
                b + "attn_norm.weight": (self.n_embd,),
                b + "attn_q.weight": (self.n_embd, q_dim),
                b + "attn_k.weight": (self.n_embd, kv_dim),
                b + "attn_v.weight": (self.n_embd, kv_dim),
                b + "attn_output.weight": (q_dim, self.n_embd),
                b + "ffn_norm.weight": (self.n_embd,),
                b + "ffn_gate.weight": (self.n_embd, self.n_ff),
                b + "ffn_up.weight": (self.n_embd, self.n_ff),
                b + "ffn_down.weight": (self.n_ff, self.n_embd),
            }
            if self.qkv_bias:
                shapes |= {b + "attn_q.bias": (q_dim,), b + "attn_k.bias": (kv_dim,), b + "attn_v.bias": (kv_dim,)}
            if self.qk_norm:
                shapes |= {b + "attn_q_norm.weight": (self.head_dim,), b + "attn_k_norm.weight": (self.head_dim,)}
        return shapes

    def check_tensors(self, mf: ModelFile) -> None:
        """Every tensor the forward pass needs is present with the shape the metadata implies."""
        for name, shape in self.expected_tensors().items():
            info = mf.tensors.get(name)
            if info is None:
                raise ModelFileError(f"{mf.path}: tensor {name} is missing")
            if tuple(info.shape) != shape:
                raise ModelFileError(f"{mf.path}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")


def _short(value: Any) -> str:
    """A metadata value for an error message: its repr, cut short (a hostile value can be huge)."""
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)}"  # repr of a million-entry array would cost more than the check
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive(mf: ModelFile, key: str, kind: type, default: int | float | None = None) -> int | float:
    """Metadata ``key`` as a finite positive ``kind`` (int or float); ``default`` when absent, else an error."""
    value = mf.get(key)
    if value is None:
        if default is None:
            raise ModelFileError(f"{mf.path}: metadata {key} is missing")
        return default
    # bool is an int to Python, but a true/false flag is never a count or a size.
    numeric = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, numeric):
        expected = "an integer" if kind is int else "a number"
        raise ModelFileError(f"{mf.path}: metadata {key} is {_short(value)}, expected {expected}")
    if not math.isfinite(value) or value <= 0:
        raise ModelFileError(f"{mf.path}: metadata {key} is {value}, expected a positive number")
    return value


# Tokenizer keys and the Python types our GGUF reader gives for the GGUF types llama.cpp writes them as.
_TOKENIZER_STRINGS = ("tokenizer.ggml.model", "tokenizer.ggml.pre")
_TOKENIZER_STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
_TOKENIZER_NUMBER_ARRAYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_TOKENIZER_ID_SUFFIX = "_token_id"


def check_tokenizer_metadata(mf: ModelFile) -> None:
    """The tokenizer keys have the types llama.cpp writes (so a hostile file gives a ModelFileError, not a TypeError)."""
    for key, value in mf.metadata.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        if key in _TOKENIZER_STRINGS:
            ok = isinstance(value, str)
            expected = "a string"
        elif key in _TOKENIZER_STRING_ARRAYS:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            expected = "an array of strings"
        elif key in _TOKENIZER_NUMBER_ARRAYS:
            ok = isinstance(value, np.ndarray) and value.dtype.kind in "iuf"
            expected = "an array of numbers"
        elif key.endswith(_TOKENIZER_ID_SUFFIX):
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an integer"
        elif key.startswith(("tokenizer.ggml.add_", "tokenizer.ggml.normalizer.")):
            ok = isinstance(value, (bool, int))
            expected = "a boolean"
        else:
            continue
        if not ok:
            raise ModelFileError(f"{mf.path}: metadata {key} is {_short(value)}, expected {expected}")
