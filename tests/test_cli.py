"""The ``pagellm`` command line, driven as a user drives it: a subprocess, its stdout, stderr and exit code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_paths import models_dir

STORIES = models_dir() / "stories260K.gguf"
COMMANDS = ["run", "chat", "info", "plan", "bench", "serve", "demo", "make-model"]
# One thread: numba's parallel kernels spin-wait, which on a busy 2-core test machine costs more
# than the tiny test models gain from a second thread.
GREEDY = ["--temp", "0", "--seed", "1", "-t", "1"]


def pagellm(*args: str | os.PathLike[str], stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pagellm.cli ARGS`` and capture everything."""
    return subprocess.run(
        [sys.executable, "-m", "pagellm.cli", *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failure as promised: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pagellm: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic tiny model made through the CLI (Q4_K_M must map to Q4_K)."""
    out = tmp_path_factory.mktemp("models") / "tiny.gguf"
    proc = pagellm("make-model", out, "--shape", "tiny", "--type", "Q4_K_M", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "Q4_K" in proc.stderr
    return out


# ----------------------------------------------------------------------------- help


def test_every_command_has_help() -> None:
    top = pagellm("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert command in top.stdout
        proc = pagellm(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert f"Usage: pagellm {command}" in proc.stdout


# ----------------------------------------------------------------------------- run


def test_run_streams_text_and_one_stats_line() -> None:
    proc = pagellm("run", STORIES, "-p", "Once upon a time", "-n", "24", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 10  # 24 tokens of a story
    stats = proc.stderr.strip().splitlines()
    assert len(stats) == 1, proc.stderr
    for figure in ("prompt", "decode", "tok/s", "/tok", "hit rate", "stalled", "peak RSS"):
        assert figure in stats[0]


RUN_STORY = ["run", STORIES, "-p", "Once upon a time", "-n", "12", *GREEDY]


@pytest.fixture(scope="module")
def story_in_ram() -> str:
    """The greedy continuation with every weight in RAM."""
    proc = pagellm(*RUN_STORY)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("policy", [["--offload", "budget:700KiB"], ["--ram", "800KiB"],
                                    ["--offload", "pinned:800KiB,last=1,prefetch=2"]])
def test_run_under_a_budget_makes_the_same_tokens(policy: list[str], story_in_ram: str) -> None:
    paged = pagellm(*RUN_STORY, *policy)
    assert paged.returncode == 0, paged.stderr
    assert paged.stdout == story_in_ram
    assert "read 0 B/tok" not in paged.stderr  # it really paged


def test_run_reads_a_piped_prompt() -> None:
    proc = pagellm("run", STORIES, "-n", "4", "--no-stats", *GREEDY, stdin="Once upon a time\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and proc.stderr == ""


# ----------------------------------------------------------------------------- info and plan


def test_info_describes_the_model() -> None:
    proc = pagellm("info", STORIES)
    assert proc.returncode == 0, proc.stderr
    for text in ("architecture", "llama", "parameters", "layers", "5", "context length", "2048",
                 "tokenizer", "512 tokens", "chat template", "F32"):
        assert text in proc.stdout
    assert "pinned" not in proc.stdout


def test_info_with_ram_shows_the_placement() -> None:
    proc = pagellm("info", STORIES, "--ram", "700KiB")
    assert proc.returncode == 0, proc.stderr
    assert "PinnedHotSet 700.00 KiB" in proc.stdout
    for word in ("pinned", "streamed", "blk."):
        assert word in proc.stdout


def test_plan_predicts_reads_and_speed() -> None:
    proc = pagellm("plan", STORIES, "--ram", "700KiB")
    assert proc.returncode == 0, proc.stderr
    for text in ("pinned", "streamed", "reads per token", "predicted", "tokens/s"):
        assert text in proc.stdout


# ----------------------------------------------------------------------------- make-model, demo, chat


def test_made_model_runs(tiny_model: Path) -> None:
    info = pagellm("info", tiny_model)
    assert "Q4_K" in info.stdout and "32000 tokens" in info.stdout
    proc = pagellm("run", tiny_model, "-p", "Hello", "-n", "4", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    assert "decode 4 tok" in proc.stderr


def test_make_model_refuses_to_overwrite(tiny_model: Path) -> None:
    assert_one_line_error(pagellm("make-model", tiny_model), "exists")


def test_small_demo_prints_both_policies_side_by_side(tmp_path: Path) -> None:
    proc = pagellm("demo", "--size", "tiny", "-t", "1", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.glob("pagellm/demo-*.gguf"))  # cached for the next time
    header = next(line for line in proc.stdout.splitlines() if "NoOffload" in line)
    assert "PinnedHotSet" in header
    for row in ("decode tok/s", "bytes read / token", "hit rate", "stalled", "peak RSS"):
        assert row in proc.stdout
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("same tokens")][0].endswith("yes")


def test_chat_with_piped_input() -> None:
    proc = pagellm("chat", STORIES, "-n", "12", *GREEDY, stdin="Tell me a story.\n\nAnd another.\n/exit\nnot read\n")
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert 2 <= len(replies) <= 6  # two replies of up to 12 tokens; the line after /exit is never answered
    assert proc.stderr == ""


# ----------------------------------------------------------------------------- errors


def test_missing_file() -> None:
    assert_one_line_error(pagellm("run", "/nonexistent/model.gguf", "-p", "hi"), "no such file")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    junk = tmp_path / "notes.gguf"
    junk.write_bytes(b"this is not a model, only some text that is long enough" * 4)
    assert_one_line_error(pagellm("info", junk), "not a GGUF file")
    assert_one_line_error(pagellm("run", junk, "-p", "hi"), "not a GGUF file")


@pytest.mark.parametrize("spec, needle", [("pinned:lots", "bad size"), ("swap:1G", "unknown offload policy"),
                                          ("pinned:1G,last=x", "last")])
def test_bad_policy_spec(spec: str, needle: str) -> None:
    assert_one_line_error(pagellm("run", STORIES, "-p", "hi", "--offload", spec), needle)


def test_budget_too_small() -> None:
    proc = pagellm("run", STORIES, "-p", "hi", "--ram", "64KiB")
    assert_one_line_error(proc, "too small", "64.00 KiB")


def test_usage_errors_are_one_line_too() -> None:
    assert_one_line_error(pagellm("run", STORIES, "-p", "hi", "--ram", "1G", "--offload", "none"), "not both")
    assert_one_line_error(pagellm("run", STORIES, "-p", "hi", "--top-p", "3"), "--top-p")


def test_debug_shows_the_traceback() -> None:
    proc = pagellm("--debug", "run", "/nonexistent/model.gguf", "-p", "hi")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("pagellm: error: ")
