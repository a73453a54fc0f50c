import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_paths import fixture_path

from pagellm.modelfile import ModelFile
from pagellm.offload import Budget, NoOffload, PinnedHotSet
from pagellm.offload.pager import BLOCK_PARTS, LayerPager, PagerError, ResidentStore
from pagellm.offload.source import FileSource, SourceError

STORIES = fixture_path("stories260K-real-F32")
SYNTH = fixture_path("synth-llama-Q8_0")


def file_bytes_of(mf, pager, unit_name):
    """What the views of a unit must contain: the tensor bytes straight from the file."""
    data = mf.path.read_bytes()
    return {s.tensor: data[mf.tensors[s.tensor].offset + s.row_start * (mf.tensors[s.tensor].nbytes // max(1, mf.tensors[s.tensor].shape[1] if len(mf.tensors[s.tensor].shape) > 1 else 1)):][: s.nbytes]
            for s in pager.unit(unit_name).slices}


def sweep_bytes(pager, sweeps):
    per_sweep = []
    for _ in range(sweeps):
        before = pager.stats.bytes_read
        for name in pager.sweep_order:
            with pager.hold(name):
                pass
        per_sweep.append(pager.stats.bytes_read - before)
    return per_sweep


@pytest.mark.parametrize("path", [STORIES, SYNTH], ids=["stories260K", "synth-llama-Q8_0"])
def test_decode_sweep_does_not_thrash(path, capsys):
    mf = ModelFile.open(path)
    budget = int(0.4 * mf.weight_bytes)
    results = {}
    for replacement in ("auto", "lru"):
        with LayerPager.build(mf, Budget(budget), replacement=replacement) as pager:
            per_sweep = sweep_bytes(pager, 20)
            largest = max(pager.unit(u).nbytes for u in pager.units)
            results[replacement] = per_sweep
            assert pager.stats.peak_resident_bytes <= budget
    steady = max(results["auto"][5:])
    bound = 1.05 * (mf.weight_bytes - budget) + largest
    swept = sum(pager.unit(u).nbytes for u in pager.sweep_order if not pager.is_pinned(u))
    with capsys.disabled():
        print(f"\n{path.name}: weights {mf.weight_bytes} B, budget {budget} B, bound {bound:.0f} B/sweep; "
              f"steady bytes/sweep: auto {steady}, lru {max(results['lru'][5:])} (all swept units: {swept})")
    assert steady <= bound
    assert min(results["lru"][5:]) == swept  # plain LRU on a loop larger than the cache re-reads everything
    assert steady < swept


def test_pinned_hot_set_pins_and_reads_pins_once():
    mf = ModelFile.open(STORIES)
    policy = PinnedHotSet(int(0.8 * mf.weight_bytes), pin_last_n_layers=1, prefetch_n_ahead=2)
    with LayerPager.build(mf, policy) as pager:
        pinned = [u for u in pager.units if pager.is_pinned(u)]
        heads = pager.units_of("token_embd") + pager.units_of("output")
        vectors = [f"blk.{i}@vectors" for i in range(5)]  # every policy pins each block's norms
        assert set(pinned) == {"globals", *heads, *pager.units_of("blk.4"), *vectors}
        assert pager.is_pinned("blk.4") and not pager.is_pinned("blk.3")
        for _ in range(5):
            for name in pager.sweep_order:
                with pager.hold(name):
                    pager.prefetch_after(name)
        time.sleep(0.05)
        for name in pinned:
            assert pager.stats.reads_by_unit[name] == 1 and pager.is_resident(name)
        assert pager.stats.prefetches_used > 0


def test_budget_too_small_names_both_numbers():
    mf = ModelFile.open(STORIES)
    with LayerPager.build(mf, PinnedHotSet(2 * mf.weight_bytes)) as roomy:
        pinned = roomy.pinned_bytes
        largest = max(roomy.unit(u).capacity for u in roomy.units if not roomy.is_pinned(u))
    with pytest.raises(PagerError, match=rf"pinned set plus the largest group.*pinned {pinned} B \+ largest unpinned group {largest} B"):
        LayerPager.build(mf, PinnedHotSet(pinned + largest - 1))
    LayerPager.build(mf, PinnedHotSet(pinned + largest)).close()  # one byte more fits
    with pytest.raises(PagerError, match="the pinned set needs"):
        LayerPager.build(mf, PinnedHotSet(100_000))
    with pytest.raises(PagerError, match="too small"):
        LayerPager.build(mf, Budget(1000))


def test_large_head_is_split_into_row_slices_no_larger_than_a_block():
    mf = ModelFile.open(SYNTH)
    with LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes))) as pager:
        block = mf.group_bytes("blk.0")
        parts = pager.units_of("output")
        assert len(parts) > 1 and all(pager.unit(p).nbytes <= block for p in parts)
        rows = [(pager.unit(p).slice_of("output.weight").row_start, pager.unit(p).slice_of("output.weight").row_end) for p in parts]
        assert rows[0][0] == 0 and rows[-1][1] == mf.tensors["output.weight"].shape[1]
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        data = mf.path.read_bytes()
        info = mf.tensors["output.weight"]
        joined = b"".join(bytes(pager.acquire(p)["output.weight"]) for p in parts[:1])
        pager.release(parts[0])
        assert joined == data[info.offset : info.offset + len(joined)]


