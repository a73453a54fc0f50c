"""Decode and prefill speed with everything in RAM (NoOffload), beside llama.cpp on the same files.

Usage: python benchmarks/decode.py [--dir /tmp/pagellm-models] [--types Q8_0,Q4_K,F16] [--threads 2]
       [--prompt-tokens 128] [--tokens 32]
Makes TinyLlama-shaped GGUFs (22 layers, embedding 2048, ff 5632, 32 heads, 4 KV heads, vocab 32000,
random valid weights) where missing. llama.cpp's figures come from llama-cpp-python when it is
installed (same thread count, same prompt, greedy).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import make_one, model_path  # noqa: E402

from pagellm.engine import EngineConfig, InferenceEngine  # noqa: E402
from pagellm.sampling import SamplerConfig  # noqa: E402


def prompt_ids(n: int) -> list[int]:
    """A fixed prompt: BOS and n-1 ordinary tokens."""
    rng = np.random.default_rng(0)
    return [1] + rng.integers(300, 30000, n - 1).tolist()


def bench_pagellm(path: Path, threads: int, n_prompt: int, n_decode: int) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) for pagellm; one warm-up run first (numba compiles/loads)."""
    eng = InferenceEngine(EngineConfig(path, context_size=512, n_threads=threads, sampler=SamplerConfig.greedy())).load_model()
    ids = prompt_ids(n_prompt)
    eng.generate(ids[:8], 2)
    gen = eng.generate(ids, n_decode)
    eng.close()
    return gen.stats.prompt_tokens_per_s, gen.stats.decode_tokens_per_s


def bench_llama_cpp(path: Path, threads: int, n_prompt: int, n_decode: int) -> tuple[float, float] | None:
    """(prompt tok/s, decode tok/s) for llama.cpp through llama-cpp-python, or None if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = prompt_ids(n_prompt)
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prompt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_decode):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    t_decode = time.perf_counter() - t0
    return n_prompt / t_prompt, n_decode / t_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/pagellm-models"))
    ap.add_argument("--types", default="Q8_0,Q4_K,F16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"TinyLlama-shaped models, {args.threads} threads, prompt {args.prompt_tokens} tokens, decode {args.tokens} tokens")
    print(f"{'file':34s} {'MB':>6s} | {'pagellm pp t/s':>14s} {'tg t/s':>7s} | {'llama.cpp pp t/s':>16s} {'tg t/s':>7s} | tg ratio")
    for ggml_type in args.types.split(","):
        make_one(args.dir, "tinyllama-1b", ggml_type, seed=0)
        path = model_path(args.dir, "tinyllama-1b", ggml_type)
        ours = bench_pagellm(path, args.threads, args.prompt_tokens, args.tokens)
        ref = bench_llama_cpp(path, args.threads, args.prompt_tokens, args.tokens)
        ref_s = f"{ref[0]:16.1f} {ref[1]:7.2f}" if ref else f"{'(not installed)':>16s} {'':>7s}"
        ratio = f"{ours[1] / ref[1]:.2f}" if ref else "-"
        print(f"{path.name:34s} {path.stat().st_size / 1e6:6.0f} | {ours[0]:14.1f} {ours[1]:7.2f} | {ref_s} | {ratio}", flush=True)


if __name__ == "__main__":
    main()
