"""The llama-family decoder (llama, mistral, qwen2, qwen3), reading every weight through the pager."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from pagellm import kernels
from pagellm.kv_cache import KVCache
from pagellm.modelfile import GLOBALS, OUTPUT_HEAD, TOKEN_EMBEDDING, ModelFile, TensorInfo
from pagellm.models.config import ModelArgs
from pagellm.offload.cpus import pinned
from pagellm.offload.pager import BLOCK_PARTS, VECTORS, LayerPager, part_of_unit


@dataclass(frozen=True)
class BlockUnits:
    """The pager units of one block: its vectors, then each part's row slices in the order the pass uses them."""

    vectors: str
    attn_in: tuple[str, ...]
    attn_out: tuple[str, ...]
    ffn_in: tuple[str, ...]
    ffn_out: tuple[str, ...]


@dataclass
class Segment:
    """The rows of a batch that belong to one sequence: its cache, first position and row range."""

    cache: KVCache
    start: int
    row: int
    end: int
    cos: np.ndarray | None = None
    sin: np.ndarray | None = None


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale * weight).astype(np.float32, copy=False)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def as_heads_first(cache: np.ndarray) -> np.ndarray:
    """Cached keys or values ``[positions, heads, dim]`` as float32 ``[heads, positions, dim]``."""
    if cache.dtype == np.float16:
        return kernels.halves_heads_first(cache)
    return np.ascontiguousarray(cache.astype(np.float32, copy=False).transpose(1, 0, 2))


def as_f32(raw: np.ndarray) -> np.ndarray:
    """An F32 tensor's raw bytes as float32 values (norm weights, biases)."""
    return raw.view(np.float32)


