import os
import time

import pytest
from shared_paths import fixture_path

from pagellm.modelfile import ModelFile
from pagellm.offload import Budget, NoOffload, PinnedHotSet
from pagellm.offload.pager import BLOCK_PARTS, LayerPager
from pagellm.offload.planner import MachineProfile, auto_budget, kv_cache_bytes, place, plan_offload, simulate_step
from pagellm.offload.pressure import FakeMemoryProbe

MiB = 2**20
SYNTH = fixture_path("synth-llama-Q8_0")
ORDER = ["globals"] + [f"blk.{i}" for i in range(10)] + ["output"]
SIZES = {"globals": 1, "output": 100, "token_embd": 100, **{f"blk.{i}": 100 for i in range(10)}}


def test_placement_fills_budget_after_pins_and_window_evenly():
    p = place(SIZES, ORDER, 751, pinned_units=["output"], prefetch_n_ahead=1, embedding_units=["token_embd"])
    assert p.pinned == ("output",) and p.row_read == ("token_embd",)
    assert p.window_bytes == 200  # the unit in use plus one read ahead
    resident_bytes = sum(SIZES[u] for u in p.resident)
    assert resident_bytes <= 751 - 100 - 200 and resident_bytes + 100 > 751 - 100 - 200  # nothing more fits
    assert set(p.resident) | set(p.streamed) == set(ORDER) - {"output"}
    blocks = [u for u in p.resident if u.startswith("blk.")]
    gaps = [int(b[4:]) for b in blocks]
    assert max(b - a for a, b in zip(gaps, gaps[1:])) <= 3  # spread over the sweep, not bunched


def test_streamed_units_cost_their_streamed_size_and_kept_units_their_kept_size():
    from pagellm.offload.planner import role_capacities

    streamed_sizes = {u: size + 20 for u, size in SIZES.items()}  # whole huge pages when streamed
    p = place(SIZES, ORDER, 751, pinned_units=["output"], prefetch_n_ahead=1, embedding_units=["token_embd"],
              stream_units=streamed_sizes)
    assert p.window_bytes == 240  # the window is counted at the streamed size
    resident_bytes = sum(SIZES[u] for u in p.resident)  # the resident set at the kept size
    assert resident_bytes <= 751 - 100 - 240 and resident_bytes + 100 > 751 - 100 - 240
    roles = role_capacities(SIZES, streamed_sizes, p)
    assert all(roles[u] == SIZES[u] for u in p.resident + p.pinned)
    assert all(roles[u] == streamed_sizes[u] for u in p.streamed) and p.streamed


def test_placement_everything_fits_or_no_budget():
    p = place(SIZES, ORDER, 10_000, [], 1, ["token_embd"])
    assert p.streamed == () and set(p.resident) == set(ORDER) and p.window_bytes == 0
    assert place(SIZES, ORDER, None, [], 1).streamed == ()


def test_window_shrinks_to_what_the_budget_holds():
    p = place(SIZES, ORDER, 150, [], prefetch_n_ahead=4)
    assert p.window_bytes == 100 and p.resident == ("globals",)


SPLIT_ORDER = ["globals"] + [f"blk.{i}@{part}" for i in range(10) for part in ("attn", "ffn")] + ["output@0", "output@1"]
SPLIT_SIZES = {"globals": 1, "output@0": 30, "output@1": 30,
               **{f"blk.{i}@{part}": size for i in range(10) for part, size in (("attn", 30), ("ffn", 70))}}


def test_split_blocks_are_kept_unit_by_unit_evenly_and_the_window_holds_what_streams():
    p = place(SPLIT_SIZES, SPLIT_ORDER, 600, [], prefetch_n_ahead=1)
    assert p.window_units == 2  # in use + read ahead
    streamed = list(p.streamed)
    runs = [SPLIT_SIZES[a] + SPLIT_SIZES[b] for a, b in zip(streamed, streamed[1:] + streamed[:1])]
    assert max(runs) <= p.window_bytes <= 140  # the window holds for the units that really stream
    resident = sum(SPLIT_SIZES[u] for u in p.resident)
    assert 600 - p.window_bytes - resident < 30  # the rest of the budget is used: no unit more would fit
    # kept unit by unit, not whole blocks: the kept share of the bytes swept so far stays near the
    # budget's share all along the sweep (within one unit), so no stretch streams with nothing kept
    share = resident / sum(SPLIT_SIZES.values())
    kept = seen = 0
    for u in SPLIT_ORDER:
        seen += SPLIT_SIZES[u]
        kept += SPLIT_SIZES[u] if u in p.resident else 0
        assert abs(kept - share * seen) <= 70
    assert any((f"blk.{i}@attn" in p.resident) != (f"blk.{i}@ffn" in p.resident) for i in range(10))


