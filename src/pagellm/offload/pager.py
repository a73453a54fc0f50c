"""LayerPager: brings tensor groups of a GGUF file into a fixed RAM budget as the forward pass needs them.

The unit of residency is a *unit*: a part of a GGUF tensor group. A block ``blk.N`` is its vectors
(``blk.N@vectors``: norms and biases, pinned) and row slices of its matrices, which the forward pass
uses one after the other: the attention's q, k, v (``blk.N@attn_in.k``), its output projection
(``blk.N@attn_out.k``), the feed-forward's gate and up (``blk.N@ffn_in.k``) and down
(``blk.N@ffn_out.k``); ``globals`` is one unit; the token embedding and output head, when larger
than a block's largest unit, are slices of their rows (``output@k``). Small units keep the
streaming window small: the unit computing plus the one being read, not two blocks, and the budget
saved stays resident. ``acquire("blk.N")`` still holds a whole block.

Replacement knows the order in which the decode step sweeps the units (``sweep_order``). Evicting the
unit whose next use in that order is furthest away (Belady's rule on a cyclic sweep) keeps a stable
resident subset and streams the rest; LRU, selectable for comparison, evicts exactly the unit the sweep
needs next and so re-reads everything once the loop is larger than the budget.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES

from pagellm.modelfile import GLOBALS, OUTPUT_HEAD, TOKEN_EMBEDDING, ModelFile
from pagellm.offload.cpus import pin_thread
from pagellm.offload.planner import Placement, place, reuse_choice, role_capacities, victim_order
from pagellm.offload.policy import AnyPolicy, PinnedHotSet, format_size
from pagellm.offload.source import (FileSource, ReadPlan, allocate_buffer, buffer_capacity, buffer_mapping,
                                    page_capacity, remap_buffer)

ABSENT, LOADING, RESIDENT = 0, 1, 2
_Load = tuple[ReadPlan, dict[str, np.ndarray]]  # a unit's reads into its buffer and its tensors' views there
REPLACEMENTS = ("auto", "lru")


class PagerError(RuntimeError):
    """The pager cannot do what was asked within its budget (the message gives the numbers)."""


@dataclass(frozen=True)
class Extent:
    """A file range read into a unit's buffer at ``buffer_at``."""

    file_offset: int
    nbytes: int
    buffer_at: int


@dataclass(frozen=True)
class TensorSlice:
    """Rows ``row_start:row_end`` of ``tensor``, found at ``buffer_offset`` in the unit's buffer."""

    tensor: str
    buffer_offset: int
    nbytes: int
    row_start: int
    row_end: int


@dataclass(frozen=True)
class Unit:
    """What the pager loads and evicts as one: its file extents and the tensor slices in them."""

    name: str
    group: str
    extents: tuple[Extent, ...]
    slices: tuple[TensorSlice, ...]
    nbytes: int  # payload bytes (what the model needs)
    capacity: int  # buffer bytes when streamed: one size for every streamed unit (see plan_units)
    resident_capacity: int  # buffer bytes when kept (whole pages only: read once, read speed hardly matters)

    def slice_of(self, tensor: str) -> TensorSlice:
        """The slice of ``tensor`` this unit holds."""
        for s in self.slices:
            if s.tensor == tensor:
                return s
        raise KeyError(f"unit {self.name} holds no part of tensor {tensor!r}")


def _row_bytes(mf: ModelFile, tensor: str) -> int:
    info = mf.tensors[tensor]
    block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
    return info.shape[0] // block_size * type_size


def _n_rows(mf: ModelFile, tensor: str) -> int:
    info = mf.tensors[tensor]
    return int(np.prod(info.shape[1:])) if len(info.shape) > 1 else 1


def _build_unit(mf: ModelFile, name: str, group: str, pieces: list[tuple[str, int, int, int]], alignment: int) -> Unit:
    """Lay out ``pieces`` (tensor, file offset, bytes, rows) as extents in one buffer.

    Pieces adjacent in the file (only alignment padding between them) share one extent and so one read.
    """
    pieces = sorted(pieces, key=lambda p: p[1])
    runs: list[list[tuple[str, int, int, int, int]]] = []
    for tensor, offset, nbytes, row_start in pieces:
        row_end = row_start + nbytes // _row_bytes(mf, tensor)
        if runs:
            last = runs[-1][-1]
            gap = offset - (last[1] + last[2])
            if 0 <= gap < mf.alignment:
                runs[-1].append((tensor, offset, nbytes, row_start, row_end))
                continue
        runs.append([(tensor, offset, nbytes, row_start, row_end)])
    extents, slices, at = [], [], 0
    for run in runs:
        start = run[0][1]
        end = run[-1][1] + run[-1][2]
        a_start = start // alignment * alignment
        a_end = -(-end // alignment) * alignment
        extents.append(Extent(start, end - start, at))
        for tensor, offset, nbytes, row_start, row_end in run:
            slices.append(TensorSlice(tensor, at + offset - a_start, nbytes, row_start, row_end))
        at += a_end - a_start
    return Unit(name, group, tuple(extents), tuple(slices), sum(p[2] for p in pieces), buffer_capacity(at),
                page_capacity(at))


# A block's matrices by the input they take, in the order the forward pass uses them: the attention's
# projections of the normed input, its output projection, the feed-forward's gate and up, its down.
# The forward pass lets each part's units go before it takes the next part's, so the streaming window
# holds units, not blocks: with a 7B Q4_0 block's 36 MiB attention and 24 MiB feed-forward matrices
# cut to ~12 MiB units, a window of two units went from 72 MiB to 24 (see plan_units).
BLOCK_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn_in", ("attn_q", "attn_k", "attn_v")),
    ("attn_out", ("attn_output",)),
    ("ffn_in", ("ffn_gate", "ffn_up")),
    ("ffn_out", ("ffn_down",)),
)
# A block's vectors (norms, biases: a few KiB) are one unit, pinned like the globals: the pass holds it
# through the block, and a streamed unit that small would take a whole streamed buffer.
VECTORS = "vectors"
# Units are cut to about half the largest matrix, and no smaller than this. Each unit costs the
# forward pass 10-12 us (acquire, read-ahead request, release, a kernel call), and a read that
# small still runs at the disk's rate. A smaller unit is a smaller window (two units: the one
# computing and the one being read), and the planner may still choose a window of more of them
# where the reader must run ahead through resident stretches. TinyLlama Q8_0 (largest matrix
# 12 MB), two alternating runs of eight tokens at each setting, 6 MiB units against 12: ms per
# token at 25% 210-226 against 225-228, at 50% 141-144 against 145-147, `pinned` at 50% 171-175
# against 174-179; at 75% `budget` 64-65 against 73-75 (its window 12 MiB against 36), `pinned`
# 83-88 against 85-93; 10-18 MB less read per token. (On an older host with no planner's choice
# of window, 12 MiB had won at 75%.)
MIN_UNIT_BYTES = 6 << 20


