"""Positional reads of byte ranges of the model file into page-aligned buffers.

``direct`` opens the file with O_DIRECT, so reads bypass the page cache and the memory the
pager counts is the memory the process uses; the enclosing aligned range is read and the
caller gets the slice it asked for. ``buffered`` is a plain ``pread`` (followed by
``POSIX_FADV_DONTNEED`` so the cache does not grow behind the budget's back). ``mmap`` copies
out of a shared mapping, as llama.cpp's default loader pages, kept for comparison.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20  # transparent huge page size on x86-64 and arm64 (4 KiB base pages)
DIRECT_ALIGNMENT = 4096  # covers 512- and 4096-byte logical blocks
# One syscall never asks for more. A small read (a token's embedding row) queues behind whatever
# the reader has in the device: behind a 64 MiB read it waited 15 ms (median) here, behind 16 MiB
# 2 ms, and large reads ran as fast in 16 MiB pieces (2.4-2.55 GB/s either way).
MAX_READ_CHUNK = 16 << 20
IO_MODES = ("auto", "direct", "buffered", "mmap")
# Errors a second try can cure: a signal, a busy device, a one-off media or network-filesystem hiccup.
TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EIO})
MAX_READ_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.01  # doubled per attempt: 10 ms, 20 ms


class SourceError(OSError):
    """A read of the model file failed; the message names the file, the range and the cause."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 cause_errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.errno = cause_errno