def test_window_grows_when_the_streamed_units_need_it():
    # units of one size where resident ones would leave two large ones adjacent: the window is checked
    sizes = {"a": 10, "b": 90, "c": 10, "d": 90, "e": 10, "f": 90}
    p = place(sizes, list(sizes), 250, [], prefetch_n_ahead=1)
    streamed = list(p.streamed)
    runs = [sizes[a] + sizes[b] for a, b in zip(streamed, streamed[1:] + streamed[:1])]
    assert p.window_bytes == 180 and max(runs) <= p.window_bytes  # grew from the first estimate, 100
    assert sum(sizes[u] for u in p.resident) + p.window_bytes <= 250


def test_simulation_arithmetic():
    order = ["a", "b", "c", "d"]
    compute = {u: 1.0 for u in order}
    # nothing streamed: the time is the compute
    assert simulate_step(order, set(), {}, compute, 2, 1) == (4.0, 0.0)
    # disk-bound, everything streamed, reading ahead: the reader is the bottleneck (4 x 3 s)
    seconds, stall = simulate_step(order, set(order), {u: 3.0 for u in order}, compute, 2, 1)
    assert seconds == pytest.approx(12.0) and stall == pytest.approx(8.0)
    # compute-bound with read-ahead: reads hide behind compute
    seconds, stall = simulate_step(order, {"b", "d"}, {"b": 0.5, "d": 0.5}, compute, 2, 1)
    assert seconds == pytest.approx(4.0) and stall == pytest.approx(0.0)
    # no prefetch: every streamed read is waited for
    seconds, stall = simulate_step(order, {"b", "d"}, {"b": 0.5, "d": 0.5}, compute, 1, 0)
    assert seconds == pytest.approx(5.0) and stall == pytest.approx(1.0)


def test_simulation_reads_ahead_into_the_room_the_budget_leaves():
    order = ["a", "b", "c", "d"]
    compute = {"a": 0.1, "b": 0.1, "c": 2.0, "d": 0.0}
    reads = {"a": 1.0, "b": 1.0}
    sizes = {"a": 10, "b": 10}

    def step(slots, room=None):
        return simulate_step(order, {"a", "b"}, reads, compute, slots, 1, sizes if room else None, room)

    # room for two buffers is a window of two units, room for one (or one and a half) a window of one
    assert step(2, room=20) == pytest.approx(step(2))
    assert step(1, room=10) == pytest.approx(step(1)) and step(2, room=15) == pytest.approx(step(1))
    # more room lets both reads hide behind c's compute instead of one
    assert step(1)[0] > step(2)[0]


def test_plan_matches_what_the_pager_does():
    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))
    plan = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=1e9))
    with LayerPager.build(mf, policy) as pager:
        pager.set_window_units(plan.placement.window_units)  # as the engine does
        assert pager.placement == plan.placement
        for _ in range(3):
            for name in pager.sweep_order:
                with pager.hold(name):
                    pager.prefetch_after(name)
        pager.stats.reset()
        for _ in range(4):
            for name in pager.sweep_order:
                with pager.hold(name):
                    pager.prefetch_after(name)
        import time
        time.sleep(0.05)
        per_sweep = pager.stats.bytes_read / 4
        assert set(plan.resident) <= set(pager.resident_units())
    streamed_bytes = sum(plan.unit_bytes[u] for u in plan.streamed)
    largest = max(plan.unit_bytes.values())
    # streamed units the window still holds when the sweep comes round are not read again
    assert streamed_bytes - plan.placement.window_units * largest <= per_sweep <= streamed_bytes + largest
    row = mf.tensors["token_embd.weight"].nbytes // 32000
    assert plan.predicted_bytes_per_token == streamed_bytes + row
    assert plan.predicted_bytes_per_token <= 1.05 * (mf.weight_bytes - policy.ram_bytes) + max(plan.unit_bytes.values())
    assert plan.floor_seconds_per_token == pytest.approx(max(plan.compute_seconds_per_token, (mf.weight_bytes - policy.ram_bytes) / 1e9))
    assert any("predicted" in line for line in plan.lines())


