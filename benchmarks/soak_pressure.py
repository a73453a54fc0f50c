"""Soak under memory pressure: generate non-stop under --ram auto while available memory comes and goes.

Usage: python benchmarks/soak_pressure.py [--minutes 1] [--every 5] [--mode fake|hog] [--hog-mib 200]
       [--dir /tmp/pagellm-models] [--threads N]

A synthetic llama model (16 layers x 1024, Q8_0, ~250 MiB; made once under --dir) runs with
``EngineConfig(ram_auto=True)``, so a PressureMonitor watches a memory probe and resizes the pager's
budget. Generation runs the whole time (greedy, the same prompt each time: every generation must give
the first one's tokens, however the budget moved under it).

``--mode fake`` (the default): a simulated machine. The probe reports ``room - hog(t) - RSS``
(this process's real RSS), where ``hog(t)`` takes 0%, 40%, 70% then 0% of the weights in 5-second
steps; the room is sized at start so that the whole model fits the auto budget, then, once the
weights are in, so that the high-water mark is just met: every hog then bites, and evictions give
memory back exactly as they do on a real machine.
``--mode hog``: the real MemoryProbe (MemAvailable, cgroup-aware) and a real hog process that
allocates ``--hog-mib`` MiB, holds it for 5 s, frees it for 5 s; once the weights are in, the marks are
placed around the memory available then (low: half the hog below it, high: a quarter below) so the hog
crosses them; other processes on the machine add their noise.

Every ``--every`` seconds it prints: the budget, resident weights, the process RSS now and its peak
over the interval (VmHWM, reset each line) against the largest budget of the interval, tokens/s and
the monitor's shrinks/grows. The run is bounded: ``--minutes`` at most 30.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
PROMPT = "Once upon a time"
STEP_S = 5.0
HOG_SHARES = (0.0, 0.4, 0.7, 0.0)  # the fake machine's hog, as a share of the weights, one per step


@dataclass
class Line:
    """One interval's figures."""

    t: float
    hog: int
    budget: int
    max_budget: int
    resident: int
    rss: int
    peak_rss: int
    tokens_per_s: float
    shrinks: int
    grows: int


def soak_model(directory: Path) -> Path:
    """The soak's synthetic model, made on first use."""
    from pagellm.synth import ModelShape, make_model

    path = directory / "soak-llama-16x1024-Q8_0.gguf"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        print(f"making {path} (once) ...", flush=True)
        shape = ModelShape(n_layer=16, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000, n_ctx=2048)
        make_model(path, shape, "Q8_0", seed=0)
    return path