def _huge_pages_usable() -> bool:
    """Whether anonymous mappings that ask for transparent huge pages (MADV_HUGEPAGE) get them."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


HUGE_PAGES = _huge_pages_usable()


def page_capacity(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages (at least one)."""
    return max(PAGE, -(-nbytes // PAGE) * PAGE)


def buffer_capacity(nbytes: int) -> int:
    """The bytes a buffer for ``nbytes`` takes: whole pages, run on to a huge-page boundary where the tail is large.

    O_DIRECT pins the destination's pages, and a buffer ending inside a huge page has its tail on
    4 KiB pages: the last 1.6 MiB of a 9.6 MiB read took 2.9 ms there against 0.8 ms when the
    buffer ran on to the next 2 MiB boundary (reads of 10 MB units at 1.2-1.5 GB/s instead of
    2+). Rounding costs budget, though, which is then read from disk each token. A tail of half a
    huge page or more costs more read time on small pages than its rounding costs in memory, so
    such buffers are rounded up (the whole last huge page is faulted in, so the process holds the
    rounded size); a shorter tail stays on small pages (a 7B layer's 36 MiB + 16 KiB of attention).
    """
    pages = page_capacity(nbytes)
    tail = pages % HUGE_PAGE
    if HUGE_PAGES and pages > HUGE_PAGE and tail >= HUGE_PAGE // 2:
        return pages - tail + HUGE_PAGE
    return pages


def allocate_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned, zero-filled uint8 array of ``nbytes`` in whole pages, backed by its own anonymous mapping.

    Its pages return to the OS as soon as the last reference to it goes, so a buffer the
    pager drops is memory the process no longer holds. The caller picks the size
    (``buffer_capacity`` for a streamed unit): a buffer is exactly what the pager counts for it.
    """
    size = page_capacity(nbytes)
    pad = HUGE_PAGE if size >= HUGE_PAGE else 0
    mapping = mmap.mmap(-1, size + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return _huge_page_view(mapping, size)


def _huge_page_view(mapping: mmap.mmap, size: int) -> np.ndarray:
    """``size`` bytes of ``mapping`` starting on a huge-page boundary, the mapping cut to end there.

    O_DIRECT pins every page of the destination; with 2 MiB pages a 100 MiB read ran at 1.7-1.8
    GB/s here against 0.9 with 4 KiB ones, and a 37 MiB buffer the kernel placed off a 2 MiB
    boundary got 12 huge pages instead of 18 and read 10-15% slower. So the view starts on a
    boundary (the mapping has up to 2 MiB of slack before it, never touched and so never resident)
    and the mapping ends where the view does: no huge page reaches past it, and once filled the
    process holds exactly ``size`` bytes for it.
    """
    offset = 0
    if size >= HUGE_PAGE:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))  # the export ends with the statement
        offset = -address % HUGE_PAGE
        if len(mapping) != offset + size:
            mapping.resize(offset + size)  # shrinks in place: the start, and so the offset, stay
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP disabled or unsupported: small pages, same bytes
                pass
    view = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=offset)
    # Fault every page in now: a read may fill less than the buffer (streamed buffers share one
    # size), and the pager counts the whole buffer as held, so the process must hold all of it.
    view[::PAGE] = 0
    return view


def buffer_mapping(buffer: np.ndarray) -> mmap.mmap | None:
    """The anonymous mapping behind a buffer from allocate_buffer (None for any other array)."""
    mapping = getattr(buffer.base, "obj", None)
    return mapping if isinstance(mapping, mmap.mmap) else None


def remap_buffer(mapping: mmap.mmap, nbytes: int) -> np.ndarray | None:
    """The pages of an evicted buffer's ``mapping`` remapped to ``nbytes``, as a new buffer; or None.

    Shrinking returns the tail to the OS and growing adds pages only for the difference (mremap),
    so a unit read into a victim of another size faults in few new pages: the kernel zeroes every
    new page, and reads into fresh pages ran at 1.9 GB/s here against 2.8 into pages already held.
    The contents are not kept (the next read overwrites them); the view starts on a huge-page
    boundary again. None while any array over the mapping is alive (its memory must not move under
    it; the caller must drop its own first) or where the platform cannot remap: the caller then
    allocates anew.
    """
    size = page_capacity(nbytes)
    try:
        mapping.resize(size + (HUGE_PAGE if size >= HUGE_PAGE else 0))  # may move: room to align
        return _huge_page_view(mapping, size)
    except (BufferError, OSError, SystemError, ValueError):
        return None


class PlannedRead(NamedTuple):
    """One read of a plan: the range asked for, the aligned span read, and where it lands."""

    offset: int
    nbytes: int
    start: int
    length: int
    into: memoryview  # the buffer's bytes the span is read into


ReadPlan = tuple[PlannedRead, ...]


@dataclass
class SourceStats:
    """What the source did: reads issued, bytes that came from the file, seconds in reads."""

    reads: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    retries: int = 0  # reads tried again after a transient error


class FileSource:
    """Reads byte ranges of one file; ``mode`` is 'direct', 'buffered' or 'mmap' once opened."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "auto"):
        if mode not in IO_MODES:
            raise ValueError(f"io mode {mode!r}: expected one of {', '.join(IO_MODES)}")
        self.path = os.fspath(path)
        self.fallback_reason: str | None = None
        self.stats = SourceStats()
        self._stats_lock = threading.Lock()
        self._mmap: mmap.mmap | None = None
        self._fd = -1
        self.file_size = os.path.getsize(self.path)
        if mode in ("auto", "direct"):
            reason = self._try_open_direct()
            if reason is None:
                self.mode = "direct"
            elif mode == "direct":
                raise SourceError(f"{self.path}: O_DIRECT reads are not possible here ({reason})")
            else:
                self.fallback_reason = reason
                mode = "buffered"
        if mode == "buffered":
            self._fd = os.open(self.path, os.O_RDONLY)
            self.mode = "buffered"
        elif mode == "mmap":
            self._fd = os.open(self.path, os.O_RDONLY)
            self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) if self.file_size else None
            self.mode = "mmap"
        # The inode we read from: an open descriptor keeps reading it even when the path is later
        # deleted or renamed over, so only a change to this inode (truncation) can break reads.
        opened = os.fstat(self._fd)
        self.inode = (opened.st_dev, opened.st_ino)

    def _try_open_direct(self) -> str | None:
        """Open with O_DIRECT and prove one aligned read works; return why not otherwise."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return "this platform has no O_DIRECT"
        try:
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError as e:
            return f"open with O_DIRECT failed: {e.strerror}"
        try:
            probe = allocate_buffer(DIRECT_ALIGNMENT)
            os.preadv(fd, [memoryview(probe)], 0)
        except OSError as e:
            os.close(fd)
            return f"an O_DIRECT read failed: {e.strerror}"
        self._fd = fd
        return None

    @property
    def alignment(self) -> int:
        """Alignment reads are widened to (1 when none is needed)."""
        return DIRECT_ALIGNMENT if self.mode == "direct" else 1

    def span(self, offset: int, nbytes: int) -> tuple[int, int]:
        """The (start, length) actually read to serve ``nbytes`` at ``offset``."""
        a = self.alignment
        start = offset // a * a
        end = -(-(offset + nbytes) // a) * a
        return start, end - start

    def buffer_bytes(self, offset: int, nbytes: int) -> int:
        """Bytes of buffer a read of this range needs (its aligned span)."""
        return self.span(offset, nbytes)[1]

    def read_into(self, offset: int, nbytes: int, buffer: np.ndarray, at: int = 0) -> np.ndarray:
        """Read ``nbytes`` at file ``offset`` into ``buffer[at:]``; return the view of exactly those bytes.

        ``at`` must be a multiple of the alignment, and the buffer must hold the aligned span.
        Transient errors (EINTR, EAGAIN, EIO) are retried up to MAX_READ_ATTEMPTS times; anything
        else is a SourceError naming the file, the offset and what happened to the file.
        """
        plan = self.plan(((offset, nbytes, at),), buffer)
        self.run(plan)
        inner = at + (offset - self.span(offset, nbytes)[0])
        return buffer[inner : inner + nbytes]

    def plan(self, ranges: Iterable[tuple[int, int, int]], buffer: np.ndarray) -> ReadPlan:
        """The reads that bring file ranges (offset, bytes, position in ``buffer``) into ``buffer``, laid
        out and checked now so that ``run`` later does little besides the reads.

        Between two reads the pager's reader runs Python on a CPU whose caches the read left cold
        (here a numpy slice took 0.4 us warm and 13-29 us after 5 ms of reading, spinning or
        sleeping), and the disk idles meanwhile: the slicing belongs before the read, not between.
        """
        view = memoryview(buffer)
        spans = []
        for offset, nbytes, at in ranges:
            start, length = self.span(offset, nbytes)
            if at % self.alignment or at + length > buffer.nbytes:
                raise ValueError(f"buffer of {buffer.nbytes} bytes cannot take {length} bytes at {at}")
            if offset < 0 or offset + nbytes > self.file_size:
                raise SourceError(
                    f"{self.path}: range {offset}+{nbytes} lies outside the file ({self.file_size} bytes)",
                    path=self.path, offset=offset,
                )
            for piece in range(0, length, MAX_READ_CHUNK):  # one syscall never asks for more
                size = min(MAX_READ_CHUNK, length - piece)
                first = max(offset, start + piece)
                last = min(offset + nbytes, start + piece + size)
                spans.append(PlannedRead(first, max(0, last - first), start + piece, size,
                                         view[at + piece : at + piece + size]))
        return tuple(spans)

    def run(self, plan: ReadPlan) -> int:
        """Do the reads ``plan`` lays out (retrying and explaining as ``read_into`` does); the bytes read."""
        t0 = time.perf_counter()
        got = 0
        for read in plan:
            got += self._read_with_retries(read.offset, read.nbytes, read.start, read.length, read.into)
        with self._stats_lock:
            self.stats.reads += len(plan)
            self.stats.bytes_read += got
            self.stats.read_seconds += time.perf_counter() - t0
        return got

    def _read_with_retries(self, offset: int, nbytes: int, start: int, length: int, out: memoryview) -> int:
        for attempt in range(1, MAX_READ_ATTEMPTS + 1):
            try:
                if self.mode == "mmap":  # pread finds a truncation itself (a short read)
                    self._check_not_truncated(offset, nbytes)
                return self._read_span(start, length, out)
            except SourceError:
                raise
            except OSError as e:
                if e.errno not in TRANSIENT_ERRNOS or attempt == MAX_READ_ATTEMPTS:
                    tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                    raise self._error(offset, f"read of {nbytes} bytes failed{tries}: {e.strerror or e}",
                                      e.errno) from e
                with self._stats_lock:
                    self.stats.retries += 1
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _check_not_truncated(self, offset: int, nbytes: int) -> None:
        """Fail before reading a range the file no longer holds (in mmap mode that read would be a SIGBUS).

        Only mmap mode asks: the fstat releases the GIL, and the reader then waits to take it back
        from the forward pass before its next read (pread sees a truncation as a short read).
        """
        size = os.fstat(self._fd).st_size
        if size < offset + nbytes:
            raise self._error(offset, f"read of {nbytes} bytes failed")

    def _error(self, offset: int, what: str, cause_errno: int | None = None) -> SourceError:
        """A SourceError for ``offset``, saying what became of the file if it changed under us."""
        return SourceError(f"{self.path}: {what} at offset {offset}{self._file_change()}",
                           path=self.path, offset=offset, cause_errno=cause_errno)

    def _file_change(self) -> str:
        """', truncated ...' / ', deleted ...' / ', replaced ...' when the file changed since open, else ''."""
        try:
            mine = os.fstat(self._fd)
        except OSError:
            return ""
        if mine.st_size < self.file_size:
            return f" (truncated while in use: {mine.st_size} of {self.file_size} bytes remain)"
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return " (the file was deleted while in use)"
        except OSError:
            return ""
        if (now.st_dev, now.st_ino) != self.inode:
            return " (the path now names another file: replaced while in use)"
        return ""

    def _read_span(self, start: int, length: int, view: memoryview) -> int:
        """Read the aligned span into ``view``; raises OSError as the system gives it (``run`` retries and explains)."""
        if self.mode == "mmap":
            assert self._mmap is not None
            np.frombuffer(view, dtype=np.uint8)[:] = np.frombuffer(self._mmap, dtype=np.uint8, count=length, offset=start)
            return length
        done = 0
        while done < length:  # one read (``plan`` cut the span to MAX_READ_CHUNK) unless it comes up short
            n = os.preadv(self._fd, (view[done:] if done else view,), start + done)
            if n == 0:
                # An aligned span may reach past the end of the file; short of the size we
                # opened with, though, the file shrank under us.
                if start + done >= self.file_size:
                    break
                raise self._error(start + done, "the file ended early (truncated while in use?)")
            done += n
        if self.mode == "buffered":
            os.posix_fadvise(self._fd, start, length, os.POSIX_FADV_DONTNEED)
        return done

    def evict_page_cache(self) -> None:
        """Drop the file's pages from the OS cache so the next read comes from the disk."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the file (and the mapping, in mmap mode)."""
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
