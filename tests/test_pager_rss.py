"""The budget is honest: the process's own peak RSS while sweeping a >1 GiB model with a 256 MiB budget."""
import json
import subprocess
import sys

import pytest

from pagellm.synth import SHAPES, make_model

MiB = 2**20

SWEEP = r"""
import json, sys
from pagellm.modelfile import ModelFile
from pagellm.offload import Budget
from pagellm.offload.pager import LayerPager
from pagellm.offload.pressure import peak_rss_bytes, process_rss_bytes, reset_peak_rss

mf = ModelFile.open(sys.argv[1])
budget = int(sys.argv[2])
reset_peak_rss()
baseline = process_rss_bytes()
with LayerPager.build(mf, Budget(budget), io_mode=sys.argv[3]) as pager:
    for _ in range(3):
        for name in pager.sweep_order:
            with pager.hold(name) as tensors:
                for view in tensors.values():
                    view[::4096].sum()  # touch every page the pager hands out
    rows = pager.read_rows("token_embd.weight", list(range(0, 32000, 997)))
    stats = pager.stats
    # every buffer is the size the pager counts for its unit, kept and streamed units alike
    held = {n: e.buffer.nbytes for n, e in pager._entries.items() if e.buffer is not None}
    as_counted = all(size == pager.buffer_bytes(n) for n, size in held.items())
    roles = {n in pager.placement.streamed for n in held}
print(json.dumps({"weight_bytes": mf.weight_bytes, "baseline_rss": baseline, "peak_rss": peak_rss_bytes(),
                  "buffers_as_counted": as_counted, "both_roles": roles == {True, False},
                  "pager_peak": stats.peak_resident_bytes, "bytes_read": stats.bytes_read, "io_mode": pager.io_mode}))
"""


@pytest.fixture(scope="session")
def big_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tinyllama-Q8_0.gguf"
    return make_model(path, SHAPES["tinyllama-1b"], "Q8_0", seed=1)


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
def test_peak_rss_stays_within_budget_plus_overhead(big_model, io_mode, capsys):
    budget = 256 * MiB
    out = subprocess.run([sys.executable, "-c", SWEEP, str(big_model), str(budget), io_mode],
                         capture_output=True, text=True, check=True, timeout=300)
    r = json.loads(out.stdout)
    with capsys.disabled():
        print(f"\n[{io_mode}] weights {r['weight_bytes'] / MiB:.0f} MiB, budget 256 MiB: pager peak "
              f"{r['pager_peak'] / MiB:.1f} MiB, process peak RSS {r['peak_rss'] / MiB:.1f} MiB "
              f"(baseline {r['baseline_rss'] / MiB:.1f} MiB), read {r['bytes_read'] / MiB:.0f} MiB")
    assert r["weight_bytes"] >= 1024 * MiB
    assert r["io_mode"] == io_mode
    assert r["pager_peak"] <= budget
    assert r["buffers_as_counted"] and r["both_roles"]
    assert r["bytes_read"] >= 2 * (r["weight_bytes"] - budget)  # it really streamed
    assert r["peak_rss"] <= budget + 200 * MiB