class SimulatedMachine:
    """A MemoryProbe for a machine whose free memory a hog takes in steps; this process's RSS counts against it."""

    def __init__(self, room_bytes: int, weight_bytes: int):
        from pagellm.offload.pressure import FakeMemoryProbe, process_rss_bytes

        self._probe = FakeMemoryProbe(room_bytes)
        self._rss = process_rss_bytes
        self.room = room_bytes
        self.weight_bytes = weight_bytes
        self.started = time.monotonic()

    def hog_bytes(self) -> int:
        """What the simulated hog holds now."""
        step = int((time.monotonic() - self.started) // STEP_S) % len(HOG_SHARES)
        return int(HOG_SHARES[step] * self.weight_bytes)

    def available_ram_bytes(self) -> int:
        """The machine's room, less the hog, less this process's RSS."""
        return max(0, self.room - self.hog_bytes() - self._rss())

    def __getattr__(self, name: str):  # rss_bytes, peak_rss_bytes...: those of the fake
        return getattr(self._probe, name)


HOG_SCRIPT = r"""
import sys, time
size, hold, deadline = int(sys.argv[1]), float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    block = bytearray(size)          # zero pages: touch every page so they are really resident
    for i in range(0, size, 4096):
        block[i] = 1
    time.sleep(min(hold, max(0.0, deadline - time.monotonic())))
    del block
    time.sleep(min(hold, max(0.0, deadline - time.monotonic())))
"""


def start_hog(mib: int, seconds: float) -> subprocess.Popen:
    """A process that takes ``mib`` MiB for STEP_S seconds, gives it back for STEP_S, until ``seconds`` pass."""
    return subprocess.Popen([sys.executable, "-c", HOG_SCRIPT, str(mib * MiB), str(STEP_S), str(seconds)])


def make_engine(path: Path, mode: str, hog_mib: int, threads: int | None):
    """The engine under ram_auto, its probe and a label for the marks."""
    from pagellm.engine import EngineConfig, InferenceEngine
    from pagellm.modelfile import ModelFile
    from pagellm.offload.monitor import PressureConfig
    from pagellm.offload.planner import RUNTIME_HEADROOM_BYTES, kv_cache_bytes
    from pagellm.offload.pressure import MemoryProbe, process_rss_bytes
    from pagellm.sampling import SamplerConfig

    mf = ModelFile.open(path)
    n_ctx = 512
    if mode == "fake":
        room = process_rss_bytes() + mf.weight_bytes + kv_cache_bytes(mf, n_ctx) + RUNTIME_HEADROOM_BYTES + 64 * MiB
        probe = SimulatedMachine(room, mf.weight_bytes)
    else:
        probe = MemoryProbe()
    # Marks that cannot fire while the weights load; set for real by place_marks() once they are in.
    quiet = PressureConfig(low_water_bytes=0, high_water_bytes=1, interval_s=0.1)
    config = EngineConfig(path, context_size=n_ctx, n_threads=threads, sampler=SamplerConfig.greedy(),
                          ram_auto=True, pressure_probe=probe, pressure=quiet)
    return InferenceEngine(config).load_model(), probe


def place_marks(engine, probe, hog_mib: int) -> str:
    """Set the monitor's marks (and the fake machine's room) now that every weight is resident."""
    from pagellm.offload.monitor import PressureConfig
    from pagellm.offload.pressure import process_rss_bytes

    if isinstance(probe, SimulatedMachine):
        low, high = 32 * MiB, 96 * MiB
        probe.room = process_rss_bytes() + high  # no hog: available sits at the high mark
    else:
        available = probe.available_ram_bytes()
        low, high = max(0, available - hog_mib * MiB // 2), max(1, available - hog_mib * MiB // 4)
    engine.pressure.config = PressureConfig(low_water_bytes=low, high_water_bytes=high, interval_s=0.1)
    return f"low {low / MiB:.0f} MiB, high {high / MiB:.0f} MiB"


class Generator(threading.Thread):
    """Generates the same greedy completion over and over, counting tokens and mismatches."""

    def __init__(self, engine, deadline: float, n_tokens: int = 24):
        super().__init__(name="soak-generate", daemon=True)
        self.engine, self.deadline, self.n_tokens = engine, deadline, n_tokens
        self.tokens = 0
        self.generations = 0
        self.mismatches = 0
        self.reference: list[int] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                out = self.engine.generate(PROMPT, max_tokens=self.n_tokens)
                if self.reference is None:
                    self.reference = out.token_ids
                elif out.token_ids != self.reference:
                    self.mismatches += 1
                self.generations += 1
                self.tokens += len(out.token_ids)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            self.error = error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to soak (at most 30)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between lines")
    parser.add_argument("--mode", choices=("fake", "hog"), default="fake")
    parser.add_argument("--hog-mib", type=int, default=200, help="--mode hog: MiB the hog process takes")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pagellm-models"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 30:
        parser.error("--minutes must be in (0, 30]")
    seconds = args.minutes * 60

    from pagellm.offload.pressure import peak_rss_bytes, process_rss_bytes, reset_peak_rss

    path = soak_model(args.dir)
    rss_before = process_rss_bytes()
    engine, probe = make_engine(path, args.mode, args.hog_mib, args.threads)
    monitor = engine.pressure
    engine.generate(PROMPT, max_tokens=2)  # compile the kernels and bring every weight in before the clock starts
    marks = place_marks(engine, probe, args.hog_mib)
    print(f"model {path.name}: weights {engine.model_file.weight_bytes / MiB:.0f} MiB; auto budget "
          f"{monitor.max_budget / MiB:.0f} MiB, floor {monitor.floor_bytes / MiB:.0f} MiB; marks {marks}; "
          f"mode {args.mode}; {seconds:.0f} s")
    print(f"RSS before loading {rss_before / MiB:.0f} MiB (interpreter, numba, numpy); after warm-up "
          f"{process_rss_bytes() / MiB:.0f} MiB")

    hog = start_hog(args.hog_mib, seconds) if args.mode == "hog" else None
    if isinstance(probe, SimulatedMachine):
        probe.started = time.monotonic()
    start = time.monotonic()
    gen = Generator(engine, start + seconds)
    gen.start()
    lines: list[Line] = []
    print(f"{'t s':>6} {'hog MiB':>8} {'budget':>8} {'max bud':>8} {'resident':>9} {'RSS':>7} {'peak RSS':>9} "
          f"{'peak-bud':>9} {'tok/s':>6} {'shrink':>6} {'grow':>5}")
    try:
        last_tokens, last_t = 0, start
        while gen.is_alive() and time.monotonic() - start < seconds + 30:
            reset_peak_rss()
            budgets = [engine.weights.budget_bytes]
            hogs = []
            end = min(time.monotonic() + args.every, start + seconds)
            while time.monotonic() < end and gen.is_alive():
                time.sleep(0.05)
                budgets.append(engine.weights.budget_bytes)
                hogs.append(probe.hog_bytes() if isinstance(probe, SimulatedMachine) else _hog_rss(hog))
            now = time.monotonic()
            line = Line(now - start, max(hogs, default=0), engine.weights.budget_bytes, max(budgets),
                        engine.weights.resident_bytes, process_rss_bytes(), peak_rss_bytes(),
                        (gen.tokens - last_tokens) / max(now - last_t, 1e-9), monitor.stats.shrinks, monitor.stats.grows)
            last_tokens, last_t = gen.tokens, now
            lines.append(line)
            print(f"{line.t:6.0f} {line.hog / MiB:8.0f} {line.budget / MiB:8.0f} {line.max_budget / MiB:8.0f} "
                  f"{line.resident / MiB:9.0f} {line.rss / MiB:7.0f} {line.peak_rss / MiB:9.0f} "
                  f"{(line.peak_rss - line.max_budget) / MiB:9.0f} {line.tokens_per_s:6.1f} {line.shrinks:6d} "
                  f"{line.grows:5d}", flush=True)
            if now - start >= seconds:
                break
    finally:
        gen.join(timeout=60)
        if hog is not None:
            hog.kill()
            hog.wait()
    summary = engine.memory_summary()
    overhead = max((ln.peak_rss - ln.max_budget for ln in lines), default=0)
    print(f"\ngenerations {gen.generations}, tokens {gen.tokens}, token mismatches vs the first generation "
          f"{gen.mismatches}, error {type(gen.error).__name__ + ': ' + str(gen.error) if gen.error else 'none'}")
    print(f"budget moved {monitor.stats.shrinks} times down, {monitor.stats.grows} times up; lowest budget "
          f"{(monitor.stats.min_budget_bytes or monitor.max_budget) / MiB:.0f} MiB; peak resident weights "
          f"{engine.weights.stats.peak_resident_bytes / MiB:.0f} MiB (auto budget {monitor.max_budget / MiB:.0f} MiB)")
    print(f"peak RSS - largest budget of its interval: at most {overhead / MiB:.0f} MiB "
          f"(RSS before loading {rss_before / MiB:.0f} MiB, KV cache {summary['kv_cache_bytes'] / MiB:.0f} MiB)")
    engine.close()
    return 1 if gen.error or gen.mismatches else 0


def _hog_rss(hog: subprocess.Popen | None) -> int:
    """The hog process's RSS (0 when it is gone)."""
    if hog is None:
        return 0
    try:
        with open(f"/proc/{hog.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
