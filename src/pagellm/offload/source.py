"""Positional reads of byte ranges of the model file into page-aligned buffers.

``direct`` opens the file with O_DIRECT, so reads bypass the page cache and the memory the
pager counts is the memory the process uses; the enclosing aligned range is read and the
caller gets the slice it asked for. ``buffered`` is a plain ``pread`` (followed by
``POSIX_FADV_DONTNEED`` so the cache does not grow behind the budget's back). ``mmap`` copies
out of a shared mapping, as llama.cpp's default loader pages, kept for comparison.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

PAGE = mmap.PAGESIZE
DIRECT_ALIGNMENT = 4096  # covers 512- and 4096-byte logical blocks
MAX_READ_CHUNK = 64 << 20  # one syscall never asks for more; keeps latency of a single read bounded
IO_MODES = ("auto", "direct", "buffered", "mmap")


class SourceError(OSError):
    """A read of the model file failed; the message names the file, the range and the cause."""


def allocate_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned, zero-filled uint8 array backed by its own anonymous mapping.

    Its pages return to the OS as soon as the last reference to it goes, so a buffer the
    pager drops is memory the process no longer holds.
    """
    size = max(PAGE, -(-nbytes // PAGE) * PAGE)
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)


@dataclass
class SourceStats:
    """What the source did: reads issued, bytes that came from the file, seconds in reads."""

    reads: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0


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
        """
        start, length = self.span(offset, nbytes)
        if at % self.alignment or at + length > buffer.nbytes:
            raise ValueError(f"buffer of {buffer.nbytes} bytes cannot take {length} bytes at {at}")
        if offset < 0 or offset + nbytes > self.file_size:
            raise SourceError(
                f"{self.path}: range {offset}+{nbytes} lies outside the file ({self.file_size} bytes)"
            )
        t0 = time.perf_counter()
        got = self._read_span(start, length, buffer[at : at + length])
        with self._stats_lock:
            self.stats.reads += 1
            self.stats.bytes_read += got
            self.stats.read_seconds += time.perf_counter() - t0
        inner = at + (offset - start)
        return buffer[inner : inner + nbytes]

    def _read_span(self, start: int, length: int, out: np.ndarray) -> int:
        if self.mode == "mmap":
            assert self._mmap is not None
            out[:] = np.frombuffer(self._mmap, dtype=np.uint8, count=length, offset=start)
            return length
        view = memoryview(out)
        done = 0
        while done < length:
            want = min(length - done, MAX_READ_CHUNK)
            try:
                n = os.preadv(self._fd, [view[done : done + want]], start + done)
            except OSError as e:
                raise SourceError(f"{self.path}: read of {want} bytes at {start + done} failed: {e.strerror}") from e
            if n == 0:
                # An aligned span may reach past the end of the file; short of the size we
                # opened with, though, the file shrank under us.
                if start + done >= self.file_size:
                    break
                raise SourceError(f"{self.path}: file ended at {start + done} (truncated while in use?)")
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
