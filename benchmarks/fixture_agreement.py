"""Agreement with llama.cpp on every fixture in ../shared/fixtures: logits (max and mean |d|/std), top-1, greedy tokens.

Usage: python benchmarks/fixture_agreement.py   (the tolerances are in ../shared/fixtures/README.md)
"""
import sys, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
from shared_paths import fixture_names, fixture_path, fixture_meta, fixture_logits
from pagellm.engine import EngineConfig, InferenceEngine
from pagellm.sampling import SamplerConfig
for name in fixture_names():
    meta, ref = fixture_meta(name), fixture_logits(name)
    e = InferenceEngine(EngineConfig(fixture_path(name), context_size=64, n_threads=1)).load_model()
    got = e.eval_logits(meta["sequence_tokens"]); d = np.abs(got - ref) / ref.std()
    g = e.generate(meta["prompt_tokens"], 32, sampler=SamplerConfig.greedy())
    n = next((i for i, (a, b) in enumerate(zip(g.token_ids, meta["continuation_tokens"])) if a != b), 32)
    print(f"{name:24s} max|d|/std {d.max():.4f}  mean|d|/std {d.mean():.5f}  top-1 {np.mean(got.argmax(1)==ref.argmax(1)):.3f}  greedy {n}/32")
