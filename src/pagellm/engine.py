"""EngineConfig and InferenceEngine: load a GGUF model under an offload policy and generate."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pagellm import kernels
from pagellm.modelfile import ModelFile
from pagellm.models import LlamaModel, ModelArgs
from pagellm.offload.pager import LayerPager, PagerStats, ResidentStore
from pagellm.offload.policy import AnyPolicy, NoOffload, OffloadPolicy
from pagellm.offload.pressure import peak_rss_bytes, process_rss_bytes
from pagellm.sampling import Sampler, SamplerConfig, StopChecker
from pagellm.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to load a model and generate with it."""

    model_path: str | os.PathLike[str]
    context_size: int | None = None  # default: the model's training context, capped at 4096
    n_threads: int | None = None  # default: all cores
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    prefill_chunk_size: int = 512
    offload_policy: AnyPolicy = field(default_factory=NoOffload)
    io_mode: str = "auto"  # how the pager reads: auto, direct, buffered, mmap
    replacement: str = "auto"  # the pager's replacement: auto (sweep-aware) or lru

    def with_offload(self, policy: AnyPolicy | str) -> "EngineConfig":
        """The same configuration under another offload policy (a policy or its text spelling)."""
        return replace(self, offload_policy=OffloadPolicy.parse(policy) if isinstance(policy, str) else policy)


@dataclass
class GenerationStats:
    """Figures of one generation (or, on the engine, of all generations so far)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    bytes_read: int = 0
    acquires: int = 0
    hits: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    stall_seconds: float = 0.0
    resident_bytes: int = 0
    peak_rss_bytes: int = 0
    io_mode: str = "none"

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prompt (prefill) tokens per second."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second, excluding the prompt."""
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def bytes_read_per_token(self) -> float:
        """Bytes read from the file per token processed (prompt and generated)."""
        n = self.prompt_tokens + self.generated_tokens
        return self.bytes_read / n if n else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of weight acquires served from RAM."""
        return self.hits / self.acquires if self.acquires else 1.0

    @property
    def prefetch_hit_rate(self) -> float:
        """Share of issued prefetches that an acquire then used."""
        return self.prefetches_used / self.prefetches_issued if self.prefetches_issued else 0.0

    @property
    def stall_share(self) -> float:
        """Share of the generation's time spent waiting on reads."""
        total = self.prompt_seconds + self.decode_seconds
        return self.stall_seconds / total if total else 0.0

    def add(self, other: "GenerationStats") -> None:
        """Accumulate another generation's figures into these."""
        for name in ("prompt_tokens", "generated_tokens", "prompt_seconds", "decode_seconds", "bytes_read",
                     "acquires", "hits", "prefetches_issued", "prefetches_used", "stall_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.resident_bytes = other.resident_bytes
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)
        self.io_mode = other.io_mode

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain figures, derived ones included (for JSON and the CLI)."""
        out: dict[str, float | int | str] = dict(self.__dict__)
        for name in ("prompt_tokens_per_s", "decode_tokens_per_s", "bytes_read_per_token", "hit_rate",
                     "prefetch_hit_rate", "stall_share"):
            out[name] = getattr(self, name)
        return out


@dataclass
class Generation:
    """The result of ``generate``: the new token ids, their text, why it stopped, and the figures."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end of generation token or stop string) or "length"
    stats: GenerationStats