def block_part(mf: ModelFile, tensor: str) -> str:
    """Which part of its block a ``blk.N.*`` tensor belongs to: VECTORS for a 1-D tensor, else the
    BLOCK_PARTS name listing its matrix ('' for a matrix no part lists)."""
    if len(mf.tensors[tensor].shape) < 2:
        return VECTORS
    stem = tensor.split(".")[2]
    return next((part for part, stems in BLOCK_PARTS if stem in stems), "")


def part_of_unit(name: str) -> str:
    """The part a block unit holds (``ffn_in`` for ``blk.3@ffn_in.1``; '' for a unit not cut from a block)."""
    return name.partition("@")[2].partition(".")[0] if name.startswith("blk.") else ""


def _cut_rows(mf: ModelFile, tensors: list[str], n: int) -> list[list[tuple[str, int, int, int]]]:
    """Row slices (tensor, file offset, bytes, first row) of ``tensors``, taken in turn, in ``n``
    runs of about equal bytes; a run may end inside a tensor and the next go on from there."""
    total = sum(mf.tensors[t].nbytes for t in tensors)
    runs: list[list[tuple[str, int, int, int]]] = [[]]
    before = 0  # bytes of the tensors already cut
    for t in tensors:
        row_bytes, rows, base = _row_bytes(mf, t), _n_rows(mf, t), mf.tensors[t].offset
        r = 0
        while r < rows:
            j = len(runs) - 1
            end = rows if j == n - 1 else min(rows, max(r, round((total * (j + 1) / n - before) / row_bytes)))
            if end > r:
                runs[-1].append((t, base + r * row_bytes, (end - r) * row_bytes, r))
                r = end
            if r < rows:  # run j ends inside this tensor
                runs.append([])
        before += rows * row_bytes
    return [run for run in runs if run]


