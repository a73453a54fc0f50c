"""EngineConfig and InferenceEngine: load a GGUF model under an offload policy and generate."""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from pagellm import kernels
from pagellm.modelfile import ModelFile, ModelFileError
from pagellm.models import LlamaModel, ModelArgs
from pagellm.models.config import check_tokenizer_metadata
from pagellm.offload.cpus import available_cpus, split_for_reader
from pagellm.offload.monitor import PressureConfig, PressureMonitor
from pagellm.offload.pager import LayerPager, PagerError, PagerStats, ResidentStore
from pagellm.offload.planner import MachineProfile, Plan, auto_budget, plan_offload
from pagellm.offload.policy import AnyPolicy, NoOffload, OffloadPolicy, PinnedHotSet
from pagellm.offload.pressure import (MemoryProbe, fix_malloc_mmap_threshold, peak_rss_bytes, process_rss_bytes,
                                      release_compiler_pages)
from pagellm.sampling import Sampler, SamplerConfig, StopChecker
from pagellm.kv_cache import KVCache
from pagellm.offload.source import SourceError
from pagellm.tokenizer import StreamDecoder, Tokenizer

# Failures of the weights' I/O (a read that failed, a file truncated under us) or of the pager's budget:
# the generation that met one stops with a GenerationError; the engine stays usable.
_WEIGHT_ERRORS = (SourceError, PagerError)