class InferenceEngine:
    """One model, one KV cache; ``generate`` and ``eval_logits`` run the forward pass through the pager."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_file: ModelFile | None = None
        self.args: ModelArgs | None = None
        self.tokenizer: Tokenizer | None = None
        self.weights: LayerPager | None = None
        self.model: LlamaModel | None = None
        self.cache = None
        self.n_ctx = 0
        self.stats = GenerationStats()
        self._lock = threading.RLock()  # one forward pass at a time

    # -- loading -----------------------------------------------------------------------

    def load_model(self) -> "InferenceEngine":
        """Open and validate the file, build the pager for the policy (or load every weight), make the cache."""
        cfg = self.config
        mf = ModelFile.open(cfg.model_path)
        args = ModelArgs.from_model_file(mf)
        for name, info in mf.tensors.items():
            if not kernels.is_supported(info.ggml_type):
                raise ValueError(f"{mf.path}: tensor {name} has GGML type {info.ggml_type.name}, which pagellm cannot compute yet")
        n_ctx = cfg.context_size or min(args.context_length, 4096)
        if n_ctx <= 0:
            raise ValueError(f"context size must be positive, got {n_ctx}")
        if cfg.n_threads:
            kernels.set_num_threads(cfg.n_threads)
        self.tokenizer = Tokenizer.from_metadata(mf.metadata)
        self.weights = LayerPager.build(mf, cfg.offload_policy, replacement=cfg.replacement, io_mode=cfg.io_mode)
        self.model_file, self.args, self.n_ctx = mf, args, n_ctx
        self.model = LlamaModel(args, mf, self.weights)
        self.cache = self.model.new_cache(n_ctx)
        return self

    @property
    def layer_pager(self) -> LayerPager | None:
        """The pager, or None under NoOffload (whose weights sit in a ResidentStore)."""
        return None if isinstance(self.weights, ResidentStore) else self.weights

    def _require_loaded(self) -> None:
        if self.model is None:
            raise RuntimeError("call load_model() first")

    def close(self) -> None:
        """Release the weights and the file."""
        if self.weights is not None:
            self.weights.close()
            self.weights = None
            self.model = None

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (BOS added when the vocabulary asks for it)."""
        self._require_loaded()
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of token ids."""
        self._require_loaded()
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    # -- evaluation ----------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the KV cache."""
        self._require_loaded()
        self.cache.reset()

    def _prefill(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        chunk = max(1, self.config.prefill_chunk_size)
        rows = []
        for i in range(0, len(ids), chunk):
            part = np.asarray(ids[i : i + chunk], dtype=np.int64)
            last = i + chunk >= len(ids)
            out = self.model.forward(part, self.cache, all_logits=all_logits)
            if all_logits or last:
                rows.append(out)
        return np.concatenate(rows, axis=0)

    def _check_fits(self, n_prompt: int, extra: int = 0) -> None:
        if n_prompt + extra > self.n_ctx:
            raise ValueError(f"prompt of {n_prompt} tokens does not fit the context of {self.n_ctx} tokens")

    def eval_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits after each position (float32 [len, vocab]), evaluated from an empty cache."""
        self._require_loaded()
        with self._lock:
            self._check_fits(len(token_ids))
            self.cache.reset()
            return self._prefill(list(token_ids), all_logits=True)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        on_token: Callable[[int, str], object] | None = None,
        sampler: SamplerConfig | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Generate up to ``max_tokens`` after ``prompt`` (text, or token ids used as they are).

        ``on_token(id, text)`` is called as tokens are made, with the text that became final
        (complete UTF-8, not part of a possible stop string); returning False stops generation.
        """
        self._require_loaded()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        with self._lock:
            self._check_fits(len(ids))
            max_tokens = min(max_tokens, self.n_ctx - len(ids))
            return self._generate(ids, max_tokens, on_token, sampler or self.config.sampler, stop, seed)

    def _generate(self, ids, max_tokens, on_token, sampler_config, stop, seed) -> Generation:
        sampler = Sampler(sampler_config if seed is None else replace(sampler_config, seed=seed))
        stop_checker = StopChecker(stop)
        decoder = self.tokenizer.stream_decoder()
        before = self._pager_snapshot()
        t0 = time.perf_counter()
        self.cache.reset()
        logits = self._prefill(ids, all_logits=False)[-1]
        t_prompt = time.perf_counter() - t0
        history = list(ids)
        new_ids: list[int] = []
        text, emitted = "", 0
        finish = "length"
        t1 = time.perf_counter()
        while len(new_ids) < max_tokens:
            token = sampler.sample(logits, history)
            if self.tokenizer.is_eog(token):
                finish = "stop"
                break
            new_ids.append(token)
            history.append(token)
            text += decoder.push(token)
            check = stop_checker.check(text)
            if check.stopped:
                text = text[: check.safe_length]
                finish = "stop"
            if on_token is not None and check.safe_length > emitted:
                if on_token(token, text[emitted : check.safe_length]) is False:
                    emitted = check.safe_length
                    finish = "stop"
                    break
                emitted = check.safe_length
            if finish == "stop" or len(new_ids) >= max_tokens:
                break
            logits = self.model.forward(np.asarray([token]), self.cache)[-1]
        if finish == "length" or not stop_checker.check(text).stopped:
            text += decoder.flush()
        if on_token is not None and len(text) > emitted and not stop_checker.check(text).stopped:
            on_token(new_ids[-1] if new_ids else -1, text[emitted:])
        stats = self._generation_stats(before, len(ids), len(new_ids), t_prompt, time.perf_counter() - t1)
        self.stats.add(stats)
        return Generation(new_ids, text, finish, stats)

    # -- figures -------------------------------------------------------------------------

    def _pager_snapshot(self) -> PagerStats:
        return self.weights.stats.snapshot()

    def _generation_stats(self, before: PagerStats, n_prompt: int, n_new: int, t_prompt: float, t_decode: float) -> GenerationStats:
        now = self.weights.stats
        return GenerationStats(
            prompt_tokens=n_prompt,
            generated_tokens=n_new,
            prompt_seconds=t_prompt,
            decode_seconds=t_decode,
            bytes_read=(now.bytes_read - before.bytes_read) + (now.row_bytes_read - before.row_bytes_read),
            acquires=now.acquires - before.acquires,
            hits=now.hits - before.hits,
            prefetches_issued=now.prefetches_issued - before.prefetches_issued,
            prefetches_used=now.prefetches_used - before.prefetches_used,
            stall_seconds=now.stall_seconds - before.stall_seconds,
            resident_bytes=now.resident_bytes,
            peak_rss_bytes=peak_rss_bytes(),
            io_mode=self.weights.io_mode,
        )

    def memory_summary(self) -> dict[str, int]:
        """Budget, resident weights, KV cache bytes, process RSS now and at peak."""
        self._require_loaded()
        return {
            "budget_bytes": self.weights.budget_bytes or 0,
            "resident_bytes": self.weights.resident_bytes,
            "kv_cache_bytes": self.cache.nbytes,
            "rss_bytes": process_rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
        }


def model_path_of(path: str | os.PathLike[str]) -> Path:
    """The model path as a Path (kept for callers that take strings)."""
    return Path(path)
