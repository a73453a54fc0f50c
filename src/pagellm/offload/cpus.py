"""Which CPUs the reader and the forward pass run on, where the plan leaves the reader a core.

Leaving the reader a core only works if the scheduler keeps the two apart. Unpinned, Linux often
wakes the reader on the CPU the forward pass is computing on, and it waits there for a time
slice: here, TinyLlama Q8_0 at a 50% budget read 10 MB units at 1.2-1.3 GB/s beside compute and
decoded 2.8 tokens/s; with the reader on one CPU and the forward pass on the other, 1.5-1.8 GB/s
and 2.9-3.4 tokens/s. Where the platform has no CPU affinity (macOS, Windows) these are no-ops.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Collection, Iterator

_HAVE_AFFINITY = hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def available_cpus() -> frozenset[int]:
    """The CPUs this thread may run on (empty where the platform cannot say)."""
    return frozenset(os.sched_getaffinity(0)) if _HAVE_AFFINITY else frozenset()


def split_for_reader(cpus: Collection[int]) -> tuple[frozenset[int], frozenset[int]] | None:
    """(compute CPUs, reader CPUs): the highest CPU for the reader, the rest for compute; None under two CPUs."""
    if len(cpus) < 2:
        return None
    reader = max(cpus)
    return frozenset(c for c in cpus if c != reader), frozenset({reader})


def pin_thread(native_id: int, cpus: Collection[int] | None) -> bool:
    """Keep thread ``native_id`` (0: the caller) on ``cpus``; False where it cannot (no affinity, thread gone)."""
    if not cpus or not _HAVE_AFFINITY:
        return False
    try:
        os.sched_setaffinity(native_id, cpus)
        return True
    except OSError:  # the thread has exited, or the CPUs are no longer ours (a changed cgroup)
        return False


@contextmanager
def pinned(cpus: Collection[int] | None) -> Iterator[None]:
    """Run the calling thread on ``cpus`` inside the block, then back where it was (None: leave it be)."""
    before = available_cpus() if cpus else frozenset()  # no syscall on the unpinned path: every forward pass comes here
    if not before or set(cpus) == before or not pin_thread(0, cpus):
        yield
        return
    try:
        yield
    finally:
        pin_thread(0, before)