class GenerationError(RuntimeError):
    """Generation stopped because the weights could not be read; names the file and offset when known."""

    def __init__(self, message: str, path: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset

    @classmethod
    def wrap(cls, error: BaseException) -> "GenerationError":
        """The GenerationError for a weight I/O or pager failure."""
        text = " ".join(str(error).split())
        return cls(f"generation stopped: {text}", getattr(error, "path", None), getattr(error, "offset", None))


def open_model(path: str | os.PathLike[str]) -> tuple[ModelFile, ModelArgs, Tokenizer]:
    """Open and check a model file for the engine; anything wrong with the file is a one-line ModelFileError."""
    mf = ModelFile.open(path)
    return (mf, *check_model(mf))


def check_model(mf: ModelFile) -> tuple[ModelArgs, Tokenizer]:
    """The model arguments and tokenizer of an opened file, or a ModelFileError saying why it cannot run."""
    args = ModelArgs.from_model_file(mf)
    for name, info in mf.tensors.items():
        if not kernels.is_supported(info.ggml_type):
            raise ModelFileError(f"{mf.path}: tensor {name} has GGML type {info.ggml_type.name}, "
                                 f"which pagellm cannot compute yet")
    check_tokenizer_metadata(mf)
    try:
        tokenizer = Tokenizer.from_metadata(mf.metadata)
    except ValueError as error:  # the vocabulary's own checks: unsupported model, counts that disagree
        raise ModelFileError(f"{mf.path}: {' '.join(str(error).split())}") from None
    return args, tokenizer


READER_SWITCH_INTERVAL_S = 0.0005


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
    # the machine's figures the plan uses (disk, compute, how reads and compute share the cores);
    # default: the cached calibration (pagellm plan --measure), else rough defaults
    machine_profile: MachineProfile | None = field(default=None, compare=False, repr=False)
    # --ram auto: size the budget from the RAM available at load (when the policy is NoOffload) and keep
    # following it: a PressureMonitor shrinks the budget under memory pressure and grows it back.
    ram_auto: bool = False
    pressure: PressureConfig = field(default_factory=PressureConfig)
    pressure_probe: MemoryProbe | None = field(default=None, compare=False, repr=False)  # default: the real one

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
    budget_bytes: int = 0  # the weights' budget at the end (0: none); moves under --ram auto
    budget_changes: int = 0  # times memory pressure shrank or grew the budget during the generation

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
        """Share of weight acquires whose unit was already in RAM, not read for this use.

        A unit the prefetcher read just ahead of its use is not a hit here (it cost a read);
        ``prefetch_hit_rate`` says how many of those reads were used.
        """
        return (self.hits - self.prefetches_used) / self.acquires if self.acquires else 1.0

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
                     "acquires", "hits", "prefetches_issued", "prefetches_used", "stall_seconds", "budget_changes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.resident_bytes = other.resident_bytes
        self.budget_bytes = other.budget_bytes
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
        self.plan: Plan | None = None
        self.pressure: PressureMonitor | None = None  # under ram_auto
        self.cache = None
        self.n_ctx = 0
        self.stats = GenerationStats()
        self._lock = threading.RLock()  # one forward pass at a time

    # -- loading -----------------------------------------------------------------------

    def load_model(self) -> "InferenceEngine":
        """Open and validate the file, build the pager for the policy (or load every weight), make the cache."""
        cfg = self.config
        fix_malloc_mmap_threshold()
        mf, args, tokenizer = open_model(cfg.model_path)
        n_ctx = cfg.context_size or min(args.context_length, 4096)
        if n_ctx <= 0:
            raise ValueError(f"context size must be positive, got {n_ctx}")
        if cfg.n_threads:
            kernels.set_num_threads(cfg.n_threads)
        self.tokenizer = tokenizer
        policy, probe = cfg.offload_policy, None
        if cfg.ram_auto:
            probe = cfg.pressure_probe or MemoryProbe()
            if policy.is_disabled():
                policy = PinnedHotSet(auto_budget(mf, n_ctx, probe))
        # Kernels load before any weight, so the compiler's pages go back before the budget fills.
        kernels.warm_up(t.ggml_type for t in mf.tensors.values() if len(t.shape) > 1)
        release_compiler_pages()
        self.weights = LayerPager.build(mf, policy, replacement=cfg.replacement, io_mode=cfg.io_mode)
        # What the planner expects of this placement on this machine (cached calibration or defaults).
        self._plan(mf, policy)
        if probe is not None:
            # a budget the monitor moves is planned again: a smaller one may call for another window
            self.pressure = PressureMonitor(self.weights, probe, policy.ram_budget_bytes(), cfg.pressure,
                                            on_change=lambda budget: self._plan(mf, replace(policy, ram_bytes=budget))
                                            ).start()
        self.model_file, self.args, self.n_ctx = mf, args, n_ctx
        self.model = LlamaModel(args, mf, self.weights)
        if self.plan.streamed:
            # The reader needs the GIL between its reads; at Python's default 5 ms switch interval it
            # waits behind the forward pass's own Python code (TinyLlama, 50% budget: 2.9-3.0 tokens/s
            # at 5 ms, 3.0-3.2 at 0.5 ms). Process-wide, so only lowered, never raised.
            sys.setswitchinterval(min(sys.getswitchinterval(), READER_SWITCH_INTERVAL_S))
        if self.plan.compute_threads and not isinstance(self.weights, ResidentStore):
            # The plan found reads slow beside compute on every thread: leave them a core, and keep
            # the reader on it and the forward pass off it (offload.cpus says why both).
            threads = kernels.get_num_threads() - 1
            split = split_for_reader(available_cpus())
            if split is not None:
                self.model.compute_cpus, reader_cpus = split
                threads = min(threads, len(self.model.compute_cpus))
                self.weights.set_reader_cpus(reader_cpus)
            self.model.compute_threads = max(1, threads)
        self.cache = self.model.new_cache(n_ctx)
        return self

    def _plan(self, mf: ModelFile, policy: AnyPolicy) -> None:
        """Plan ``policy`` on this machine (cached calibration or defaults) and page with the window it chose."""
        cfg = self.config
        plan = plan_offload(mf, policy, cfg.machine_profile or MachineProfile.load_or_default(),
                            self.weights.source.alignment, replacement=cfg.replacement)
        if plan.streamed and not isinstance(self.weights, ResidentStore):
            self.weights.set_window_units(plan.placement.window_units)
        self.plan = plan

    @property
    def layer_pager(self) -> LayerPager | None:
        """The pager, or None under NoOffload (whose weights sit in a ResidentStore)."""
        return None if isinstance(self.weights, ResidentStore) else self.weights

    def _require_loaded(self) -> None:
        if self.model is None:
            raise RuntimeError("call load_model() first")

    def close(self) -> None:
        """Release the weights and the file."""
        if self.pressure is not None:
            self.pressure.stop()
            self.pressure = None
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

    def _prefill(self, ids: Sequence[int], cache: KVCache, all_logits: bool) -> np.ndarray:
        """Run a prompt in chunks of ``prefill_chunk_size``; logits of every row or of the last."""
        chunk = max(1, self.config.prefill_chunk_size)
        rows = []
        for i in range(0, len(ids), chunk):
            out = self.model.forward(np.asarray(ids[i : i + chunk]), cache, all_logits=all_logits)
            if all_logits or i + chunk >= len(ids):
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
            try:
                return self._prefill(list(token_ids), self.cache, all_logits=True)
            except _WEIGHT_ERRORS as error:
                self.cache.reset()
                raise GenerationError.wrap(error) from error

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
        with self._lock:
            seq = self.start(prompt, max_tokens, sampler=sampler, stop=stop, seed=seed, on_token=on_token, cache=self.cache)
            try:
                while not seq.done:
                    self.step([seq])
            except GenerationError:
                self.cache.reset()  # the failed sequence's positions must not leak into the next one
                raise
            return seq.result()

    def start(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        sampler: SamplerConfig | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        on_token: Callable[[int, str], object] | None = None,
        cache: KVCache | None = None,
    ) -> "SequenceState":
        """Prefill a prompt into a sequence of its own (its own KV cache) and sample its first token."""
        self._require_loaded()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self._check_fits(len(ids))
        config = sampler or self.config.sampler
        seq = SequenceState(
            engine=self,
            prompt_ids=ids,
            max_tokens=min(max_tokens, self.n_ctx - len(ids)),
            cache=cache if cache is not None else self.model.new_cache(self.n_ctx),
            sampler=Sampler(config if seed is None else replace(config, seed=seed)),
            stop_checker=StopChecker(stop),
            decoder=self.tokenizer.stream_decoder(),
            on_token=on_token,
        )
        with self._lock:
            seq.before = self.weights.stats.snapshot()
            seq.budget_changes_before = self._pressure_changes()
            t0 = time.perf_counter()
            seq.cache.reset()
            try:
                logits = self._prefill(ids, seq.cache, all_logits=False)[-1]
            except _WEIGHT_ERRORS as error:
                seq.cache.reset()
                raise GenerationError.wrap(error) from error
            seq.prompt_seconds = time.perf_counter() - t0
            seq.decode_start = time.perf_counter()
            seq.accept(logits)
        return seq

    def step(self, sequences: Sequence["SequenceState"]) -> None:
        """One decode step for every unfinished sequence, all in one forward pass (each layer read once)."""
        live = [s for s in sequences if not s.done]
        if not live:
            return
        with self._lock:
            positions = [s.cache.n_tokens for s in live]
            try:
                outs = self.model.forward_batch([(np.asarray([s.new_ids[-1]]), s.cache) for s in live])
            except _WEIGHT_ERRORS as error:
                # The pass may have advanced a cache (the head runs after it does): put every
                # sequence back where it was, so a retry, alone or batched, starts clean.
                for seq, n in zip(live, positions):
                    seq.cache.truncate(n)
                raise GenerationError.wrap(error) from error
            for seq, logits in zip(live, outs):
                seq.accept(logits[-1])

    # -- figures -------------------------------------------------------------------------

    def _generation_stats(self, before: PagerStats, n_prompt: int, n_new: int, t_prompt: float, t_decode: float,
                          budget_changes_before: int = 0) -> GenerationStats:
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
            budget_bytes=self.weights.budget_bytes or 0,
            budget_changes=self._pressure_changes() - budget_changes_before,
        )

    def _pressure_changes(self) -> int:
        """Budget changes the pressure monitor has made so far."""
        return self.pressure.stats.shrinks + self.pressure.stats.grows if self.pressure is not None else 0

    def memory_summary(self) -> dict[str, int]:
        """Budget, resident weights, KV cache bytes, process RSS now and at peak (and, under ram_auto, pressure counters)."""
        self._require_loaded()
        summary = {
            "budget_bytes": self.weights.budget_bytes or 0,
            "resident_bytes": self.weights.resident_bytes,
            "kv_cache_bytes": self.cache.nbytes,
            "rss_bytes": process_rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.pressure is not None:
            monitor = self.pressure.stats
            summary |= {"pressure_shrinks": monitor.shrinks, "pressure_grows": monitor.grows,
                        "max_budget_bytes": self.pressure.max_budget}
        return summary


@dataclass(eq=False)
class SequenceState:
    """One sequence being generated: its cache, sampler, text so far and why it stopped."""

    engine: InferenceEngine
    prompt_ids: list[int]
    max_tokens: int
    cache: KVCache
    sampler: Sampler
    stop_checker: StopChecker
    decoder: StreamDecoder
    on_token: Callable[[int, str], object] | None = None
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` handed to on_token so far
    finish_reason: str | None = None
    before: PagerStats | None = None
    budget_changes_before: int = 0  # the pressure monitor's count when the sequence started
    prompt_seconds: float = 0.0
    decode_start: float = 0.0
    decode_seconds: float = 0.0
    stats: GenerationStats | None = None

    @property
    def done(self) -> bool:
        """Finished (stop, length or cancelled)."""
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating (a client went away); the sequence finishes at once."""
        if not self.done:
            self._finish("cancelled")

    def accept(self, logits: np.ndarray) -> None:
        """Sample the next token from ``logits`` and account for it; finish when it ends the sequence."""
        if self.done:
            return
        if len(self.new_ids) >= self.max_tokens:
            return self._finish("length")
        token = self.sampler.sample(logits, self.prompt_ids + self.new_ids)
        if self.engine.tokenizer.is_eog(token):
            return self._finish("stop")
        self.new_ids.append(token)
        self.text += self.decoder.push(token)
        check = self.stop_checker.check(self.text)
        if check.stopped:
            self.text = self.text[: check.safe_length]
        if self.on_token is not None and check.safe_length > self.emitted:
            keep_going = self.on_token(token, self.text[self.emitted : check.safe_length])
            self.emitted = check.safe_length
            if keep_going is False:
                return self._finish("cancelled")
        if check.stopped:
            return self._finish("stop")
        if len(self.new_ids) >= self.max_tokens:
            return self._finish("length")

    def _finish(self, reason: str) -> None:
        if reason in ("length", "cancelled"):
            self.text += self.decoder.flush()
            check = self.stop_checker.check(self.text)
            if check.stopped:
                self.text, reason = self.text[: check.safe_length], "stop"
        if self.on_token is not None and len(self.text) > self.emitted:
            self.on_token(self.new_ids[-1] if self.new_ids else -1, self.text[self.emitted :])
            self.emitted = len(self.text)
        self.finish_reason = reason
        self.decode_seconds = time.perf_counter() - self.decode_start
        eng = self.engine
        self.stats = eng._generation_stats(self.before, len(self.prompt_ids), len(self.new_ids), self.prompt_seconds,
                                           self.decode_seconds, self.budget_changes_before)
        eng.stats.add(self.stats)

    def result(self) -> Generation:
        """The finished generation."""
        if not self.done:
            raise RuntimeError("the sequence has not finished")
        return Generation(self.new_ids, self.text, self.finish_reason, self.stats)
