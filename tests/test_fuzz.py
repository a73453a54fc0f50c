"""Hostile GGUF files: a fixed-seed subset of benchmarks/fuzz_gguf.py and its hand-made cases.

Only ModelFileError may escape model opening, `pagellm info` and the engine's checks; every case is
fast and bounded in memory; the CLI answers a hostile file with one line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from shared_paths import REPO_ROOT, fixtures_dir

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import fuzz_gguf  # noqa: E402

from pagellm.engine import EngineConfig, InferenceEngine  # noqa: E402
from pagellm.modelfile import ModelFileError  # noqa: E402

N_CASES = 2000
SEED = 20240601


@pytest.fixture(scope="module")
def seeds() -> dict[str, fuzz_gguf.Header]:
    return fuzz_gguf.load_seeds(fixtures_dir())


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> fuzz_gguf.Runner:
    return fuzz_gguf.Runner(tmp_path_factory.mktemp("fuzz"))


def test_encoder_reproduces_a_fixture_header(seeds: dict[str, fuzz_gguf.Header]) -> None:
    fuzz_gguf.check_encoder(fixtures_dir(), seeds)  # raises SystemExit when not


def test_mutated_headers_only_raise_model_file_error(seeds: dict[str, fuzz_gguf.Header], runner: fuzz_gguf.Runner) -> None:
    tally = fuzz_gguf.run_cases(runner, fuzz_gguf.mutated_cases(seeds, N_CASES, SEED), fuzz_gguf.Tally())
    assert tally.count == N_CASES
    assert not tally.failures, tally.failures[:3]
    assert not tally.over_bound, tally.over_bound[:3]
    assert tally.slowest[0] < fuzz_gguf.CASE_LIMIT_S
    # The mix reaches every layer: files refused by the parser, by the model checks, and files that open.
    assert tally.by_type["ModelFileError"] > N_CASES // 2 and tally.by_type["ok"] > 20
    assert any("expected" in kind for kind in tally.messages)  # type checks of metadata values ran


def test_hand_made_hostile_files(seeds: dict[str, fuzz_gguf.Header], runner: fuzz_gguf.Runner) -> None:
    cases = fuzz_gguf.hand_cases(seeds["stories260K-real-Q8_0"])
    assert len(cases) > 100
    for case in cases:
        out, tb = runner.run(case)
        assert out.error == "ModelFileError" or (case.may_open and out.error == "ok"), (case.name, out, tb)
        assert out.seconds < fuzz_gguf.CASE_LIMIT_S, case.name


def _write(runner: fuzz_gguf.Runner, cases: list[fuzz_gguf.Case], name: str, path: Path) -> Path:
    case = next(c for c in cases if c.name == name)
    with open(path, "wb") as f:
        f.write(case.data[: case.total_size])
        f.truncate(case.total_size)
    return path


def test_wrong_type_of_required_key_fails_engine_load(seeds: dict[str, fuzz_gguf.Header], runner: fuzz_gguf.Runner,
                                                      tmp_path: Path) -> None:
    cases = fuzz_gguf.hand_cases(seeds["stories260K-real-Q8_0"])
    for name, fragment in (("llama.block_count a string", "llama.block_count is '12', expected an integer"),
                           ("llama.block_count 2^32-1", "but the file has 5 blocks"),
                           ("tokenizer tokens an integer", "tokenizer.ggml.tokens is 5"),
                           ("bos id a float (inf)", "bos_token_id is inf")):
        path = _write(runner, cases, name, tmp_path / "bad.gguf")
        with pytest.raises(ModelFileError, match=fragment) as caught:
            InferenceEngine(EngineConfig(path)).load_model()
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name,command", [
    ("llama.block_count a string", ["run", "-p", "Hi", "-n", "1"]),
    ("tensor count 2^40", ["info"]),
    ("shape product overflows 64 bits", ["info"]),
    ("tokenizer tokens an integer", ["run", "-p", "Hi", "-n", "1"]),
])
def test_cli_answers_a_hostile_file_with_one_line(seeds: dict[str, fuzz_gguf.Header], runner: fuzz_gguf.Runner,
                                                  tmp_path: Path, name: str, command: list[str]) -> None:
    path = _write(runner, fuzz_gguf.hand_cases(seeds["stories260K-real-Q8_0"]), name, tmp_path / "bad.gguf")
    proc = subprocess.run([sys.executable, "-m", "pagellm.cli", command[0], str(path), *command[1:]],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pagellm: error: {path}") and "bug" not in proc.stderr, proc.stderr


def test_cli_info_shows_a_broken_chat_template(seeds: dict[str, fuzz_gguf.Header], runner: fuzz_gguf.Runner,
                                               tmp_path: Path) -> None:
    cases = fuzz_gguf.hand_cases(seeds["stories260K-real-Q8_0"])
    path = _write(runner, cases, "chat template: nested 5000 deep", tmp_path / "bad.gguf")
    proc = subprocess.run([sys.executable, "-m", "pagellm.cli", "info", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "invalid (chat template is nested too deeply" in proc.stdout
