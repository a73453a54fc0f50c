"""Loopback load on `pagellm serve`: a bounded number of valid requests from concurrent clients.

Usage: python benchmarks/load.py [--model PATH] [--requests 200] [--clients 16] [--seconds 60]
       [--max-tokens 24] [--offload SPEC] [--parallel 8]

Starts `pagellm serve MODEL` on a free loopback port and sends ``--requests`` valid requests from
``--clients`` threads (each with its own keep-alive connection): completions and chat completions,
a quarter of them streamed, sampled with a per-request seed. Stops at the count or after
``--seconds``, whichever comes first. Prints requests/s, tokens/s, p50/p90/p99 latency (and time
to first token for the streamed ones), errors by kind (valid requests: 0 expected) and the
server's RSS at start and end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_requests import free_port  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a bird", "Tom and his mom went"]


@dataclass
class Outcome:
    """One request: when it ended, how long it took, what came back."""

    seconds: float
    first_token_s: float | None
    status: int | str
    tokens: int


def rss_bytes(pid: int) -> int:
    """VmRSS of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start(model: Path, ctx: int, parallel: int, offload: str | None) -> tuple[subprocess.Popen, str]:
    """`pagellm serve` on a free loopback port, once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagellm.cli", "serve", str(model), "--port", str(port), "--ctx", str(ctx),
           "-np", str(parallel), "--max-queue", "64", "--log-level", "warning"]
    if offload:
        cmd += ["--offload", offload]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def request_body(i: int, max_tokens: int) -> tuple[str, dict]:
    """The i-th request: alternating completion / chat, every fourth streamed."""
    prompt = PROMPTS[i % len(PROMPTS)]
    common = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, "stream": i % 4 == 3}
    if i % 2:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**common, "prompt": prompt}


def send(client: httpx.Client, base: str, i: int, max_tokens: int) -> Outcome:
    """Send request i and wait for the whole answer."""
    path, body = request_body(i, max_tokens)
    t0 = time.perf_counter()
    try:
        if not body["stream"]:
            r = client.post(base + path, json=body)
            tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            return Outcome(time.perf_counter() - t0, None, r.status_code, tokens)
        first, tokens = None, 0
        with client.stream("POST", base + path, json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return Outcome(time.perf_counter() - t0, first, "stream error", tokens)
                piece = chunk["choices"][0].get("text") or chunk["choices"][0].get("delta", {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - t0
                    tokens += 1  # chunks, about one per token
            return Outcome(time.perf_counter() - t0, first, r.status_code, tokens)
    except httpx.HTTPError as error:
        return Outcome(time.perf_counter() - t0, None, type(error).__name__, 0)


def run_load(base: str, n_requests: int, n_clients: int, seconds: float, max_tokens: int) -> tuple[list[Outcome], float]:
    """Run the clients until ``n_requests`` are answered or ``seconds`` pass; returns outcomes and wall time."""
    next_index = iter(range(n_requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds

    def client_loop() -> None:
        with httpx.Client(timeout=httpx.Timeout(60.0)) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                out = send(client, base, i, max_tokens)
                with lock:
                    outcomes.append(out)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 65))
    return outcomes, time.monotonic() - t0


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("PAGELLM_SHARED", REPO_ROOT.parent / "shared"))
    parser.add_argument("--model", type=Path, default=shared / "models" / "stories260K.gguf")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="time cap for the whole run")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=8, help="the server's batch (-np)")
    parser.add_argument("--offload", default=None, help="the server's --offload, e.g. budget:600KiB")
    args = parser.parse_args(argv)

    proc, base = start(args.model, args.ctx, args.parallel, args.offload)
    try:
        rss_start = rss_bytes(proc.pid)
        send(httpx.Client(timeout=60), base, 0, 2)  # compile the kernels before the clock starts
        rss_warm = rss_bytes(proc.pid)
        outcomes, wall = run_load(base, args.requests, args.clients, args.seconds, args.max_tokens)
        rss_end = rss_bytes(proc.pid)
        metrics = httpx.get(base + "/metrics", timeout=10).text
        alive = httpx.get(base + "/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    ok = [o for o in outcomes if o.status == 200]
    errors = Counter(o.status for o in outcomes if o.status != 200)
    latencies = [o.seconds for o in ok]
    first = [o.first_token_s for o in ok if o.first_token_s is not None]
    tokens = sum(o.tokens for o in ok)
    batch_max = next((line.split()[-1] for line in metrics.splitlines() if line.startswith("pagellm_decode_batch_max")), "?")
    print(f"model {args.model.name}, ctx {args.ctx}, server batch {args.parallel}, offload {args.offload or 'none'}; "
          f"{args.clients} clients, {args.requests} requests (cap {args.seconds:g} s), max_tokens {args.max_tokens}")
    print(f"answered {len(outcomes)} in {wall:.1f} s: {len(outcomes) / wall:.1f} requests/s, {tokens / wall:.0f} "
          f"generated tokens/s (largest decode batch {batch_max})")
    print(f"latency p50 {percentile(latencies, 50) * 1e3:.0f} ms, p90 {percentile(latencies, 90) * 1e3:.0f} ms, "
          f"p99 {percentile(latencies, 99) * 1e3:.0f} ms, max {max(latencies, default=0) * 1e3:.0f} ms; "
          f"mean {statistics.fmean(latencies) * 1e3 if latencies else 0:.0f} ms")
    print(f"time to first token (streamed, {len(first)}): p50 {percentile(first, 50) * 1e3:.0f} ms, "
          f"p99 {percentile(first, 99) * 1e3:.0f} ms")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"server RSS: {rss_start / 2**20:.0f} MiB at start, {rss_warm / 2**20:.0f} MiB after warm-up, "
          f"{rss_end / 2**20:.0f} MiB at end; healthy at end: {alive}")
    return 0 if not errors and alive and len(outcomes) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