class LlamaModel:
    """Forward pass over a KV cache; weights come from a LayerPager (or the NoOffload ResidentStore)."""

    def __init__(self, args: ModelArgs, mf: ModelFile, weights: LayerPager):
        self.args = args
        self.mf = mf
        self.weights = weights
        self.head_tensor = "token_embd.weight" if args.tied_embeddings else "output.weight"
        self.head_units = weights.units_of(TOKEN_EMBEDDING if args.tied_embeddings else OUTPUT_HEAD)
        # per layer, its units: the vectors, then each part's (attention in and out, feed-forward in and out)
        self.block_units = [self._block_units(weights, i) for i in range(args.n_layer)]
        # Threads the mat-vecs run on (None: all). Where reads cost CPU that compute would take (a
        # virtual disk served by the host's cores: here reads ran at 1.6 GB/s beside two busy compute
        # threads and 2.5 beside one), the plan leaves a core to the reader. The limit holds for the
        # whole pass: switching thread counts per mat-vec wakes and idles the pool's other workers,
        # which spin meanwhile (decode measured 2.4 tokens/s so, 3.1 on one thread throughout).
        self.compute_threads: int | None = None
        # The CPUs the pass runs on while a core is left to the reader (None: any); see offload.cpus.
        self.compute_cpus: frozenset[int] | None = None
        half = args.n_rot // 2
        self.inv_freq = args.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / args.n_rot)

    @staticmethod
    def _block_units(weights: LayerPager, layer: int) -> BlockUnits:
        """The units of block ``layer`` by part (the pager cuts every llama block so: vectors, then BLOCK_PARTS)."""
        units = weights.units_of(f"blk.{layer}")
        by_part = {part: tuple(u for u in units if part_of_unit(u) == part)
                   for part in (VECTORS, *(name for name, _ in BLOCK_PARTS))}
        if len(by_part[VECTORS]) != 1 or not all(by_part.values()) or sum(map(len, by_part.values())) != len(units):
            raise ValueError(f"blk.{layer} is not a llama block: its tensors make the units {', '.join(units)}")
        return BlockUnits(by_part[VECTORS][0], *(by_part[name] for name, _ in BLOCK_PARTS))

    def new_cache(self, n_ctx: int) -> KVCache:
        """An empty KV cache for ``n_ctx`` positions."""
        a = self.args
        return KVCache(a.n_layer, n_ctx, a.n_head_kv, a.head_dim)

    # -- one forward pass ------------------------------------------------------------------

    def forward(self, token_ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``token_ids`` at the cache's next positions; logits [T, vocab] (or [1, vocab] for the last)."""
        return self.forward_batch([(np.asarray(token_ids), cache)], all_logits)[0]

    def forward_batch(self, batch: Sequence[tuple[np.ndarray, KVCache]], all_logits: bool = False) -> list[np.ndarray]:
        """Run several sequences together, each on its own cache: every layer is acquired once for all.

        Returns per sequence its logits [T_i, vocab] (or [1, vocab], the last position, unless ``all_logits``).
        """
        segments = []
        row = 0
        for ids, cache in batch:
            n = len(ids)
            if n == 0:
                raise ValueError("a sequence in the batch has no tokens")
            if cache.n_tokens + n > cache.n_ctx:
                raise ValueError(f"{cache.n_tokens + n} positions do not fit the context of {cache.n_ctx}")
            segments.append(Segment(cache, cache.n_tokens, row, row + n))
            row += n
        with kernels.threads_limited(self.compute_threads), pinned(self.compute_cpus):
            return self._forward_segments(batch, segments, all_logits)

    def _forward_segments(self, batch: Sequence[tuple[np.ndarray, KVCache]], segments: list["Segment"],
                          all_logits: bool) -> list[np.ndarray]:
        """forward_batch's body, once the segments are laid out."""
        x = self.embed(np.concatenate([np.asarray(ids) for ids, _ in batch]))
        with self.weights.hold(GLOBALS) as glob:
            factors = as_f32(glob["rope_freqs.weight"]) if "rope_freqs.weight" in glob else None
            for seg in segments:
                seg.cos, seg.sin = self.rope_tables(seg.start, seg.end - seg.row, factors)
            for layer in range(self.args.n_layer):
                x = self.block(layer, x, segments)
            keep = np.arange(x.shape[0]) if all_logits else np.array([seg.end - 1 for seg in segments])
            x = rms_norm(x[keep], as_f32(glob["output_norm.weight"]), self.args.rms_eps)
        for seg in segments:
            seg.cache.n_tokens = seg.start + (seg.end - seg.row)
        logits = self.head(x)
        if not all_logits:
            return [logits[i : i + 1] for i in range(len(segments))]
        return [logits[seg.row : seg.end] for seg in segments]

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Token embedding rows, read by row (the table need not be resident)."""
        info = self.mf.tensors["token_embd.weight"]
        bad = [int(t) for t in token_ids if not 0 <= int(t) < self.args.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.args.n_vocab}")
        rows = self.weights.read_rows("token_embd.weight", [int(t) for t in token_ids])
        return kernels.dequantize(rows, info.ggml_type, self.args.n_embd)

    def block(self, layer: int, x: np.ndarray, segments: list["Segment"]) -> np.ndarray:
        """One transformer block over all rows: attention (per sequence) then feed-forward, each with a residual.

        The vectors (norms, biases) are held through the block; each part's units are taken one
        after the other and let go before the next (``project``), so the streaming window holds
        units, not whole blocks.
        """
        a, p = self.args, f"blk.{layer}."
        units = self.block_units[layer]
        with self.acquired(units.vectors) as vec:
            x = x + self.attention_part(units, vec, layer, x, segments)
            h = rms_norm(x, as_f32(vec[p + "ffn_norm.weight"]), a.rms_eps)
            gate, up = self.project(units.ffn_in, (p + "ffn_gate.weight", p + "ffn_up.weight"), h)
            down, = self.project(units.ffn_out, (p + "ffn_down.weight",), (silu(gate) * up).astype(np.float32))
            return x + down

    def attention_part(self, units: BlockUnits, vec: Mapping[str, np.ndarray], layer: int, x: np.ndarray,
                       segments: list["Segment"]) -> np.ndarray:
        """attention(rms_norm(x)), with this layer's keys and values stored in each sequence's cache."""
        a = self.args
        p = f"blk.{layer}."
        T = x.shape[0]
        h = rms_norm(x, as_f32(vec[p + "attn_norm.weight"]), a.rms_eps)
        q, k, v = self.project(units.attn_in, (p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"), h)
        if a.qkv_bias:
            q += as_f32(vec[p + "attn_q.bias"])
            k += as_f32(vec[p + "attn_k.bias"])
            v += as_f32(vec[p + "attn_v.bias"])
        q = q.reshape(T, a.n_head, a.head_dim)
        k = k.reshape(T, a.n_head_kv, a.head_dim)
        v = v.reshape(T, a.n_head_kv, a.head_dim)
        if a.qk_norm:
            q = rms_norm(q, as_f32(vec[p + "attn_q_norm.weight"]), a.rms_eps)
            k = rms_norm(k, as_f32(vec[p + "attn_k_norm.weight"]), a.rms_eps)
        attn = np.empty((T, a.n_head * a.head_dim), dtype=np.float32)
        for seg in segments:
            rows = slice(seg.row, seg.end)
            qs = self.rope(q[rows], seg.cos, seg.sin)
            seg.cache.store(layer, seg.start, self.rope(k[rows], seg.cos, seg.sin), v[rows])
            end = seg.start + (seg.end - seg.row)
            attn[rows] = self.attention(qs, seg.cache.keys[layer, :end], seg.cache.values[layer, :end], seg.start)
        out, = self.project(units.attn_out, (p + "attn_output.weight",), attn)
        return out

    def project(self, units: Sequence[str], names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        """x [T, in] times the transpose of each weight in ``names`` -> [T, out] each, from the row
        slices ``units`` hold, one unit at a time."""
        outs = [np.empty((x.shape[0], self.mf.tensors[n].shape[1]), dtype=np.float32) for n in names]
        for unit in units:
            self.project_unit(unit, names, x, outs)
        return outs

    def project_unit(self, unit: str, names: Sequence[str], x: np.ndarray, outs: list[np.ndarray]) -> None:
        """Fill ``outs`` with the rows of ``names`` that ``unit`` holds (a method so its tensors are let go on return)."""
        with self.acquired(unit) as w:
            for s in self.weights.unit(unit).slices:
                info = self.mf.tensors[s.tensor]
                outs[names.index(s.tensor)][:, s.row_start : s.row_end] = kernels.matmul(
                    w[s.tensor], info.ggml_type, info.shape[0], x)

    @contextmanager
    def acquired(self, unit: str) -> Iterator[Mapping[str, np.ndarray]]:
        """Hold a weight unit while it computes and ask the reader for the ones after it."""
        w = self.weights.acquire(unit)
        self.weights.prefetch_after(unit)
        try:
            yield w
        finally:
            self.weights.release(unit)

    def head(self, x: np.ndarray) -> np.ndarray:
        """Logits from the output head, one row slice (unit) at a time."""
        info = self.mf.tensors[self.head_tensor]
        logits = np.empty((x.shape[0], self.args.n_vocab), dtype=np.float32)
        for unit in self.head_units:
            s = self.weights.unit(unit).slice_of(self.head_tensor)
            logits[:, s.row_start : s.row_end] = self.head_slice(unit, info, x)
        return logits

    def head_slice(self, unit: str, info: TensorInfo, x: np.ndarray) -> np.ndarray:
        """Logits of the rows one head unit holds (a method so its tensors are let go on return)."""
        with self.acquired(unit) as t:
            return kernels.matmul(t[self.head_tensor], info.ggml_type, info.shape[0], x)

    # -- attention and rotary embedding ----------------------------------------------------

    def rope_tables(self, start: int, n: int, factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin [n, 1, n_rot/2] for positions start .. start+n."""
        pos = (start + np.arange(n, dtype=np.float64)) / self.args.rope_scale
        inv_freq = self.inv_freq if factors is None else self.inv_freq / factors.astype(np.float64)
        theta = pos[:, None] * inv_freq[None, :]
        return np.cos(theta).astype(np.float32)[:, None, :], np.sin(theta).astype(np.float32)[:, None, :]

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate the first n_rot dims of each head: adjacent pairs (llama) or halves (NeoX)."""
        n_rot = self.args.n_rot
        out = x.copy()
        if self.args.rope_neox:
            half = n_rot // 2
            x0, x1 = x[..., :half], x[..., half:n_rot]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half:n_rot] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = x0 * cos - x1 * sin
            out[..., 1:n_rot:2] = x0 * sin + x1 * cos
        return out

    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        """Causal grouped-query attention: query head h reads KV head h // (n_head / n_head_kv)."""
        a = self.args
        T, S, group = q.shape[0], keys.shape[0], a.n_head // a.n_head_kv
        if T <= kernels.FUSED_MAX_QUERIES and keys.dtype == values.dtype == np.float16:
            # decoding: one pass over the cached halves, no float32 copy of the cache
            return kernels.attend(q, keys, values, start).reshape(T, a.n_head * a.head_dim)
        qh = q.reshape(T, a.n_head_kv, group, a.head_dim).transpose(1, 2, 0, 3)  # [kv, g, T, d]
        # Each head's keys and values contiguous (keys transposed as a view): numpy's stacked matmul
        # only reaches BLAS for such operands (50x here).
        k = as_heads_first(keys).transpose(0, 2, 1)  # [kv, d, S]
        v = as_heads_first(values)  # [kv, S, d]
        scores = (qh.reshape(a.n_head_kv, group * T, a.head_dim) @ k).reshape(a.n_head_kv, group, T, S)
        scores *= np.float32(1.0 / np.sqrt(a.head_dim))
        if T > 1:  # causal: query t (position start+t) sees keys up to its own position
            future = np.arange(S)[None, :] > (start + np.arange(T))[:, None]
            scores += np.where(future, np.float32(-np.inf), np.float32(0.0))
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs.reshape(a.n_head_kv, group * T, S) @ v  # [kv, g*T, d]
        return np.ascontiguousarray(out.reshape(a.n_head_kv, group, T, a.head_dim).transpose(2, 0, 1, 3)).reshape(T, a.n_head * a.head_dim)
