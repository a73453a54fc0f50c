"""Hostile requests against `pagellm serve` (benchmarks/hostile_requests.py, without its two slow-client cases).

Adds what tests/test_server.py does not cover: request smuggling and oversized headers, lone surrogates
and control characters, the chat endpoint's model field and URL paths naming files, more concurrent
requests than the queue holds, and an audit of every file the server opens while the cases run.
"""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_paths import REPO_ROOT, models_dir

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import hostile_requests  # noqa: E402

MODEL = (models_dir() / "stories260K.gguf").resolve()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hostile_requests.Server]:
    srv = hostile_requests.start_server(MODEL, tmp_path_factory.mktemp("hostile"))
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=60)


def test_every_hostile_request_is_refused_or_served_and_the_server_lives(server: hostile_requests.Server) -> None:
    _, offset = hostile_requests.opens_since(server, 0)
    fds_before = hostile_requests.open_files(server.proc.pid)
    outcomes = {}
    for name, _expected, run in hostile_requests.case_list(server, MODEL, "stories260K", quick=True):
        got, ok = run()
        outcomes[name] = (got, ok, hostile_requests.healthy(server))
    bad = {name: got for name, (got, ok, alive) in outcomes.items() if not (ok and alive)}
    assert not bad, bad
    assert len(outcomes) >= 25

    # No request made the server open a file: only its own /proc entries (RSS figures) and modules
    # imported on first use (numba's kernel cache among them).
    opened, _ = hostile_requests.opens_since(server, offset)
    kinds = Counter(hostile_requests.classify(p, MODEL, server.proc.pid) for p in opened)
    others = [p for p in opened if hostile_requests.classify(p, MODEL, server.proc.pid) == "OTHER"]
    assert not others, others
    assert set(kinds) <= {"own /proc", "python module"}
    fds_after = hostile_requests.open_files(server.proc.pid)
    assert fds_after == fds_before and str(MODEL) in fds_after


def test_audit_log_sees_opens(server: hostile_requests.Server) -> None:
    # The audit hook works: the server opened the model (and much else) while starting.
    opened, _ = hostile_requests.opens_since(server, 0)
    assert any(Path(p).resolve() == MODEL for p in opened)