def test_views_hold_the_file_bytes_and_no_offload_loads_everything_once():
    mf = ModelFile.open(SYNTH)
    data = mf.path.read_bytes()
    store = LayerPager.build(mf, NoOffload())
    assert isinstance(store, ResidentStore) and store.budget_bytes is None
    for _ in range(3):
        for name in store.sweep_order:
            with store.hold(name) as tensors:
                for s in store.unit(name).slices:
                    info = mf.tensors[s.tensor]
                    row_bytes = info.nbytes // int(np.prod(info.shape[1:]))
                    start = info.offset + s.row_start * row_bytes
                    assert bytes(tensors[s.tensor]) == data[start : start + s.nbytes]
    assert store.stats.misses == 0 and store.stats.hits == store.stats.acquires
    assert store.stats.bytes_read == mf.weight_bytes and set(store.stats.reads_by_unit.values()) == {1}
    store.close()


def test_embedding_rows_are_read_directly_when_not_resident():
    mf = ModelFile.open(SYNTH)
    data = mf.path.read_bytes()
    info = mf.tensors["token_embd.weight"]
    row_bytes = info.nbytes // info.shape[1]
    with LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes))) as pager:
        rows = pager.read_rows("token_embd.weight", [1, 9038, 31999])
        for got, r in zip(rows, [1, 9038, 31999]):
            assert bytes(got) == data[info.offset + r * row_bytes :][:row_bytes]
        assert pager.stats.row_reads == 3 and pager.stats.bytes_read == pager.stats.bytes_by_kind["pin"]  # only the pinned globals were loaded
    with LayerPager.build(mf, PinnedHotSet(int(0.9 * mf.weight_bytes))) as pager:
        rows = pager.read_rows("token_embd.weight", [5, 7])
        assert bytes(rows[1]) == data[info.offset + 7 * row_bytes :][:row_bytes]
        assert pager.stats.row_reads == 0


class SlowSource(FileSource):
    """A source whose reads take a while, so concurrent acquires really overlap."""

    def __init__(self, path, delay=0.05):
        super().__init__(path)
        self.delay = delay

    def run(self, plan):
        time.sleep(self.delay)
        return super().run(plan)


def test_concurrent_acquires_of_a_missing_group_read_it_once():
    mf = ModelFile.open(STORIES)
    pager = LayerPager(mf, int(0.5 * mf.weight_bytes), source=SlowSource(mf.path))
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        with pager.hold("blk.2"):
            time.sleep(0.01)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    # holding a block holds all its units: each read once, by the first thread to ask (the pinned
    # vectors at load, a hit for all four)
    units = pager.units_of("blk.2")
    assert [pager.stats.reads_by_unit[u] for u in units] == [1] * len(units) and len(units) == 1 + len(BLOCK_PARTS)
    assert pager.stats.misses == len(units) - 1 and pager.stats.hits == 3 * (len(units) - 1) + 4
    assert pager.stats.stall_seconds >= 4 * 0.04
    pager.close()


