"""The planner: what to pin, keep resident and stream for a budget, and what that costs per token.

Placement: the declared pins first; then a streaming window of ``1 + prefetch`` units or more (the
one being computed plus the ones being read ahead; the prediction below chooses how many); the
budget left is filled with whole units that stay
resident, spread evenly over the sweep so reads of the streamed units overlap the compute of the
resident ones. Steady-state reads per token are then the streamed units plus one embedding row:
``M - B`` plus at most the window, less the embedding table, which is never read whole.

Prediction: a small event simulation of one decode step — a reader that fetches streamed units
ahead within the window at the measured disk bandwidth, and compute that takes each unit's bytes at
the measured rate for its GGML type — gives the stall and the time per token.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from pagellm.modelfile import TOKEN_EMBEDDING, ModelFile
from pagellm.offload.cpus import available_cpus, pin_thread, pinned, split_for_reader
from pagellm.offload.policy import AnyPolicy, NoOffload, PinnedHotSet, format_size

MiB = 2**20
RUNTIME_HEADROOM_BYTES = 256 * MiB  # interpreter, numba, activations, logits: measured ~100-150 MiB


@dataclass(frozen=True)
class Placement:
    """Where each unit lives under a budget."""

    pinned: tuple[str, ...]  # declared by the policy; loaded at start, never evicted
    resident: tuple[str, ...]  # chosen to fill the budget; stay once read
    streamed: tuple[str, ...]  # cycle through the window every token
    row_read: tuple[str, ...]  # read by rows on demand (the token embedding)
    window_bytes: int  # budget kept for streamed units in flight and in use
    budget_bytes: int | None
    window_units: int = 1  # streamed units the window holds at once (in use plus read ahead)

    def role(self, unit: str) -> str:
        """'pinned', 'resident', 'streamed' or 'row_read'."""
        for name in ("pinned", "resident", "streamed", "row_read"):
            if unit in getattr(self, name):
                return name
        raise KeyError(unit)


def place(
    units: Mapping[str, int],
    sweep_order: Sequence[str],
    budget_bytes: int | None,
    pinned_units: Sequence[str],
    prefetch_n_ahead: int,
    embedding_units: Sequence[str] = (),
    replacement: str = "auto",
    stream_units: Mapping[str, int] | None = None,
    window_units: int | None = None,
) -> Placement:
    """Choose the placement; ``units`` maps unit name -> buffer bytes kept, ``stream_units`` -> bytes streamed.

    A streamed unit's buffer may be larger than a kept one's (whole huge pages, for read speed:
    ``source.buffer_capacity``); by default the two are the same.

    With ``replacement="lru"`` (for comparison) nothing stays resident once the sweep is larger
    than the budget: LRU evicts exactly the unit the sweep needs next, so every unpinned unit streams.

    The window must hold the largest run of ``window_units`` (by default ``1 + prefetch``)
    consecutive streamed units (the one computing and those being read behind it: more lets the
    reader run further ahead while resident units compute, at the cost of budget that would keep
    units resident), which depends on what stays resident; so the window
    is estimated from all candidates, the resident set chosen, and the window checked against the
    streamed units that result, growing it (a few rounds, then the worst case) until it holds.
    """
    streaming = units if stream_units is None else stream_units
    pinned = tuple(u for u in units if u in set(pinned_units))
    in_sweep = set(sweep_order)
    row_read = tuple(u for u in embedding_units if u not in pinned and u not in in_sweep)
    candidates = [u for u in sweep_order if u not in pinned]
    if budget_bytes is None:
        return Placement(pinned, tuple(candidates), (), row_read, 0, None)
    free = budget_bytes - sum(units[u] for u in pinned)
    if sum(units[u] for u in candidates) <= free:
        return Placement(pinned, tuple(candidates), (), row_read, 0, budget_bytes)
    largest = max(streaming[u] for u in candidates)
    # One unit in use plus the read-ahead, fewer if the budget cannot hold them.
    slots = window_units or 1 + prefetch_n_ahead
    while slots > 1 and _run_bytes(candidates, streaming, slots) > free:
        slots -= 1
    window = _run_bytes(candidates, streaming, slots)
    for attempt in range(5):
        resident = _spread(candidates, units, free - window)
        streamed = [u for u in candidates if u not in resident]
        needed = _run_bytes(streamed, streaming, slots)
        if needed <= window:
            break
        window = needed if attempt < 3 else slots * largest  # the worst case always holds
    if replacement == "lru":
        resident, streamed = set(), candidates
    return Placement(pinned, tuple(u for u in candidates if u in resident), tuple(streamed), row_read, window,
                     budget_bytes, slots)


def role_capacities(kept: Mapping[str, int], streamed: Mapping[str, int], placement: Placement) -> dict[str, int]:
    """Buffer bytes per unit by its role: kept (pinned, resident) units their kept size, the rest their streamed size."""
    keep = set(placement.pinned) | set(placement.resident)
    return {u: kept[u] if u in keep else streamed[u] for u in kept}


def victim_order(idle: Sequence[str], keep: set[str], distance: Callable[[str], int], last_use: Mapping[str, int],
                 replacement: str, bringing: str | None = None) -> list[str]:
    """Idle units, best victim first, by the pager's rules.

    Sweep-aware: the unit the sweep needs furthest ahead first, units the placement keeps resident
    (``keep``) last; LRU: the least recently used first. A prefetch ``bringing`` a unit takes no
    kept unit, nor one the sweep needs before the unit it brings.
    """
    if bringing is not None:
        limit = distance(bringing)
        idle = [u for u in idle if u not in keep and distance(u) > limit]
    if replacement == "lru":
        return sorted(idle, key=lambda u: last_use.get(u, 0))
    return sorted(idle, key=lambda u: (u in keep, -distance(u)))


def reuse_choice(need: int, sizes: Sequence[int]) -> int | None:
    """Which victim's buffer a load of ``need`` bytes takes: one of that size, else the largest (None: no victim).

    A same-sized buffer is used as it is; any other is remapped to size, so only growth maps new pages.
    """
    if not sizes:
        return None
    return sizes.index(need) if need in sizes else max(range(len(sizes)), key=sizes.__getitem__)


def _run_bytes(order: Sequence[str], units: Mapping[str, int], n: int) -> int:
    """The most bytes ``n`` cyclically consecutive units of ``order`` take together."""
    sizes = [units[u] for u in order]
    if not sizes:
        return 0
    n = min(n, len(sizes))
    return max(sum(sizes[(i + k) % len(sizes)] for k in range(n)) for i in range(len(sizes)))


def block_of(unit: str) -> str:
    """The block a unit belongs to (``blk.3`` for ``blk.3@ffn_in.1``); other units stand for themselves."""
    return unit.partition("@")[0] if unit.startswith("blk.") else unit


def _spread(candidates: Sequence[str], units: Mapping[str, int], room: int) -> set[str]:
    """Pick units that fit in ``room``, spread evenly over the sweep by bytes (so reads interleave
    with compute), then fill what rounding left.

    Unit by unit, not whole blocks: a unit is kept while the kept bytes trail the budget's share
    of the bytes swept so far, so at 50% every other unit stays and the reader reads one streamed
    unit while compute runs through the resident one beside it. With whole blocks kept and whole
    blocks streamed, compute ran through a resident block (7B Q4_0: 10 units, 19 ms) while the
    reader, its window full, waited: the disk stood idle 3-10% of a 50% step (3-4% unit by unit),
    and the larger window that shortened the wait was read every token (7B Q4_0 at 50%, three
    alternating runs of five tokens: 0.80-0.86 s per token unit by unit, 0.85-0.92 by blocks).
    """
    if room <= 0 or not candidates:
        return set()
    share = min(1.0, room / sum(units[u] for u in candidates))
    kept: set[str] = set()
    used = seen = 0
    for u in candidates:
        seen += units[u]
        if used + units[u] <= room and used + units[u] / 2 <= share * seen:
            kept.add(u)
            used += units[u]
    for u in candidates:  # what rounding left
        if u not in kept and used + units[u] <= room:
            kept.add(u)
            used += units[u]
    return kept


# -- machine figures -----------------------------------------------------------------------------


@dataclass
class MachineProfile:
    """Disk bandwidth and compute speed (weight bytes per second, per GGML type) of this machine."""

    disk_bytes_per_s: float = 1.0e9
    compute_bytes_per_s: dict[str, float] = field(default_factory=dict)
    # Seconds per block of norms, rope and attention at short context: measured per model shape
    # (``model_shape``; a 7B block takes several times a TinyLlama one), and for a shape never
    # measured the last figure measured.
    layer_overhead_s: float = 2.0e-4
    layer_overhead_s_by_shape: dict[str, float] = field(default_factory=dict)
    # Where reads take CPU that compute would use (a virtual disk the host serves from the same
    # cores), reads beside compute run slower than alone, and leaving one core to the reader can
    # win: the read rates beside compute on every thread and on one thread fewer (0: unmeasured,
    # as fast as alone), and the compute rate per type on one thread fewer.
    disk_bytes_per_s_beside_compute: float = 0.0
    disk_bytes_per_s_beside_one_fewer: float = 0.0
    compute_bytes_per_s_one_fewer: dict[str, float] = field(default_factory=dict)
    # The other side of the same sharing: the share of its own speed compute on every thread keeps
    # while reads run. Here 7B Q4_0 mat-vecs on both cores kept 0.61-0.64 beside O_DIRECT reads,
    # little faster than on one thread. On one thread fewer the reader has a core of its own and
    # compute keeps its speed: 7B decoding on one thread beside 0.44 s of reads per token took
    # 0.575 s per token, against 0.589 in RAM. (The calibration's own loop showed 0.76-0.94 there;
    # decode does not pay that, so the planner does not use it.)
    compute_kept_beside_reads: float = 1.0
    # bytes/s at which the kernel maps and zeroes new pages: what a read into fresh memory costs extra
    fresh_page_bytes_per_s: float = 7.0e9
    # seconds the forward pass spends on each unit besides its mat-vecs' bytes: acquire, the read-ahead
    # request, release, the kernel calls (``measure_unit_overhead``: 0.06-0.12 ms here)
    unit_overhead_s: float = 1.0e-4
    threads: int = 0
    measured: bool = False
    source: str = "defaults"

    DEFAULT_COMPUTE = 4.0e9

    def compute_rate(self, ggml_type: str, one_fewer: bool = False) -> float:
        """Weight bytes per second a mat-vec of this type runs at (on one thread fewer: ``one_fewer``)."""
        rate = self.compute_bytes_per_s.get(ggml_type, self.DEFAULT_COMPUTE)
        return self.compute_bytes_per_s_one_fewer.get(ggml_type, rate) if one_fewer else rate

    def layer_overhead(self, shape: str) -> float:
        """Seconds per block besides the mat-vecs for a model of this ``model_shape``."""
        return self.layer_overhead_s_by_shape.get(shape, self.layer_overhead_s)

    def compute_kept(self, one_fewer: bool = False) -> float:
        """Share of its speed compute keeps while reads run (on one thread fewer, with the reader apart: all)."""
        return 1.0 if one_fewer else min(1.0, max(0.05, self.compute_kept_beside_reads))

    def use_shared_rates(self, shared: "SharedRates", threads: int) -> None:
        """Take the read rates (alone, beside compute on ``threads`` and on one fewer) and compute's
        kept share that ``measure_disk`` measured; a setting it did not measure reads as alone."""
        self.disk_bytes_per_s = shared.read[0]
        self.disk_bytes_per_s_beside_compute = shared.read.get(threads, 0.0)
        self.disk_bytes_per_s_beside_one_fewer = shared.read.get(threads - 1, 0.0) if threads > 1 else 0.0
        self.compute_kept_beside_reads = shared.compute_kept.get(threads, 1.0)

    def read_rate_beside_compute(self, one_fewer: bool = False) -> float:
        """Bytes/s of reads while compute runs on every thread (on one thread fewer: ``one_fewer``)."""
        rate = self.disk_bytes_per_s_beside_one_fewer if one_fewer else self.disk_bytes_per_s_beside_compute
        return rate or self.disk_bytes_per_s

    def disk_rate(self) -> float:
        """The disk's own bandwidth: the fastest it was measured at, alone or beside compute on one
        thread fewer (reads alone sometimes measure slower here than beside compute, idle cores
        seemingly answering completions later; the slower would understate what the disk does)."""
        return max(self.disk_bytes_per_s, self.disk_bytes_per_s_beside_one_fewer)

    @staticmethod
    def cache_path() -> Path:
        """Where calibrations are kept (one file per machine)."""
        import platformdirs

        return Path(platformdirs.user_cache_dir("pagellm")) / f"machine-{platform.node() or 'local'}.json"

    @classmethod
    def load_or_default(cls, path: Path | None = None) -> "MachineProfile":
        """The cached calibration of this machine, or rough defaults."""
        path = path or cls.cache_path()
        try:
            data = json.loads(path.read_text())
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self, path: Path | None = None) -> None:
        """Cache this profile for later runs."""
        path = path or self.cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


def sweep_reads(mf: ModelFile, units: Sequence[str] | None = None, most: int = 1024 * MiB,
                alignment: int = 4096) -> list[tuple[int, int]]:
    """The pager's reads (file offset, bytes) of ``units`` in sweep order; by default the sweep's
    first ``most`` bytes, the token embedding aside (decode reads one row of it)."""
    from pagellm.offload.pager import LayerPager

    all_units, order, _, _ = LayerPager.describe(mf, NoOffload(), alignment)
    by_name = {u.name: u for u in all_units}
    wanted = set(units) if units is not None else None
    reads: list[tuple[int, int]] = []
    total = 0
    for name in order:
        unit = by_name[name]
        if (wanted is not None and name not in wanted) or (wanted is None and unit.group == TOKEN_EMBEDDING):
            continue
        reads += [(e.file_offset, e.nbytes) for e in unit.extents]
        total += unit.nbytes
        if wanted is None and total >= most:
            break
    return reads


@dataclass
class SharedRates:
    """Reads and compute measured in turns: read rates (bytes/s) by compute threads beside them (0:
    none); for each thread count, the mat-vecs' weight bytes/s alone and the share of it they kept
    beside the reads."""

    read: dict[int, float]
    compute: dict[int, float]
    compute_kept: dict[int, float]


def measure_disk(path: str | os.PathLike[str], reads: Sequence[tuple[int, int]], ggml_type: str | None = None,
                 threads: Sequence[int] = (0,), seconds: float = 2.0) -> SharedRates:
    """Read rate of the pager's reads of ``path``, alone (0) and beside compute on each ``threads``,
    and what the reads cost that compute.

    Reads are the pager's: O_DIRECT into two huge-page buffers in turn, the file ranges ``reads``
    (offset, bytes) in turn, cycling: the units a decode streams, in sweep order (``sweep_reads``), since
    small reads run slower (here 9 MiB at 1.6 GB/s against 76 MiB at 2.1). A first untimed pass
    reads them all once: decoding re-reads the same units every token, and a virtual disk backed
    by the host's cache serves repeats faster than first reads. Beside compute, mat-vecs of
    ``ggml_type`` run on the given number of threads in a background thread; each such setting
    also runs a slice with no reads, and the mat-vecs done in the two give compute's speed and its
    kept share. The settings take turns in short slices, so a disk whose rate drifts over minutes
    (a shared virtual disk) moves them all alike and their ratios hold.
    """
    import threading

    from pagellm import kernels
    from pagellm.offload.source import FileSource, allocate_buffer, buffer_capacity
    from pagellm.synth import random_weights

    settings = list(dict.fromkeys(int(t) for t in threads))
    # Beside compute on fewer threads than CPUs, the engine keeps the reader on a core of its own
    # and the compute off it (offload.cpus): measure that arrangement.
    cpus = available_cpus()
    split = split_for_reader(cpus)

    def placed(k: int) -> tuple[frozenset[int], frozenset[int] | None]:
        """(compute CPUs, reader CPUs) for setting ``k``: apart where it leaves a core, else anywhere."""
        return split if split is not None and 0 < k < len(cpus) else (cpus, None)

    wanted = [0]  # the setting the compute thread is asked for (threads; 0 idle; -1 end)
    running = [0]  # the setting it is in
    computed = [0]  # weight bytes the compute thread has multiplied so far
    changed = threading.Condition()

    def compute() -> None:
        rows, cols = 2048, 5632
        w = random_weights(ggml_type, rows, cols, seed=1)
        copies = [w] + [w.copy() for _ in range(max(1, (96 * MiB) // w.nbytes))]
        x = np.random.default_rng(0).standard_normal(cols).astype(np.float32)
        qtype = GGMLQuantizationType[ggml_type]
        kernels.matvec(w, qtype, cols, x)  # compiled before the first timed slice
        n = 0
        while True:
            with changed:
                while wanted[0] == 0:
                    running[0] = 0
                    changed.notify_all()
                    changed.wait()
                k = running[0] = wanted[0]
                changed.notify_all()
            if k < 0:
                return
            pin_thread(0, placed(k)[0])
            kernels.set_num_threads(k)
            kernels.matvec(copies[n % len(copies)], qtype, cols, x)
            computed[0] += w.nbytes
            n += 1

    worker = None
    if any(settings):
        if ggml_type is None:
            raise ValueError("reads beside compute need the GGML type to compute with")
        worker = threading.Thread(target=compute, name="pagellm-calibrate", daemon=True)
        worker.start()

    def switch(k: int) -> None:
        if worker is None:
            return
        with changed:
            wanted[0] = k
            changed.notify_all()
            changed.wait_for(lambda: running[0] == k, timeout=10)
        time.sleep(0.02)  # the setting has taken hold

    reads = [(int(o), int(n)) for o, n in reads]
    if not reads:
        raise ValueError("measure_disk needs at least one range to read")
    # per setting, one figure per round: read bytes/s; compute's bytes/s alone and its kept share
    read_rates: dict[int, list[float]] = {k: [] for k in settings}
    alone: dict[int, list[float]] = {k: [] for k in settings if k}
    kept: dict[int, list[float]] = {k: [] for k in settings if k}
    try:
        with FileSource(path) as src:
            if src.mode != "direct":
                src.evict_page_cache()
            # sized as the pager sizes a streamed unit's buffer: one ending inside a huge page has
            # its tail on small pages, which read slower (12 MB units here: 2.0 GB/s against 2.3)
            capacity = buffer_capacity(max(n for _, n in reads) + 2 * src.alignment)
            # Two buffers, read into in turn: reads that overlap compute need one to fill while the
            # other is computed on, and the pager's window alternates between two such. One buffer
            # read into over and over measured faster than any overlapped reader gets: the same
            # ranges of 12 MB units, nothing else running, 3.74-3.93 GB/s into one, 3.67-3.74 into
            # two in turn, 3.46-3.62 into four (6 MiB units: 3.97-4.07 against 3.89-3.95), likely a
            # virtual disk's host copying into memory still in its cache.
            buffers = [allocate_buffer(capacity) for _ in range(2)]
            # laid out ahead, as the pager lays out its read-ahead: between two reads only the loop runs
            plans = [[(src.plan(((offset, n, 0),), b), n) for offset, n in reads] for b in buffers]
            cursor = [0]  # the next of ``reads``: they go on across slices, cycling

            def read_for(duration: float, most: float = float("inf")) -> int:
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < duration and done < most:
                    plan, n = plans[cursor[0] % 2][cursor[0] % len(reads)]
                    src.run(plan)
                    cursor[0] += 1
                    done += n
                return done

            def idle(duration: float) -> int:
                time.sleep(duration)
                return 0

            def timed(k: int, work: Callable[[float], int], duration: float) -> tuple[float, float]:
                """(bytes read/s, weight bytes computed/s) while ``work`` runs in setting ``k``."""
                switch(k)
                c0, t0 = computed[0], time.perf_counter()
                with pinned(placed(k)[1]):
                    done = work(duration)
                spent = time.perf_counter() - t0
                return done / spent, (computed[0] - c0) / spent

            slice_s = 0.4
            # The untimed pass: every range once (for at most a few seconds), then a short slice
            # in each setting. Decoding re-reads the same units every token, and a virtual disk
            # backed by the host's cache serves repeats faster than first reads: the rows of
            # benchmarks/offload.py read 14% faster than the first bytes of the file, warmed only
            # in part, had measured.
            read_for(max(4.0, seconds), most=sum(n for _, n in reads))
            for k in settings:
                timed(k, read_for, slice_s / 2)
            # A figure per round and the median of the rounds: a disk that stalls for a slice (here
            # once 1.3 GB/s among slices at 2.3) moves one round, not the result.
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or not read_rates[settings[0]]:
                for k in settings:
                    read_rate, beside = timed(k, read_for, slice_s)
                    read_rates[k].append(read_rate)
                    if k:
                        own = timed(k, idle, slice_s)[1]
                        if own > 0:
                            alone[k].append(own)
                            kept[k].append(beside / own)
    finally:
        switch(-1)
        if worker is not None:
            worker.join()

    def median(rates: dict[int, list[float]]) -> dict[int, float]:
        return {k: float(np.median(v)) for k, v in rates.items() if v}

    return SharedRates(median(read_rates), median(alone), median(kept))


def main_weight_type(mf: ModelFile) -> str:
    """The GGML type holding most of the model's matrix bytes."""
    totals = collections.Counter()
    for t in mf.tensors.values():
        if len(t.shape) > 1:
            totals[t.ggml_type.name] += t.nbytes
    return totals.most_common(1)[0][0]


