"""I/O faults during generation: failing, slow and vanishing reads; the file truncated, replaced or deleted.

Generation that meets a fault it cannot cure stops with a GenerationError naming the file and offset;
transient errors are retried; the pager stays consistent and the engine works again once the cause is
gone. Faults come from a FileSource subclass swapped into the pager, or from changing the file itself.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from shared_paths import models_dir

from pagellm import LLM
from pagellm.engine import EngineConfig, GenerationError, InferenceEngine
from pagellm.modelfile import ModelFile
from pagellm.offload import Budget
from pagellm.offload import pager as pager_module
from pagellm.offload.pager import LOADING, RESIDENT, LayerPager
from pagellm.offload.source import MAX_READ_ATTEMPTS, FileSource, SourceError
from pagellm.sampling import SamplerConfig
from pagellm.server import ServerLimits, create_app, uvicorn_config

MODEL = models_dir() / "stories260K.gguf"
PROMPT = "Once upon a time"
N_TOKENS = 8
GREEDY = SamplerConfig.greedy()


class FaultySource(FileSource):
    """A FileSource whose reads fail or slow down on demand (tests set the plan between generations)."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "auto"):
        super().__init__(path, mode)
        self.fail_errno: int | None = None
        self.failures_left = 0  # reads that fail before reads work again (-1: every read)
        self.delay_s = 0.0
        self.calls = 0

    def fail(self, code: int, times: int = -1) -> None:
        """Make the next ``times`` reads raise ``code`` (-1: until clear())."""
        self.fail_errno, self.failures_left = code, times

    def clear(self) -> None:
        """Reads work again."""
        self.fail_errno, self.failures_left, self.delay_s = None, 0, 0.0

    def _read_span(self, start: int, length: int, out: object) -> int:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_errno is not None and self.failures_left != 0:
            self.failures_left -= 1 if self.failures_left > 0 else 0
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        return super()._read_span(start, length, out)


def budget_for(path: Path) -> Budget:
    """A budget well below the weights, so every token reads layers from the file."""
    return Budget(int(ModelFile.open(path).weight_bytes * 0.4))


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A private copy of the model that tests may truncate, replace or delete."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(MODEL, path)
    return path


@pytest.fixture(scope="module")
def expected() -> list[int]:
    """Greedy tokens of an engine that meets no fault."""
    with_budget = EngineConfig(MODEL, context_size=64, sampler=GREEDY, offload_policy=budget_for(MODEL))
    engine = InferenceEngine(with_budget).load_model()
    try:
        return engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids
    finally:
        engine.close()


