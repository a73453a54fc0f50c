"""PressureMonitor: shrinks the pager's budget when the machine runs short of memory, and grows it back.

``--ram auto`` sizes the budget from the RAM available at start. Other programs may later want that
memory; rather than let the kernel swap or kill us, a daemon thread polls a MemoryProbe and, when
available memory falls below a low-water mark, lowers the budget by the deficit: the pager evicts idle
unpinned units, so the pages go back to the system at once. Units a forward pass holds are never
evicted, so a generation in progress goes on (slower: more of the model streams). When memory
returns above a high-water mark the budget grows again, up to the budget configured at start, and
the pager reloads units as the sweep meets them.

The two marks give hysteresis: after a shrink, available memory sits near the low mark; growth needs
``high - low`` more to come back, so a probe that wobbles does not make the budget thrash.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pagellm.modelfile import GLOBALS
from pagellm.offload.pager import LayerPager
from pagellm.offload.pressure import MemoryProbe

log = logging.getLogger("pagellm.monitor")
MiB = 1 << 20
MAX_EVENTS = 256  # events kept for stats; older ones are only counted


@dataclass(frozen=True)
class PressureConfig:
    """When to shrink and grow: below ``low_water_bytes`` available, shrink; above ``high_water_bytes``, grow."""

    # The auto budget leaves RUNTIME_HEADROOM_BYTES (256 MiB) for the runtime, which takes ~100-150 MiB
    # of it; what stays available once the budget is full sits above this low mark.
    low_water_bytes: int = 128 * MiB
    high_water_bytes: int = 384 * MiB
    interval_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.low_water_bytes < self.high_water_bytes:
            raise ValueError(f"pressure marks need 0 <= low ({self.low_water_bytes}) < high ({self.high_water_bytes})")
        if self.interval_s <= 0:
            raise ValueError(f"pressure poll interval must be positive, got {self.interval_s}")


@dataclass(frozen=True)
class PressureEvent:
    """One budget change: when (seconds since the monitor started), why, and the numbers."""

    at_s: float
    kind: str  # "shrink" or "grow"
    available_bytes: int
    budget_before: int
    budget_after: int
    resident_before: int
    resident_after: int


@dataclass
class MonitorStats:
    """What the monitor saw and did."""

    polls: int = 0
    shrinks: int = 0
    grows: int = 0
    probe_errors: int = 0
    last_available_bytes: int = 0
    min_available_bytes: int | None = None
    min_budget_bytes: int | None = None
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_EVENTS))

    def as_dict(self) -> dict[str, int | None]:
        """The counters as plain numbers (events left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "events"}


class PressureMonitor:
    """Resizes ``pager``'s budget between its floor and ``max_budget`` as ``probe`` reports memory coming and going."""

    def __init__(self, pager: LayerPager, probe: MemoryProbe, max_budget: int, config: PressureConfig | None = None,
                 on_change: Callable[[int], None] | None = None):
        if pager.budget_bytes is None:
            raise ValueError("a pager without a budget (NoOffload) has nothing to shrink")
        self.pager = pager
        self.probe = probe
        self.config = config or PressureConfig()
        self.on_change = on_change  # called with the new budget after each change (the engine plans again)
        self.max_budget = max(int(max_budget), self.floor_bytes)
        self.stats = MonitorStats()
        self._lock = threading.Lock()  # one poll at a time (the thread, or a caller of poll_once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()

    @property
    def floor_bytes(self) -> int:
        """The smallest budget a forward pass can run in: pinned units, the globals it holds throughout, the largest other unit.

        (The pager's own floor, pinned + largest, forgets that the forward pass holds ``globals``
        while it acquires each block; at that floor the first block cannot load.)
        """
        pager = self.pager
        unpinned = [u for u in pager.units if not pager.is_pinned(u)]
        held_throughout = sum(pager.unit(u).capacity for u in unpinned if pager.unit(u).group == GLOBALS)
        largest = max((pager.unit(u).capacity for u in unpinned if pager.unit(u).group != GLOBALS), default=0)
        return pager.pinned_bytes + held_throughout + largest

    def start(self) -> "PressureMonitor":
        """Start polling in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pagellm-pressure", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (waits for the thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a failing probe must not end the watch or the process
                self.stats.probe_errors += 1
                log.exception("memory pressure poll failed")

    def poll_once(self) -> PressureEvent | None:
        """Read the probe once and shrink or grow the budget if the marks say so; returns the change made."""
        with self._lock:
            available = int(self.probe.available_ram_bytes())
            s = self.stats
            s.polls += 1
            s.last_available_bytes = available
            s.min_available_bytes = available if s.min_available_bytes is None else min(s.min_available_bytes, available)
            budget, resident = self.pager.budget_bytes, self.pager.resident_bytes
            target = self._target(available, budget, resident)
            if target is None or target == budget:
                return None
            after = self.pager.set_budget(target)  # clamps to the floor; evicts idle unpinned units
            if after == budget:
                return None
            kind = "shrink" if after < budget else "grow"
            event = PressureEvent(time.monotonic() - self._started_at, kind, available, budget, after, resident,
                                  self.pager.resident_bytes)
            s.events.append(event)
            if kind == "shrink":
                s.shrinks += 1
            else:
                s.grows += 1
            s.min_budget_bytes = after if s.min_budget_bytes is None else min(s.min_budget_bytes, after)
            log.info("memory pressure: %s budget %d -> %d B (available %d B)", kind, budget, after, available)
            if self.on_change is not None:
                try:
                    self.on_change(after)
                except Exception:  # noqa: BLE001 - the budget changed all the same; the old window still works
                    log.exception("planning for the budget of %d B failed", after)
            return event

    def _target(self, available: int, budget: int, resident: int) -> int | None:
        """The budget the marks ask for, or None to leave it."""
        low, high = self.config.low_water_bytes, self.config.high_water_bytes
        if available < low:
            # Give back the deficit from what is actually held: lowering a budget that is not full
            # would free nothing.
            return max(self.floor_bytes, min(budget, resident) - (low - available))
        if available > high and budget < self.max_budget:
            return min(self.max_budget, budget + (available - high))
        return None

    def summary(self) -> dict[str, object]:
        """Counters, the budget now and its bounds, and the last few events (for stats and /metrics)."""
        return {
            **self.stats.as_dict(),
            "budget_bytes": self.pager.budget_bytes,
            "max_budget_bytes": self.max_budget,
            "floor_bytes": self.floor_bytes,
            "recent_events": [e.__dict__ for e in list(self.stats.events)[-8:]],
        }

    def __enter__(self) -> "PressureMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
