"""How much RAM this process uses and how much it may still take (cgroup aware).

Everything reads Linux's text interfaces under ``/proc`` and ``/sys/fs/cgroup``.
Each function takes ``root`` (default ``/``) so tests can point it at a fake
tree built in a temporary directory.

Why cgroups matter: inside a container ``/proc/meminfo`` describes the host,
so ``MemAvailable`` may promise gigabytes the container's memory limit will
never grant. The honest headroom is the smaller of the host's MemAvailable and
the tightest cgroup limit minus that cgroup's working set.
"""
from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/")

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX in bytes (about 2**63,
# rounded down to a page); no real machine has 2**60 bytes of RAM.
_V1_UNLIMITED_THRESHOLD = 1 << 60

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


# ---------------------------------------------------------------------------
# small readers


def _read_text(path: Path) -> str | None:
    """Return a file's text, or None when it is missing or unreadable."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    """Return the integer a one-value file holds, or None (missing, "max", garbage)."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _kib_field(text: str | None, key: str) -> int | None:
    """Return ``key: N kB`` from a /proc status-style text, in bytes."""
    if text is None:
        return None
    prefix = key + ":"
    for line in text.splitlines():
        if line.startswith(prefix):
            parts = line[len(prefix):].split()
            try:
                return int(parts[0]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _flat_keyed(text: str | None) -> dict[str, int]:
    """Parse ``key value`` lines (memory.stat) into a dict, skipping odd lines."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def _page_size() -> int:
    """Return the system page size in bytes."""
    return os.sysconf("SC_PAGE_SIZE")


def _proc_self(root: Path) -> Path:
    return Path(root) / "proc" / "self"


# ---------------------------------------------------------------------------
# this process


def process_rss_bytes(root: Path = DEFAULT_ROOT) -> int:
    """Return the current resident set size of this process in bytes."""
    # statm is one short line, the cheapest thing to poll; its unit is pages.
    statm = _read_text(_proc_self(root) / "statm")
    if statm is not None:
        fields = statm.split()
        if len(fields) >= 2 and fields[1].isdigit():
            return int(fields[1]) * _page_size()
    rss = _kib_field(_read_text(_proc_self(root) / "status"), "VmRSS")
    if rss is not None:
        return rss
    raise OSError(f"cannot read the resident set size under {root}")


def peak_rss_bytes(root: Path = DEFAULT_ROOT) -> int:
    """Return the peak resident set size of this process (VmHWM) in bytes."""
    hwm = _kib_field(_read_text(_proc_self(root) / "status"), "VmHWM")
    if hwm is not None:
        return hwm
    # ru_maxrss is in KiB on Linux; it never resets, unlike VmHWM.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss(root: Path = DEFAULT_ROOT) -> bool:
    """Reset VmHWM to the current RSS; return whether the kernel accepted it."""
    # Writing "5" to clear_refs resets the high-water mark (Linux >= 4.0). It
    # lets a benchmark measure the peak of one phase rather than of the process.
    try:
        with open(_proc_self(root) / "clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# the machine


def mem_available_bytes(root: Path = DEFAULT_ROOT) -> int:
    """Return the host's MemAvailable in bytes (the kernel's estimate of free + reclaimable)."""
    meminfo = _read_text(Path(root) / "proc" / "meminfo")
    available = _kib_field(meminfo, "MemAvailable")
    if available is not None:
        return available
    # Kernels before 3.14 lack MemAvailable; free + buffers + page cache is the
    # usual approximation (it overestimates: not all cache is reclaimable).
    parts = [_kib_field(meminfo, key) for key in ("MemFree", "Buffers", "Cached")]
    if parts[0] is not None:
        return sum(p for p in parts if p is not None)
    # No /proc at all (not Linux): ask libc for free physical pages.
    return os.sysconf("SC_AVPHYS_PAGES") * _page_size()


# ---------------------------------------------------------------------------
# cgroups


@dataclass(frozen=True)
class CgroupMemory:
    """The memory limit and usage of the cgroup that constrains this process most."""

    limit_bytes: int | None  # None: no limit anywhere up the hierarchy
    usage_bytes: int  # what the cgroup is charged, page cache included
    version: int  # 1 or 2
    path: Path  # the cgroup directory the numbers come from
    inactive_file_bytes: int = 0  # page cache the kernel reclaims before OOM

    @property
    def working_set_bytes(self) -> int:
        """Usage minus reclaimable file cache: what cannot be given back."""
        return max(0, self.usage_bytes - self.inactive_file_bytes)

    @property
    def available_bytes(self) -> int | None:
        """Bytes still available under the limit (None when unlimited)."""
        if self.limit_bytes is None:
            return None
        return max(0, self.limit_bytes - self.working_set_bytes)


@dataclass(frozen=True)
class _CgroupLocation:
    version: int
    leaf: Path  # this process's cgroup directory
    top: Path  # the mount point: walking up stops here


def _unescape_mount_field(field: str) -> str:
    """Decode mountinfo's octal escapes (``\\040`` for a space)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def _cgroup_mounts(root: Path) -> dict[int, tuple[str, Path]]:
    """Map cgroup version → (mount root inside the hierarchy, mount point) from mountinfo."""
    text = _read_text(_proc_self(root) / "mountinfo")
    mounts: dict[int, tuple[str, Path]] = {}
    for line in (text or "").splitlines():
        # "id parent major:minor root mountpoint options [optional...] - fstype source superopts"
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        left_fields, right_fields = left.split(), right.split()
        if len(left_fields) < 5 or len(right_fields) < 3:
            continue
        fstype, super_options = right_fields[0], right_fields[2].split(",")
        mount_root = _unescape_mount_field(left_fields[3])
        mount_point = Path(root) / _unescape_mount_field(left_fields[4]).lstrip("/")
        if fstype == "cgroup2":
            mounts.setdefault(2, (mount_root, mount_point))
        elif fstype == "cgroup" and "memory" in super_options:
            mounts.setdefault(1, (mount_root, mount_point))
    return mounts


def _process_cgroup_paths(root: Path) -> dict[int, str]:
    """Map cgroup version → this process's path in that hierarchy from /proc/self/cgroup."""
    text = _read_text(_proc_self(root) / "cgroup")
    paths: dict[int, str] = {}
    for line in (text or "").splitlines():
        # "hierarchy-id:controllers:path"; v2 is "0::path".
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths.setdefault(2, path)
        elif "memory" in controllers.split(","):
            paths.setdefault(1, path)
    return paths


def _locate_cgroup(root: Path) -> _CgroupLocation | None:
    """Find the directory of this process's memory cgroup, or None when there is none."""
    paths = _process_cgroup_paths(root)
    mounts = _cgroup_mounts(root)
    # A v1 memory hierarchy, when present, owns the memory controller; the
    # v2 hierarchy beside it (hybrid mode) then has no memory files.
    for version in (1, 2):
        if version not in paths:
            continue
        default_point = Path(root) / ("sys/fs/cgroup/memory" if version == 1 else "sys/fs/cgroup")
        mount_root, mount_point = mounts.get(version, ("/", default_point))
        leaf = _join_cgroup_path(mount_point, mount_root, paths[version])
        if leaf is not None:
            return _CgroupLocation(version, leaf, mount_point)
    return None


def _join_cgroup_path(mount_point: Path, mount_root: str, cgroup_path: str) -> Path | None:
    """Return the directory of ``cgroup_path`` under a mount of ``mount_root``."""
    inside = mount_root == "/" or cgroup_path == mount_root or cgroup_path.startswith(mount_root + "/")
    relative = os.path.relpath(cgroup_path, mount_root) if inside else "."
    if relative != "." and not relative.startswith(".."):
        candidate = mount_point / relative
        if candidate.is_dir():
            return candidate
    # With a cgroup namespace the path in /proc/self/cgroup can be relative to
    # a namespace root that the mount already is; the mount point is then ours.
    return mount_point if mount_point.is_dir() else None


def _read_level(directory: Path, version: int) -> CgroupMemory | None:
    """Read one cgroup directory's limit and usage, or None when it has no memory files."""
    stat = _flat_keyed(_read_text(directory / "memory.stat"))
    if version == 2:
        usage = _read_int(directory / "memory.current")
        if usage is None:
            return None  # the v2 root cgroup has no memory.current
        # memory.high throttles hard before memory.max kills, so budget to the lower.
        limits = [_read_int(directory / name) for name in ("memory.max", "memory.high")]
        known = [value for value in limits if value is not None]  # "max" parses as None
        limit = min(known) if known else None
        inactive = stat.get("inactive_file", 0)
    else:
        usage = _read_int(directory / "memory.usage_in_bytes")
        if usage is None:
            return None
        limit = _read_int(directory / "memory.limit_in_bytes")
        if limit is not None and limit >= _V1_UNLIMITED_THRESHOLD:
            limit = None
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return CgroupMemory(limit, usage, version, directory, inactive)


def _read_cgroup(location: _CgroupLocation) -> CgroupMemory | None:
    """Walk from the leaf cgroup to the mount point; return the level with the least headroom."""
    # A parent's limit binds its children too, and the kernel does not copy it
    # into the child's memory.max, so every ancestor has to be read.
    levels: list[CgroupMemory] = []
    directory = location.leaf
    while True:
        level = _read_level(directory, location.version)
        if level is not None:
            levels.append(level)
        if directory == location.top or location.top not in directory.parents:
            break
        directory = directory.parent
    if not levels:
        return None
    limited = [level for level in levels if level.limit_bytes is not None]
    if not limited:
        return levels[0]
    return min(limited, key=lambda level: level.available_bytes or 0)


def cgroup_memory(root: Path = DEFAULT_ROOT) -> CgroupMemory | None:
    """Return the memory cgroup that constrains this process most, or None outside cgroups."""
    location = _locate_cgroup(Path(root))
    return _read_cgroup(location) if location is not None else None


def _combine_available(host_available: int, cgroup: CgroupMemory | None) -> int:
    """The smaller of the host's MemAvailable and the cgroup's headroom."""
    if cgroup is None or cgroup.available_bytes is None:
        return host_available
    return min(host_available, cgroup.available_bytes)


def available_ram_bytes(root: Path = DEFAULT_ROOT) -> int:
    """Return the RAM this process can still take: min(MemAvailable, cgroup limit − working set)."""
    return _combine_available(mem_available_bytes(root), cgroup_memory(root))


# ---------------------------------------------------------------------------
# probes for the pager


class MemoryProbe:
    """Polls this process's RSS and the RAM still available to it."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        # Where our cgroup lives does not change while we run; finding it means
        # parsing mountinfo, which is too slow to repeat on every poll.
        self._location: _CgroupLocation | None = _locate_cgroup(self.root)

    def cgroup(self) -> CgroupMemory | None:
        """Return the binding cgroup's limit and usage now (None outside cgroups)."""
        return _read_cgroup(self._location) if self._location is not None else None

    def available_ram_bytes(self) -> int:
        """Return the RAM this process can still take without swapping or being killed."""
        return _combine_available(mem_available_bytes(self.root), self.cgroup())

    def rss_bytes(self) -> int:
        """Return this process's resident set size now."""
        return process_rss_bytes(self.root)

    def peak_rss_bytes(self) -> int:
        """Return this process's peak resident set size (since start or the last reset)."""
        return peak_rss_bytes(self.root)

    def reset_peak_rss(self) -> bool:
        """Reset the peak RSS mark where the kernel allows it; return whether it worked."""
        return reset_peak_rss(self.root)


class FakeMemoryProbe(MemoryProbe):
    """A MemoryProbe whose numbers tests set by hand."""

    def __init__(self, available_bytes: int = 8 << 30, rss_bytes: int = 0) -> None:
        # No super().__init__(): a fake must not look at the real /proc.
        self.root = DEFAULT_ROOT
        self._location = None
        self.available = available_bytes
        self.rss = rss_bytes
        self.peak = rss_bytes
        self.polls = 0  # how many times available_ram_bytes() was asked

    def set_available(self, available_bytes: int) -> None:
        """Set what available_ram_bytes() returns from now on."""
        self.available = available_bytes

    def allocate(self, nbytes: int) -> None:
        """Pretend the process took ``nbytes`` (negative to give them back)."""
        self.rss += nbytes
        self.available -= nbytes
        self.peak = max(self.peak, self.rss)

    def cgroup(self) -> CgroupMemory | None:
        """A fake probe lives in no cgroup."""
        return None

    def available_ram_bytes(self) -> int:
        """Return the set available bytes (never negative)."""
        self.polls += 1
        return max(0, self.available)

    def rss_bytes(self) -> int:
        """Return the set RSS."""
        return self.rss

    def peak_rss_bytes(self) -> int:
        """Return the highest RSS seen since construction or the last reset."""
        return self.peak

    def reset_peak_rss(self) -> bool:
        """Reset the peak to the current RSS."""
        self.peak = self.rss
        return True


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def fix_malloc_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``nbytes`` and more by mmap, and stop it raising that bar.

    glibc raises its mmap threshold (up to 32 MiB) each time a large mmap'd block is freed; the
    activation arrays of later steps then come from the heap, which does not shrink, and a
    batched server's RSS grew from 221 to over 670 MiB against a 150 MiB budget. A fixed
    threshold returns large arrays to the OS when freed. Returns whether it was applied.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False  # not glibc: nothing to fix


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages from the process now
COMPILER_LIBRARIES = ("libllvmlite",)  # numba's LLVM: needed to compile and load kernels, not to run them


def release_compiler_pages(root: Path = DEFAULT_ROOT) -> int:
    """Hand back the resident pages of numba's compiler library; returns the bytes they held.

    LLVM's code (about 68 MiB here) is touched while numba loads the kernels and is dead weight
    once they are loaded, yet it stays in the process's RSS, where it takes a third of the runtime's
    allowance next to the budget. The pages are clean file pages: reclaiming them loses nothing,
    and they fault back in if a kernel is ever compiled later. Call it after ``kernels.warm_up``.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        maps = _read_text(_proc_self(root) / "maps") or ""
    except (OSError, AttributeError):
        return 0
    before = _mapped_rss_bytes(root, COMPILER_LIBRARIES)
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 6 or not any(name in fields[5] for name in COMPILER_LIBRARIES):
            continue
        start, end = (int(v, 16) for v in fields[0].split("-"))
        libc.madvise(start, end - start, MADV_PAGEOUT)  # an old kernel says EINVAL: nothing lost
    return max(0, before - _mapped_rss_bytes(root, COMPILER_LIBRARIES))


def _mapped_rss_bytes(root: Path, names: tuple[str, ...]) -> int:
    """Resident bytes of the mappings whose path contains one of ``names`` (from smaps)."""
    total, counting = 0, False
    for line in (_read_text(_proc_self(root) / "smaps") or "").splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            counting = len(head) == 6 and any(name in head[5] for name in names)
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