def test_acquire_waits_for_a_prefetch_in_flight_instead_of_reading_again():
    mf = ModelFile.open(STORIES)
    pager = LayerPager(mf, int(0.5 * mf.weight_bytes), source=SlowSource(mf.path))
    pager.prefetch(["blk.1"])
    time.sleep(0.01)
    with pager.hold("blk.1"):
        pass
    units = pager.units_of("blk.1")
    assert [pager.stats.reads_by_unit[u] for u in units] == [1] * len(units)
    assert pager.stats.prefetches_used == len(units) - 1 and pager.stats.misses == 0  # the vectors are pinned
    pager.close()


def test_prefetch_never_evicts_what_the_sweep_needs_sooner():
    mf = ModelFile.open(STORIES)
    ffn = [f"blk.{i}@ffn_in.0" for i in range(5)]
    units = {u.name: u for u in LayerPager.describe(mf, Budget(mf.weight_bytes), 4096)[0]}
    pinned = sum(u.resident_capacity for u in units.values() if u.group == "globals" or u.name.endswith("@vectors"))
    room = pinned + 2 * units[ffn[0]].capacity + 4096  # room for two units, and less than any unit more
    # a window of the two: nothing is kept resident, so only the sweep decides
    with LayerPager(mf, room, pinned_groups=["globals"], window_units=2) as pager:
        assert not {u for u in pager.placement.resident if u.startswith("blk.")}
        for name in [ffn[2], ffn[3], ffn[1]]:
            with pager.hold(name):
                pass
        assert set(pager.resident_units()) - set(pager.placement.pinned) == {ffn[1], ffn[2]}  # ffn[3] was the furthest away
        with pager.hold(ffn[1]):
            pager.prefetch([ffn[4]])  # would have to push out ffn[2], which the sweep needs first
            time.sleep(0.05)
        assert pager.stats.prefetches_skipped == 1 and pager.is_resident(ffn[2]) and not pager.is_resident(ffn[4])
        with pager.hold(ffn[2]):
            pager.prefetch([ffn[3]])  # ffn[1] is now the furthest: it may go
            time.sleep(0.05)
        assert pager.is_resident(ffn[3]) and not pager.is_resident(ffn[1])


def test_own_holds_exhausting_budget_raise_instead_of_deadlock():
    mf = ModelFile.open(STORIES)
    with LayerPager(mf, int(0.42 * mf.weight_bytes)) as pager:
        held = []
        with pytest.raises(PagerError, match="units this thread holds"):
            for name in ["blk.0", "blk.1", "blk.2", "blk.3"]:
                pager.acquire(name)
                held.append(name)
        for name in held:
            pager.release(name)


def test_release_without_hold_is_an_error():
    mf = ModelFile.open(STORIES)
    with LayerPager(mf, mf.weight_bytes) as pager:
        with pytest.raises(PagerError, match="does not hold"):
            pager.release("blk.0")
        with pytest.raises(KeyError, match="no unit"):
            pager.acquire("blk.99")


def test_set_budget_shrinks_resident_set_and_grows_back():
    mf = ModelFile.open(STORIES)
    with LayerPager(mf, mf.weight_bytes) as pager:
        sweep_bytes(pager, 1)
        full = pager.resident_bytes
        new = pager.set_budget(int(0.3 * mf.weight_bytes))
        assert pager.resident_bytes <= new < full
        sweep_bytes(pager, 2)
        assert pager.stats.peak_resident_bytes >= pager.resident_bytes
        assert pager.resident_bytes <= new
        pager.set_budget(mf.weight_bytes)
        sweep_bytes(pager, 2)
        assert pager.resident_bytes == full


def test_stats_reset():
    mf = ModelFile.open(STORIES)
    with LayerPager(mf, mf.weight_bytes) as pager:
        sweep_bytes(pager, 1)
        pager.stats.reset()
        assert pager.stats.acquires == 0 and pager.stats.bytes_read == 0
        assert pager.stats.resident_bytes == pager.stats.peak_resident_bytes == pager.resident_bytes


# --- property test: random acquire / release / prefetch from several threads ---------------------

_MF = ModelFile.open(STORIES)
_DATA = STORIES.read_bytes()
_UNIT_NAMES = LayerPager(_MF, None).units  # unit names do not depend on the budget