def test_pinned_policy_placement():
    mf = ModelFile.open(SYNTH)
    plan = plan_offload(mf, PinnedHotSet(int(0.95 * mf.weight_bytes), pin_last_n_layers=1))
    block = [u for u in LayerPager.describe(mf, NoOffload(), 4096)[0] if u.group == "blk.3"]
    assert {"token_embd@0", *(u.name for u in block)} <= set(plan.pinned) and len(block) == 1 + len(BLOCK_PARTS)
    assert plan.row_read == ()
    assert plan_offload(mf, NoOffload()).predicted_bytes_per_token == 0


def test_auto_budget_uses_the_probe():
    mf = ModelFile.open(SYNTH)
    kv = kv_cache_bytes(mf, 512)
    assert kv == 2 * 4 * 512 * 2 * 32 * 2
    probe = FakeMemoryProbe(available_bytes=300 * MiB)
    units = LayerPager.describe(mf, PinnedHotSet(1), 4096)[0]
    assert auto_budget(mf, 512, probe) == min(300 * MiB - kv - 256 * MiB, sum(u.resident_capacity for u in units))
    probe.set_available(275 * MiB)
    assert auto_budget(mf, 512, probe) == 275 * MiB - kv - 256 * MiB
    probe.set_available(260 * MiB)
    with pytest.raises(ValueError, match="not enough free RAM"):
        auto_budget(mf, 512, probe)


def test_lru_plan_streams_every_unpinned_unit_as_the_lru_pager_does():
    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))
    auto = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=1e9))
    lru = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=1e9), replacement="lru")
    assert lru.resident == () and set(lru.streamed) == set(auto.resident) | set(auto.streamed)
    assert lru.predicted_bytes_per_token > auto.predicted_bytes_per_token
    assert lru.predicted_tokens_per_s < auto.predicted_tokens_per_s
    with LayerPager.build(mf, policy, replacement="lru") as pager:
        assert pager.placement == lru.placement


def test_plan_leaves_a_core_to_reads_where_they_bound_the_step_or_suffer_beside_compute():
    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))
    rates = dict(unit_overhead_s=0.0, compute_bytes_per_s={"Q8_0": 8e9, "F32": 8e9},
                 compute_bytes_per_s_one_fewer={"Q8_0": 4.5e9, "F32": 4.5e9},
                 threads=2)
    coupled = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=2e9, disk_bytes_per_s_beside_compute=0.8e9, **rates))
    separate = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=2e9, disk_bytes_per_s_beside_compute=2e9, **rates))
    unmeasured = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=2e9, compute_bytes_per_s={"Q8_0": 8e9}))
    assert coupled.compute_threads == 1 and separate.compute_threads is None
    assert unmeasured.compute_threads is None
    # reads bound the step even on one thread fewer: the reader gets its core, though the
    # calibration saw reads no faster beside one thread fewer
    same = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=2e9, disk_bytes_per_s_beside_compute=1e9,
                                                   disk_bytes_per_s_beside_one_fewer=1e9, **rates))
    assert same.read_seconds_per_token > same.compute_seconds_per_token
    assert same.compute_threads == 1
    # compute bounds it on one thread fewer, and that is no faster: every thread computes
    fast_disk = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=20e9, disk_bytes_per_s_beside_compute=19e9,
                                                        disk_bytes_per_s_beside_one_fewer=20e9, **rates))
    assert fast_disk.read_seconds_per_token < fast_disk.compute_seconds_per_token
    assert fast_disk.compute_threads is None
    # the choice is the faster of the two, and the floor is the same for both
    assert coupled.predicted_tokens_per_s > plan_offload(
        mf, policy, MachineProfile(disk_bytes_per_s=0.8e9, **{**rates, "compute_bytes_per_s_one_fewer": {}})
    ).predicted_tokens_per_s
    assert coupled.floor_seconds_per_token == separate.floor_seconds_per_token
    assert any("one core left to the reader" in line for line in coupled.lines())
    assert plan_offload(mf, NoOffload(), MachineProfile(disk_bytes_per_s_beside_compute=1e8, **rates)).compute_threads is None