def measure_fresh_pages(seconds: float = 0.5, nbytes: int = 64 * MiB) -> float:
    """Bytes/s at which new buffers' pages are mapped, zeroed (by the kernel, on first touch) and let go."""
    from pagellm.offload.source import PAGE, allocate_buffer

    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done < 3 * nbytes:
        buffer = allocate_buffer(nbytes)
        buffer[::PAGE] = 0  # one write per page faults each in
        del buffer
        done += nbytes
    return done / (time.perf_counter() - t0)


def measure_compute(ggml_types: Sequence[str], threads: int | None = None, seconds_each: float = 0.4) -> dict[str, float]:
    """Weight bytes/s of the fused mat-vec per type, on a 2048 x 5632 weight."""
    from pagellm import kernels
    from pagellm.synth import random_weights

    if threads:
        kernels.set_num_threads(threads)
    rates = {}
    rows, cols = 2048, 5632
    x = np.random.default_rng(0).standard_normal(cols).astype(np.float32)
    for name in ggml_types:
        qtype = GGMLQuantizationType[name]
        # Copies enough to overflow the last-level cache: decode streams weights from RAM.
        first = random_weights(name, rows, cols, seed=1)
        copies = [first] + [first.copy() for _ in range(max(1, (96 * MiB) // first.nbytes))]
        kernels.matvec(first, qtype, cols, x)  # compile and warm
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds_each or n < 3:
            kernels.matvec(copies[n % len(copies)], qtype, cols, x)
            n += 1
        rates[name] = first.nbytes * n / (time.perf_counter() - t0)
    return rates


def model_shape(mf: ModelFile) -> str:
    """The dimensions a block's work besides its mat-vecs depends on, as a key for ``layer_overhead_s_by_shape``."""
    from pagellm.models.config import ModelArgs

    args = ModelArgs.from_model_file(mf)
    return f"embd {args.n_embd}, ff {args.n_ff}, heads {args.n_head}/{args.n_head_kv}x{args.head_dim}"


# Bytes streamed through the caches before each timed piece of bookkeeping, as a unit's mat-vec
# (9-12 MiB here) streams its weights through them before the forward pass's bookkeeping. Decoding
# in RAM on one thread spent 22 ms per token besides the mat-vecs on TinyLlama, 47 on the 7B;
# timed with warm caches the calibration gave 11 and 28, with 8 MiB swept 21 and 41, with 32 MiB
# (the whole last-level cache) 35 and 99.
CACHE_SWEEP_BYTES = 8 * MiB


def _cold_caches(sweep: np.ndarray) -> None:
    """Stream ``sweep`` through the caches, as a unit's mat-vec does before the forward pass's bookkeeping."""
    float(sweep.sum())


def measure_layer_overhead(mf: ModelFile, repeats: int = 30) -> float:
    """Seconds per block of everything but the mat-vecs (norms, rope, attention over a short context).

    Each timed block starts with the caches as a mat-vec leaves them (``CACHE_SWEEP_BYTES``). The median of
    ``repeats`` timed blocks after an untimed one: a first call (numba loading a kernel, numpy
    allocating) and an interrupted one would otherwise weigh on every block.
    """
    from pagellm.kv_cache import KVCache
    from pagellm.models.config import ModelArgs
    from pagellm.models.llama import LlamaModel, Segment, rms_norm, silu

    args = ModelArgs.from_model_file(mf)
    model = LlamaModel.__new__(LlamaModel)
    model.args = args
    model.inv_freq = args.rope_base ** (-np.arange(args.n_rot // 2) * 2.0 / args.n_rot)
    cache = KVCache(1, 64, args.n_head_kv, args.head_dim)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.n_embd)).astype(np.float32)
    w = np.ones(args.n_embd, np.float32)
    q = rng.standard_normal((1, args.n_head, args.head_dim)).astype(np.float32)
    k = rng.standard_normal((1, args.n_head_kv, args.head_dim)).astype(np.float32)
    ff = rng.standard_normal((1, args.n_ff)).astype(np.float32)
    sweep = np.ones(CACHE_SWEEP_BYTES // 4, np.float32)
    times = []
    for _ in range(repeats + 1):
        _cold_caches(sweep)
        t0 = time.perf_counter()
        seg = Segment(cache, 32, 0, 1)
        seg.cos, seg.sin = model.rope_tables(32, 1, None)
        h = rms_norm(x, w, args.rms_eps)
        qs = model.rope(q, seg.cos, seg.sin)
        cache.store(0, 32, model.rope(k, seg.cos, seg.sin), k)
        model.attention(qs, cache.keys[0, :33], cache.values[0, :33], 32)
        h = rms_norm(x + h, w, args.rms_eps)
        (silu(ff) * ff).astype(np.float32)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def measure_unit_overhead(mf: ModelFile, repeats: int = 100) -> float:
    """Seconds the forward pass spends per unit besides its mat-vecs' bytes: acquire, the read-ahead
    request, release and a kernel call, timed on the model's own pager with a tiny weight.

    The pager reads only its pinned units (globals and block vectors, a few KiB each) and its
    read-ahead requests go nowhere, so the bookkeeping is what is timed, each unit with the caches
    as a mat-vec leaves them (``_cold_caches``). The median of ``repeats`` units.
    """
    from pagellm import kernels
    from pagellm.models.config import ModelArgs
    from pagellm.models.llama import LlamaModel
    from pagellm.offload.pager import LayerPager
    from pagellm.synth import random_weights

    class Quiet(LayerPager):
        def prefetch(self, names: Sequence[str]) -> None:
            """Requests go nowhere: the reader never starts."""

    qtype = GGMLQuantizationType.Q8_0
    w = random_weights("Q8_0", 32, 64, seed=1)
    x = np.ones((1, 64), np.float32)
    kernels.matmul(w, qtype, 64, x)  # compiled before timing
    with Quiet(mf, None, prefetch_n_ahead=1) as pager:
        model = LlamaModel(ModelArgs.from_model_file(mf), mf, pager)
        units = [b.vectors for b in model.block_units]
        sweep = np.ones(CACHE_SWEEP_BYTES // 4, np.float32)
        times = []
        for i in range(repeats):
            _cold_caches(sweep)
            t0 = time.perf_counter()
            with model.acquired(units[i % len(units)]):
                kernels.matmul(w, qtype, 64, x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def calibrate(
    mf: ModelFile,
    seconds: float = 5.0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    save: bool = True,
) -> MachineProfile:
    """Measure disk bandwidth (on this model's file), compute per type and per-layer overhead; cache it."""
    types = sorted({t.ggml_type.name for t in mf.tensors.values() if len(t.shape) > 1})
    n_threads = threads or os.cpu_count() or 1
    if progress:
        progress("disk")
    # alone, and (with cores to share) beside compute on every thread and on one fewer, in turns
    settings = [0, n_threads - 1, n_threads] if n_threads > 1 else [0]
    shared = measure_disk(mf.path, sweep_reads(mf), main_weight_type(mf), settings, seconds=max(1.5, seconds * 0.8))
    if progress:
        progress("compute")
    rates = measure_compute(types, threads, seconds_each=max(0.1, seconds * 0.5 / max(1, len(types))))
    fewer: dict[str, float] = {}
    if n_threads > 1:
        fewer = measure_compute(types, n_threads - 1, seconds_each=max(0.1, seconds * 0.3 / max(1, len(types))))
        from pagellm import kernels

        kernels.set_num_threads(n_threads)
    overhead = measure_layer_overhead(mf)
    profile = MachineProfile.load_or_default()
    profile.use_shared_rates(shared, n_threads)
    profile.fresh_page_bytes_per_s = measure_fresh_pages()
    profile.unit_overhead_s = measure_unit_overhead(mf)
    profile.compute_bytes_per_s.update(rates)
    profile.compute_bytes_per_s_one_fewer.update(fewer)
    profile.layer_overhead_s = overhead
    profile.layer_overhead_s_by_shape[model_shape(mf)] = overhead
    profile.threads = n_threads
    profile.measured = True
    profile.source = f"calibrated {time.strftime('%Y-%m-%d %H:%M')}"
    if save:
        profile.save()
    return profile


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A placement and what it predicts per decoded token."""

    placement: Placement
    weight_bytes: int
    unit_bytes: dict[str, int]  # payload bytes per unit
    predicted_bytes_per_token: float
    compute_seconds_per_token: float
    read_seconds_per_token: float
    predicted_stall_seconds_per_token: float
    predicted_seconds_per_token: float
    floor_seconds_per_token: float
    profile: MachineProfile
    compute_threads: int | None = None  # threads the mat-vecs run on while layers stream (None: all)
    # compute as the step runs it: on ``compute_threads``, slowed where reads run beside it
    working_compute_seconds_per_token: float = 0.0

    @property
    def pinned(self) -> tuple[str, ...]:
        return self.placement.pinned

    @property
    def resident(self) -> tuple[str, ...]:
        return self.placement.resident

    @property
    def streamed(self) -> tuple[str, ...]:
        return self.placement.streamed

    @property
    def row_read(self) -> tuple[str, ...]:
        return self.placement.row_read

    @property
    def predicted_tokens_per_s(self) -> float:
        """Decode tokens per second the plan predicts."""
        return 1.0 / self.predicted_seconds_per_token

    @property
    def ratio_to_floor(self) -> float:
        """Floor time over predicted time (1.0: as fast as the bound allows)."""
        return self.floor_seconds_per_token / self.predicted_seconds_per_token

    def lines(self) -> list[str]:
        """A human summary, for the CLI."""

        def names(units: Sequence[str]) -> str:
            return _compress(units, self.unit_bytes) or "-"

        def size(units: Sequence[str]) -> str:
            return format_size(sum(self.unit_bytes[u] for u in units))

        p = self.placement
        budget = format_size(p.budget_bytes) if p.budget_bytes is not None else "unlimited"
        prof = self.profile
        return [
            f"budget {budget} of {format_size(self.weight_bytes)} weights; streaming window {format_size(p.window_bytes)}"
            + (f" ({p.window_units} units)" if p.streamed else ""),
            f"pinned    {size(p.pinned):>11}  {names(p.pinned)}",
            f"resident  {size(p.resident):>11}  {names(p.resident)}",
            f"streamed  {size(p.streamed):>11}  {names(p.streamed)}",
            f"row reads {'':>11}  {names(p.row_read)} (one row per token)",
            f"reads per token {format_size(self.predicted_bytes_per_token)}; "
            f"disk {prof.disk_rate() / 1e9:.2f} GB/s ({prof.source})",
            f"compute {self.compute_seconds_per_token * 1e3:.1f} ms/token alone on every thread, "
            f"{self.working_compute_seconds_per_token * 1e3:.1f} ms as the step runs it; "
            f"reads {self.read_seconds_per_token * 1e3:.1f} ms/token"
            + (f" (at {self.predicted_bytes_per_token / self.read_seconds_per_token / 1e9:.2f} GB/s: slower beside "
               "compute, the disk's own rate while compute waits)" if self.read_seconds_per_token > 0 else "")
            + f", stall {self.predicted_stall_seconds_per_token * 1e3:.1f} ms/token",
            "compute threads: "
            + (f"{self.compute_threads} (one core left to the reader, kept on a CPU of its own; reads ran at "
               f"{prof.read_rate_beside_compute() / 1e9:.2f} GB/s beside compute on every thread, which kept "
               f"{prof.compute_kept():.0%} of its speed beside them)"
               if self.compute_threads else "all"),
            f"predicted {self.predicted_tokens_per_s:.2f} tokens/s; floor {1 / self.floor_seconds_per_token:.2f} tokens/s "
            f"(ratio {self.ratio_to_floor:.2f})",
        ]


def _compress(units: Sequence[str], every: Collection[str]) -> str:
    """'blk.0-3, blk.7 (4 of 10 units), output@0-2' from a list of unit names, ``every`` being all
    units (a block whose units all appear, its pinned vectors aside: blk.N; the vectors: 'block vectors')."""
    from pagellm.offload.pager import VECTORS, part_of_unit

    listed = set(units)
    of_block = collections.defaultdict(set)
    for u in every:
        if block_of(u) != u and part_of_unit(u) != VECTORS:
            of_block[block_of(u)].add(u)
    names: list[str] = []
    vectors = False
    for u in units:
        block = block_of(u)
        if part_of_unit(u) == VECTORS:
            vectors = True
            continue
        if block != u and not of_block[block] <= listed:  # part of a block: how much of it
            name = f"{block} ({len(of_block[block] & listed)} of {len(of_block[block])} units)"
        else:
            name = block
        if not names or names[-1] != name:
            names.append(name)
    out: list[str] = []
    runs: list[tuple[str, int, int]] = []
    for u in names:
        base, sep, idx = u.rpartition("." if u.startswith("blk.") and "@" not in u else "@")
        if sep and idx.isdigit():
            i = int(idx)
            if runs and runs[-1][0] == base + sep and runs[-1][2] == i - 1:
                runs[-1] = (runs[-1][0], runs[-1][1], i)
                continue
            runs.append((base + sep, i, i))
        else:
            runs.append((u, -1, -1))
    for prefix, a, b in runs:
        out.append(prefix if a < 0 else f"{prefix}{a}" if a == b else f"{prefix}{a}-{b}")
    return ", ".join(out + (["block vectors"] if vectors else []))


def fresh_bytes_per_sweep(
    units: Mapping[str, int],
    order: Sequence[str],
    placement: Placement,
    prefetch_n_ahead: int,
    replacement: str = "auto",
    sweeps: int = 4,
    reader_ahead: bool = True,
) -> dict[str, int]:
    """Bytes per streamed unit the pager must map anew (not reuse a victim's pages) in a steady sweep.

    ``reader_ahead``: whether the reader runs ahead of the sweep (reads faster than compute), and
    so reads ahead into whatever room the budget leaves; otherwise it is busy with the next
    streamed unit and gets no further. Replayed as always ahead, TinyLlama under
    pinned,embeddings=no at 50% (read-bound) was predicted 354 MB of new pages per token where
    the pager mapped 28; replayed as behind, 0.

    A replay of the pager's rules on one thread: acquire each unit of the sweep (a miss evicts the
    best victims), ask for the next unit not in RAM (while the reader is behind, no further than
    the next streamed one) and again once the unit is released (the read-ahead, which may not
    evict what the sweep needs sooner, nor the resident set), victims
    best first (furthest next use; LRU: least recently used). A load takes a same-sized victim's
    buffer, else grows the largest victim's (only the difference is new), else new pages.
    """
    budget = placement.budget_bytes
    if budget is None or not placement.streamed:
        return {}
    index = {u: i for i, u in enumerate(order)}
    keep = set(placement.resident)
    held = {u: units[u] for u in placement.pinned}  # resident unit -> its buffer's bytes
    last_use: dict[str, int] = {}
    position, tick = -1, 0
    fresh: dict[str, int] = {}

    def distance(u: str) -> int:
        return (index[u] - position - 1) % len(order) if u in index else len(order)

    def reserve(u: str, prefetching: bool, in_use: str | None) -> bool:
        need = units[u]
        idle = [v for v in held if v not in placement.pinned and v != in_use]
        room = budget - sum(held.values())
        chosen = []
        for v in victim_order(idle, keep, distance, last_use, replacement, u if prefetching else None):
            if room >= need:
                break
            chosen.append(v)
            room += held[v]
        if room < need:
            return False
        sizes = [held.pop(v) for v in chosen]
        pick = reuse_choice(need, sizes)
        fresh[u] = fresh.get(u, 0) + (need if pick is None else max(0, need - sizes[pick]))
        held[u] = need
        return True

    streaming = set(placement.streamed)

    def next_absent(u: str) -> str | None:
        for k in range(1, len(order)):
            v = order[(index[u] + k) % len(order)]
            if v in streaming and not reader_ahead:
                return v if v not in held else None
            if v not in held:
                return v
        return None

    for sweep in range(sweeps):
        if sweep == sweeps - 1:
            fresh.clear()
        for u in order:
            position = index[u]
            if u not in held:
                reserve(u, False, None)
            tick += 1
            last_use[u] = tick
            if prefetch_n_ahead > 0:
                ahead = next_absent(u)
                if ahead is not None and not reserve(ahead, True, u):
                    reserve(ahead, True, None)  # once ``u`` is released
    return fresh


def simulate_step(
    order: Sequence[str],
    streamed: set[str],
    read_s: Mapping[str, float],
    compute_s: Mapping[str, float],
    window_slots: int,
    prefetch_n_ahead: int,
    sizes: Mapping[str, int] | None = None,
    room: int | None = None,
) -> tuple[float, float]:
    """One decode step as two timelines, reader and compute. Returns (seconds, stall seconds).

    As the pager does: with read-ahead (``prefetch_n_ahead`` > 0) the reader reads the streamed
    units one after another, each as soon as the window has room for it, that is once the unit
    ``window_slots`` streamed units earlier has been computed; or, given the units' buffer
    ``sizes`` and the ``room`` the budget leaves them (the pager reads ahead into all of it,
    slack the resident set could not fill included), once enough earlier units have been
    computed for its buffer to fit. Acquiring a unit waits for its read. With no read-ahead a
    streamed unit is read when compute reaches it. Three steps are simulated and the middle one
    timed, so its first reads overlap the previous step's tail and its last units compute beside
    the next step's reads, as in steady decoding.
    """
    seq = list(order) * 3
    positions = [i for i, u in enumerate(seq) if u in streamed]
    rank = {pos: m for m, pos in enumerate(positions)}  # position -> index among streamed
    slots = max(1, window_slots)
    # after[m]: the streamed unit (index) whose computing frees room for unit m; -1 for none
    if sizes is not None and room is not None:
        after, first, held = [], 0, 0
        for m, pos in enumerate(positions):
            held += sizes[seq[pos]]
            while held > room and first < m:
                held -= sizes[seq[positions[first]]]
                first += 1
            after.append(first - 1)
    else:
        after = [m - slots for m in range(len(positions))]
    end = [0.0] * len(seq)
    ready: dict[int, float] = {}
    reader_free = 0.0
    issued = 0  # streamed units handed to the reader so far

    def read(m: int, not_before: float) -> None:
        nonlocal reader_free, issued
        earlier = positions[after[m]] if after[m] >= 0 else None
        slot_free = end[earlier] if earlier is not None else 0.0
        start = max(reader_free, not_before, slot_free)
        reader_free = ready[positions[m]] = start + read_s[seq[positions[m]]]
        issued += 1

    clock = stall = step_start = 0.0
    for i, u in enumerate(seq):
        if i == len(order):
            step_start, stall = clock, 0.0
        if i == 2 * len(order):
            return clock - step_start, stall
        if prefetch_n_ahead > 0:  # read ahead every unit whose slot the units computed so far freed
            while issued < len(positions) and (after[issued] < 0 or positions[after[issued]] < i):
                read(issued, 0.0)
        start = clock
        if u in streamed:
            if rank[i] >= issued:  # not read ahead: read now, compute waits
                read(rank[i], clock)
            start = max(clock, ready[i])
            stall += start - clock
        clock = end[i] = start + compute_s[u]
    raise AssertionError("unreachable: the loop returns after the second step")


def plan_offload(
    mf: ModelFile,
    policy: AnyPolicy,
    profile: MachineProfile | None = None,
    alignment: int = 4096,
    n_ctx: int = 512,
    replacement: str = "auto",
    window_units: int | None = None,
) -> Plan:
    """Placement and per-token predictions for ``policy`` on this model and machine.

    The streaming window is the planner's choice (unless ``window_units`` fixes it): from the
    smallest, ``1 + prefetch`` units, up to a block's units more, the one predicted fastest, the
    smaller of two within 0.5%. A larger window reads more per token (its bytes are not kept
    resident) but lets the reader run further ahead while resident units compute. With resident
    units spread one by one (``_spread``) the stretches it must read ahead through are short: with
    this VM's calibration the benchmark's rows get two units, but for TinyLlama at 75% (three) under
    `budget` and `pinned,embeddings=no`; a larger one wins where reads and compute nearly balance.

    ``replacement="lru"`` predicts the pager run with plain LRU, for comparison: on a sweep larger
    than the budget it keeps nothing from one token to the next, so every unpinned unit streams.
    """
    from pagellm.offload.pager import LayerPager

    profile = profile or MachineProfile.load_or_default()
    units, order, pinned, prefetch = LayerPager.describe(mf, policy, alignment)
    kept = {u.name: u.resident_capacity for u in units}
    streaming = {u.name: u.capacity for u in units}
    budget = policy.ram_budget_bytes()
    payload = {u.name: u.nbytes for u in units}
    types = {u.name: mf.tensors[max(u.slices, key=lambda s: s.nbytes).tensor].ggml_type.name for u in units}
    parts = collections.Counter(u.group for u in units)
    group = {u.name: u.group for u in units}
    embedding = [u.name for u in units if u.group == TOKEN_EMBEDDING]
    # the per-block overhead (norms, rope, attention) is shared among the block's units
    shape = model_shape(mf)
    if profile.measured and shape not in profile.layer_overhead_s_by_shape:
        # a calibrated machine, a model shape it has not timed yet: a few milliseconds to time it
        profile.layer_overhead_s_by_shape[shape] = measure_layer_overhead(mf)
    overhead = profile.layer_overhead(shape)

    def compute_seconds(one_fewer: bool) -> dict[str, float]:
        return {u: payload[u] / profile.compute_rate(types[u], one_fewer)
                + (overhead / parts[group[u]] if u.startswith("blk.") else 0.0) for u in order}

    compute_s = compute_seconds(False)  # on every thread: what the floor counts
    # as the step runs it, each unit's bookkeeping added: on every thread (False) and on one fewer (True)
    step_compute_s = {fewer: {u: t + profile.unit_overhead_s for u, t in compute_seconds(fewer).items()}
                      for fewer in (False, True)}
    compute = sum(compute_s.values())
    threads = profile.threads or os.cpu_count() or 1
    floor_bytes = max(0, mf.weight_bytes - budget) if budget is not None else 0
    floor = max(compute, floor_bytes / profile.disk_rate())
    embd = mf.tensors["token_embd.weight"]
    row_bytes = embd.nbytes // embd.shape[1] if len(embd.shape) > 1 else embd.nbytes

    def predict(placement: Placement) -> Plan:
        """The step this placement makes, predicted."""
        capacities = role_capacities(kept, streaming, placement)  # what the pager allocates for each
        streamed = set(placement.streamed)
        bytes_per_token = sum(payload[u] for u in streamed) + (row_bytes if placement.row_read else 0)
        slots = placement.window_units
        if not streamed:  # the floor counts the mat-vecs and the per-layer work; the step also each unit
            working = sum(step_compute_s[False].values())
            return Plan(placement, mf.weight_bytes, payload, bytes_per_token, compute,
                        bytes_per_token / profile.disk_rate(), 0.0, max(working, 1e-9), floor, profile, None,
                        working)
        # Two ways to share the cores with the reader: compute on every thread or on one thread fewer,
        # each with reads at the rate measured beside it; the faster wins.
        options: list[tuple[float, float, float, int | None, float]] = []
        # Reads into pages mapped anew wait for the kernel to zero them. Whether the reader keeps ahead
        # of compute decides how far it reads ahead, and so which victims' pages it finds.
        ahead = sum(payload[u] for u in streamed) / profile.read_rate_beside_compute(True) < compute
        fresh = fresh_bytes_per_sweep(capacities, order, placement, prefetch, replacement, reader_ahead=ahead)
        fresh_s = {u: fresh.get(u, 0) / profile.fresh_page_bytes_per_s for u in order}
        # the room streamed units read ahead into: the budget less what is kept (slack included)
        room = (budget - sum(capacities[u] for u in placement.pinned + placement.resident)
                if budget is not None and prefetch > 0 else None)
        for fewer in (False, True) if threads > 1 and profile.compute_bytes_per_s_one_fewer else (False,):
            beside = profile.read_rate_beside_compute(fewer)
            alone_s = step_compute_s[fewer]
            kept_share, disk, slowed = profile.compute_kept(fewer), beside, 1.0
            work = sum(alone_s.values())
            # Reads run beside compute only while it computes; while it waits for them they run at the
            # disk's own rate. So the rate is the two blended by compute's share of the step. Compute in
            # turn keeps only part of its speed while reads run: its C seconds of work, overlapped by R
            # seconds of reads, take C + R (1 - kept), or C / kept once reads cover it all. Both are
            # found by iterating until they move by under 0.5% (two or three rounds).
            for _ in range(8):
                compute_s_used = {u: t * slowed for u, t in alone_s.items()}
                read_s = {u: payload[u] / disk + fresh_s[u] for u in order}
                seconds, stall = simulate_step(order, streamed, read_s, compute_s_used, slots,
                                               min(prefetch, slots - 1), capacities, room)
                reading = sum(read_s[u] for u in streamed)
                busy = min(1.0, work * slowed / max(seconds, 1e-9))
                blended = busy * beside + (1 - busy) * profile.disk_rate()
                to_slow = min(1 / kept_share, 1 + reading * (1 - kept_share) / max(work, 1e-12))
                if abs(blended - disk) < 0.005 * disk and abs(to_slow - slowed) < 0.005 * slowed:
                    break
                disk, slowed = blended, to_slow
            options.append((seconds, stall, bytes_per_token / disk, threads - 1 if fewer else None, work * slowed))
        # Leave the reader a core where reads bound the step even on one thread fewer: compute gives
        # up nothing it would not wait out anyway. Elsewhere one thread fewer only where it is
        # clearly faster. (On 7B Q4_0 at 50% and 75% here, alternating runs each way decoded 3-10%
        # faster with a core left; compute on both cores kept about 0.65 of its speed beside the reads.)
        read_bound = len(options) == 2 and options[1][2] >= options[1][4]
        clearly_faster = len(options) == 2 and options[1][0] < 0.99 * options[0][0]
        seconds, stall, reads, compute_threads, working = options[1] if read_bound or clearly_faster else options[0]
        return Plan(placement, mf.weight_bytes, payload, bytes_per_token, compute, reads, stall, max(seconds, 1e-9),
                    floor, profile, compute_threads, working)

    best: Plan | None = None
    # from the smallest window up to a block's streamable units more
    per_block = max((n for g, n in parts.items() if g.startswith("blk.")), default=2) - 1
    windows = [window_units] if window_units else range(1 + prefetch, 1 + prefetch + per_block + 1)
    for slots in windows:
        plan = predict(place(kept, order, budget, pinned, prefetch, embedding, replacement, streaming, slots))
        if best is None or plan.predicted_seconds_per_token < 0.995 * best.predicted_seconds_per_token:
            best = plan
        if not plan.placement.streamed or replacement == "lru" or plan.placement.window_units < slots:
            break  # nothing streams, nothing is kept, or the budget holds no larger window
    assert best is not None
    return best


# -- automatic budget ----------------------------------------------------------------------------


def kv_cache_bytes(mf: ModelFile, n_ctx: int) -> int:
    """Bytes of a float16 KV cache for ``n_ctx`` positions."""
    from pagellm.models.config import ModelArgs

    a = ModelArgs.from_model_file(mf)
    return 2 * a.n_layer * n_ctx * a.n_head_kv * a.head_dim * 2


def auto_budget(mf: ModelFile, n_ctx: int, probe=None, policy: AnyPolicy | None = None,
                headroom_bytes: int = RUNTIME_HEADROOM_BYTES) -> int:
    """Available RAM (cgroup-aware) minus KV cache and runtime headroom; ValueError if the pins cannot fit."""
    from pagellm.offload.pager import LayerPager
    from pagellm.offload.pressure import MemoryProbe

    probe = probe or MemoryProbe()
    available = int(probe.available_ram_bytes())
    kv = kv_cache_bytes(mf, n_ctx)
    budget = available - kv - headroom_bytes
    policy = policy or PinnedHotSet(max(budget, 1))
    units, _, pinned, _ = LayerPager.describe(mf, policy, 4096)
    capacity = {u.name: u.resident_capacity for u in units}
    need = sum(capacity[u] for u in pinned) + max((u.capacity for u in units if u.name not in pinned), default=0)
    if budget < need:
        raise ValueError(
            f"not enough free RAM for {mf.path.name}: {format_size(available)} available, minus KV cache "
            f"{format_size(kv)} and headroom {format_size(headroom_bytes)} leaves {format_size(max(budget, 0))}; "
            f"the pinned set and one streamed layer need {format_size(need)}"
        )
    return min(budget, sum(capacity.values()))
