"""Generation against llama.cpp's own numbers (../shared/fixtures), under every policy."""
import numpy as np
import pytest
from shared_paths import fixture_logits, fixture_meta, fixture_names, fixture_path, models_dir

from pagellm.engine import EngineConfig, InferenceEngine
from pagellm.modelfile import ModelFile
from pagellm.offload import Budget, NoOffload, PinnedHotSet
from pagellm.offload.pager import PagerError
from pagellm.sampling import SamplerConfig

FIXTURES = fixture_names()
QUANTIZED = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# fixtures/README.md, "Tolerances a correct implementation meets": (max |d|/std, mean |d|/std)
TOLERANCE = {"F32": (0.01, 0.001), "F16": (0.03, 0.002), "BF16": (0.12, 0.008), "quantized": (0.4, 0.03)}
GREEDY = SamplerConfig.greedy()


def type_class(meta: dict) -> str:
    types = set(meta["tensor_type_counts"])
    if types & QUANTIZED:
        return "quantized"
    return "BF16" if "BF16" in types else "F16" if "F16" in types else "F32"


def margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


_engines: dict = {}


def engine_for(name: str, policy=None) -> InferenceEngine:
    key = (name, str(policy))
    if key not in _engines:
        cfg = EngineConfig(fixture_path(name), context_size=64, offload_policy=policy or NoOffload())
        _engines[key] = InferenceEngine(cfg).load_model()
    return _engines[key]


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_llama_cpp(name):
    meta, ref = fixture_meta(name), fixture_logits(name)
    got = engine_for(name).eval_logits(meta["sequence_tokens"])
    assert got.shape == ref.shape and got.dtype == np.float32
    kind = type_class(meta)
    max_tol, mean_tol = TOLERANCE[kind]
    diff = np.abs(got - ref) / ref.std()
    assert diff.max() <= max_tol, f"{name}: max |d|/std {diff.max():.4f} > {max_tol}"
    assert diff.mean() <= mean_tol, f"{name}: mean |d|/std {diff.mean():.5f} > {mean_tol}"
    agree = got.argmax(1) == ref.argmax(1)
    if kind == "quantized":
        assert agree.mean() >= 0.9
        assert agree[margins(ref) >= 1.0].all()
    else:
        assert agree.all()


def expected_greedy_prefix(name: str) -> int:
    """How many continuation tokens a correct implementation reproduces (fixtures/README.md)."""
    meta = fixture_meta(name)
    if type_class(meta) != "quantized":
        return 32
    m = margins(fixture_logits(name))
    rows = len(meta["prompt_tokens"]) - 1 + np.arange(32)
    low = np.nonzero(m[rows] < 1.0)[0]
    return int(low[0]) if len(low) else 32


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_continuation_matches_llama_cpp(name):
    meta = fixture_meta(name)
    gen = engine_for(name).generate(meta["prompt_tokens"], 32, sampler=GREEDY)
    n = expected_greedy_prefix(name)
    assert gen.token_ids[:n] == meta["continuation_tokens"][:n]
    if n == 32:
        assert len(gen.token_ids) == 32 or gen.finish_reason == "stop"