def test_reads_run_at_the_disks_own_rate_while_compute_waits_for_them():
    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))

    def plan(compute_rate: float, beside: float):
        rates = {"Q8_0": compute_rate, "F32": compute_rate}
        return plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=2e9, disk_bytes_per_s_beside_compute=beside,
                                                       compute_bytes_per_s=rates, layer_overhead_s=0.0, threads=2,
                                                       unit_overhead_s=0.0))

    slow_beside = plan(4e9, 1e9)
    rate = slow_beside.predicted_bytes_per_token / slow_beside.read_seconds_per_token
    busy = slow_beside.compute_seconds_per_token / slow_beside.predicted_seconds_per_token
    assert 0.1 < busy < 0.9  # reads take most of the step, compute part of it
    # the rate blends "beside compute" and "alone" by compute's share of the step (to the 0.5% it settles to)
    assert rate == pytest.approx(busy * 1e9 + (1 - busy) * 2e9, rel=0.01)
    # compute that takes no time leaves the disk alone; a disk as fast beside compute changes nothing
    idle = plan(1e15, 1e9)
    assert idle.predicted_bytes_per_token / idle.read_seconds_per_token == pytest.approx(2e9, rel=0.01)
    same = plan(4e9, 2e9)
    assert same.predicted_bytes_per_token / same.read_seconds_per_token == pytest.approx(2e9)
    assert slow_beside.predicted_seconds_per_token > same.predicted_seconds_per_token


def test_layer_overhead_is_per_model_shape():
    from pagellm.offload.planner import measure_layer_overhead, model_shape

    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))
    other = ModelFile.open(fixture_path("stories260K-real-F32"))
    assert model_shape(mf) != model_shape(other)
    base = dict(disk_bytes_per_s=2e9, compute_bytes_per_s={"Q8_0": 8e9, "F32": 8e9})
    none = plan_offload(mf, policy, MachineProfile(layer_overhead_s=0.0, **base))
    own = plan_offload(mf, policy, MachineProfile(layer_overhead_s=0.0, layer_overhead_s_by_shape={model_shape(mf): 1e-3},
                                                  **base))
    # another model's figure is not this model's: the fallback applies
    foreign = plan_offload(mf, policy, MachineProfile(layer_overhead_s=0.0,
                                                      layer_overhead_s_by_shape={model_shape(other): 1e-3}, **base))
    blocks = len(mf.block_groups)
    assert own.compute_seconds_per_token == pytest.approx(none.compute_seconds_per_token + blocks * 1e-3)
    assert foreign.compute_seconds_per_token == none.compute_seconds_per_token
    assert 0 < measure_layer_overhead(mf, repeats=5) < 0.1


def test_each_unit_costs_the_step_its_overhead_and_the_floor_nothing():
    from pagellm.offload.planner import measure_unit_overhead

    mf = ModelFile.open(SYNTH)
    base = dict(disk_bytes_per_s=2e9, compute_bytes_per_s={"Q8_0": 8e9, "F32": 8e9}, layer_overhead_s=0.0)
    order = LayerPager.describe(mf, NoOffload(), 4096)[1]
    plans = {}
    for name, policy in (("in RAM", Budget(2 * mf.weight_bytes)), ("paged", Budget(int(0.4 * mf.weight_bytes)))):
        none = plan_offload(mf, policy, MachineProfile(unit_overhead_s=0.0, **base), window_units=2)
        some = plan_offload(mf, policy, MachineProfile(unit_overhead_s=1e-3, **base), window_units=2)
        # the floor is the mat-vecs and the layers' own work, not our bookkeeping
        assert some.floor_seconds_per_token == none.floor_seconds_per_token
        assert some.compute_seconds_per_token == none.compute_seconds_per_token
        plans[name] = none, some
    none, some = plans["in RAM"]
    assert not some.streamed
    assert some.predicted_seconds_per_token == pytest.approx(none.predicted_seconds_per_token + len(order) * 1e-3)
    none, some = plans["paged"]
    assert some.streamed and some.predicted_seconds_per_token > none.predicted_seconds_per_token
    assert 0 < measure_unit_overhead(mf, repeats=50) < 0.01


def test_fresh_page_replay_arithmetic():
    from pagellm.offload.planner import fresh_bytes_per_sweep

    order = [f"u{i}" for i in range(8)]
    same = {u: 100 for u in order}
    placement = place(same, order, 450, [], prefetch_n_ahead=1)
    # equal units: every load takes its victim's buffer, nothing is mapped anew in steady state
    assert sum(fresh_bytes_per_sweep(same, order, placement, 1).values()) == 0
    assert sum(fresh_bytes_per_sweep(same, order, place(same, order, 450, [], 1, replacement="lru"), 1, "lru").values()) == 0
    # alternating sizes under LRU: a large unit often replaces a small one and grows it
    mixed = {u: 100 if i % 2 else 40 for i, u in enumerate(order)}
    lru = place(mixed, order, 320, [], 1, replacement="lru")
    grown = fresh_bytes_per_sweep(mixed, order, lru, 1, "lru")
    assert 0 < sum(grown.values()) < sum(mixed.values())
    assert all(grown[u] <= mixed[u] for u in grown)
    # everything fits: nothing streams, nothing to replay
    assert fresh_bytes_per_sweep(same, order, place(same, order, 10_000, [], 1), 1) == {}


