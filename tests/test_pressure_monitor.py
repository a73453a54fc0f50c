"""Memory pressure under --ram auto: the budget shrinks when available memory falls and grows back when it returns.

A fake probe models a machine: available = what the machine has for us - what the pager holds, so the
pager's evictions give memory back just as they do for real.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from shared_paths import models_dir

from pagellm.cli import EngineOptions
from pagellm.engine import EngineConfig, InferenceEngine
from pagellm.modelfile import ModelFile
from pagellm.offload import Budget
from pagellm.offload.monitor import PressureConfig, PressureMonitor
from pagellm.offload.pager import LOADING, LayerPager
from pagellm.offload.pressure import FakeMemoryProbe
from pagellm.sampling import SamplerConfig

MODEL = models_dir() / "stories260K.gguf"
PROMPT = "Once upon a time"
N_TOKENS = 12
KiB = 1024
MARKS = PressureConfig(low_water_bytes=1024 * KiB, high_water_bytes=2048 * KiB, interval_s=0.005)


class MachineProbe(FakeMemoryProbe):
    """Available memory = what the machine has left for us minus what the pager holds now."""

    def __init__(self, machine_bytes: int):
        super().__init__(available_bytes=machine_bytes)
        self.pager: LayerPager | None = None

    def available_ram_bytes(self) -> int:
        """The machine's bytes less the pager's (all of them before the pager exists)."""
        self.polls += 1
        held = self.pager.resident_bytes if self.pager is not None else 0
        return max(0, self.available - held)


def plenty() -> int:
    """Room for every weight plus the high-water mark: no pressure."""
    return 1 << 30  # above the auto budget's 256 MiB runtime headroom


@pytest.fixture(scope="module")
def expected() -> list[int]:
    engine = InferenceEngine(EngineConfig(MODEL, context_size=64, sampler=SamplerConfig.greedy())).load_model()
    try:
        return engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids
    finally:
        engine.close()


def auto_engine(probe: MachineProbe, marks: PressureConfig = MARKS) -> InferenceEngine:
    config = EngineConfig(MODEL, context_size=64, sampler=SamplerConfig.greedy(), ram_auto=True, pressure_probe=probe,
                          pressure=marks)
    engine = InferenceEngine(config).load_model()
    probe.pager = engine.weights
    return engine


@pytest.fixture
def engine_and_probe() -> Iterator[tuple[InferenceEngine, MachineProbe]]:
    probe = MachineProbe(plenty())
    # A long poll interval: these tests drive the monitor with poll_once, so the thread stays out of the way.
    engine = auto_engine(probe, PressureConfig(MARKS.low_water_bytes, MARKS.high_water_bytes, interval_s=3600))
    try:
        yield engine, probe
    finally:
        engine.close()


def settle(pager: LayerPager) -> None:
    deadline = time.monotonic() + 10
    while any(pager._entries[u].state == LOADING for u in pager.units) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_auto_budget_and_monitor_start_with_the_engine(engine_and_probe: tuple[InferenceEngine, MachineProbe]) -> None:
    engine, _probe = engine_and_probe
    monitor = engine.pressure
    assert monitor is not None and monitor._thread is not None and monitor._thread.is_alive()
    assert engine.weights.budget_bytes == monitor.max_budget  # the whole model fits the fake machine
    assert monitor.floor_bytes < monitor.max_budget
    summary = engine.memory_summary()
    assert summary["pressure_shrinks"] == 0 and summary["max_budget_bytes"] == monitor.max_budget
    thread = monitor._thread
    engine.close()
    assert not thread.is_alive()


def test_shrink_evicts_generation_continues_grow_restores_hit_rate(
        engine_and_probe: tuple[InferenceEngine, MachineProbe], expected: list[int]) -> None:
    engine, probe = engine_and_probe
    monitor, pager = engine.pressure, engine.weights
    engine.generate(PROMPT, max_tokens=N_TOKENS)  # warm: every unit resident
    full = engine.generate(PROMPT, max_tokens=N_TOKENS)
    assert full.token_ids == expected and full.stats.hit_rate == 1.0
    settle(pager)
    resident, evictions = pager.resident_bytes, pager.stats.evictions

    deficit = resident // 2
    probe.set_available(resident + MARKS.low_water_bytes - deficit)  # others took memory: we are `deficit` short
    event = monitor.poll_once()
    assert event is not None and event.kind == "shrink"
    assert pager.budget_bytes == max(monitor.floor_bytes, resident - deficit)
    assert pager.resident_bytes <= pager.budget_bytes and pager.stats.evictions > evictions
    assert monitor.poll_once() is None  # the eviction gave the memory back: no further shrinking

    squeezed = engine.generate(PROMPT, max_tokens=N_TOKENS)
    assert squeezed.token_ids == expected
    assert squeezed.stats.hit_rate < full.stats.hit_rate and squeezed.stats.budget_bytes == pager.budget_bytes
    assert pager.stats.peak_resident_bytes <= monitor.max_budget

    probe.set_available(plenty())  # memory returns
    event = monitor.poll_once()
    assert event is not None and event.kind == "grow" and pager.budget_bytes == monitor.max_budget
    engine.generate(PROMPT, max_tokens=N_TOKENS)  # brings the evicted units back
    restored = engine.generate(PROMPT, max_tokens=N_TOKENS)
    assert restored.token_ids == expected and restored.stats.hit_rate == full.stats.hit_rate
    assert monitor.stats.shrinks == 1 and monitor.stats.grows == 1
    assert [e.kind for e in monitor.stats.events] == ["shrink", "grow"]


def test_a_changed_budget_is_planned_again(engine_and_probe: tuple[InferenceEngine, MachineProbe]) -> None:
    engine, probe = engine_and_probe
    monitor, pager = engine.pressure, engine.weights
    engine.generate(PROMPT, max_tokens=N_TOKENS)
    settle(pager)
    resident = pager.resident_bytes
    assert not engine.plan.streamed  # everything fits at first
    probe.set_available(resident + MARKS.low_water_bytes - resident // 2)
    event = monitor.poll_once()
    assert event is not None and event.kind == "shrink"
    # the plan is for the budget now in force, and the pager pages with the window it chose
    assert engine.plan.placement.budget_bytes == pager.budget_bytes < monitor.max_budget
    assert engine.plan.streamed and pager.placement == engine.plan.placement
    assert pager.window_units == engine.plan.placement.window_units
    assert engine.generate(PROMPT, max_tokens=N_TOKENS).stats.bytes_read > 0


def test_budget_never_goes_below_pinned_plus_largest_unit(engine_and_probe: tuple[InferenceEngine, MachineProbe],
                                                          expected: list[int]) -> None:
    engine, probe = engine_and_probe
    monitor = engine.pressure
    probe.set_available(0)
    for _ in range(5):
        monitor.poll_once()
    assert engine.weights.budget_bytes == monitor.floor_bytes
    assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected  # still works at the floor


def test_held_unit_is_never_evicted() -> None:
    mf = ModelFile.open(MODEL)
    with LayerPager.build(mf, Budget(mf.weight_bytes * 2)) as pager:
        probe = MachineProbe(0)
        probe.pager = pager
        monitor = PressureMonitor(pager, probe, pager.budget_bytes, MARKS)
        for unit in pager.sweep_order:
            with pager.hold(unit):
                pass
        held = pager.sweep_order[1]
        views = pager.acquire(held)
        before = {name: np.array(v) for name, v in views.items()}
        for _ in range(5):  # each poll gives back at most the deficit
            monitor.poll_once()
        assert pager.budget_bytes == monitor.floor_bytes
        assert pager.is_resident(held)  # under the caller: never evicted
        assert all(np.array_equal(views[n], before[n]) for n in before)
        pager.release(held)
        monitor.poll_once()
        assert pager.resident_bytes <= pager.budget_bytes


def test_shrink_and_grow_during_generation_keep_the_tokens(expected: list[int]) -> None:
    probe = MachineProbe(plenty())
    engine = auto_engine(probe)  # the monitor thread polls every 5 ms
    try:
        engine.generate(PROMPT, max_tokens=2)
        resident = engine.weights.resident_bytes
        flip = iter(range(10**6))

        def squeeze_and_release(_token: int, _text: str) -> None:
            # Alternate: short of memory on one token, plenty on the next; give the thread time to see it.
            tight = next(flip) % 2 == 0
            probe.set_available(resident // 3 + MARKS.low_water_bytes if tight else plenty())
            time.sleep(0.05)

        out = engine.generate(PROMPT, max_tokens=N_TOKENS, on_token=squeeze_and_release)
        assert out.token_ids == expected
        stats = engine.pressure.stats
        assert stats.shrinks >= 2 and stats.grows >= 2 and out.stats.budget_changes >= 4
        assert engine.memory_summary()["pressure_shrinks"] == stats.shrinks
    finally:
        engine.close()


def test_probe_errors_do_not_end_the_watch() -> None:
    class BrokenProbe(MachineProbe):
        def available_ram_bytes(self) -> int:
            raise OSError("cannot read /proc/meminfo")

    mf = ModelFile.open(MODEL)
    with LayerPager.build(mf, Budget(mf.weight_bytes)) as pager:
        monitor = PressureMonitor(pager, BrokenProbe(0), mf.weight_bytes, MARKS).start()
        try:
            deadline = time.monotonic() + 10
            while monitor.stats.probe_errors < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert monitor.stats.probe_errors >= 3 and monitor._thread.is_alive()
        finally:
            monitor.stop()


def test_marks_are_checked() -> None:
    with pytest.raises(ValueError, match="low"):
        PressureConfig(low_water_bytes=10, high_water_bytes=10)
    with pytest.raises(ValueError, match="interval"):
        PressureConfig(interval_s=0)


def test_no_monitor_without_ram_auto() -> None:
    engine = InferenceEngine(EngineConfig(MODEL, context_size=64)).load_model()
    try:
        assert engine.pressure is None and "pressure_shrinks" not in engine.memory_summary()
    finally:
        engine.close()


def test_cli_ram_auto_turns_the_monitor_on() -> None:
    assert EngineOptions(64, None, None, "auto", "auto").engine_config(str(MODEL)).ram_auto
    assert not EngineOptions(64, None, None, "1MiB", "auto").engine_config(str(MODEL)).ram_auto


def test_monitor_thread_is_a_daemon(engine_and_probe: tuple[InferenceEngine, MachineProbe]) -> None:
    engine, _ = engine_and_probe
    assert engine.pressure._thread.daemon and engine.pressure._thread.name == "pagellm-pressure"
    assert threading.active_count() >= 2
