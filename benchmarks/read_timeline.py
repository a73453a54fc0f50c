"""Where a paged decode's disk stands idle: every read's start and end over a few tokens.

Usage: python benchmarks/read_timeline.py MODEL.gguf [--budget 0.5] [--policy budget|pinned|pinned-noembd]
       [--tokens 5] [--threads 2]

Prints the step times, the share of the decode the disk was reading, the gaps between reads (long
ones: the reader waiting for room in its window; short ones: its bookkeeping between reads), the
per-read rates, and the reads per token. Reads are timed at the system call (os.preadv), so the
script times any version of the pager alike. The page cache is dropped for the file first; the pager
reads with O_DIRECT where the file system allows it.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--budget", type=float, default=0.5, help="budget as a fraction of the weights")
    ap.add_argument("--policy", default="budget", choices=("budget", "pinned", "pinned-noembd"))
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from pagellm.engine import EngineConfig, InferenceEngine
    from pagellm.modelfile import ModelFile
    from pagellm.offload import Budget, PinnedHotSet
    from pagellm.offload import source
    from pagellm.sampling import SamplerConfig

    reads: list[tuple[float, float, int]] = []  # (start, end, bytes) of every read
    preadv = os.preadv

    def timed_preadv(fd, buffers, offset):
        # the system call itself: what runs between two of them (the pager's Python) is disk idle
        t0 = time.perf_counter()
        got = preadv(fd, buffers, offset)
        reads.append((t0, time.perf_counter(), got))
        return got

    os.preadv = timed_preadv
    mf = ModelFile.open(args.model)
    budget = int(args.budget * mf.weight_bytes)
    policy = {"budget": Budget(budget), "pinned": PinnedHotSet(budget),
              "pinned-noembd": PinnedHotSet(budget, pin_embeddings=False)}[args.policy]
    with source.FileSource(args.model, "buffered") as src:
        src.evict_page_cache()
    engine = InferenceEngine(EngineConfig(args.model, context_size=256, n_threads=args.threads, offload_policy=policy,
                                          sampler=SamplerConfig.greedy())).load_model()
    try:
        placement = engine.weights.placement
        print(f"{mf.path}: {args.policy} {args.budget:.0%}, window {placement.window_units} units, "
              f"compute threads {engine.model.compute_threads or args.threads}, io {engine.weights.io_mode}")
        seq = engine.start([1, 450, 4996, 17354], max_tokens=args.tokens + 3)
        for _ in range(2):  # the first steps load the resident set
            engine.step([seq])
        stall0 = engine.weights.stats.stall_seconds
        reads.clear()
        steps = []
        t_start = time.perf_counter()
        for _ in range(args.tokens):
            t0 = time.perf_counter()
            engine.step([seq])
            steps.append(time.perf_counter() - t0)
        t_end = time.perf_counter()
        stall = engine.weights.stats.stall_seconds - stall0
    finally:
        engine.close()

    wall = t_end - t_start
    spans = sorted(r for r in reads if r[1] > t_start)
    busy = sum(min(b, t_end) - max(a, t_start) for a, b, _ in spans)
    nbytes = sum(n for _, _, n in spans)
    gaps = np.array([b[0] - a[1] for a, b in zip(spans, spans[1:])])
    long = gaps > 1e-3
    sizes = np.array([n for _, _, n in spans], dtype=np.float64)
    rates = sizes / np.array([b - a for a, b, _ in spans])
    big = sizes > 1e6
    print("step ms: " + ", ".join(f"{s * 1e3:.0f}" for s in steps))
    print(f"disk reading {busy / wall:.1%} of {wall:.2f} s; {nbytes / args.tokens / 1e6:.0f} MB and "
          f"{len(spans) / args.tokens:.0f} reads per token at {nbytes / max(busy, 1e-9) / 1e9:.2f} GB/s; "
          f"compute stalled {stall / wall:.1%}")
    print(f"gaps between reads: {long.sum()} over 1 ms ({gaps[long].sum() * 1e3:.0f} ms), "
          f"{(~long).sum()} under ({gaps[(gaps > 0) & ~long].sum() * 1e3:.0f} ms, "
          f"{np.median(gaps[(gaps > 0) & ~long]) * 1e3 if ((gaps > 0) & ~long).any() else 0:.2f} ms median)")
    if big.any():
        print(f"per-read GB/s (reads over 1 MB): median {np.median(rates[big]) / 1e9:.2f}, "
              f"10th percentile {np.percentile(rates[big], 10) / 1e9:.2f}, 90th {np.percentile(rates[big], 90) / 1e9:.2f}")


if __name__ == "__main__":
    main()