def test_fresh_page_replay_matches_the_pager():
    from pagellm.offload.planner import fresh_bytes_per_sweep, role_capacities

    mf = ModelFile.open(SYNTH)
    cases = [("auto", Budget(int(0.4 * mf.weight_bytes))), ("lru", Budget(int(0.4 * mf.weight_bytes))),
             ("auto", PinnedHotSet(int(0.5 * mf.weight_bytes), pin_embeddings=False))]
    for replacement, policy in cases:
        plan = plan_offload(mf, policy, MachineProfile(disk_bytes_per_s=1e9), replacement=replacement)
        units, order, _, prefetch = LayerPager.describe(mf, policy, 4096)
        capacity = role_capacities({u.name: u.resident_capacity for u in units}, {u.name: u.capacity for u in units},
                                   plan.placement)
        predicted = sum(fresh_bytes_per_sweep(capacity, order, plan.placement, prefetch, replacement).values())
        with LayerPager.build(mf, policy, replacement=replacement) as pager:
            for sweep in range(6):
                if sweep == 3:
                    before = pager.stats.fresh_buffer_bytes
                for name in pager.sweep_order:
                    with pager.hold(name):
                        pager.prefetch_after(name)
                        time.sleep(0.002)  # let the read-ahead land, as compute would
            measured = (pager.stats.fresh_buffer_bytes - before) / 3
        largest = max(capacity.values())
        assert abs(measured - predicted) <= largest, (replacement, measured, predicted)


def test_compute_on_every_thread_slows_beside_reads_as_measured():
    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))
    # reads of the 60% streamed take about 0.8 of the compute's time: compute bounds the step
    rates = dict(compute_bytes_per_s={"Q8_0": 2e9, "F32": 2e9}, layer_overhead_s=0.0, fresh_page_bytes_per_s=1e15,
                 unit_overhead_s=0.0,
                 disk_bytes_per_s=1.5e9, threads=2)

    def plan(kept: float, fewer_rate: float | None = None):
        fewer = {"compute_bytes_per_s_one_fewer": {"Q8_0": fewer_rate, "F32": fewer_rate}} if fewer_rate else {}
        return plan_offload(mf, policy, MachineProfile(compute_kept_beside_reads=kept, **rates, **fewer))

    whole, half = plan(1.0), plan(0.5)
    assert whole.working_compute_seconds_per_token == pytest.approx(whole.compute_seconds_per_token)
    # C seconds of work beside R seconds of reads take C + R (1 - kept), or C / kept once reads cover it
    c, r = half.compute_seconds_per_token, half.read_seconds_per_token
    assert half.working_compute_seconds_per_token == pytest.approx(min(c / 0.5, c + r * 0.5), rel=0.01)
    assert half.working_compute_seconds_per_token > 1.2 * c
    assert half.predicted_seconds_per_token > whole.predicted_seconds_per_token
    # the floor is compute alone, whatever reads cost it
    assert half.floor_seconds_per_token == whole.floor_seconds_per_token
    # one thread fewer at 0.8 of the speed: slower than every thread at full speed, faster than every
    # thread keeping 0.3 of it beside the reads (the reader has a core of its own and costs compute nothing)
    assert plan(1.0, 1.6e9).compute_threads is None
    chosen = plan(0.3, 1.6e9)
    assert chosen.read_seconds_per_token < chosen.working_compute_seconds_per_token
    assert chosen.compute_threads == 1
    assert chosen.working_compute_seconds_per_token == pytest.approx(c * 2 / 1.6, rel=1e-6)
    assert any("kept 30% of its speed" in line for line in chosen.lines())


