"""Memory probe: fake /proc and /sys trees for cgroup v1 and v2, plus the real machine."""
from __future__ import annotations

import os
import resource
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.offload.pressure import (
    CgroupMemory,
    FakeMemoryProbe,
    MemoryProbe,
    available_ram_bytes,
    cgroup_memory,
    mem_available_bytes,
    peak_rss_bytes,
    process_rss_bytes,
    reset_peak_rss,
)

MiB = 1 << 20
GiB = 1 << 30
V1_UNLIMITED = 9223372036854771712  # what cgroup v1 prints for "no limit" on 4 KiB pages


def write(root: Path, relative: str, text: str) -> Path:
    """Create root/relative with text, making parents."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_proc(root: Path, *, available: int = 4 * GiB, rss_pages: int = 1000, hwm_kib: int = 9000) -> None:
    """Write the /proc files a probe reads outside cgroups."""
    write(root, "proc/meminfo", f"MemTotal: 16000000 kB\nMemFree: 100 kB\nMemAvailable: {available // 1024} kB\n")
    write(root, "proc/self/statm", f"5000 {rss_pages} 300 10 0 800 0\n")
    write(root, "proc/self/status", f"Name:\tpython\nVmHWM:\t{hwm_kib} kB\nVmRSS:\t{rss_pages * 4} kB\n")


def fake_v2(root: Path, levels: dict[str, tuple[str, int, int]], leaf: str, high: dict[str, str] | None = None) -> None:
    """Write a cgroup v2 tree: levels maps path → (memory.max text, current, inactive_file)."""
    write(root, "proc/self/cgroup", f"0::{leaf}\n")
    for path, (limit, current, inactive) in levels.items():
        base = "sys/fs/cgroup" + path.rstrip("/")
        write(root, f"{base}/memory.max", limit + "\n")
        write(root, f"{base}/memory.current", f"{current}\n")
        write(root, f"{base}/memory.stat", f"anon 1\nfile 2\nactive_file 3\ninactive_file {inactive}\n")
        write(root, f"{base}/memory.high", (high or {}).get(path, "max") + "\n")


def fake_v1(root: Path, path: str, limit: int, usage: int, inactive: int, base: str | None = None) -> Path:
    """Write a cgroup v1 memory cgroup; base overrides the directory (namespaced mounts)."""
    write(root, "proc/self/cgroup", f"12:pids:/x\n4:memory:{path}\n3:cpu,cpuacct:/x\n0::/\n")
    directory = base if base is not None else "sys/fs/cgroup/memory" + path.rstrip("/")
    write(root, f"{directory}/memory.limit_in_bytes", f"{limit}\n")
    write(root, f"{directory}/memory.usage_in_bytes", f"{usage}\n")
    write(root, f"{directory}/memory.stat", f"cache 5\ninactive_file 7\ntotal_inactive_file {inactive}\n")
    return root / directory


# --------------------------------------------------------------------- /proc


def test_process_numbers_from_fake_proc(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=3 * GiB, rss_pages=1234, hwm_kib=8000)
    assert process_rss_bytes(tmp_path) == 1234 * os.sysconf("SC_PAGE_SIZE")
    assert peak_rss_bytes(tmp_path) == 8000 * 1024
    assert mem_available_bytes(tmp_path) == 3 * GiB


def test_rss_falls_back_to_status_without_statm(tmp_path: Path) -> None:
    fake_proc(tmp_path, rss_pages=50)
    (tmp_path / "proc/self/statm").unlink()
    assert process_rss_bytes(tmp_path) == 50 * 4 * 1024


def test_rss_without_proc_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        process_rss_bytes(tmp_path)


def test_peak_falls_back_to_getrusage(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = peak_rss_bytes(tmp_path)  # no proc/self/status under tmp_path
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert before <= peak <= after


def test_mem_available_fallback_for_old_kernels(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", "MemTotal: 9000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n")
    assert mem_available_bytes(tmp_path) == 420 * 1024


def test_reset_peak_writes_clear_refs(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    write(tmp_path, "proc/self/clear_refs", "")
    assert reset_peak_rss(tmp_path) is True
    assert (tmp_path / "proc/self/clear_refs").read_text() == "5"


def test_reset_peak_reports_failure(tmp_path: Path) -> None:
    assert reset_peak_rss(tmp_path / "missing") is False


# --------------------------------------------------------------- cgroup v2


def test_v2_limited(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB)
    fake_v2(tmp_path, {"/user.slice/app": (str(GiB), 300 * MiB, 100 * MiB)}, "/user.slice/app")
    cgroup = cgroup_memory(tmp_path)
    assert cgroup == CgroupMemory(GiB, 300 * MiB, 2, tmp_path / "sys/fs/cgroup/user.slice/app", 100 * MiB)
    assert cgroup.working_set_bytes == 200 * MiB
    assert available_ram_bytes(tmp_path) == GiB - 200 * MiB


def test_v2_unlimited(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB)
    fake_v2(tmp_path, {"/user.slice/app": ("max", 300 * MiB, 0)}, "/user.slice/app")
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None
    assert cgroup.limit_bytes is None and cgroup.usage_bytes == 300 * MiB and cgroup.version == 2
    assert cgroup.available_bytes is None
    assert available_ram_bytes(tmp_path) == 4 * GiB


def test_v2_limit_above_host_available_uses_host(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=GiB)
    fake_v2(tmp_path, {"/app": (str(8 * GiB), 10 * MiB, 0)}, "/app")
    assert available_ram_bytes(tmp_path) == GiB


def test_v2_parent_limit_binds(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB)
    fake_v2(
        tmp_path,
        {"/": ("max", 0, 0), "/pod": (str(512 * MiB), 450 * MiB, 50 * MiB), "/pod/app": ("max", 100 * MiB, 0)},
        "/pod/app",
    )
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None
    assert cgroup.path == tmp_path / "sys/fs/cgroup/pod"
    assert cgroup.limit_bytes == 512 * MiB
    assert available_ram_bytes(tmp_path) == 512 * MiB - 400 * MiB


def test_v2_memory_high_counts_as_limit(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    fake_v2(tmp_path, {"/app": (str(2 * GiB), 0, 0)}, "/app", high={"/app": str(GiB)})
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.limit_bytes == GiB


def test_v2_namespaced_root(tmp_path: Path) -> None:
    # Inside a cgroup namespace the process sees itself at "/", and the mount is its cgroup.
    fake_proc(tmp_path, available=4 * GiB)
    fake_v2(tmp_path, {"/": (str(GiB), 100 * MiB, 0)}, "/")
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.path == tmp_path / "sys/fs/cgroup"
    assert available_ram_bytes(tmp_path) == GiB - 100 * MiB


def test_working_set_never_negative(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB)
    fake_v2(tmp_path, {"/app": (str(GiB), 10 * MiB, 20 * MiB)}, "/app")
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.working_set_bytes == 0
    assert available_ram_bytes(tmp_path) == GiB


def test_v2_mount_point_from_mountinfo(tmp_path: Path) -> None:
    # A cgroup2 mount in an unusual place, with a space escaped as \040.
    fake_proc(tmp_path)
    write(tmp_path, "proc/self/mountinfo", "30 1 0:26 / /run/my\\040cg rw,nosuid - cgroup2 cgroup2 rw\n")
    write(tmp_path, "proc/self/cgroup", "0::/app\n")
    write(tmp_path, "run/my cg/app/memory.max", f"{GiB}\n")
    write(tmp_path, "run/my cg/app/memory.current", f"{MiB}\n")
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.path == tmp_path / "run/my cg/app"
    assert cgroup.limit_bytes == GiB and cgroup.usage_bytes == MiB and cgroup.inactive_file_bytes == 0


# --------------------------------------------------------------- cgroup v1


def test_v1_limited(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB)
    directory = fake_v1(tmp_path, "/docker/abc", limit=GiB, usage=600 * MiB, inactive=200 * MiB)
    cgroup = cgroup_memory(tmp_path)
    assert cgroup == CgroupMemory(GiB, 600 * MiB, 1, directory, 200 * MiB)
    assert available_ram_bytes(tmp_path) == GiB - 400 * MiB


def test_v1_unlimited_value_is_none(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB)
    fake_v1(tmp_path, "/docker/abc", limit=V1_UNLIMITED, usage=600 * MiB, inactive=0)
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.limit_bytes is None and cgroup.version == 1
    assert available_ram_bytes(tmp_path) == 4 * GiB


def test_v1_namespaced_mount_root(tmp_path: Path) -> None:
    # The container's mount shows /docker/abc as its root at /sys/fs/cgroup/memory.
    fake_proc(tmp_path, available=4 * GiB)
    write(
        tmp_path,
        "proc/self/mountinfo",
        "25 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid master:15 - cgroup cgroup rw,memory\n"
        "36 31 0:33 /docker/abc /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu\n",
    )
    directory = fake_v1(tmp_path, "/docker/abc", limit=GiB, usage=GiB // 2, inactive=0, base="sys/fs/cgroup/memory")
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.path == directory
    assert available_ram_bytes(tmp_path) == GiB // 2


def test_v1_wins_over_empty_v2_in_hybrid_mode(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    fake_v1(tmp_path, "/app", limit=GiB, usage=0, inactive=0)
    write(tmp_path, "sys/fs/cgroup/cgroup.procs", "1\n")  # v2 root without memory files
    cgroup = cgroup_memory(tmp_path)
    assert cgroup is not None and cgroup.version == 1


def test_no_cgroup(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=3 * GiB)
    assert cgroup_memory(tmp_path) is None
    assert available_ram_bytes(tmp_path) == 3 * GiB


@settings(max_examples=60, deadline=None)
@given(
    host=st.integers(0, 64 * GiB),
    levels=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, 16 * GiB)), st.integers(0, 16 * GiB), st.integers(0, 16 * GiB)),
        min_size=1,
        max_size=4,
    ),
)
def test_available_is_min_over_hierarchy(host: int, levels: list[tuple[int | None, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake_proc(root, available=host // 1024 * 1024)
        paths = ["/" + "/".join(f"l{i}" for i in range(depth + 1)) for depth in range(len(levels))]
        tree = {
            path: ("max" if limit is None else str(limit), usage, inactive)
            for path, (limit, usage, inactive) in zip(paths, levels)
        }
        fake_v2(root, tree, paths[-1])
        headrooms = [limit - max(0, usage - inactive) for limit, usage, inactive in levels if limit is not None]
        expected = min([host // 1024 * 1024] + [max(0, h) for h in headrooms])
        assert available_ram_bytes(root) == expected
        assert MemoryProbe(root).available_ram_bytes() == expected


# ------------------------------------------------------------------ probes


def test_probe_sees_changes_between_polls(tmp_path: Path) -> None:
    fake_proc(tmp_path, available=4 * GiB, rss_pages=10, hwm_kib=100)
    fake_v2(tmp_path, {"/app": (str(GiB), 100 * MiB, 0)}, "/app")
    probe = MemoryProbe(tmp_path)
    assert probe.available_ram_bytes() == GiB - 100 * MiB
    write(tmp_path, "sys/fs/cgroup/app/memory.current", f"{700 * MiB}\n")
    assert probe.available_ram_bytes() == GiB - 700 * MiB
    assert probe.rss_bytes() == 10 * os.sysconf("SC_PAGE_SIZE")
    assert probe.peak_rss_bytes() == 100 * 1024


def test_fake_probe() -> None:
    probe = FakeMemoryProbe(available_bytes=GiB, rss_bytes=10 * MiB)
    assert isinstance(probe, MemoryProbe)
    assert probe.cgroup() is None
    assert (probe.available_ram_bytes(), probe.rss_bytes(), probe.peak_rss_bytes()) == (GiB, 10 * MiB, 10 * MiB)
    probe.allocate(100 * MiB)
    probe.allocate(-50 * MiB)
    assert probe.rss_bytes() == 60 * MiB
    assert probe.peak_rss_bytes() == 110 * MiB
    assert probe.available_ram_bytes() == GiB - 50 * MiB
    assert probe.reset_peak_rss() and probe.peak_rss_bytes() == 60 * MiB
    probe.set_available(-5)
    assert probe.available_ram_bytes() == 0
    assert probe.polls == 3


# ------------------------------------------------------------ real machine

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


@linux_only
def test_real_numbers_are_plausible() -> None:
    rss = process_rss_bytes()
    peak = peak_rss_bytes()
    assert 1 * MiB < rss < 1 << 40
    assert peak >= rss
    # MemAvailable moves between two reads (other processes free and take memory): compare with
    # readings on either side, with a little room
    before = mem_available_bytes()
    available = available_ram_bytes()
    after = mem_available_bytes()
    assert 0 < available <= max(before, after) + 16 * MiB
    cgroup = cgroup_memory()
    if cgroup is not None:
        assert cgroup.version in (1, 2) and cgroup.path.is_dir() and cgroup.usage_bytes > 0
    probe = MemoryProbe()
    assert probe.rss_bytes() > 0 and probe.peak_rss_bytes() >= probe.rss_bytes() // 2
    assert probe.available_ram_bytes() > 0


@linux_only
def test_touching_200_mib_raises_peak() -> None:
    size = 200 * MiB
    was_reset = reset_peak_rss()
    rss_before = process_rss_bytes()
    peak_before = peak_rss_bytes()
    block = np.ones(size, dtype=np.uint8)  # np.ones writes every page, so all of it becomes resident
    rss_during = process_rss_bytes()
    peak_after = peak_rss_bytes()
    del block
    assert rss_during - rss_before >= 0.95 * size
    assert peak_after >= rss_before + 0.95 * size
    if was_reset:
        # With the mark reset just before, the peak moved by about the block alone.
        assert 0.95 * size <= peak_after - peak_before <= size + 32 * MiB
        assert reset_peak_rss() and peak_rss_bytes() < peak_after - size // 2
