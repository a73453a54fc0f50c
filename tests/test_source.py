import numpy as np
import pytest
from shared_paths import fixture_path

from pagellm.offload.source import FileSource, SourceError, allocate_buffer

PATH = fixture_path("synth-llama-Q4_0")


@pytest.mark.parametrize("mode", ["auto", "direct", "buffered", "mmap"])
def test_reads_return_exactly_the_file_bytes(mode):
    data = PATH.read_bytes()
    rng = np.random.default_rng(0)
    with FileSource(PATH, mode) as src:
        assert src.mode in ("direct", "buffered", "mmap")
        buf = allocate_buffer(1 << 20)
        for _ in range(200):
            n = int(rng.integers(1, 300_000))
            off = int(rng.integers(0, len(data) - n))
            view = src.read_into(off, n, buf)
            assert bytes(view) == data[off : off + n]
        view = src.read_into(len(data) - 10, 10, buf)  # last partial block
        assert bytes(view) == data[-10:]
        assert src.stats.reads == 201 and src.stats.bytes_read >= 10


@pytest.mark.parametrize("mode", ["direct", "buffered", "mmap"])
def test_a_plan_cuts_reads_to_the_largest_syscall_and_brings_every_range(mode, monkeypatch):
    import pagellm.offload.source as source

    monkeypatch.setattr(source, "MAX_READ_CHUNK", 3 * 4096)
    data = PATH.read_bytes()
    ranges = [(5000, 40_000, 0), (len(data) - 9000, 9000, 49_152)]  # the second runs to the end of the file
    with FileSource(PATH, mode) as src:
        buf = allocate_buffer(65_536)
        plan = src.plan(ranges, buf)
        assert all(r.length <= 3 * 4096 for r in plan)
        assert sum(r.nbytes for r in plan) == 49_000  # the bytes asked for, each counted once
        assert src.run(plan) >= 49_000 and src.stats.reads == len(plan) > len(ranges)
        for offset, nbytes, at in ranges:
            inner = at + offset - src.span(offset, nbytes)[0]
            assert bytes(buf[inner : inner + nbytes]) == data[offset : offset + nbytes]
        with pytest.raises(ValueError, match="cannot take"):
            src.plan([(0, 70_000, 0)], buf)


def test_auto_prefers_direct_and_reports_alignment():
    with FileSource(PATH) as src:
        assert src.mode == "direct" and src.alignment == 4096 and src.fallback_reason is None
        assert src.span(5000, 10) == (4096, 4096)
        assert src.span(4095, 2) == (0, 8192)


def test_buffers_are_page_aligned():
    buf = allocate_buffer(10_000)
    assert buf.ctypes.data % 4096 == 0 and buf.nbytes == 12288


def test_out_of_range_read_is_an_error():
    with FileSource(PATH, "buffered") as src:
        with pytest.raises(SourceError, match="outside the file"):
            src.read_into(src.file_size - 4, 8, allocate_buffer(4096))


def test_file_truncated_after_open_is_a_clear_error(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 100_000)
    with FileSource(p, "buffered") as src:
        p.write_bytes(b"x" * 10_000)
        with pytest.raises(SourceError, match="truncated"):
            src.read_into(50_000, 1000, allocate_buffer(4096))


def test_unknown_mode():
    with pytest.raises(ValueError, match="io mode"):
        FileSource(PATH, "fast")


def test_buffer_capacity_is_whole_pages_run_on_to_a_huge_page_where_the_tail_is_large():
    from pagellm.offload.source import HUGE_PAGE, HUGE_PAGES, PAGE, buffer_capacity

    def pages(n):
        return -(-n // PAGE) * PAGE

    assert buffer_capacity(1) == PAGE and buffer_capacity(PAGE + 1) == 2 * PAGE
    assert buffer_capacity(HUGE_PAGE - 1) == HUGE_PAGE  # under one huge page: whole small pages
    long_tail = 9 * (1 << 20) + 12345  # 1 MiB + 12345 past a boundary: rounded up
    assert buffer_capacity(long_tail) == (10 << 20 if HUGE_PAGES else pages(long_tail))
    short_tail = (36 << 20) + 16384  # a few pages past a boundary: left on small pages
    assert buffer_capacity(short_tail) == pages(short_tail)
    for n in (long_tail, short_tail):  # a buffer is exactly the size asked for: what the pager counts
        assert allocate_buffer(buffer_capacity(n)).nbytes == buffer_capacity(n)
        assert allocate_buffer(n).nbytes == pages(n)


def test_remap_buffer_resizes_aligned_and_refuses_while_a_view_lives():
    from pagellm.offload.source import HUGE_PAGE, buffer_mapping, remap_buffer

    def address(a):
        return a.__array_interface__["data"][0]

    buf = allocate_buffer(8 << 20)
    buf[:] = 7
    assert address(buf) % HUGE_PAGE == 0 and buf.nbytes == 8 << 20
    view = buf[100:200]
    mapping = buffer_mapping(buf)
    assert remap_buffer(mapping, 4 << 20) is None  # arrays over it are alive: it must not move
    del buf, view
    small = remap_buffer(mapping, 4 << 20)
    assert small.nbytes == 4 << 20 and address(small) % HUGE_PAGE == 0
    assert len(mapping) < (4 << 20) + HUGE_PAGE  # the tail went back, not just out of the view
    mapping = buffer_mapping(small)
    del small
    large = remap_buffer(mapping, (12 << 20) + 4096)
    assert large.nbytes == (12 << 20) + 4096 and address(large) % HUGE_PAGE == 0
    large[:] = 1  # every byte of it is writable memory
    assert buffer_mapping(np.zeros(4)) is None
    small_buffer = allocate_buffer(1000)
    assert small_buffer.nbytes >= 1000 and address(small_buffer) % 4096 == 0