def test_calibration_measures_reads_and_compute_beside_each_other():
    from pagellm.offload.planner import calibrate, measure_disk, sweep_reads

    mf = ModelFile.open(SYNTH)
    reads = sweep_reads(mf)
    assert reads and all(0 < o and o + n <= os.path.getsize(mf.path) for o, n in reads)
    # what a plan streams: exactly its streamed units' bytes
    plan = plan_offload(mf, Budget(int(0.4 * mf.weight_bytes)))
    assert sum(n for _, n in sweep_reads(mf, plan.placement.streamed)) == sum(plan.unit_bytes[u] for u in plan.streamed)
    shared = measure_disk(mf.path, reads, "Q8_0", (0, 1, 2), seconds=0.5)
    assert set(shared.read) == {0, 1, 2} and all(r > 0 for r in shared.read.values())
    # compute alone and beside the reads, for each setting that computes
    assert set(shared.compute) == set(shared.compute_kept) == {1, 2}
    assert all(r > 0 for r in shared.compute.values()) and all(k > 0 for k in shared.compute_kept.values())
    profile = calibrate(mf, seconds=0.5, threads=2, save=False)
    assert profile.measured and profile.threads == 2
    assert profile.disk_bytes_per_s > 0 and profile.read_rate_beside_compute() > 0
    # the calibration keeps what it measured, not the default
    assert profile.compute_kept_beside_reads != MachineProfile().compute_kept_beside_reads
    assert 0 < profile.compute_kept() <= 1



def test_the_disk_is_measured_reading_into_two_buffers_in_turn(monkeypatch):
    """An overlapped reader fills one buffer while the other is computed on; a single buffer read
    into over and over measured faster than any such reader gets (the host's cache), so the floor's
    disk figure comes from two, never the same one twice running, an odd cycle of ranges included."""
    from pagellm.offload import source as source_module
    from pagellm.offload.planner import measure_disk, sweep_reads

    mf = ModelFile.open(SYNTH)
    reads = sweep_reads(mf)[:3]
    assert len(reads) == 3
    targets: list[int] = []
    run = source_module.FileSource.run

    def spy(self, plan):
        targets.append(id(plan[0].into.obj))  # the buffer the read lands in
        return run(self, plan)

    monkeypatch.setattr(source_module.FileSource, "run", spy)
    measure_disk(mf.path, reads, seconds=0.2)
    assert len(targets) > 6 and len(set(targets)) == 2
    assert all(a != b for a, b in zip(targets, targets[1:]))

WINDOW_PROFILE = dict(disk_bytes_per_s=1e9, compute_bytes_per_s={"Q8_0": 4e9, "F32": 4e9}, layer_overhead_s=0.0,
                      unit_overhead_s=0.0,
                      fresh_page_bytes_per_s=1e15)


def test_planner_chooses_the_window_predicted_fastest():
    mf = ModelFile.open(SYNTH)
    chosen = {}
    for disk, fraction in ((1e9, 0.45), (3e9, 0.2)):
        profile = MachineProfile(**{**WINDOW_PROFILE, "disk_bytes_per_s": disk})
        policy = Budget(int(fraction * mf.weight_bytes))
        fixed = {w: plan_offload(mf, policy, profile, window_units=w) for w in range(2, 7)}
        # each unit more in the window is a unit fewer kept resident: more reads per token
        sizes = [fixed[w].predicted_bytes_per_token for w in range(2, 7)]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
        plan = plan_offload(mf, policy, profile)
        w = plan.placement.window_units
        assert plan.placement == fixed[w].placement and f"({w} units)" in plan.lines()[0]
        # the fastest, or the smallest within 0.5% of it
        fastest = min(p.predicted_seconds_per_token for p in fixed.values())
        assert plan.predicted_seconds_per_token <= 1.005 * fastest
        assert all(p.predicted_seconds_per_token > 0.995 * fastest for v, p in fixed.items() if v < w)
        chosen[fraction] = w
    # reads bound the step at 45% on the slow disk: the smallest window; at 20% on a disk three times
    # faster, reads and compute nearly balance, and a reader that can read further ahead through the
    # resident units wins
    assert chosen[0.45] == 2 and chosen[0.2] > 2


def test_engine_pages_with_the_window_its_plan_chose():
    from pagellm.engine import EngineConfig, InferenceEngine

    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.2 * mf.weight_bytes))
    profile = MachineProfile(**{**WINDOW_PROFILE, "disk_bytes_per_s": 3e9})
    engine = InferenceEngine(EngineConfig(SYNTH, context_size=64, offload_policy=policy,
                                          machine_profile=profile)).load_model()
    try:
        assert engine.plan.placement.window_units > 2
        assert engine.weights.placement == engine.plan.placement
        engine.generate([1, 2, 3], max_tokens=3)
        assert engine.weights.stats.peak_resident_bytes <= policy.ram_bytes
    finally:
        engine.close()