op = st.one_of(
    st.tuples(st.just("hold"), st.sampled_from(_UNIT_NAMES)),
    st.tuples(st.just("prefetch"), st.lists(st.sampled_from(_UNIT_NAMES), min_size=1, max_size=3)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget_fraction=st.floats(0.45, 1.2),
    pin=st.booleans(),
    last=st.integers(0, 2),
    replacement=st.sampled_from(["auto", "lru"]),
    programs=st.lists(st.lists(op, min_size=1, max_size=25), min_size=2, max_size=4),
)
def test_random_concurrent_use_keeps_every_invariant(budget_fraction, pin, last, replacement, programs):
    budget = int(budget_fraction * _MF.weight_bytes)
    policy = PinnedHotSet(budget, pin_embeddings=pin, pin_output_head=pin, pin_last_n_layers=last) if pin or last else Budget(budget)
    try:
        pager = LayerPager.build(_MF, policy, replacement=replacement)
    except PagerError:
        return  # too small for its pins: refusing is the specified behaviour
    failures: list[str] = []
    peak_seen = [0]

    def run(program):
        for kind, arg in program:
            if kind == "prefetch":
                pager.prefetch(arg)
                continue
            with pager.hold(arg) as tensors:
                peak_seen[0] = max(peak_seen[0], pager.resident_bytes)
                expected = {s.tensor: s for s in pager.unit(arg).slices}
                time.sleep(0.0005)  # let other threads evict and load meanwhile
                if not pager.is_resident(arg):
                    failures.append(f"{arg} evicted while held")
                for name, view in tensors.items():
                    info, s = _MF.tensors[name], expected[name]
                    row_bytes = info.nbytes // int(np.prod(info.shape[1:]))
                    start = info.offset + s.row_start * row_bytes
                    if bytes(view) != _DATA[start : start + s.nbytes]:
                        failures.append(f"{arg}/{name} holds the wrong bytes")

    threads = [threading.Thread(target=run, args=(p,)) for p in programs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    time.sleep(0.01)
    pager.prefetch([])  # flush nothing; the reader may still be finishing a read
    deadline = time.time() + 2
    while any(pager._entries[n].state == 1 for n in _UNIT_NAMES) and time.time() < deadline:
        time.sleep(0.005)
    s = pager.stats
    pager.close()
    assert not failures, failures
    assert s.peak_resident_bytes <= budget and peak_seen[0] <= budget
    assert s.hits + s.misses == s.acquires == sum(1 for p in programs for k, _ in p if k == "hold")
    pinned = [u for u in _UNIT_NAMES if pager.is_pinned(u)]
    assert all(s.reads_by_unit[u] == 1 for u in pinned)
    sizes = {u: pager.unit(u).nbytes for u in _UNIT_NAMES}
    assert s.bytes_read == sum(sizes[u] * n for u, n in s.reads_by_unit.items())
    assert sum(s.reads_by_unit.values()) == s.misses + s.prefetches_completed + len(pinned)
    assert s.bytes_read == s.bytes_by_kind["miss"] + s.bytes_by_kind["prefetch"] + s.bytes_by_kind["pin"]


def test_reader_reads_ahead_along_the_sweep_once_per_unit():
    mf = ModelFile.open(SYNTH)
    policy = Budget(int(0.4 * mf.weight_bytes))
    with LayerPager.build(mf, policy, source=SlowSource(mf.path)) as pager:
        streamed = [u for u in pager.sweep_order if u in pager.placement.streamed]
        first = streamed[0]
        pager.prefetch([first])  # one request; the reader then walks the sweep by itself
        deadline = time.time() + 5
        while pager.stats.prefetches_completed < 2 and time.time() < deadline:
            time.sleep(0.01)
        # the next unit of the sweep not yet in RAM (streamed, or resident and not read yet)
        order = pager.sweep_order
        following = next(u for u in order[order.index(first) + 1:] if u not in pager.placement.pinned)
        assert pager.stats.prefetches_completed >= 2 and pager.is_resident(following)
        for _ in range(3):  # sweeps with no prefetch calls: read-ahead alone serves them
            for name in pager.sweep_order:
                with pager.hold(name):
                    time.sleep(0.002)
        deadline = time.time() + 5
        while any(pager._entries[u].state == 1 for u in pager.units) and time.time() < deadline:
            time.sleep(0.01)  # let a read-ahead in flight land
        s = pager.stats
        assert max(s.reads_by_unit[u] for u in streamed) <= 4  # never read twice in one sweep
        assert s.prefetches_used > s.misses
        assert not any(s.reads_by_unit[u] for u in pager.placement.resident if s.reads_by_unit[u] > 1)
        # every load went into pages mapped anew or into a victim's: the two counts add up to the loads
        capacity = {u: pager.buffer_bytes(u) for u in pager.units}
        assert s.fresh_buffer_bytes + s.reused_buffer_bytes == sum(capacity[u] * n for u, n in s.reads_by_unit.items())
        assert s.reused_buffer_bytes > 0
        # the count of sweep units in RAM (which lets read-ahead requests stop early) stayed true
        assert pager._sweep_in_ram == sum(pager.is_resident(u) for u in pager.sweep_order)


def test_letting_a_streamed_unit_go_arms_the_next_read_and_close_gives_it_back():
    mf = ModelFile.open(SYNTH)
    source = SlowSource(mf.path, delay=0.3)
    pager = LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes)), source=source)
    order = pager.sweep_order
    streamed = [u for u in order if u in pager.placement.streamed]
    first, second = streamed[:2]
    with pager.hold(first):
        pager.prefetch([second])  # the reader starts on it (0.3 s) and is busy meanwhile
        deadline = time.time() + 5
        while pager._entries[second].state != 1 and time.time() < deadline:
            time.sleep(0.001)
        later = next(u for u in order[order.index(first) + 1:] if not pager.is_resident(u) and u != second)
        assert pager._armed is None
    # ``first`` let go while the reader reads ``second``: the unit after it in the sweep that is not
    # in RAM is reserved for the reader at once, within the budget, before anyone asks for it
    armed = pager._armed
    assert armed is not None and armed[0].unit.name == later and armed[0].state == 1
    assert pager.resident_bytes <= pager.budget_bytes
    before = pager.stats.prefetches_completed
    deadline = time.time() + 5
    while pager.stats.prefetches_completed < before + 2 and time.time() < deadline:
        time.sleep(0.01)
    assert pager.is_resident(second) and pager.is_resident(later) and pager._armed is None
    # armed again, then closed: whatever the reader had not read yet is given back, nothing stays reserved
    with pager.hold(second):
        pass
    reads = sum(pager.stats.reads_by_unit.values())
    pager.close()
    assert pager.resident_bytes == 0 and sum(pager.stats.reads_by_unit.values()) <= reads + 1


