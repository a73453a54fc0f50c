"""A small loopback load (benchmarks/load.py): valid requests from concurrent clients all succeed."""
from __future__ import annotations

import sys

from shared_paths import REPO_ROOT, models_dir

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import load  # noqa: E402


def test_concurrent_valid_requests_all_succeed() -> None:
    proc, base = load.start(models_dir() / "stories260K.gguf", ctx=128, parallel=4, offload=None)
    try:
        rss_start = load.rss_bytes(proc.pid)
        outcomes, wall = load.run_load(base, n_requests=40, n_clients=8, seconds=60, max_tokens=8)
        rss_end = load.rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert len(outcomes) == 40 and wall < 60
    assert [o.status for o in outcomes if o.status != 200] == []
    assert all(o.tokens > 0 for o in outcomes)
    assert any(o.first_token_s is not None for o in outcomes)  # the streamed ones streamed
    assert rss_end < rss_start + (256 << 20)  # no runaway growth under load
