"""Keeping the reader and the forward pass on separate CPUs (pagellm.offload.cpus)."""
import os
import threading
import time

import pytest
from shared_paths import fixture_path

from pagellm.modelfile import ModelFile
from pagellm.offload import Budget
from pagellm.offload.cpus import available_cpus, pin_thread, pinned, split_for_reader
from pagellm.offload.pager import LayerPager

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")


def test_split_gives_the_reader_the_highest_cpu_and_compute_the_rest():
    assert split_for_reader({0, 1}) == (frozenset({0}), frozenset({1}))
    assert split_for_reader([7, 2, 5]) == (frozenset({2, 5}), frozenset({7}))
    assert split_for_reader({3}) is None and split_for_reader(set()) is None


def test_pin_thread_without_cpus_does_nothing():
    before = available_cpus()
    assert pin_thread(0, None) is False and pin_thread(0, set()) is False
    assert available_cpus() == before


@needs_affinity
def test_pinned_runs_the_block_on_the_cpus_and_restores_the_thread():
    before = available_cpus()
    one = {min(before)}
    with pinned(one):
        assert os.sched_getaffinity(0) == one
    assert available_cpus() == before
    with pinned(None):
        assert available_cpus() == before
    with pytest.raises(RuntimeError):  # restored on the way out of an error too
        with pinned(one):
            raise RuntimeError("boom")
    assert available_cpus() == before


@needs_affinity
def test_reader_thread_runs_on_the_cpus_it_is_given_before_or_after_it_starts():
    mf = ModelFile.open(fixture_path("synth-llama-Q8_0"))
    cpu = {max(available_cpus())}
    with LayerPager.build(mf, Budget(int(0.4 * mf.weight_bytes))) as pager:
        assert pager.reader_cpus is None
        pager.set_reader_cpus(cpu)  # before the reader exists: it pins itself when it starts
        streamed = [u for u in pager.sweep_order if u in pager.placement.streamed]
        pager.prefetch(streamed[:1])
        deadline = time.time() + 5
        while pager._reader is None and time.time() < deadline:
            time.sleep(0.01)
        reader = pager._reader
        assert reader is not None and reader is not threading.current_thread()
        while os.sched_getaffinity(reader.native_id) != cpu and time.time() < deadline:
            time.sleep(0.01)  # it pins itself as its first step
        assert pager.reader_cpus == cpu and os.sched_getaffinity(reader.native_id) == cpu
        everywhere = available_cpus()
        pager.set_reader_cpus(everywhere)  # a running reader is moved at once
        assert os.sched_getaffinity(reader.native_id) == everywhere