class UnplannableSource(SlowSource):
    """A slow source that refuses to lay out reads of one file range (as if the range were bad)."""

    bad_offset = -1

    def plan(self, ranges, buffer):
        ranges = list(ranges)
        if any(offset == self.bad_offset for offset, _, _ in ranges):
            raise SourceError(f"{self.path}: no reads at {self.bad_offset}", path=self.path, offset=self.bad_offset)
        return super().plan(ranges, buffer)


def test_a_read_ahead_that_cannot_be_laid_out_is_given_back_and_its_acquire_reports_why():
    mf = ModelFile.open(SYNTH)
    source = UnplannableSource(mf.path, delay=0.6)
    pager = LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes)), source=source)
    order = pager.sweep_order
    first, second = [u for u in order if u in pager.placement.streamed][:2]
    later = next(u for u in order[order.index(first) + 1:] if not pager.is_resident(u) and u != second)
    source.bad_offset = pager.unit(later).extents[0].file_offset
    with pager.hold(first):
        pager.prefetch([second])
        deadline = time.time() + 5
        while pager._entries[second].state != 1 and time.time() < deadline:
            time.sleep(0.001)
        held = pager.resident_bytes
    # letting ``first`` go would arm ``later``; its reads cannot be laid out, so nothing is armed and
    # its reservation is back (only ``first``'s buffer may go, as a victim, never more is held)
    assert pager._armed is None and pager._entries[later].state == 0 and pager.resident_bytes <= held
    with pytest.raises(SourceError, match="no reads at"):
        pager.acquire(later)
    assert pager._entries[later].state == 0 and pager.resident_bytes <= pager.budget_bytes
    pager.close()
    assert pager.resident_bytes == 0


