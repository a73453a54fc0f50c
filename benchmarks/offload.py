"""Decode under a RAM budget, against the floor max(compute, (M - B) / disk bandwidth).

Usage: python benchmarks/offload.py [--dir /tmp/pagellm-models] [--models tinyllama-1b:Q8_0,llama-7b:Q4_0]
       [--budgets 25,50,75] [--policies budget,pinned,pinned-noembd,lru] [--tokens 6] [--threads 2]

Each row runs in a fresh process, so its peak RSS is its own. Reads use O_DIRECT (the page cache
never serves them; the file's cached pages are also dropped with POSIX_FADV_DONTNEED before each
row). Compute rate per GGML type and per-layer overhead are measured first
(pagellm.offload.planner.calibrate); the disk's rates and the main type's compute rate again before
each run of a row and after the last (both drift here): each run plans with the figures before it,
and the table's prediction uses the mean of those before and after. The planner's prediction is
printed beside each measurement, and beside it the same plan at the rate the row's own reads
achieved, which separates the planner's error from the disk's drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import make_one, model_path  # noqa: E402

MiB = 2**20
POLICY_KINDS = ("budget", "pinned", "pinned-noembd", "lru")
SETTLE_S = 10.0  # pause before measuring the disk after a run's process exits (see measure_machine)


def policy_for(kind: str, budget: int):
    """The policy and replacement a row runs with."""
    from pagellm.offload import Budget, PinnedHotSet

    if kind == "budget":
        return Budget(budget), "auto"
    if kind == "pinned":
        return PinnedHotSet(budget), "auto"
    if kind == "pinned-noembd":
        return PinnedHotSet(budget, pin_embeddings=False), "auto"
    if kind == "lru":
        return Budget(budget), "lru"
    raise ValueError(kind)


def set_machine(profile, shared, threads: int, calibrated, main_type: str) -> None:
    """Give ``profile`` the figures ``shared`` measured: read rates alone (0) and beside compute on
    threads - 1 and threads, compute's kept share beside reads on every thread, and the
    ``calibrated`` compute rates scaled to the speed ``main_type``'s mat-vecs had (a virtual
    machine's cores drift too: one thread ran 7B Q4_0 at 6.6 GB/s in one calibration and 7.8 in
    another)."""
    profile.use_shared_rates(shared, threads)
    for scaled, measured, k in ((profile.compute_bytes_per_s, calibrated.compute_bytes_per_s, threads),
                                (profile.compute_bytes_per_s_one_fewer, calibrated.compute_bytes_per_s_one_fewer,
                                 threads - 1)):
        if k in shared.compute and main_type in measured:
            scaled.update({t: r * shared.compute[k] / measured[main_type] for t, r in measured.items()})


def combine(measures: list, how: Callable[[list[float]], float]):
    """One set of machine figures from several, each figure combined by ``how`` (mean, median)."""
    from pagellm.offload.planner import SharedRates

    def each(field: str) -> dict[int, float]:
        return {k: how([getattr(m, field)[k] for m in measures]) for k in getattr(measures[0], field)}

    return SharedRates(read=each("read"), compute=each("compute"), compute_kept=each("compute_kept"))


def streamed_reads(mf, policy, replacement: str, profile) -> list[tuple[int, int]]:
    """The file ranges (offset, bytes) a policy streams each token, in sweep order (what the pager reads)."""
    from pagellm.offload.planner import plan_offload, sweep_reads

    plan = plan_offload(mf, policy, profile, replacement=replacement)
    return sweep_reads(mf, plan.placement.streamed) if plan.placement.streamed else sweep_reads(mf, most=64 * MiB)


def run_row(path: str, kind: str, fraction: float, tokens: int, threads: int, warmup: int,
            profile_path: str | None = None) -> dict:
    """One measurement, in this (fresh) process, planned with the parent's calibration."""
    from pagellm.engine import EngineConfig, InferenceEngine
    from pagellm.modelfile import ModelFile
    from pagellm.offload.pressure import peak_rss_bytes, reset_peak_rss
    from pagellm.offload.source import FileSource
    from pagellm.sampling import SamplerConfig

    mf = ModelFile.open(path)
    budget = int(fraction * mf.weight_bytes)
    policy, replacement = policy_for(kind, budget)
    with FileSource(path, "buffered") as src:
        src.evict_page_cache()
    from pagellm.offload.planner import MachineProfile

    profile = MachineProfile.load_or_default(Path(profile_path)) if profile_path else None
    reset_peak_rss()
    eng = InferenceEngine(EngineConfig(path, context_size=256, n_threads=threads, offload_policy=policy,
                                       replacement=replacement, sampler=SamplerConfig.greedy(),
                                       machine_profile=profile)).load_model()
    seq = eng.start([1, 450, 4996, 17354], max_tokens=warmup + tokens + 1)
    for _ in range(warmup):
        eng.step([seq])
    before = eng.weights.stats.snapshot()
    source = eng.weights.source.stats
    disk_bytes0, disk_seconds0 = source.bytes_read, source.read_seconds
    t0 = time.perf_counter()
    for _ in range(tokens):
        eng.step([seq])
    seconds = time.perf_counter() - t0
    now = eng.weights.stats
    read = (now.bytes_read - before.bytes_read) + (now.row_bytes_read - before.row_bytes_read)
    return {
        "weight_bytes": mf.weight_bytes,
        "budget": budget,
        "tok_s": tokens / seconds,
        "bytes_per_token": read / tokens,
        "stall_share": (now.stall_seconds - before.stall_seconds) / seconds,
        "hit_rate": (now.hits - before.hits) / max(1, now.acquires - before.acquires),
        "peak_rss": peak_rss_bytes(),
        "kv_bytes": seq.cache.nbytes,
        "pager_peak": now.peak_resident_bytes,
        # one group: a layer's tensors (the bound on reads is (M - B) and one group's worth more)
        "largest_group": max(mf.group_bytes(g) for g in mf.block_groups),
        "io_mode": eng.weights.io_mode,
        "fresh_bytes_per_token": (now.fresh_buffer_bytes - before.fresh_buffer_bytes) / tokens,
        "compute_threads": eng.model.compute_threads or threads,
        "window_units": eng.weights.placement.window_units,
        # the bandwidth the row's own reads achieved (bytes from the file / seconds inside reads)
        "disk_bytes_per_s": (source.bytes_read - disk_bytes0) / max(source.read_seconds - disk_seconds0, 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/pagellm-models"))
    ap.add_argument("--models", default="tinyllama-1b:Q8_0,llama-7b:Q4_0")
    ap.add_argument("--budgets", default="25,50,75")
    ap.add_argument("--policies", default=",".join(POLICY_KINDS))
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibrate-seconds", type=float, default=4.0)
    ap.add_argument("--disk-seconds", type=float, default=5.0, help="disk measurement before each run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row; the row shows medians (peak RSS: the worst)")
    ap.add_argument("--row", nargs=2, metavar=("MODEL", "KIND:FRACTION"), help=argparse.SUPPRESS)
    ap.add_argument("--profile", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        kind, fraction = args.row[1].split(":")
        print(json.dumps(run_row(args.row[0], kind, float(fraction), args.tokens, args.threads, args.warmup,
                                 args.profile)))
        return

    from pagellm.modelfile import ModelFile
    from pagellm.offload.planner import (MachineProfile, calibrate, main_weight_type, measure_disk, model_shape,
                                         plan_offload)
    from pagellm.offload.pressure import release_compiler_pages

    args.dir.mkdir(parents=True, exist_ok=True)
    models = [tuple(m.split(":")) for m in args.models.split(",")]
    profile = MachineProfile()
    for shape, ggml_type in models:
        make_one(args.dir, shape, ggml_type, seed=0)
        mf = ModelFile.open(model_path(args.dir, shape, ggml_type))
        measured = calibrate(mf, seconds=args.calibrate_seconds, threads=args.threads, save=False)
        model_types = {t.ggml_type.name for t in mf.tensors.values() if len(t.shape) > 1}
        # only what was measured just now (the returned profile also carries cached figures)
        profile.compute_bytes_per_s.update({t: r for t, r in measured.compute_bytes_per_s.items() if t in model_types})
        profile.compute_bytes_per_s_one_fewer.update(
            {t: r for t, r in measured.compute_bytes_per_s_one_fewer.items() if t in model_types})
        profile.disk_bytes_per_s = measured.disk_bytes_per_s  # same disk for every file
        profile.disk_bytes_per_s_beside_compute = measured.disk_bytes_per_s_beside_compute
        profile.disk_bytes_per_s_beside_one_fewer = measured.disk_bytes_per_s_beside_one_fewer
        profile.compute_kept_beside_reads = measured.compute_kept_beside_reads
        profile.fresh_page_bytes_per_s = measured.fresh_page_bytes_per_s
        profile.unit_overhead_s = measured.unit_overhead_s
        profile.layer_overhead_s_by_shape[model_shape(mf)] = measured.layer_overhead(model_shape(mf))
        profile.threads = measured.threads
    # The rows run in child processes; LLVM pages this process still maps would count as shared in
    # theirs and stay resident there (MADV_PAGEOUT skips pages other processes map), so let them go.
    release_compiler_pages()
    # the calibration's compute rates, which each row scales to the speed measured around it
    calibrated = dataclasses.replace(profile, compute_bytes_per_s=dict(profile.compute_bytes_per_s),
                                     compute_bytes_per_s_one_fewer=dict(profile.compute_bytes_per_s_one_fewer))
    rates = ", ".join(f"{t} {r / 1e9:.2f} GB/s" for t, r in sorted(profile.compute_bytes_per_s.items()))
    fewer = ", ".join(f"{t} {r / 1e9:.2f} GB/s" for t, r in sorted(profile.compute_bytes_per_s_one_fewer.items()))
    print(f"calibration: disk {profile.disk_bytes_per_s / 1e9:.2f} GB/s (O_DIRECT), "
          f"{profile.read_rate_beside_compute() / 1e9:.2f} GB/s beside compute on {args.threads} threads, "
          f"{profile.read_rate_beside_compute(True) / 1e9:.2f} beside one thread fewer; compute on {args.threads} "
          f"threads kept {profile.compute_kept():.0%} of its speed beside reads; "
          f"compute {rates}; on one thread fewer {fewer or '-'}; "
          "per layer besides mat-vecs "
          + ", ".join(f"{ms * 1e3:.2f} ms ({shape})" for shape, ms in profile.layer_overhead_s_by_shape.items())
          + f"; {profile.unit_overhead_s * 1e6:.0f} us per unit; new pages at "
          f"{profile.fresh_page_bytes_per_s / 1e9:.2f} GB/s; {args.threads} threads")
    profile_file = Path(tempfile.mkdtemp(prefix="pagellm-bench-")) / "profile.json"
    print("disk: GB/s of the disk measured alone around the row (O_DIRECT reads, warm, of the very ranges the row streams, in "
          "sweep order, in turns with the same reads beside compute on one thread fewer "
          "and on every thread, which the plan uses); reads: GB/s the row's own reads achieved")
    print("d|n-1: GB/s of reads beside compute on one thread fewer, measured in turns with disk; kept: the share of "
          "its speed compute on every thread kept beside those reads; c|n-1: GB/s of the main type's mat-vecs on one "
          "thread fewer (every figure: the mean of those measured just before and just after each run, the median "
          "over runs)")
    print("thr: compute threads (the plan's choice: all, or one fewer to leave the reader a core); fresh MB: buffer bytes per token "
          "the pager had to map anew (the kernel zeroes them) rather than reuse")
    print("ok: MB read/tok <= 1.05 (M - B) + one group (a layer's tensors); peak RSS <= B + KV cache + 200 MiB")
    print("floor = max(compute, (M - B) / the disk's bandwidth), the bandwidth being the fastest of disk and d|n-1 "
          "(reads alone sometimes measure slower here than beside compute); ratio = floor time / measured time; "
          "planned: the planner's tok/s from the calibration and that disk figure; "
          "after reads: the ratio and the plan again with the rate the row's own reads achieved as the disk's")
    header = (f"{'model':28s} {'policy':14s} {'budget':>6s} | {'tok/s':>6s} {'disk':>5s} {'d|n-1':>5s} {'kept':>4s} "
              f"{'c|n-1':>5s} {'floor':>6s} {'ratio':>5s} | "
              f"{'MB read/tok':>11s} {'(M-B) MB':>8s} {'ok':>3s} | {'stall':>5s} | {'peak RSS':>8s} {'B+KV+200':>8s} {'ok':>3s} | "
              f"{'planned':>7s} {'err':>5s} | {'reads':>5s} {'ratio':>5s} {'planned':>7s} {'err':>5s} | "
              f"{'thr':>3s} {'fresh MB':>8s}")
    print(header)
    print("-" * len(header))
    for shape, ggml_type in models:
        path = model_path(args.dir, shape, ggml_type)
        mf = ModelFile.open(path)
        main_type = main_weight_type(mf)
        for pct in (int(b) for b in args.budgets.split(",")):
            for kind in args.policies.split(","):
                runs = []
                policy, replacement = policy_for(kind, int(pct / 100 * mf.weight_bytes))
                reads = streamed_reads(mf, policy, replacement, profile)

                def measure_machine():
                    """Disk and compute, measured again: both drift here over minutes."""
                    # after a pause for the previous run's exit to settle (here, measured at once
                    # after the 7B's LRU row at 50% the disk read 1.28 GB/s alone, 5 s later 2.21-2.30;
                    # after its 75% row, 1.41 and 1.76 beside compute at once and 3.6 s later, 2.16-2.37
                    # from 7 s on; after a 1 s pause the LRU rows measured 0.9-1.9 GB/s around runs
                    # reading at 2.2-2.4);
                    # the very ranges the row streams, in sweep order (a virtual disk's host caches
                    # what the row re-reads each token: other ranges of as many bytes read up to 14%
                    # slower); alone and beside compute, in turns, so the drift moves them all alike
                    time.sleep(SETTLE_S)
                    return measure_disk(path, reads, main_type, sorted({0, max(0, args.threads - 1), args.threads}),
                                        seconds=args.disk_seconds)

                # measured before each run and after the last: the run plans with the figures
                # before it, the table's prediction uses the mean of those before and after it
                measures = [measure_machine()]
                for _ in range(args.repeats):
                    set_machine(profile, measures[-1], args.threads, calibrated, main_type)
                    profile.save(profile_file)
                    out = subprocess.run([sys.executable, __file__, "--row", str(path), f"{kind}:{pct / 100}",
                                          "--tokens", str(args.tokens), "--threads", str(args.threads),
                                          "--warmup", str(args.warmup), "--profile", str(profile_file)],
                                         capture_output=True, text=True)
                    if out.returncode:
                        break
                    runs.append(json.loads(out.stdout))
                    measures.append(measure_machine())
                if out.returncode:
                    print(f"{path.name:28s} {kind:14s} {pct:5d}% | failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
                    continue
                # medians over the repeats, except peak RSS: the worst run
                r = {k: statistics.median(run[k] for run in runs) for k in ("tok_s", "bytes_per_token", "stall_share",
                                                                            "disk_bytes_per_s", "fresh_bytes_per_token")}
                r.update({k: runs[0][k] for k in ("budget", "weight_bytes", "kv_bytes", "largest_group",
                                                  "compute_threads", "window_units")})
                r["peak_rss"] = max(run["peak_rss"] for run in runs)
                around = [combine(measures[i:i + 2], statistics.mean) for i in range(len(runs))]
                set_machine(profile, combine(around, statistics.median), args.threads, calibrated, main_type)
                B, M = r["budget"], r["weight_bytes"]
                policy, replacement = policy_for(kind, B)
                # predicted for the window the row ran with (the planner's choice from the figures before it)
                plan = plan_offload(mf, policy, profile, replacement=replacement, window_units=r["window_units"])
                # the same plan at the rate the row's reads achieved: what is left is the planner's own error
                # (all read rates scaled alike, so the rate the plan reads at becomes the row's)
                scale = r["disk_bytes_per_s"] / (plan.predicted_bytes_per_token / max(plan.read_seconds_per_token, 1e-9))
                at_row_profile = dataclasses.replace(
                    profile, disk_bytes_per_s=profile.disk_bytes_per_s * scale,
                    disk_bytes_per_s_beside_compute=profile.read_rate_beside_compute() * scale,
                    disk_bytes_per_s_beside_one_fewer=profile.read_rate_beside_compute(True) * scale)
                at_row = plan_offload(mf, policy, at_row_profile, replacement=replacement,
                                      window_units=r["window_units"])
                # the disk's bandwidth as the planner takes it: the fastest it was measured at, alone or
                # beside compute on one thread fewer (the slower would flatter the ratio)
                floor_s = max(plan.compute_seconds_per_token, (M - B) / profile.disk_rate())
                ratio = r["tok_s"] * floor_s
                # the same ratio with the rate the row's own reads achieved as the disk's (kinder where
                # the disk drifted down during the row, stricter where it drifted up)
                ratio_at_reads = r["tok_s"] * max(plan.compute_seconds_per_token, (M - B) / r["disk_bytes_per_s"])
                bytes_ok = r["bytes_per_token"] <= 1.05 * (M - B) + r["largest_group"]
                rss_limit = B + r["kv_bytes"] + 200 * MiB
                rss_ok = r["peak_rss"] <= rss_limit
                err = (plan.predicted_tokens_per_s - r["tok_s"]) / r["tok_s"]
                err_at_row = (at_row.predicted_tokens_per_s - r["tok_s"]) / r["tok_s"]
                print(f"{path.name:28s} {kind:14s} {pct:5d}% | {r['tok_s']:6.2f} {profile.disk_bytes_per_s / 1e9:5.2f} "
                      f"{profile.read_rate_beside_compute(True) / 1e9:5.2f} {profile.compute_kept():4.2f} "
                      f"{profile.compute_rate(main_type, True) / 1e9:5.2f} {1 / floor_s:6.2f} {ratio:5.2f} | "
                      f"{r['bytes_per_token'] / 1e6:11.0f} {(M - B) / 1e6:8.0f} {'yes' if bytes_ok else 'NO':>3s} | "
                      f"{r['stall_share']:5.2f} | {r['peak_rss'] / MiB:8.0f} {rss_limit / MiB:8.0f} {'yes' if rss_ok else 'NO':>3s} | "
                      f"{plan.predicted_tokens_per_s:7.2f} {err:+5.0%} | "
                      f"{r['disk_bytes_per_s'] / 1e9:5.2f} {ratio_at_reads:5.2f} {at_row.predicted_tokens_per_s:7.2f} "
                      f"{err_at_row:+5.0%} | {r['compute_threads']:3d} {r['fresh_bytes_per_token'] / 1e6:8.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
