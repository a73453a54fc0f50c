"""Turn logits into the next token id, and stop strings into safe streaming.

The sampler follows llama.cpp's default chain, in order:
penalties → top-k → top-p → min-p → temperature → draw.
Filters run before temperature, so temperature reshapes the odds among the
survivors but never changes which tokens survive. ``temperature <= 0`` is
greedy: the argmax of the penalized logits (first index on ties).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# When top-k is off, top-p needs the candidates in descending order. Sorting a
# 150k vocabulary costs ~10 ms; the nucleus usually lies within the first few
# thousand tokens, so sort only those first and fall back to a full sort.
_NUCLEUS_HEAD = 4096


@dataclass(frozen=True)
class SamplerConfig:
    """How to pick the next token; the defaults are llama.cpp's."""

    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # 0: off, -1: every previous token
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window
    presence_penalty: float = 0.0  # subtracted once if present in the window
    seed: int | None = None  # None: fresh entropy on every reset

    def __post_init__(self) -> None:
        _check_real(self, "temperature", -math.inf, math.inf, "a finite number (<= 0 means greedy)")
        _check_int(self, "top_k", 0, None, "an integer >= 0 (0 turns top-k off)")
        _check_real(self, "top_p", 0.0, 1.0, "a number in [0, 1] (1 turns top-p off)")
        _check_real(self, "min_p", 0.0, 1.0, "a number in [0, 1] (0 turns min-p off)")
        _check_real(self, "repeat_penalty", 0.0, math.inf, "a finite number > 0 (1 turns it off)", open_low=True)
        _check_int(self, "repeat_last_n", -1, None, "an integer >= -1 (0 off, -1 all previous tokens)")
        # The OpenAI API bounds both penalties to [-2, 2]; beyond that they only
        # ban or force tokens, which is not what a penalty is for.
        _check_real(self, "frequency_penalty", -2.0, 2.0, "a number in [-2, 2]")
        _check_real(self, "presence_penalty", -2.0, 2.0, "a number in [-2, 2]")
        if self.seed is not None:
            _check_int(self, "seed", 0, None, "None or an integer >= 0")

    @classmethod
    def greedy(cls, **overrides: object) -> SamplerConfig:
        """Return a config that always takes the most likely token (penalties still apply if given)."""
        return cls(**{"temperature": 0.0, **overrides})  # type: ignore[arg-type]

    @property
    def is_greedy(self) -> bool:
        """Whether sampling is deterministic argmax."""
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether any repetition penalty can change a logit."""
        active = self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        return active and self.repeat_last_n != 0


def _is_int(value: object) -> bool:
    # bool is an int subclass, but top_k=True is a bug, not a number.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(config: SamplerConfig, name: str, low: int, high: int | None, allowed: str) -> None:
    """Raise ValueError unless config.name is an integer in [low, high]."""
    value = getattr(config, name)
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ValueError(f"SamplerConfig.{name} must be {allowed}, got {value!r}")
    object.__setattr__(config, name, int(value))


def _check_real(
    config: SamplerConfig, name: str, low: float, high: float, allowed: str, open_low: bool = False
) -> None:
    """Raise ValueError unless config.name is a finite real in [low, high] ((low, high] with open_low)."""
    value = getattr(config, name)
    ok = (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise ValueError(f"SamplerConfig.{name} must be {allowed}, got {value!r}")
    object.__setattr__(config, name, float(value))


class Sampler:
    """Picks token ids from logits under a SamplerConfig, with its own random stream."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config if config is not None else SamplerConfig()
        self._rng = np.random.default_rng(self.config.seed)

    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream from ``seed``, or from the config's seed when None."""
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self._rng = np.random.default_rng(self.config.seed if seed is None else seed)

    def sample(self, logits: np.ndarray, previous_ids: Sequence[int] = ()) -> int:
        """Return the next token id for ``logits`` given the ids generated or prompted so far."""
        ids, probs = self.distribution(logits, previous_ids)
        if len(ids) == 1:
            return int(ids[0])
        # Inverse-CDF draw: one uniform number per token keeps seeded runs
        # reproducible regardless of how many candidates survive.
        cumulative = np.cumsum(probs)
        position = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return int(ids[min(position, len(ids) - 1)])

    def distribution(self, logits: np.ndarray, previous_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Return the surviving candidate ids and their final probabilities (float64, sum 1)."""
        logits = _as_logits(logits)
        config = self.config
        if config.has_penalties:
            logits = apply_penalties(logits, previous_ids, config)
        if config.is_greedy:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        ids, kept = _filter(logits, config)
        with np.errstate(over="ignore"):
            scaled = kept.astype(np.float64) / config.temperature
        if not np.isfinite(scaled.max()):
            # A temperature so small that logits overflow float64 is greedy.
            return ids[np.argmax(kept)].reshape(1), np.ones(1)
        weights = np.exp(scaled - scaled.max())
        return ids, weights / weights.sum()


def _as_logits(logits: np.ndarray) -> np.ndarray:
    """Check logits are a non-empty 1-D float vector with a finite maximum; return float32."""
    array = np.asarray(logits, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError("logits contain NaN")
    if not np.isfinite(array.max()):
        raise ValueError("logits have no finite maximum (all -inf, or +inf present)")
    return array


def apply_penalties(logits: np.ndarray, previous_ids: Sequence[int], config: SamplerConfig) -> np.ndarray:
    """Return logits with repeat, frequency and presence penalties applied; the input is never modified."""
    window = _penalty_window(previous_ids, config.repeat_last_n)
    if window.size == 0:
        return logits
    if window.min() < 0 or window.max() >= logits.size:
        raise ValueError(f"previous_ids must lie in [0, {logits.size}), got {int(window.min())}..{int(window.max())}")
    ids, counts = np.unique(window, return_counts=True)
    values = logits[ids]
    # Dividing a negative logit would raise it; multiplying pushes it further
    # down, so the penalty always makes a seen token less likely.
    values = np.where(values <= 0, values * config.repeat_penalty, values / config.repeat_penalty)
    values = values - (counts * config.frequency_penalty + config.presence_penalty)
    penalized = logits.copy()
    penalized[ids] = values
    return penalized


def _penalty_window(previous_ids: Sequence[int], last_n: int) -> np.ndarray:
    """The ids the penalties look at: the last ``last_n`` (all for -1, none for 0)."""
    if last_n == 0 or len(previous_ids) == 0:
        return np.empty(0, dtype=np.int64)
    window = previous_ids if last_n < 0 else previous_ids[-last_n:]
    return np.asarray(window, dtype=np.int64).reshape(-1)


def _filter(logits: np.ndarray, config: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Apply top-k, top-p and min-p; return surviving ids and their logits."""
    ids, kept, ordered = _top_k(logits, config.top_k)
    # top-p normalizes over everything top-k kept, so take the sum before min-p trims.
    top = float(kept.max())
    weights = np.exp(kept.astype(np.float64) - top)
    total = float(weights.sum())
    if config.min_p > 0.0:
        # min-p keeps logit >= max + log(p), i.e. prob >= p * max prob. top-p
        # always keeps the max, so the threshold is the same before or after
        # it; both keep a prefix of the sorted order, so applying min-p first
        # gives llama.cpp's result and leaves top-p less to sort.
        mask = kept >= np.float32(top + math.log(config.min_p))
        if not mask.all():
            ids, kept, weights = ids[mask], kept[mask], weights[mask]
    if config.top_p < 1.0:
        if not ordered:
            order = _descending_order(kept, weights, total, config.top_p)
            ids, kept, weights = ids[order], kept[order], weights[order]
        cumulative = np.cumsum(weights) / total
        # Keep through the first token where the mass reaches p (at least one).
        cut = int(np.searchsorted(cumulative, config.top_p, side="left")) + 1
        ids, kept = ids[:cut], kept[:cut]
    return ids, kept


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (ids, logits, sorted?) of the k largest logits, descending; everything when k is off."""
    if k <= 0 or k >= logits.size:
        return np.arange(logits.size), logits, False
    ids = _largest_k(logits, k)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    return ids, logits[ids], True


def _largest_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits, unordered, in about one pass over the vocabulary."""
    stride = logits.size // (32 * k)
    if stride >= 4:
        # The k-th largest of a strided sample is a lower bound for the k-th
        # largest overall (the sample's top k are all in the vocabulary), so
        # every winner passes the threshold, and few others do.
        sample = logits[::stride]
        threshold = np.partition(sample, sample.size - k)[sample.size - k]
        survivors = np.flatnonzero(logits >= threshold)
        top = np.argpartition(logits[survivors], survivors.size - k)[survivors.size - k :]
        return survivors[top]
    return np.argpartition(logits, logits.size - k)[logits.size - k :]


def _descending_order(kept: np.ndarray, weights: np.ndarray, total: float, top_p: float) -> np.ndarray:
    """Indices of kept in descending logit order, at least far enough to hold mass top_p."""
    if kept.size > _NUCLEUS_HEAD:
        head = np.argpartition(-kept, _NUCLEUS_HEAD - 1)[:_NUCLEUS_HEAD]
        if float(weights[head].sum()) / total >= top_p:
            return head[np.argsort(-kept[head], kind="stable")]
    return np.argsort(-kept, kind="stable")


# ---------------------------------------------------------------------------
# stop strings


@dataclass(frozen=True)
class StopCheck:
    """What StopChecker.check found in the text so far."""

    stopped: bool  # a stop string occurred
    safe_length: int  # characters of the text that may be emitted now
    stop: str | None = None  # the stop string found (the earliest one)


class StopChecker:
    """Finds stop strings in streamed text and says how much of it is safe to emit."""

    def __init__(self, stop: str | Sequence[str] | None = ()) -> None:
        if stop is None:
            stop = ()
        if isinstance(stop, str):  # the OpenAI API allows one string or a list
            stop = (stop,)
        for index, item in enumerate(stop):
            if not isinstance(item, str) or not item:
                raise ValueError(f"stop[{index}] must be a non-empty string, got {item!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stop))

    def check(self, text: str) -> StopCheck:
        """Report whether ``text`` contains a stop string and how much of it may be emitted."""
        found = self._earliest_stop(text)
        if found is not None:
            position, stop = found
            return StopCheck(True, position, stop)
        return StopCheck(False, len(text) - self._held_back(text))

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        """Return (position, stop) of the stop string that starts first, or None."""
        best: tuple[int, str] | None = None
        for stop in self.stops:
            position = text.find(stop)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that could begin a stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


__all__ = ["SamplerConfig", "Sampler", "StopChecker", "StopCheck", "apply_penalties"]