def plan_units(mf: ModelFile, alignment: int) -> dict[str, list[Unit]]:
    """Units per group: a block's vectors, then its parts (``BLOCK_PARTS``) cut by rows; the
    embedding/head split by rows.

    Each part is cut into units of about half the largest block matrix (at least MIN_UNIT_BYTES),
    and row slices of the embedding/head are no larger than the largest block unit. A smaller
    unit is a smaller window (the window's bytes are budget not kept, so read each token): a 7B
    Q4_0's reads per token at a 50% budget went from 1939 MB with one unit per part to 1876-1896
    with ~12 MiB units and the budget filled unit by unit; reads that size ran as fast (2.3 GB/s
    here, whole or cut).

    Every unit but the pinned ones (globals, vectors) gets the same streamed buffer size
    (``Unit.capacity``), the largest one's, so a unit streamed in takes an evicted one's buffer as
    it is: sized each to its own unit, a 7B block's parts (36 and 24 MiB) grew and shrank
    victims' buffers on nearly every load (the planner's replay of the pager: 0.9 GB of pages
    mapped anew per token at a 25% budget, each zeroed by the kernel before the read). The window
    then holds ``n`` units in ``n`` times that size.
    """
    units: dict[str, list[Unit]] = {}

    def whole(name: str, group: str, tensors: list[str]) -> Unit:
        pieces = [(t, mf.tensors[t].offset, mf.tensors[t].nbytes, 0) for t in tensors]
        return _build_unit(mf, name, group, pieces, alignment)

    matrices = [mf.tensors[t].nbytes for g in mf.block_groups for t in mf.group(g).tensor_names
                if len(mf.tensors[t].shape) > 1]
    target = max(MIN_UNIT_BYTES, max(matrices, default=0) // 2)
    for group in mf.block_groups:
        names = mf.group(group).tensor_names
        by_part = {part: [t for t in names if block_part(mf, t) == part] for part in (VECTORS, "")}
        for part, stems in BLOCK_PARTS:
            # the part's matrices in the order the part names them (q, k, v)
            by_part[part] = sorted((t for t in names if block_part(mf, t) == part),
                                   key=lambda t: stems.index(t.split(".")[2]))
        if by_part[""] or not all(by_part[part] for part, _ in BLOCK_PARTS) or not by_part[VECTORS]:
            units[group] = [whole(group, group, names)]  # not a llama block: one unit
            continue
        units[group] = [whole(f"{group}@{VECTORS}", group, by_part[VECTORS])]
        for part, _ in BLOCK_PARTS:
            tensors = by_part[part]
            n = max(1, -(-sum(mf.tensors[t].nbytes for t in tensors) // target))
            units[group] += [_build_unit(mf, f"{group}@{part}.{k}", group, run, alignment)
                             for k, run in enumerate(_cut_rows(mf, tensors, n))]
    block_units = [u.nbytes for us in units.values() for u in us if part_of_unit(u.name) != VECTORS]
    others = [mf.group_bytes(g) for g in mf.groups if g not in units]
    max_slice = max(block_units) if block_units else max(others, default=0)
    for group in mf.groups:
        if group in units:
            continue
        info = mf.group(group)
        splittable = group in (TOKEN_EMBEDDING, OUTPUT_HEAD) and len(info.tensor_names) == 1
        if not splittable or info.nbytes <= max_slice:
            units[group] = [whole(group, group, info.tensor_names)]
            continue
        tensor = info.tensor_names[0]
        row_bytes, n_rows = _row_bytes(mf, tensor), _n_rows(mf, tensor)
        rows_per_part = max(1, max_slice // row_bytes)
        base = mf.tensors[tensor].offset
        parts = []
        for k, r0 in enumerate(range(0, n_rows, rows_per_part)):
            r1 = min(n_rows, r0 + rows_per_part)
            piece = (tensor, base + r0 * row_bytes, (r1 - r0) * row_bytes, r0)
            parts.append(_build_unit(mf, f"{group}@{k}", group, [piece], alignment))
        units[group] = parts
    streamable = [u.capacity for us in units.values() for u in us if not always_pinned(u)]
    if streamable:
        shared = max(streamable)
        units = {g: [u if always_pinned(u) else dataclasses.replace(u, capacity=shared) for u in us]
                 for g, us in units.items()}
    return {g: units[g] for g in mf.groups}


def always_pinned(unit: Unit) -> bool:
    """Units every policy pins: the globals and each block's vectors (held while whole passes or blocks run)."""
    return unit.group == GLOBALS or part_of_unit(unit.name) == VECTORS


def pinned_groups(mf: ModelFile, policy: AnyPolicy) -> list[str]:
    """The groups a policy pins: the globals always; embeddings, output head and last N blocks as declared.

    The globals (output norm, rope factors: a few KiB) are held for the whole forward pass while
    each block loads, so they are pinned under every policy rather than competing for the budget.
    """
    pinned: list[str] = [GLOBALS] if GLOBALS in mf.groups else []
    if not isinstance(policy, PinnedHotSet):
        return pinned
    head = OUTPUT_HEAD if OUTPUT_HEAD in mf.groups else TOKEN_EMBEDDING
    if policy.pin_embeddings and TOKEN_EMBEDDING in mf.groups:
        pinned.append(TOKEN_EMBEDDING)
    if policy.pin_output_head and head in mf.groups and head not in pinned:
        pinned.append(head)
    blocks = mf.block_groups
    return pinned + blocks[len(blocks) - min(policy.pin_last_n_layers, len(blocks)) :]


def sweep_order(mf: ModelFile, units_by_group: Mapping[str, list[Unit]]) -> list[str]:
    """Units in the order one decode step acquires them (the token embedding is read by rows)."""
    head = OUTPUT_HEAD if OUTPUT_HEAD in mf.groups else TOKEN_EMBEDDING
    groups = ([GLOBALS] if GLOBALS in mf.groups else []) + mf.block_groups + ([head] if head in mf.groups else [])
    return [u.name for g in groups for u in units_by_group[g]]


@dataclass
class PagerStats:
    """Counters of one pager; ``reset()`` zeroes them (peak restarts from what is resident now)."""

    acquires: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0  # whole-unit loads: misses, completed prefetches, pinned loads
    evictions: int = 0
    prefetches_issued: int = 0
    prefetches_completed: int = 0
    prefetches_used: int = 0
    prefetches_skipped: int = 0
    stall_seconds: float = 0.0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    row_reads: int = 0  # single rows read straight from the file (token embeddings)
    row_bytes_read: int = 0
    # loads into newly mapped pages (the kernel faults and zeroes them: here a read into fresh
    # pages ran at 1.9 GB/s against 2.8 into reused ones) and into a victim's buffer
    fresh_buffer_bytes: int = 0
    reused_buffer_bytes: int = 0
    reads_by_unit: collections.Counter = field(default_factory=collections.Counter)
    bytes_by_kind: collections.Counter = field(default_factory=collections.Counter)  # miss/prefetch/pin

    def reset(self) -> None:
        """Zero the counters; resident bytes stay as they are."""
        resident = self.resident_bytes
        fresh = PagerStats(resident_bytes=resident, peak_resident_bytes=resident)
        self.__dict__.update(fresh.__dict__)

    def snapshot(self) -> "PagerStats":
        """A copy that later activity does not change."""
        copy = PagerStats(**{k: v for k, v in self.__dict__.items()})
        copy.reads_by_unit = collections.Counter(self.reads_by_unit)
        copy.bytes_by_kind = collections.Counter(self.bytes_by_kind)
        return copy

    @property
    def hit_rate(self) -> float:
        """Hits over acquires (1.0 before any acquire)."""
        return self.hits / self.acquires if self.acquires else 1.0


class _Entry:
    __slots__ = ("unit", "state", "refs", "holders", "pinned", "buffer", "views", "prefetched", "last_use", "waiters",
                 "held")

    def __init__(self, unit: Unit, pinned: bool):
        self.unit = unit
        self.state = ABSENT
        self.refs = 0
        self.holders: collections.Counter = collections.Counter()  # thread id -> holds
        self.pinned = pinned
        self.buffer: np.ndarray | None = None
        self.views: dict[str, np.ndarray] = {}
        self.prefetched = False
        self.last_use = 0
        self.waiters = 0  # threads waiting in acquire for its read to finish: not a victim meanwhile
        self.held = 0  # buffer bytes reserved for it (counted in the budget) while loading or resident


class LayerPager:
    """Keeps at most ``budget_bytes`` of units resident; see the module docstring."""

    def __init__(
        self,
        mf: ModelFile,
        budget_bytes: int | None,
        pinned_groups: Sequence[str] = (),
        replacement: str = "auto",
        io_mode: str = "auto",
        source: FileSource | None = None,
        prefetch_n_ahead: int = 0,
        window_units: int | None = None,
    ):
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement {replacement!r}: expected one of {', '.join(REPLACEMENTS)}")
        self.model_file = mf
        self.replacement = replacement
        self.prefetch_n_ahead = prefetch_n_ahead
        self.window_units = window_units  # streamed units the window holds (None: 1 + prefetch)
        self.source = source or FileSource(mf.path, io_mode)
        self._units_by_group = plan_units(mf, self.source.alignment)
        self._entries: dict[str, _Entry] = {}
        for group, units in self._units_by_group.items():
            for unit in units:
                self._entries[unit.name] = _Entry(unit, pinned=group in pinned_groups or always_pinned(unit))
        self.sweep_order = sweep_order(mf, self._units_by_group)
        self._group_of_tensor = {s.tensor: g for g, us in self._units_by_group.items() for u in us for s in u.slices}
        self._order_index = {name: i for i, name in enumerate(self.sweep_order)}
        self._position = -1
        self._tick = 0
        self._budget = budget_bytes
        self._held_bytes = 0
        # Counts the events that can make room for a read-ahead (a streamed unit let go or evicted, a
        # new placement): the reader is woken, and retries a read-ahead, only when one happened (each
        # try sorts the victims: on the 7B, 230 tries per token at 0.2 ms each held the GIL).
        self._freed = 0
        # Sweep units in RAM: once all are, a read-ahead request has nothing to find (in RAM, the scan
        # along the sweep for one took 0.13 ms per unit, 18 ms of TinyLlama's 90 ms token).
        self._sweep_in_ram = 0
        self._room_waiters = 0  # acquires waiting for room in the budget (any unit let go may give it)
        self.stats = PagerStats()
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        self._closed = False
        self._reader: threading.Thread | None = None
        # A read-ahead reserved by the thread that let a streamed unit go, for the reader to start the
        # moment its current read lands: the search and the evictions it takes then run on the forward
        # pass's side, not between the reader's reads, where each of its ~100 us left the disk idle.
        self._armed: tuple[_Entry, np.ndarray, _Load] | None = None
        self._reader_cpus: frozenset[int] | None = None
        self._check_budget_fits()
        self.placement = self._place()
        self._load_pinned()

    # -- construction --------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        mf: ModelFile,
        policy: AnyPolicy,
        replacement: str = "auto",
        io_mode: str = "auto",
        source: FileSource | None = None,
    ) -> "LayerPager":
        """A pager for ``policy``; NoOffload gives a ResidentStore (everything loaded once)."""
        if policy.is_disabled():
            return ResidentStore(mf, io_mode=io_mode, source=source)
        return cls(
            mf,
            policy.ram_budget_bytes(),
            pinned_groups=pinned_groups(mf, policy),
            replacement=replacement,
            io_mode=io_mode,
            source=source,
            prefetch_n_ahead=policy.prefetch_n_ahead if isinstance(policy, PinnedHotSet) else 1,
        )

    @staticmethod
    def describe(mf: ModelFile, policy: AnyPolicy, alignment: int) -> tuple[list[Unit], list[str], list[str], int]:
        """What a pager for ``policy`` would work with: units, sweep order, pinned units, prefetch depth."""
        by_group = plan_units(mf, alignment)
        pinned = set(mf.groups) if policy.is_disabled() else set(pinned_groups(mf, policy))
        units = [u for us in by_group.values() for u in us]
        prefetch = policy.prefetch_n_ahead if isinstance(policy, PinnedHotSet) else 1
        pinned_units = [u.name for u in units if u.group in pinned or always_pinned(u)]
        return units, sweep_order(mf, by_group), pinned_units, prefetch

    def _check_budget_fits(self) -> None:
        if self._budget is None:
            return
        pinned = self.pinned_bytes
        largest = max((e.unit.capacity for e in self._entries.values() if not e.pinned), default=0)
        if pinned + largest > self._budget:
            what = "the pinned set" if pinned > self._budget else "the pinned set plus the largest group"
            raise PagerError(
                f"budget {format_size(self._budget)} ({self._budget} B) is too small: {what} needs "
                f"{format_size(pinned + (largest if pinned <= self._budget else 0))} "
                f"(pinned {pinned} B + largest unpinned group {largest} B)"
            )

    def _place(self) -> Placement:
        """The planner's placement for the current budget (LRU, for comparison, keeps no resident set)."""
        kept = {n: e.unit.resident_capacity for n, e in self._entries.items()}
        streamed = {n: e.unit.capacity for n, e in self._entries.items()}
        pinned = [n for n, e in self._entries.items() if e.pinned]
        embedding = [u.name for u in self._units_by_group.get(TOKEN_EMBEDDING, [])]
        placement = place(kept, self.sweep_order, self._budget, pinned, self.prefetch_n_ahead, embedding,
                          self.replacement, stream_units=streamed, window_units=self.window_units)
        self._capacity = role_capacities(kept, streamed, placement)
        self._keep = frozenset(placement.resident)
        # the units a read-ahead may take the buffer of: neither pinned nor kept resident; of those,
        # the ones in RAM (a few: the window) are the only ones it looks at
        self._streamed_in_ram = dict.fromkeys(  # ordered
            e for n, e in self._entries.items() if not e.pinned and n not in self._keep and e.state == RESIDENT)
        self._freed += 1  # the rules changed: what could not be made room for may be now
        return placement

    def _load_pinned(self) -> None:
        for entry in self._entries.values():
            if entry.pinned:
                with self._cond:
                    buffer = self._reserve(entry, for_prefetch=False)
                    assert buffer is not None, "pinned set was checked to fit"
                    entry.state = LOADING
                self._finish_load(entry, buffer, kind="pin")

    # -- what callers see ----------------------------------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        """The budget in force (None: unbounded)."""
        return self._budget

    @property
    def pinned_bytes(self) -> int:
        """Buffer bytes of the pinned units."""
        return sum(e.unit.resident_capacity for e in self._entries.values() if e.pinned)

    @property
    def resident_bytes(self) -> int:
        """Buffer bytes held now: resident and in flight."""
        return self._held_bytes

    @property
    def io_mode(self) -> str:
        """'direct', 'buffered' or 'mmap'."""
        return self.source.mode

    @property
    def units(self) -> list[str]:
        """All unit names."""
        return list(self._entries)

    def unit(self, name: str) -> Unit:
        """The unit called ``name``."""
        return self._entry(name).unit

    def buffer_bytes(self, name: str) -> int:
        """Bytes a buffer for unit ``name`` takes under the placement in force (kept or streamed size)."""
        return self._capacity[self._entry(name).unit.name]

    def units_of(self, group: str) -> list[str]:
        """Unit names of a model-file group, in row order."""
        try:
            return [u.name for u in self._units_by_group[group]]
        except KeyError:
            raise KeyError(f"no group {group!r} in {self.model_file.path}") from None

    def is_pinned(self, name: str) -> bool:
        """Whether unit ``name`` (every unit of block ``blk.N``) is pinned."""
        return all(self._entry(n).pinned for n in self._parts(name) or [name])

    def is_resident(self, name: str) -> bool:
        """Whether unit ``name`` (every unit of block ``blk.N``) is resident now."""
        return all(self._entry(n).state == RESIDENT for n in self._parts(name) or [name])

    def resident_units(self) -> list[str]:
        """Names of the units resident now."""
        with self._cond:
            return [n for n, e in self._entries.items() if e.state == RESIDENT]

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no unit {name!r} (units: {', '.join(self._entries)})") from None

    # -- acquire / release ---------------------------------------------------------------

    def _parts(self, name: str) -> list[str] | None:
        """The units of block group ``name`` when it is held as a whole; None for a unit name."""
        if name in self._entries:
            return None
        units = self._units_by_group.get(name)
        if units and name.startswith("blk."):
            return [u.name for u in units]
        self._entry(name)  # raises the KeyError that lists the units
        return None

    def acquire(self, name: str) -> Mapping[str, np.ndarray]:
        """Hold unit ``name`` (or every unit of block ``blk.N``) and return its tensors (name -> uint8 view)."""
        parts = self._parts(name)
        if parts is not None:
            views: dict[str, np.ndarray] = {}
            held: list[str] = []
            try:
                for part in parts:
                    views.update(self.acquire(part))
                    held.append(part)
            except BaseException:
                for part in held:
                    self.release(part)
                raise
            return views
        entry = self._entry(name)
        me = threading.get_ident()
        t0 = time.perf_counter()
        waited = False
        with self._cond:
            if self._closed:
                raise PagerError("the pager is closed")
            self.stats.acquires += 1
            if name in self._order_index:
                self._position = self._order_index[name]
            while True:
                if entry.state == RESIDENT:
                    self.stats.hits += 1
                    if entry.prefetched:
                        self.stats.prefetches_used += 1
                        entry.prefetched = False
                    self._hold(entry, me)
                    if waited:
                        self.stats.stall_seconds += time.perf_counter() - t0
                    return entry.views
                if entry.state == LOADING:
                    waited = True
                    entry.waiters += 1
                    try:
                        self._cond.wait()
                    finally:
                        entry.waiters -= 1
                    continue
                buffer = self._reserve(entry, for_prefetch=False)
                if buffer is not None:
                    entry.state = LOADING
                    break
                self._raise_if_stuck(entry, me)
                waited = True
                self._room_waiters += 1
                try:
                    self._cond.wait(timeout=1.0)
                finally:
                    self._room_waiters -= 1
        views = self._finish_load(entry, buffer, kind="miss", holder=me)
        with self._cond:
            self.stats.stall_seconds += time.perf_counter() - t0
        return views

    def release(self, name: str) -> None:
        """Let unit ``name`` (or block ``blk.N``) go: evictable again once no one holds it, unless pinned."""
        parts = self._parts(name)
        if parts is not None:
            for part in parts:
                self.release(part)
            return
        entry = self._entry(name)
        me = threading.get_ident()
        with self._cond:
            if entry.refs <= 0 or entry.holders[me] <= 0:
                raise PagerError(f"release of {name} which this thread does not hold")
            entry.refs -= 1
            entry.holders[me] -= 1
            if not entry.holders[me]:
                del entry.holders[me]
            freed = self._freed
            if self._stale(entry):
                self._evict(entry)  # read into a buffer for the role it had before the placement changed
            if not entry.refs and not entry.pinned and name not in self._keep:
                self._freed += 1  # a streamed unit let go: a read-ahead may take its buffer now
                self._arm_read_ahead()
            # Wake the reader only when it may find room, and acquires waiting for room when a unit
            # is let go: a woken reader takes the GIL from the forward pass (on the 7B in RAM,
            # notifying every release cost 70 us per release, 23 ms per token).
            if self._freed != freed or (not entry.refs and self._room_waiters):
                self._cond.notify_all()

    @contextmanager
    def hold(self, name: str) -> Iterator[Mapping[str, np.ndarray]]:
        """``with pager.hold(name) as tensors:`` acquire on entry, release on exit."""
        views = self.acquire(name)
        try:
            yield views
        finally:
            self.release(name)

    def _hold(self, entry: _Entry, me: int) -> None:
        entry.refs += 1
        entry.holders[me] += 1
        self._tick += 1
        entry.last_use = self._tick

    def _raise_if_stuck(self, entry: _Entry, me: int) -> None:
        """Fail rather than wait forever when only this thread's own holds block the load."""
        if any(e.state == LOADING or e.waiters for e in self._entries.values()):
            return  # a read in flight, or another thread about to hold what a read just brought in
        others = [e for e in self._entries.values() if e.refs and set(e.holders) - {me}]
        if others:
            return
        held = [e.unit.name for e in self._entries.values() if e.refs and not e.pinned]
        raise PagerError(
            f"cannot load {entry.unit.name} ({self.buffer_bytes(entry.unit.name)} B): budget {self._budget} B is taken by "
            f"pinned {self.pinned_bytes} B and units this thread holds: {', '.join(held) or 'none'}"
        )

    # -- budget and replacement ----------------------------------------------------------

    def _distance(self, name: str) -> int:
        """Acquires until the sweep next needs ``name`` (units outside the sweep: never)."""
        idx = self._order_index.get(name)
        if idx is None:
            return len(self._order_index)
        return (idx - self._position - 1) % len(self._order_index)

    def _victims(self, prefetching: _Entry | None = None) -> list[_Entry]:
        """Idle unpinned resident units, best victim first.

        Units the placement keeps resident go last (only random access, never the sweep, reaches
        them), and a prefetch never takes them, nor a unit the sweep needs before the one it brings.
        """
        # A read-ahead takes no kept unit, so it need only look among the streamed ones in RAM (on
        # the 7B, scanning all 163 streamed units took 57 us of the reader's ~140 between reads).
        pool = self._streamed_in_ram if prefetching is not None else self._entries.values()
        idle = {e.unit.name: e for e in pool if e.state == RESIDENT and not e.refs and not e.pinned and not e.waiters}
        order = victim_order(list(idle), self._keep, self._distance,
                             {n: e.last_use for n, e in idle.items()}, self.replacement,
                             prefetching.unit.name if prefetching is not None else None)
        return [idle[n] for n in order]

    def _reserve(self, entry: _Entry, for_prefetch: bool) -> np.ndarray | None:
        """Make room for ``entry`` and return its buffer, or None (evicting nothing) if impossible now."""
        need = self._capacity[entry.unit.name]  # by its role in the placement: kept or streamed
        if self._budget is None or self._held_bytes + need <= self._budget:
            self._account(need)
            entry.held = need
            self.stats.fresh_buffer_bytes += need
            return allocate_buffer(need)
        chosen, freed = [], 0
        for victim in self._victims(entry if for_prefetch else None):
            if self._held_bytes - freed + need <= self._budget:
                break
            chosen.append(victim)
            freed += victim.held
        if self._held_bytes - freed + need > self._budget:
            return None
        # Read into pages the process already holds where it can (reuse_choice says whose).
        donors = [v.buffer for v in chosen if v.buffer is not None]
        pick = reuse_choice(need, [b.nbytes for b in donors])
        donor = donors[pick] if pick is not None else None
        del donors
        for victim in chosen:
            self._evict(victim)  # drops the pager's arrays over the victims' pages
        self._account(need)
        entry.held = need
        if donor is not None and donor.nbytes == need:
            self.stats.reused_buffer_bytes += need
            return donor
        if donor is not None:
            donor_bytes, mapping = donor.nbytes, buffer_mapping(donor)
            del donor  # the last array over its pages, so they may move
            remapped = remap_buffer(mapping, need) if mapping is not None else None
            if remapped is not None:
                self.stats.reused_buffer_bytes += min(need, donor_bytes)
                self.stats.fresh_buffer_bytes += max(0, need - donor_bytes)
                return remapped
        self.stats.fresh_buffer_bytes += need
        return allocate_buffer(need)

    def _stale(self, entry: _Entry) -> bool:
        """Whether an idle resident unit's buffer has the size of a role the placement no longer gives it
        (one held at a placement change, or loading through it, is let go on its release)."""
        return (entry.state == RESIDENT and not entry.refs and not entry.pinned and not entry.waiters
                and entry.held != self._capacity[entry.unit.name])

    def _evict(self, entry: _Entry) -> None:
        if entry.state == RESIDENT and entry.unit.name in self._order_index:
            self._sweep_in_ram -= 1
        self._streamed_in_ram.pop(entry, None)
        entry.state = ABSENT
        entry.buffer = None
        entry.views = {}
        entry.prefetched = False
        self._held_bytes -= entry.held
        entry.held = 0
        self.stats.resident_bytes = self._held_bytes
        self.stats.evictions += 1
        self._freed += 1

    def _account(self, nbytes: int) -> None:
        self._held_bytes += nbytes
        self.stats.resident_bytes = self._held_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self._held_bytes)

    def set_budget(self, ram_bytes: int) -> int:
        """Change the budget (never below pinned + largest unit); evict idle units to fit. Returns it."""
        with self._cond:
            if self._budget is None:
                raise PagerError("a resident store has no budget to change")
            largest = max((e.unit.capacity for e in self._entries.values() if not e.pinned), default=0)
            self._budget = max(int(ram_bytes), self.pinned_bytes + largest)
            self._place_anew()
            return self._budget

    def set_window_units(self, n: int) -> None:
        """Keep a window of ``n`` streamed units (the planner's choice) and place the rest anew."""
        with self._cond:
            if self._budget is None:
                raise PagerError("a resident store has no window")
            self.window_units = n
            self._place_anew()

    def _place_anew(self) -> None:
        """Place anew for the current budget and window; evict idle units to fit, and those whose
        buffer was sized for the role they no longer have (kept units are exact, streamed ones share
        the largest's size), to be read again into a buffer of the right size."""
        self.placement = self._place()
        for entry in self._entries.values():
            if self._stale(entry):
                self._evict(entry)
        for victim in self._victims():
            if self._held_bytes <= self._budget:
                break
            self._evict(victim)
        self._cond.notify_all()

    # -- reading -------------------------------------------------------------------------

    def _prepare(self, unit: Unit, buffer: np.ndarray) -> _Load:
        """The reads that bring ``unit`` into ``buffer`` and its tensors' views there, made before the read."""
        plan = self.source.plan([(e.file_offset, e.nbytes, e.buffer_at) for e in unit.extents], buffer)
        return plan, {s.tensor: buffer[s.buffer_offset : s.buffer_offset + s.nbytes] for s in unit.slices}

    def _finish_load(self, entry: _Entry, buffer: np.ndarray, kind: str, holder: int | None = None,
                     then: Callable[[], None] | None = None, load: _Load | None = None) -> dict[str, np.ndarray]:
        """Read a reserved unit (state LOADING) outside the lock and publish it (then run ``then`` under the lock);
        ``load``: its reads and views, if prepared already."""
        try:
            plan, views = load if load is not None else self._prepare(entry.unit, buffer)
            self.source.run(plan)
        except BaseException:
            with self._cond:
                self._unreserve(entry)
            raise
        with self._cond:
            entry.buffer, entry.views, entry.state = buffer, views, RESIDENT
            if entry.unit.name in self._order_index:
                self._sweep_in_ram += 1
            if not entry.pinned and entry.unit.name not in self._keep:
                self._streamed_in_ram[entry] = None
            self.stats.bytes_read += entry.unit.nbytes
            self.stats.bytes_by_kind[kind] += entry.unit.nbytes
            self.stats.reads_by_unit[entry.unit.name] += 1
            if kind == "miss":
                self.stats.misses += 1
                self._hold(entry, holder)
            elif kind == "prefetch":
                entry.prefetched = True
                self.stats.prefetches_completed += 1
            if then is not None:
                then()
            self._cond.notify_all()
        return views

    # -- prefetch ------------------------------------------------------------------------

    def set_reader_cpus(self, cpus: Collection[int] | None) -> None:
        """Run the background reader on ``cpus`` (None: wherever the scheduler puts it), now or once it starts."""
        with self._cond:
            self._reader_cpus = frozenset(cpus) if cpus else None
            reader = self._reader
        if reader is not None and reader.native_id is not None and self._reader_cpus:
            pin_thread(reader.native_id, self._reader_cpus)

    @property
    def reader_cpus(self) -> frozenset[int] | None:
        """The CPUs the reader is kept on (None: not pinned)."""
        return self._reader_cpus

    def prefetch(self, names: Sequence[str]) -> None:
        """Ask the background reader to bring these units in, within the budget (skipped if no room)."""
        names = [n for name in names for n in self._parts(name) or [name]]
        with self._cond:
            queued = len(self._queue)
            for name in names:
                entry = self._entry(name)
                if entry.state == ABSENT and name not in self._queued:
                    self._queue.append(name)
                    self._queued.add(name)
            if self._queue and self._reader is None and not self._closed:
                self._reader = threading.Thread(target=self._reader_loop, name="pagellm-prefetch", daemon=True)
                self._reader.start()
            if len(self._queue) != queued:  # new work for the reader (else waking it costs the GIL for nothing)
                self._cond.notify_all()

    def prefetch_after(self, name: str, n: int | None = None) -> None:
        """Prefetch the next ``n`` (default: the policy's) units after ``name`` in the sweep that are not in RAM.

        Skipping resident units lets the reader run ahead through a run of them, so the disk keeps
        working while they compute.
        """
        n = self.prefetch_n_ahead if n is None else n
        name = (self._parts(name) or [name])[-1]
        idx = self._order_index.get(name)
        if idx is None or n <= 0 or self._sweep_in_ram == len(self._order_index):
            return
        order = self.sweep_order
        wanted: list[str] = []
        with self._cond:
            for k in range(1, len(order)):
                candidate = order[(idx + k) % len(order)]
                if self._entries[candidate].state != RESIDENT:
                    wanted.append(candidate)
                    if len(wanted) == n:
                        break
        self.prefetch(wanted)

    def _reader_loop(self) -> None:
        """Serve queued prefetches; between them, read ahead along the sweep as room frees.

        After each prefetch the reader takes the next unit of the sweep that is not in RAM as its
        read-ahead and starts it the moment the window has room for it (when the unit before it
        is released), instead of waiting for the forward pass to reach that unit and ask. On a
        sweep that streams, the disk then never idles between the unit in use and the next.
        Where the forward pass lets a streamed unit go, it reserves the next read itself (``_armed``),
        and the reader takes that as its last read lands: from one read to the next the reader then
        only publishes (TinyLlama `pinned` at 50%: 52-68 us between reads, 140-156 in runs alternated with
        the reader searching itself).
        Such a read goes first, then queued requests, then the reader's own read-ahead, which is
        dropped once the sweep reaches it.
        """
        with self._cond:
            cpus = self._reader_cpus
        if cpus:
            pin_thread(0, cpus)
        ahead: str | None = None
        blocked: tuple[str, int] | None = None  # the read-ahead that last found no room, and self._freed then
        job: tuple[_Entry, np.ndarray, _Load] | None = None  # armed while the last read landed: read it at once

        def landed(done: _Entry) -> None:
            """Under the lock that publishes ``done``: the armed read-ahead if there is one, else the next
            unit of the sweep not in RAM as the read-ahead to try."""
            nonlocal ahead, job
            if self._closed:
                return  # the loop's next turn returns, giving back what is armed
            job, self._armed = self._armed, None
            ahead = None if job is not None else self._next_absent_after(done.unit.name)

        while True:
            if job is None:
                with self._cond:
                    entry = load = None
                    while entry is None and not self._closed:
                        if self._armed is not None:  # reserved and marked loading by whoever armed it
                            (entry, buffer, load), self._armed = self._armed, None
                        elif self._queue:
                            name = self._queue.popleft()
                            self._queued.discard(name)
                            entry = self._entries[name]
                            if entry.state != ABSENT:  # read already (or by the read-ahead): nothing to do
                                entry = None
                                continue
                            ahead = None
                            buffer = self._reserve(entry, for_prefetch=True)
                            if buffer is None:
                                self.stats.prefetches_skipped += 1
                                if name == self._next_absent_after_position():
                                    ahead = name  # the unit the sweep needs next: read it as room frees
                                    blocked = (name, self._freed)
                                entry = None
                            else:
                                self._start_loading(entry)
                        elif ahead is not None and self._entries[ahead].state == ABSENT and self._ahead_of_sweep(ahead):
                            if blocked == (ahead, self._freed):  # nothing let go since it last found no room
                                self._cond.wait()
                                continue
                            entry = self._entries[ahead]
                            buffer = self._reserve(entry, for_prefetch=True)
                            if buffer is None:  # no room until a unit in use is released
                                entry = None
                                blocked = (ahead, self._freed)
                                self._cond.wait()
                            else:
                                self._start_loading(entry)
                        else:
                            ahead = None
                            self._cond.wait()
                    if self._closed:
                        self._disarm()
                        return
            else:
                (entry, buffer, load), job = job, None  # no lock and no search between the two reads
            try:
                self._finish_load(entry, buffer, kind="prefetch", then=lambda: landed(entry), load=load)
            except Exception:
                buffer = load = None
                # The acquire that needs it reads again and reports the error. No read-ahead after a
                # failed read: on a failing disk it would walk the sweep retrying every unit, and the
                # reader would never be idle (a step that failed could not settle).
                ahead = None
                with self._cond:
                    self._disarm()
                continue
            buffer = load = None  # the plan's views must not outlive the read: they pin a donor's pages (_reserve)

    def _start_loading(self, entry: _Entry) -> None:
        """Mark a unit whose buffer is reserved as being read by the reader."""
        entry.state = LOADING
        self.stats.prefetches_issued += 1

    def _arm_read_ahead(self) -> None:
        """Under the lock: reserve the next unit of the sweep not in RAM for the reader, if there is room."""
        if self._armed is not None or self._reader is None or self._closed or self.prefetch_n_ahead <= 0:
            return
        if self._position < 0 or self._sweep_in_ram == len(self._order_index):
            return
        order = self.sweep_order
        for k in range(1, len(order)):
            entry = self._entries[order[(self._position + k) % len(order)]]
            if entry.state == ABSENT:
                break
        else:
            return
        buffer = self._reserve(entry, for_prefetch=True)
        if buffer is None:
            return
        try:  # laid out here, where the forward pass lets a unit go, not between the reader's reads
            load = self._prepare(entry.unit, buffer)
        except Exception:  # the acquire that needs the unit reads it and reports why
            self._unreserve(entry)
            return
        self._start_loading(entry)
        self._armed = (entry, buffer, load)

    def _disarm(self) -> None:
        """Under the lock: give back an armed read-ahead's reservation unread (closing, or the disk failing)."""
        if self._armed is not None:
            (entry, _, _), self._armed = self._armed, None
            self._unreserve(entry)

    def _unreserve(self, entry: _Entry) -> None:
        """Under the lock: a unit reserved for a read that will not land goes back to absent, its bytes freed."""
        entry.state = ABSENT
        self._held_bytes -= entry.held
        entry.held = 0
        self.stats.resident_bytes = self._held_bytes
        self._cond.notify_all()

    def _next_absent_after_position(self) -> str | None:
        """The first unit not resident after the one the sweep acquired last."""
        return self._next_absent_after(self.sweep_order[self._position]) if self._position >= 0 else None

    def _next_absent_after(self, name: str) -> str | None:
        """The first unit after ``name`` in the sweep that is not resident (None outside the sweep)."""
        idx = self._order_index.get(name)
        if idx is None or self.prefetch_n_ahead <= 0:
            return None
        order = self.sweep_order
        for k in range(1, len(order)):
            candidate = order[(idx + k) % len(order)]
            if self._entries[candidate].state == ABSENT:
                return candidate
            if self._entries[candidate].state == LOADING:
                return None  # someone is reading it: the sweep is there already
        return None

    def _ahead_of_sweep(self, name: str) -> bool:
        """Whether the sweep has yet to reach ``name`` within this pass (so reading it ahead is of use)."""
        return name in self._order_index and self._distance(name) < len(self._order_index) - 1

    # -- rows read directly --------------------------------------------------------------

    def read_rows(self, tensor: str, rows: Sequence[int]) -> np.ndarray:
        """Raw bytes of the given rows of ``tensor`` (uint8 [len(rows), row_bytes]).

        Served from RAM when the unit holding a row is resident, otherwise read straight from the
        file: one token's embedding row is a few KiB, far cheaper than keeping the table resident.
        """
        mf = self.model_file
        row_bytes, n_rows = _row_bytes(mf, tensor), _n_rows(mf, tensor)
        group = self._group_of_tensor[tensor]
        out = np.empty((len(rows), row_bytes), dtype=np.uint8)
        base = mf.tensors[tensor].offset
        scratch = None
        for i, row in enumerate(rows):
            if not 0 <= row < n_rows:
                raise IndexError(f"row {row} of {tensor} out of range 0..{n_rows - 1}")
            if self._copy_resident_row(group, tensor, int(row), row_bytes, out[i]):
                continue
            if scratch is None:
                scratch = allocate_buffer(self.source.buffer_bytes(0, row_bytes) + self.source.alignment)
            out[i] = self.source.read_into(base + int(row) * row_bytes, row_bytes, scratch)
            with self._cond:
                self.stats.row_reads += 1
                self.stats.row_bytes_read += row_bytes
        return out

    def _copy_resident_row(self, group: str, tensor: str, row: int, row_bytes: int, out: np.ndarray) -> bool:
        with self._cond:
            for unit in self._units_by_group[group]:
                s = unit.slice_of(tensor)
                if s.row_start <= row < s.row_end:
                    entry = self._entries[unit.name]
                    if entry.state != RESIDENT:
                        return False
                    at = (row - s.row_start) * row_bytes
                    out[:] = entry.views[tensor][at : at + row_bytes]
                    return True
        return False

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reader, drop every buffer and close the file."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._reader is not None:
            self._reader.join()
        with self._cond:
            for entry in self._entries.values():
                if entry.state == RESIDENT:
                    self._evict(entry)
        self.source.close()

    def __enter__(self) -> "LayerPager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ResidentStore(LayerPager):
    """NoOffload: every unit is read once at load and stays; same acquire/release interface, no budget."""

    def __init__(self, mf: ModelFile, io_mode: str = "auto", source: FileSource | None = None):
        super().__init__(mf, None, pinned_groups=list(mf.groups), io_mode=io_mode, source=source)

    def prefetch(self, names: Sequence[str]) -> None:
        """Nothing to fetch: everything is resident."""