def load(path: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> InferenceEngine:
    """An engine on ``path`` under a small budget; with ``monkeypatch``, its pager reads through a FaultySource."""
    if monkeypatch is not None:
        monkeypatch.setattr(pager_module, "FileSource", FaultySource)
    config = EngineConfig(path, context_size=64, sampler=GREEDY, offload_policy=budget_for(path))
    return InferenceEngine(config).load_model()


def settle(pager: LayerPager, timeout: float = 10.0) -> None:
    """Wait for the prefetch reader to finish what it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with pager._cond:
            if not pager._queue and all(e.state != LOADING for e in pager._entries.values()):
                return
        time.sleep(0.01)
    raise AssertionError("the pager still has units loading")


def assert_consistent(pager: LayerPager) -> None:
    """No unit stuck loading or held, and the budget accounting equals what is resident."""
    settle(pager)
    with pager._cond:
        entries = list(pager._entries.values())
        assert all(e.state != LOADING for e in entries)
        assert all(e.refs == 0 and not e.holders for e in entries)
        resident = sum(e.buffer.nbytes for e in entries if e.state == RESIDENT)  # the buffers themselves
        assert pager.resident_bytes == resident == pager.stats.resident_bytes
        assert pager.resident_bytes <= pager.budget_bytes
        assert all(e.buffer is None for e in entries if e.state != RESIDENT)


# -- failing reads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.EINTR, errno.EAGAIN])
def test_transient_errors_are_retried(model_copy: Path, monkeypatch: pytest.MonkeyPatch, expected: list[int],
                                      code: int) -> None:
    engine = load(model_copy, monkeypatch)
    source: FaultySource = engine.weights.source
    try:
        source.fail(code, times=MAX_READ_ATTEMPTS - 1)  # fails, fails, then works: within the retries
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
        assert source.stats.retries == MAX_READ_ATTEMPTS - 1
        assert_consistent(engine.weights)
    finally:
        engine.close()


def test_persistent_read_error_stops_generation_then_recovers(model_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                              expected: list[int]) -> None:
    engine = load(model_copy, monkeypatch)
    source: FaultySource = engine.weights.source
    try:
        source.fail(errno.EIO)
        with pytest.raises(GenerationError) as caught:
            engine.generate(PROMPT, max_tokens=N_TOKENS)
        error = caught.value
        assert str(model_copy) in str(error) and "at offset" in str(error) and "Input/output error" in str(error)
        assert error.path == str(model_copy) and isinstance(error.offset, int) and error.offset >= 0
        assert f"after {MAX_READ_ATTEMPTS} attempts" in str(error)
        assert isinstance(error.__cause__, SourceError)
        assert engine.cache.n_tokens == 0  # the failed sequence left nothing in the cache
        assert_consistent(engine.weights)
        source.clear()
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
        assert_consistent(engine.weights)
    finally:
        engine.close()


def test_error_mid_generation_keeps_the_pager_consistent(model_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                         expected: list[int]) -> None:
    engine = load(model_copy, monkeypatch)
    source: FaultySource = engine.weights.source
    made: list[int] = []

    def fail_after_three(token: int, _text: str) -> None:
        made.append(token)
        if len(made) == 3:
            source.fail(errno.ENOSPC)  # not transient: no retry

    try:
        with pytest.raises(GenerationError, match="No space left on device"):
            engine.generate(PROMPT, max_tokens=N_TOKENS, on_token=fail_after_three)
        assert made == expected[:3]
        assert_consistent(engine.weights)
        source.clear()
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
    finally:
        engine.close()


def test_batched_step_failure_puts_the_caches_back(model_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                   expected: list[int]) -> None:
    engine = load(model_copy, monkeypatch)
    source: FaultySource = engine.weights.source
    try:
        seqs = [engine.start(PROMPT, N_TOKENS), engine.start(PROMPT, N_TOKENS)]
        engine.step(seqs)
        positions = [s.cache.n_tokens for s in seqs]
        source.fail(errno.EIO)
        with pytest.raises(GenerationError):
            engine.step(seqs)
        assert [s.cache.n_tokens for s in seqs] == positions
        assert_consistent(engine.weights)
        issued = engine.weights.stats.prefetches_issued
        time.sleep(0.3)
        assert engine.weights.stats.prefetches_issued == issued  # the reader does not keep retrying a failing disk
        source.clear()
        while not all(s.done for s in seqs):
            engine.step(seqs)
        assert [s.result().token_ids for s in seqs] == [expected, expected]
    finally:
        engine.close()


def test_slow_disk_is_slow_not_wrong(model_copy: Path, monkeypatch: pytest.MonkeyPatch, expected: list[int]) -> None:
    engine = load(model_copy, monkeypatch)
    source: FaultySource = engine.weights.source
    try:
        source.delay_s = 0.01
        out = engine.generate(PROMPT, max_tokens=N_TOKENS)
        assert out.token_ids == expected
        assert out.stats.stall_seconds > 0.01 * 5  # the forward pass waited on at least a few slow reads
        assert source.stats.read_seconds >= 0.01 * source.calls * 0.9
        assert_consistent(engine.weights)
    finally:
        engine.close()


# -- the file changes under us ------------------------------------------------------------------------------


def test_truncated_file_stops_generation_until_restored(model_copy: Path, expected: list[int]) -> None:
    original = model_copy.read_bytes()
    engine = load(model_copy)
    try:
        with open(model_copy, "r+b") as f:  # truncated in place: the inode we read from shrinks
            f.truncate(len(original) // 3)
        with pytest.raises(GenerationError) as caught:
            engine.generate(PROMPT, max_tokens=N_TOKENS)
        message = str(caught.value)
        assert str(model_copy) in message and "at offset" in message
        assert f"truncated while in use: {len(original) // 3} of {len(original)} bytes remain" in message
        assert_consistent(engine.weights)
        with open(model_copy, "r+b") as f:  # the cause goes away: same inode, same bytes again
            f.write(original)
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
    finally:
        engine.close()


def test_replaced_file_keeps_reading_the_loaded_one(model_copy: Path, tmp_path: Path, expected: list[int]) -> None:
    engine = load(model_copy)
    try:
        other = tmp_path / "other.gguf"
        other.write_bytes(b"GGUF not really a model")
        os.replace(other, model_copy)  # e.g. a download finishing over the path
        # The open descriptor still names the inode whose header we checked: generation goes on,
        # unchanged. Reopening the path would read bytes laid out under a header never parsed.
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
        assert engine.weights.source._file_change() == " (the path now names another file: replaced while in use)"
    finally:
        engine.close()


def test_deleted_file_keeps_reading_the_loaded_one(model_copy: Path, expected: list[int]) -> None:
    engine = load(model_copy)
    try:
        model_copy.unlink()
        assert engine.generate(PROMPT, max_tokens=N_TOKENS).token_ids == expected
        assert engine.weights.source._file_change() == " (the file was deleted while in use)"
    finally:
        engine.close()


def test_read_error_names_a_replaced_file(model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = load(model_copy, monkeypatch)
    try:
        other = tmp_path / "other.gguf"
        other.write_bytes(b"x")
        os.replace(other, model_copy)
        engine.weights.source.fail(errno.EBADF)
        with pytest.raises(GenerationError, match="replaced while in use"):
            engine.generate(PROMPT, max_tokens=N_TOKENS)
    finally:
        engine.close()


# -- the server --------------------------------------------------------------------------------------------


@pytest.fixture
def served(model_copy: Path) -> Iterator[tuple[str, Path]]:
    """An in-process server on a private copy of the model, under a small budget."""
    llm = LLM(str(model_copy), n_ctx=64, offload=budget_for(model_copy))
    port = _free_port()
    server = uvicorn.Server(uvicorn_config(create_app(llm, "m"), "127.0.0.1", port, ServerLimits(), "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", model_copy
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        llm.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_500_for_a_truncated_file_and_keeps_serving(served: tuple[str, Path]) -> None:
    base, path = served
    body = {"prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0}
    good = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert good.status_code == 200
    original = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(4096)
    failed = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "truncated while in use" in error["message"]
    assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
    with open(path, "r+b") as f:
        f.write(original)
    again = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == good.json()["choices"][0]["text"]
