"""Sampler: llama.cpp chain semantics, seeds, speed; StopChecker for streaming."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pagellm.sampling import Sampler, SamplerConfig, StopCheck, StopChecker, apply_penalties

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)  # every filter off


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def reference_distribution(logits: np.ndarray, previous: list[int], c: SamplerConfig) -> dict[int, float]:
    """The llama.cpp chain written the slow, obvious way: full sort, one stage at a time."""
    z = np.array(logits, dtype=np.float64)
    window = previous if c.repeat_last_n < 0 else previous[-c.repeat_last_n:] if c.repeat_last_n else []
    for token in set(window):
        count = window.count(token)
        z[token] = z[token] * c.repeat_penalty if z[token] <= 0 else z[token] / c.repeat_penalty
        z[token] -= count * c.frequency_penalty + c.presence_penalty
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if c.temperature <= 0:
        return {int(np.argmax(z)): 1.0}
    if c.top_k > 0:
        order = order[: c.top_k]
    if c.top_p < 1.0:
        probs = softmax(z[order])
        cumulative = np.cumsum(probs)
        keep = next((i + 1 for i, total in enumerate(cumulative) if total >= c.top_p), len(order))
        order = order[:keep]
    if c.min_p > 0.0:
        top = max(z[i] for i in order)
        order = [i for i in order if z[i] >= top + math.log(c.min_p)]
    probs = softmax(z[order] / c.temperature)
    return dict(zip(order, probs))


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("min_p", 2.0),
        ("repeat_penalty", 0.0),
        ("repeat_penalty", -1.0),
        ("repeat_last_n", -2),
        ("frequency_penalty", 3.0),
        ("presence_penalty", -2.5),
        ("seed", -1),
        ("seed", "42"),
    ],
)
def test_config_rejects_out_of_range(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SamplerConfig\.{field} must be"):
        SamplerConfig(**{field: value})


def test_config_defaults_and_coercion() -> None:
    config = SamplerConfig(temperature=1, top_k=np.int64(5))
    assert isinstance(config.temperature, float) and config.temperature == 1.0
    assert type(config.top_k) is int and config.top_k == 5
    assert SamplerConfig() == SamplerConfig(0.8, 40, 0.95, 0.05, 1.0, 64, 0.0, 0.0, None)
    assert SamplerConfig.greedy().is_greedy and SamplerConfig(temperature=-1).is_greedy
    assert SamplerConfig.greedy(repeat_penalty=1.3).repeat_penalty == 1.3
    assert not SamplerConfig(repeat_penalty=1.3, repeat_last_n=0).has_penalties


# ------------------------------------------------------------------ greedy


def test_greedy_is_argmax_first_on_ties() -> None:
    sampler = Sampler(SamplerConfig.greedy())
    assert sampler.sample(np.array([0.1, 3.0, -2.0, 3.0], dtype=np.float32), []) == 1
    assert sampler.sample(np.array([5.0, 5.0], dtype=np.float32), []) == 0


def test_repeat_penalty_changes_the_argmax() -> None:
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    assert Sampler(SamplerConfig.greedy(repeat_penalty=1.1)).sample(logits, [0]) == 1  # 2.0/1.1 < 1.9
    assert Sampler(SamplerConfig.greedy(repeat_penalty=1.04)).sample(logits, [0]) == 0  # 2.0/1.04 > 1.9
    # The window only looks back repeat_last_n tokens.
    assert Sampler(SamplerConfig.greedy(repeat_penalty=1.1, repeat_last_n=2)).sample(logits, [0, 2, 2]) == 0


def test_repeat_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = np.array([2.0, -2.0, 0.0, 1.0], dtype=np.float32)
    config = SamplerConfig(repeat_penalty=2.0, repeat_last_n=-1)
    out = apply_penalties(logits, [0, 1, 2, 0], config)
    assert out.tolist() == [1.0, -4.0, 0.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 0.0, 1.0]  # the caller's array is untouched


def test_frequency_and_presence_penalties() -> None:
    logits = np.zeros(4, dtype=np.float32)
    config = SamplerConfig(frequency_penalty=0.5, presence_penalty=0.25, repeat_last_n=-1)
    out = apply_penalties(logits, [1, 1, 1, 3], config)
    assert out.tolist() == pytest.approx([0.0, -1.75, 0.0, -0.75])


def test_penalty_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="previous_ids"):
        Sampler(SamplerConfig(repeat_penalty=1.1)).sample(np.zeros(4, dtype=np.float32), [4])


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), np.zeros(0), np.array([0.0, np.nan]), np.full(3, -np.inf)])
def test_bad_logits(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler(SamplerConfig()).sample(bad, [])


# ----------------------------------------------------------------- filters


def test_top_k_frequencies_follow_the_renormalized_softmax() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 1, 1000).astype(np.float32)
    logits[[10, 500, 900]] = [5.0, 4.5, 4.0]  # a clear top 3
    sampler = Sampler(SamplerConfig(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=1))
    draws = np.array([sampler.sample(logits, []) for _ in range(20000)])
    assert set(draws.tolist()) == {10, 500, 900}
    expected = softmax(np.array([5.0, 4.5, 4.0]))
    observed = np.array([(draws == i).mean() for i in (10, 500, 900)])
    assert np.abs(observed - expected).max() < 0.015


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.array([1.0, 0.0], dtype=np.float32)
    for temperature in (0.5, 1.0, 2.0):
        sampler = Sampler(SamplerConfig(temperature=temperature, seed=3, **OFF))
        draws = np.array([sampler.sample(logits, []) for _ in range(20000)])
        assert abs((draws == 0).mean() - softmax(np.array([1.0, 0.0]) / temperature)[0]) < 0.015


def test_top_p_keeps_the_token_that_crosses_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    ids, probs = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0)).distribution(logits)
    assert ids.tolist() == [0, 1]
    assert probs == pytest.approx([0.625, 0.375])
    ids, _ = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.0, min_p=0.0)).distribution(logits)
    assert ids.tolist() == [0]


def test_min_p_is_relative_to_the_top_token() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    ids, _ = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25)).distribution(logits)
    assert sorted(ids.tolist()) == [0, 1, 2]  # 0.05 < 0.25 * 0.5


def test_filters_ignore_temperature() -> None:
    # Filters run before temperature: a hot sampler still never leaves the top-p set.
    logits = np.log(np.array([0.6, 0.3, 0.08, 0.02])).astype(np.float32)
    sampler = Sampler(SamplerConfig(temperature=50.0, top_k=0, top_p=0.85, min_p=0.0, seed=0))
    assert {sampler.sample(logits, []) for _ in range(2000)} == {0, 1}


def test_masked_tokens_are_never_drawn() -> None:
    logits = np.array([1.0, -np.inf, 1.0, -np.inf], dtype=np.float32)
    sampler = Sampler(SamplerConfig(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=0))
    assert {sampler.sample(logits, []) for _ in range(500)} == {0, 2}


# hypothesis: distinct logits on a coarse grid, so cut-offs never fall inside ties.
logit_vectors = st.integers(2, 60).flatmap(
    lambda n: st.lists(st.integers(-400, 400), min_size=n, max_size=n, unique=True).map(
        lambda xs: np.array(xs, dtype=np.float32) / 37
    )
)
configs = st.builds(
    SamplerConfig,
    temperature=st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.7]),
    top_k=st.integers(0, 70),
    top_p=st.sampled_from([0.0, 0.3, 0.62, 0.9, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.7]),
    repeat_penalty=st.sampled_from([1.0, 1.1, 1.5]),
    repeat_last_n=st.sampled_from([-1, 0, 3, 64]),
    frequency_penalty=st.sampled_from([0.0, 0.4]),
    presence_penalty=st.sampled_from([0.0, 0.3]),
)


@settings(max_examples=300, deadline=None)
@given(logits=logit_vectors, config=configs, data=st.data())
def test_distribution_matches_reference(logits: np.ndarray, config: SamplerConfig, data: st.DataObject) -> None:
    previous = data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=12))
    penalized = apply_penalties(logits, previous, config) if config.has_penalties else logits
    # Penalties can create ties; skip those, the cut-off among equals is arbitrary.
    assume(len(set(penalized.tolist())) == len(penalized))
    expected = reference_distribution(logits, previous, config)
    ids, probs = Sampler(config).distribution(logits, previous)
    got = dict(zip(ids.tolist(), probs.tolist()))
    if set(got) != set(expected):
        # Only a cumulative sum within rounding of top_p may legitimately differ.
        sorted_probs = np.sort(softmax(penalized))[::-1]
        assume(np.abs(np.cumsum(sorted_probs) - config.top_p).min() > 1e-9)
    assert set(got) == set(expected)
    for token, p in expected.items():
        assert got[token] == pytest.approx(p, rel=1e-5, abs=1e-9)  # float32 logits
    assert Sampler(config).sample(logits, previous) in expected


def test_top_p_without_top_k_on_a_large_flat_vocabulary() -> None:
    # Mass spread so thin that the nucleus is larger than the sorted head the sampler tries first.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.1, 50000).astype(np.float32)
    config = SamplerConfig(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0)
    ids, probs = Sampler(config).distribution(logits)
    order = np.argsort(-logits, kind="stable")
    cumulative = np.cumsum(softmax(logits)[order])
    expected = int(np.searchsorted(cumulative, 0.5)) + 1
    assert len(ids) == expected and set(ids.tolist()) == set(order[:expected].tolist())
    assert probs.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------- seeds


def draw_sequence(sampler: Sampler, logits: np.ndarray, n: int = 64) -> list[int]:
    return [sampler.sample(logits, []) for _ in range(n)]


def test_same_seed_same_sequence_and_reset() -> None:
    logits = np.random.default_rng(1).normal(0, 1, 5000).astype(np.float32)
    config = SamplerConfig(temperature=1.0, top_k=100, top_p=0.99, min_p=0.0, seed=1234)
    a, b = Sampler(config), Sampler(config)
    first = draw_sequence(a, logits)
    assert first == draw_sequence(b, logits)
    assert len(set(first)) > 10  # it is really random, not stuck
    a.reset()
    assert draw_sequence(a, logits) == first
    a.reset(seed=99)
    other = draw_sequence(a, logits)
    assert other != first
    a.reset(seed=99)
    assert draw_sequence(a, logits) == other


def test_different_seeds_differ() -> None:
    logits = np.random.default_rng(2).normal(0, 1, 5000).astype(np.float32)
    base = dict(temperature=1.0, top_k=100, top_p=1.0, min_p=0.0)
    sequences = {tuple(draw_sequence(Sampler(SamplerConfig(**base, seed=seed)), logits)) for seed in range(5)}
    assert len(sequences) == 5


def test_reset_rejects_bad_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        Sampler().reset(seed=-3)


# ------------------------------------------------------------------- speed


@pytest.mark.parametrize(
    "config",
    [SamplerConfig(), SamplerConfig(top_k=0), SamplerConfig.greedy(repeat_penalty=1.1), SamplerConfig(**OFF)],
    ids=["defaults", "no-top-k", "greedy-penalized", "all-off"],
)
def test_fast_on_a_150k_vocabulary(config: SamplerConfig) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(152064) * 2).astype(np.float32)
    logits[rng.integers(0, logits.size, 20)] += 12  # a peaked head, as real models have
    previous = rng.integers(0, logits.size, 256).tolist()
    sampler = Sampler(config)
    sampler.sample(logits, previous)
    start = time.perf_counter()
    for _ in range(20):
        sampler.sample(logits, previous)
    per_call = (time.perf_counter() - start) / 20
    assert per_call < 0.02, f"{per_call * 1e3:.1f} ms per sample"


# ------------------------------------------------------------------- stops


def test_stop_checker_basic() -> None:
    checker = StopChecker(["</s>", "\nUser:"])
    assert checker.check("Hello") == StopCheck(False, 5)
    assert checker.check("Hello</") == StopCheck(False, 5)  # "</" could start "</s>"
    assert checker.check("Hello\nUs") == StopCheck(False, 5)
    assert checker.check("Hello\nUser: hi") == StopCheck(True, 5, "\nUser:")
    assert checker.check("a</s>b\nUser:") == StopCheck(True, 1, "</s>")  # the earliest wins


def test_stop_checker_single_string_and_none() -> None:
    assert StopChecker("###").stops == ("###",)
    assert StopChecker(None).check("anything") == StopCheck(False, 8)
    assert StopChecker([]).check("") == StopCheck(False, 0)


@pytest.mark.parametrize("bad", [[""], ["ok", 3]])
def test_stop_checker_rejects_bad_stops(bad: list) -> None:
    with pytest.raises(ValueError, match=r"stop\[\d\]"):
        StopChecker(bad)


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
    pieces=st.lists(st.text(alphabet="ab\nc", max_size=3), max_size=12),
)
def test_streaming_never_emits_part_of_a_stop(stops: list[str], pieces: list[str]) -> None:
    checker = StopChecker(stops)
    text, emitted, result = "", "", StopCheck(False, 0)
    for piece in pieces:
        text += piece
        result = checker.check(text)
        assert result.safe_length >= len(emitted)  # never takes back what it let out
        emitted = text[: result.safe_length]
        if result.stopped:
            break
    assert not any(stop in emitted for stop in stops)
    first = min((text.find(s) for s in stops if s in text), default=-1)
    if first >= 0:
        assert result.stopped and emitted == text[:first]
    else:
        # Whatever was held back could still become a stop string.
        held = text[len(emitted):]
        assert held == "" or any(s.startswith(held) and s != held for s in stops)
        assert emitted + held == text