def test_blocks_split_in_forward_order_and_streamed_units_share_one_buffer_size():
    mf = ModelFile.open(SYNTH)
    with LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes))) as pager:
        assert pager.units_of("blk.1") == ["blk.1@vectors"] + [f"blk.1@{part}.0" for part, _ in BLOCK_PARTS]
        assert {s.tensor for s in pager.unit("blk.1@vectors").slices} == {"blk.1.attn_norm.weight", "blk.1.ffn_norm.weight"}
        assert [s.tensor for s in pager.unit("blk.1@ffn_in.0").slices] == ["blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
        assert [s.tensor for s in pager.unit("blk.1@ffn_out.0").slices] == ["blk.1.ffn_down.weight"]
        assert all(pager.is_pinned(f"blk.{i}@vectors") for i in range(4))
        streamable = [pager.unit(u) for u in pager.units if not pager.is_pinned(u)]
        assert len({u.capacity for u in streamable}) == 1
        assert all(u.capacity >= u.resident_capacity for u in streamable)
        assert pager.placement.window_bytes == pager.placement.window_units * streamable[0].capacity
        sweep_bytes(pager, 2)
        fresh = pager.stats.fresh_buffer_bytes
        assert sweep_bytes(pager, 3)[-1] > 0
        # every streamed load took an evicted unit's buffer as it was: no page mapped anew
        assert pager.stats.fresh_buffer_bytes == fresh


def test_parts_cut_into_row_slices_give_the_same_logits(monkeypatch):
    import pagellm.offload.pager as pager_module
    from pagellm.engine import EngineConfig, InferenceEngine

    mf = ModelFile.open(SYNTH)
    tokens = [1, 15, 27, 3, 99, 4]

    def logits(policy):
        eng = InferenceEngine(EngineConfig(SYNTH, context_size=64, offload_policy=policy)).load_model()
        try:
            return eng.eval_logits(tokens)
        finally:
            eng.close()

    whole = logits(NoOffload())
    # units of half the largest matrix: the feed-forward's gate and up in four, q/k/v and down cut too
    monkeypatch.setattr(pager_module, "MIN_UNIT_BYTES", 0)
    with LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes))) as pager:
        units = pager.units_of("blk.2")
        count = {part: sum(u.startswith(f"blk.2@{part}.") for u in units) for part, _ in BLOCK_PARTS}
        assert count["ffn_in"] == 4 and count["ffn_out"] == 2 and count["attn_in"] >= 1
        # every row of every matrix in exactly one unit, and the bytes it holds are the file's
        rows = {}
        for u in units:
            for s in pager.unit(u).slices:
                rows.setdefault(s.tensor, []).append((s.row_start, s.row_end))
            with pager.hold(u) as views:
                assert {t: bytes(v) for t, v in views.items()} == file_bytes_of(mf, pager, u)
        for tensor, spans in rows.items():
            spans.sort()
            n_rows = mf.tensors[tensor].shape[1] if len(mf.tensors[tensor].shape) > 1 else 1
            assert spans[0][0] == 0 and spans[-1][1] == n_rows and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # a cut may end inside one matrix and go on into the next: gate and up in three
    gate_up = ["blk.2.ffn_gate.weight", "blk.2.ffn_up.weight"]
    runs = pager_module._cut_rows(mf, gate_up, 3)
    assert [[p[0] for p in run] for run in runs] == [gate_up[:1], gate_up, gate_up[1:]]
    assert max(sum(p[2] for p in run) for run in runs) - min(sum(p[2] for p in run) for run in runs) <= 2 * max(
        mf.tensors[t].nbytes // mf.tensors[t].shape[1] for t in gate_up)
    cut_in_ram = logits(NoOffload())
    cut_paged = logits(Budget(int(0.4 * mf.weight_bytes)))
    np.testing.assert_allclose(cut_in_ram, whole, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(cut_paged, cut_in_ram)