def test_tinystories_tells_its_story():
    eng = InferenceEngine(EngineConfig(models_dir() / "stories260K.gguf")).load_model()
    gen = eng.generate([eng.tokenizer.bos_id], 40, sampler=GREEDY)
    assert gen.token_ids[:15] == [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    assert gen.text.startswith(" Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")
    assert eng.tokenize("Once upon a time") == [1, 403, 407, 261, 378]


def policies_for(name: str):
    """Budget(40%) and PinnedHotSet(40%, last 1, prefetch 2) for this fixture.

    Where the default pins (embeddings and head) cannot fit 40%, building must fail with the
    budget error, and the pinned run uses only the last layer pinned, in 50% (a 365 KB model:
    its last block, the pinned vectors and one streamed unit, each in whole pages, need 45%).
    """
    mf = ModelFile.open(fixture_path(name))
    budget = int(0.4 * mf.weight_bytes)
    pinned = PinnedHotSet(budget, pin_last_n_layers=1, prefetch_n_ahead=2)
    try:
        InferenceEngine(EngineConfig(fixture_path(name), offload_policy=pinned)).load_model().close()
    except PagerError as e:
        assert "too small" in str(e)
        pinned = PinnedHotSet(int(0.5 * mf.weight_bytes), pin_embeddings=False, pin_output_head=False,
                              pin_last_n_layers=1, prefetch_n_ahead=2)
    return [Budget(budget), pinned]


@pytest.mark.parametrize("name", FIXTURES)
def test_every_policy_generates_the_same_tokens_and_really_pages(name):
    meta = fixture_meta(name)
    reference = engine_for(name).generate(meta["prompt_tokens"], 32, sampler=GREEDY)
    assert reference.stats.bytes_read == 0  # NoOffload: everything was read once at load
    for policy in policies_for(name):
        eng = engine_for(name, policy)
        gen = eng.generate(meta["prompt_tokens"], 32, sampler=GREEDY)
        assert gen.token_ids == reference.token_ids, f"{policy} changed the tokens"
        pager = eng.layer_pager
        assert pager is not None and pager.stats.peak_resident_bytes <= policy.ram_bytes
        assert gen.stats.bytes_read > 0 and gen.stats.hit_rate < 1.0  # reads really happened per token
        assert pager.stats.misses + pager.stats.prefetches_completed > 0
        if isinstance(policy, PinnedHotSet):
            assert pager.stats.prefetches_issued > 0
            last = pager.units_of(f"blk.{eng.args.n_layer - 1}")
            assert all(pager.is_pinned(u) and pager.stats.reads_by_unit[u] == 1 for u in last)


def test_prompt_longer_than_context_is_a_clear_error():
    eng = engine_for("stories260K-real-F32")
    with pytest.raises(ValueError, match="does not fit the context of 64"):
        eng.generate(list(range(1, 80)), 4)


def test_seeded_sampling_is_reproducible():
    eng = engine_for("stories260K-real-F32")
    cfg = SamplerConfig(temperature=1.0, top_k=40, top_p=0.95, seed=7)
    a = eng.generate("Once upon a time", 16, sampler=cfg)
    b = eng.generate("Once upon a time", 16, sampler=cfg)
    c = eng.generate("Once upon a time", 16, sampler=SamplerConfig(temperature=1.0, top_k=40, top_p=0.95, seed=8))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_string_ends_generation_without_emitting_it():
    eng = engine_for("stories260K-real-F32")
    pieces = []
    gen = eng.generate([1], 40, sampler=GREEDY, stop=["Lily"], on_token=lambda t, s: pieces.append(s))
    assert gen.finish_reason == "stop" and "Lily" not in gen.text
    assert gen.text.endswith("named ") and "".join(pieces) == gen.text


def test_leaving_a_core_to_reads_keeps_the_tokens():
    from pagellm import kernels
    from pagellm.offload.cpus import available_cpus
    from pagellm.offload.planner import MachineProfile

    name = "synth-llama-Q8_0"
    meta = fixture_meta(name)
    reference = engine_for(name).generate(meta["prompt_tokens"], 16, sampler=GREEDY)
    mf = ModelFile.open(fixture_path(name))
    # a machine where reads beside compute on every thread run at a third of their rate
    coupled = MachineProfile(disk_bytes_per_s=1e9, disk_bytes_per_s_beside_compute=3e8, threads=2,
                             compute_bytes_per_s={"Q8_0": 8e9, "F32": 8e9},
                             compute_bytes_per_s_one_fewer={"Q8_0": 4.5e9, "F32": 4.5e9})
    cfg = EngineConfig(fixture_path(name), context_size=64, n_threads=2, offload_policy=Budget(int(0.4 * mf.weight_bytes)),
                       machine_profile=coupled)
    eng = InferenceEngine(cfg).load_model()
    try:
        assert eng.plan.compute_threads == 1 and eng.model.compute_threads == 1
        cpus = available_cpus()
        if len(cpus) >= 2:  # the reader gets a CPU of its own and the forward pass keeps off it
            assert eng.weights.reader_cpus and eng.model.compute_cpus
            assert not eng.weights.reader_cpus & eng.model.compute_cpus
            assert eng.weights.reader_cpus | eng.model.compute_cpus == cpus
        gen = eng.generate(meta["prompt_tokens"], 16, sampler=GREEDY)
        assert gen.token_ids == reference.token_ids
        assert gen.stats.bytes_read > 0 and kernels.get_num_threads() == 2  # restored after each pass
        assert available_cpus() == cpus  # and the calling thread may run anywhere again
    finally:
        eng.close()
