"""Model arguments read from GGUF metadata, for the llama family."""
from __future__ import annotations

from dataclasses import dataclass

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

        def need(key: str, kind: type = int) -> int | float:
            value = mf.arch_get(key)
            if value is None:
                raise ModelFileError(f"{mf.path}: metadata {arch}.{key} is missing")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise ModelFileError(f"{mf.path}: metadata {arch}.{key} is {value!r}, expected a {kind.__name__}")
            if value <= 0:
                raise ModelFileError(f"{mf.path}: metadata {arch}.{key} is {value}, expected a positive number")
            return value

        n_embd = int(need("embedding_length"))
        n_head = int(need("attention.head_count"))
        n_head_kv = int(mf.arch_get("attention.head_count_kv", n_head))
        head_dim = int(mf.arch_get("attention.key_length", n_embd // n_head))
        n_rot = int(mf.arch_get("rope.dimension_count", head_dim))
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelFileError(f"{mf.path}: {n_head} heads cannot share {n_head_kv} KV heads")
        if n_rot > head_dim or n_rot % 2:
            raise ModelFileError(f"{mf.path}: rope.dimension_count {n_rot} does not fit head dimension {head_dim}")
        embd = mf.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFileError(f"{mf.path}: tensor token_embd.weight is missing")
        scaling = mf.arch_get("rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ModelFileError(f"{mf.path}: rope scaling {scaling!r} is not supported (none, linear)")
        factor = float(mf.arch_get("rope.scaling.factor", 1.0) or 1.0) if scaling == "linear" else 1.0
        args = cls(
            architecture=arch,
            n_layer=int(need("block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=int(need("feed_forward_length")),
            n_vocab=int(embd.shape[1]),
            context_length=int(mf.arch_get("context_length", 2048)),
            rope_base=float(mf.arch_get("rope.freq_base", 10000.0)),
            n_rot=n_rot,
            rope_neox=SUPPORTED_ARCHITECTURES[arch],
            rope_scale=factor,
            rms_eps=float(need("attention.layer_norm_rms_epsilon", float)),
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
