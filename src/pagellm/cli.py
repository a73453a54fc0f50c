"""The ``pagellm`` command line: run, chat, info, plan, bench, serve, demo, make-model.

Options follow llama.cpp's spelling (``-p``, ``-n``, ``--temp``, ``-c``, ``-t`` …) so that its users
feel at home; the one new idea is the RAM budget (``--ram`` / ``--offload``).

Heavy modules (numba kernels, the engine) are imported inside the commands, so ``--help`` and
``info`` answer at once. Errors are one line on stderr unless ``--debug`` is given.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import click

if TYPE_CHECKING:
    from pagellm.engine import EngineConfig, GenerationStats, InferenceEngine
    from pagellm.modelfile import ModelFile
    from pagellm.offload.planner import MachineProfile
    from pagellm.offload.policy import AnyPolicy
    from pagellm.sampling import SamplerConfig

PROG = "pagellm"
IO_MODES = ("auto", "direct", "buffered", "mmap")
DEFAULT_N_PREDICT = 256
MAX_DEFAULT_CTX = 4096  # the engine's own default cap on the model's training context

# llama.cpp names its mixed K-quant files (Q4_K_M …) after the type most tensors use; synthetic
# files use one type for every tensor, so a mix name means that type.
_QUANT_MIXES = {
    "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
}

_SAMPLER_FLAGS = {
    "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n", "seed": "--seed",
}

_state = {"debug": bool(os.environ.get("PAGELLM_DEBUG"))}


class CliError(Exception):
    """A failure the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- output helpers


def _err(message: str) -> None:
    """Print one line on stderr."""
    click.echo(message, err=True)


def _show_progress() -> bool:
    """Progress bars only for a person watching: stdout and stderr both terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _count(n: float) -> str:
    """A count as 1.10B, 292.4K, 512."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit in ("T", "B") else f"{n / scale:.1f}{unit}"
    return str(int(n))


def _size(nbytes: float) -> str:
    """Bytes in binary units (the policy module's spelling, so sizes read the same everywhere)."""
    from pagellm.offload.policy import format_size

    return format_size(nbytes)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Rows as aligned text columns (numbers right-aligned where ``right`` says so)."""
    right = right or [i > 0 for i in range(len(headers))]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def stats_line(stats: "GenerationStats") -> str:
    """The one-line summary printed after a generation."""
    return (
        f"prompt {stats.prompt_tokens} tok, {stats.prompt_tokens_per_s:.1f} tok/s | "
        f"decode {stats.generated_tokens} tok, {stats.decode_tokens_per_s:.1f} tok/s | "
        f"read {_size(stats.bytes_read_per_token)}/tok | hit rate {stats.hit_rate:.1%} | "
        f"stalled {stats.stall_share:.1%} | peak RSS {_size(stats.peak_rss_bytes)}"
    )


class _TokenWriter:
    """Streams text pieces to stdout as they come, remembering whether the last one ended a line."""

    def __init__(self) -> None:
        self.at_line_start = True

    def __call__(self, token_id: int, piece: str) -> None:
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()  # flush per token: the point is to see them as they are made
            self.at_line_start = piece.endswith("\n")

    def end_line(self) -> None:
        """Finish the current line so the shell prompt (or the next turn) starts on its own."""
        if not self.at_line_start:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.at_line_start = True


# ----------------------------------------------------------------------------- progress


def _bytes_read_by_process() -> int | None:
    """Bytes this process has read through read syscalls (O_DIRECT included), or None off Linux."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@contextmanager
def _read_progress(label: str, expected_bytes: int) -> Iterator[None]:
    """A progress bar of bytes this process reads meanwhile (the engine's loads report nothing)."""
    start = _bytes_read_by_process()
    if not _show_progress() or start is None or expected_bytes <= 0:
        yield
        return
    done = threading.Event()
    with click.progressbar(length=expected_bytes, label=label, file=sys.stderr, show_eta=False,
                           item_show_func=lambda _: None) as bar:
        shown = 0

        def poll() -> None:
            nonlocal shown
            while not done.wait(0.1):
                now = min(expected_bytes, (_bytes_read_by_process() or start) - start)
                if now > shown:
                    bar.update(now - shown)
                    shown = now

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        bar.update(expected_bytes - shown)


def _write_progress(label: str) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A (done, total) callback drawing a bar while a file is written, and a function that closes it."""
    if not _show_progress():
        return None, lambda: None
    holder: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        bar = holder.get("bar")
        if bar is None:
            bar = holder["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    def close() -> None:
        if "bar" in holder:
            holder["bar"].__exit__(None, None, None)

    return update, close


# ----------------------------------------------------------------------------- option groups


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _state["debug"] = True


_debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show the full traceback when something fails.",
)


def _option_group(cls: type, param_name: str, options: Sequence[Callable]) -> Callable:
    """A decorator adding ``options`` to a command and handing them over as one ``cls`` instance."""
    names = [f.name for f in fields(cls)]

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[param_name] = cls(**{n: kwargs.pop(n) for n in names})
            return func(*args, **kwargs)

        for option in reversed(options):  # click lists options in the order the decorators ran, reversed
            wrapper = option(wrapper)
        return wrapper

    return decorate


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling flags, as llama.cpp spells them."""

    temp: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int

    def sampler_config(self) -> "SamplerConfig":
        """The engine's SamplerConfig (its validation gives the error messages)."""
        from pagellm.sampling import SamplerConfig

        try:
            return SamplerConfig(
                temperature=self.temp, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
                seed=None if self.seed < 0 else self.seed,
            )
        except ValueError as e:
            # Name the flag the user typed, not the dataclass field behind it.
            message = str(e)
            for field_name, flag in _SAMPLER_FLAGS.items():
                message = message.replace(f"SamplerConfig.{field_name}", flag)
            raise CliError(message) from None


def max_tokens(n_predict: int, n_ctx: int) -> int:
    """Tokens to generate for -n; -1 means until the end of text or a full context."""
    if n_predict < -1:
        raise CliError(f"-n must be -1 (no limit) or >= 0, got {n_predict}")
    return n_ctx if n_predict == -1 else n_predict


_N_PREDICT_OPTION = click.option(
    "-n", "--n-predict", "n_predict", type=int, default=DEFAULT_N_PREDICT, show_default=True, metavar="N",
    help="Tokens to generate (-1: until the end of text or a full context).")

sampling_options = _option_group(SamplingOptions, "sampling", [
    click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature (0: greedy)."),
    click.option("--top-k", type=int, default=40, show_default=True, help="Top-k sampling (0: off)."),
    click.option("--top-p", type=float, default=0.95, show_default=True, help="Top-p sampling (1.0: off)."),
    click.option("--min-p", type=float, default=0.05, show_default=True, help="Min-p sampling (0.0: off)."),
    click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                 help="Penalise repeated tokens (1.0: off)."),
    click.option("--repeat-last-n", type=int, default=64, show_default=True,
                 help="Tokens the repeat penalty looks back over (0: off, -1: all)."),
    click.option("-s", "--seed", type=int, default=-1, show_default=True, help="RNG seed (-1: random)."),
])


@dataclass(frozen=True)
class EngineOptions:
    """How to load the model: context, threads, offload policy, I/O mode."""

    ctx: int | None
    threads: int | None
    offload: str | None
    ram: str | None
    io_mode: str

    def n_ctx(self, mf: "ModelFile") -> int:
        """The context size the engine will use (its default when --ctx is not given)."""
        if self.ctx is not None and self.ctx > 0:
            return self.ctx
        trained = int(mf.arch_get("context_length", MAX_DEFAULT_CTX) or MAX_DEFAULT_CTX)
        return min(trained, MAX_DEFAULT_CTX)

    def policy(self, model: str | os.PathLike[str], default: "AnyPolicy | None" = None) -> "AnyPolicy":
        """The offload policy --offload or --ram asks for (NoOffload, or ``default``, when neither)."""
        from pagellm.offload.policy import NoOffload, OffloadPolicy

        if self.offload is not None and self.ram is not None:
            raise click.UsageError("give --offload or --ram, not both")
        if self.offload is not None:
            return OffloadPolicy.parse(self.offload)
        if self.ram is not None:
            return ram_policy(model, self.ram, self.ctx)
        return default if default is not None else NoOffload()

    def engine_config(self, model: str, sampler: "SamplerConfig | None" = None) -> "EngineConfig":
        """The EngineConfig for ``model`` under these options."""
        from pagellm.engine import EngineConfig
        from pagellm.sampling import SamplerConfig

        if self.threads is not None and self.threads <= 0:
            raise CliError(f"--threads must be >= 1, got {self.threads}")
        return EngineConfig(
            model_path=model,
            context_size=self.ctx if self.ctx and self.ctx > 0 else None,
            n_threads=self.threads,
            sampler=sampler or SamplerConfig(),
            offload_policy=self.policy(model),
            io_mode=self.io_mode,
            # --ram auto keeps watching: the budget shrinks under memory pressure and grows back.
            ram_auto=self.ram is not None and self.ram.strip().lower() == "auto",
        )


def describe_policy(policy: "AnyPolicy") -> str:
    """A policy in words with readable sizes (its str() spelling is exact bytes, for machines)."""
    from pagellm.offload.policy import Budget, PinnedHotSet

    if isinstance(policy, PinnedHotSet):
        pins = [name for name, on in (("embeddings", policy.pin_embeddings), ("output head", policy.pin_output_head)) if on]
        if policy.pin_last_n_layers:
            pins.append(f"last {policy.pin_last_n_layers} layers")
        return (f"PinnedHotSet {_size(policy.ram_bytes)} (pinned: {', '.join(pins) or 'nothing'}; "
                f"prefetch {policy.prefetch_n_ahead})")
    if isinstance(policy, Budget):
        return f"Budget {_size(policy.ram_bytes)}"
    return "NoOffload (every weight in RAM)"


def ram_policy(model: str | os.PathLike[str], ram: str, ctx: int | None = None) -> "AnyPolicy":
    """--ram SIZE is PinnedHotSet(SIZE) with its defaults; --ram auto sizes it from free RAM."""
    from pagellm.modelfile import ModelFile
    from pagellm.offload.policy import PinnedHotSet, parse_size

    if ram.strip().lower() != "auto":
        return PinnedHotSet(parse_size(ram))
    from pagellm.offload.planner import auto_budget

    mf = ModelFile.open(model)
    n_ctx = ctx if ctx and ctx > 0 else EngineOptions(None, None, None, None, "auto").n_ctx(mf)
    return PinnedHotSet(auto_budget(mf, n_ctx))


_CTX_OPTION = click.option("-c", "--ctx", "--ctx-size", "ctx", type=int, default=None, metavar="N",
                           help=f"Context size in tokens (default: the model's, at most {MAX_DEFAULT_CTX}).")
_OFFLOAD_OPTION = click.option(
    "--offload", metavar="SPEC", default=None,
    help="Offload policy: none | budget:SIZE | pinned:SIZE[,embeddings=yes|no,head=yes|no,last=N,prefetch=N].")
_RAM_OPTION = click.option(
    "--ram", metavar="SIZE|auto", default=None,
    help="RAM budget for weights, e.g. 4GiB: short for --offload pinned:SIZE (embeddings and output head "
         "pinned, no last layers pinned, prefetch 1). 'auto': the available RAM (cgroup-aware) minus the "
         "KV cache and a headroom.")

engine_options = _option_group(EngineOptions, "engine_opts", [
    _CTX_OPTION,
    click.option("-t", "--threads", type=int, default=None, metavar="N", help="Compute threads (default: all cores)."),
    _OFFLOAD_OPTION,
    _RAM_OPTION,
    click.option("--io-mode", type=click.Choice(IO_MODES), default="auto", show_default=True,
                 help="How the pager reads the file (direct: O_DIRECT, bypassing the page cache)."),
])


# ----------------------------------------------------------------------------- engine helpers


def _expected_load_bytes(model: str, policy: "AnyPolicy") -> int:
    """Bytes the engine reads while loading: everything under NoOffload, the pinned units otherwise."""
    from pagellm.modelfile import ModelFile
    from pagellm.offload.pager import LayerPager

    mf = ModelFile.open(model)
    if policy.is_disabled():
        return mf.weight_bytes
    units, _, pinned, _ = LayerPager.describe(mf, policy, 4096)
    return sum(u.nbytes for u in units if u.name in set(pinned))


def load_engine(config: "EngineConfig") -> "InferenceEngine":
    """Open the model and build its pager, with a progress bar on a terminal."""
    from pagellm.engine import InferenceEngine

    expected = _expected_load_bytes(str(config.model_path), config.offload_policy)
    with _read_progress(f"loading {Path(config.model_path).name}", expected):
        return InferenceEngine(config).load_model()


def _read_prompt(prompt: str | None, prompt_file: Any) -> str:
    """The prompt from -p, -f, or piped stdin."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give -p or -f, not both")
    if prompt_file is not None:
        return prompt_file.read()
    if prompt is not None:
        return prompt
    piped = "" if sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
    if piped:
        return piped
    raise click.UsageError("no prompt: give -p TEXT, -f FILE, or pipe the prompt on stdin")


# ----------------------------------------------------------------------------- the group


class _Group(click.Group):
    """Lists commands in the order they were added (the order a newcomer needs them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pagellm", prog_name=PROG)
@_debug_option
def cli() -> None:
    """Run GGUF language models in less RAM than the model.

    \b
    pagellm demo                                   # no download: see paging at work
    pagellm run model.gguf -p "Once upon a time"   # everything in RAM, like llama.cpp
    pagellm run model.gguf -p "Hi" --ram 2GiB      # weights paged within a 2 GiB budget
    pagellm plan model.gguf --ram 2GiB             # what would be pinned, streamed, and how fast
    """


# ----------------------------------------------------------------------------- run


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.File("r"), default=None, help="Read the prompt from a file.")
@click.option("--stop", "-r", "--reverse-prompt", "stop", multiple=True, metavar="TEXT",
              help="Stop when this text appears (repeatable).")
@click.option("--echo", is_flag=True, help="Print the prompt before the generated text.")
@click.option("--stats/--no-stats", default=True, show_default=True,
              help="Print the stats line on stderr at the end.")
@_N_PREDICT_OPTION
@sampling_options
@engine_options
@_debug_option
def run(model: str, prompt: str | None, prompt_file: Any, stop: tuple[str, ...], echo: bool, stats: bool,
        n_predict: int, sampling: SamplingOptions, engine_opts: EngineOptions) -> None:
    """Generate text from a prompt, streaming tokens to stdout.

    At the end one line of figures goes to stderr: prompt and decode tokens/s, bytes read per
    token, hit rate, share of time stalled on I/O, peak RSS.
    """
    text = _read_prompt(prompt, prompt_file)
    engine = load_engine(engine_opts.engine_config(model, sampling.sampler_config()))
    try:
        writer = _TokenWriter()
        if echo:
            writer(-1, text)
        generation = engine.generate(text, max_tokens=max_tokens(n_predict, engine.n_ctx), on_token=writer,
                                     stop=list(stop) or None)
        writer.end_line()
    finally:
        engine.close()
    if stats:
        _err(stats_line(generation.stats))


# ----------------------------------------------------------------------------- chat


def _chat_prompt_ids(engine: "InferenceEngine", template: Any, messages: list[dict[str, str]], reserve: int) -> list[int]:
    """Token ids of the conversation, dropping the oldest turns until ``reserve`` tokens of room remain."""
    while True:
        text = template.render(messages, add_generation_prompt=True)
        # A template that writes the BOS text itself must not get a second BOS from the tokenizer.
        bos_written = bool(template.bos_token) and text.startswith(template.bos_token)
        ids = engine.tokenize(text, add_special=not bos_written, parse_special=True)
        if len(ids) + reserve <= engine.n_ctx:
            return ids
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise CliError(f"the message is {len(ids)} tokens; with {reserve} to generate it does not fit "
                           f"the context of {engine.n_ctx} tokens (raise --ctx)")
        del messages[first : first + 2]  # the oldest user turn and its reply


def _read_turn(interactive: bool) -> str | None:
    """One line of user input, or None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-sys", "--system", "system", default=None, metavar="TEXT", help="System prompt.")
@click.option("--stats/--no-stats", default=False, show_default=True, help="Print the stats line after each reply.")
@_N_PREDICT_OPTION
@sampling_options
@engine_options
@_debug_option
def chat(model: str, system: str | None, stats: bool, n_predict: int, sampling: SamplingOptions,
         engine_opts: EngineOptions) -> None:
    """Chat with a model through its chat template, one line per message.

    Type /exit (or Ctrl-D) to leave and /reset to forget the conversation. Input may be piped:
    each line of stdin is one user message.
    """
    from pagellm.chat import ChatTemplate

    engine = load_engine(engine_opts.engine_config(model, sampling.sampler_config()))
    try:
        template = ChatTemplate.from_metadata(engine.model_file.metadata)
        start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        interactive = sys.stdin.isatty()
        reply_tokens = max_tokens(n_predict, engine.n_ctx)
        if interactive:
            _err(f"chatting with {Path(model).name} (template: {template.name}); /exit or Ctrl-D to leave, /reset to forget")
        while (line := _read_turn(interactive)) is not None:
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit", "/bye"):
                break
            if command in ("/reset", "/clear"):
                messages = list(start)
                continue
            messages.append({"role": "user", "content": line})
            _chat_turn(engine, template, messages, reply_tokens, stats)
    finally:
        engine.close()


def _chat_turn(engine: "InferenceEngine", template: Any, messages: list[dict[str, str]], reply_tokens: int,
               stats: bool) -> None:
    """Generate and print one reply, adding it to ``messages``."""
    try:
        ids = _chat_prompt_ids(engine, template, messages, reserve=max(1, min(reply_tokens, engine.n_ctx // 2)))
    except CliError as e:
        messages.pop()  # keep the conversation usable: forget the turn that cannot fit
        _err(f"{PROG}: error: {e}")
        return
    writer = _TokenWriter()
    generation = engine.generate(ids, max_tokens=reply_tokens, on_token=writer,
                                 stop=list(template.default_stop) or None)
    writer.end_line()
    messages.append({"role": "assistant", "content": generation.text.strip()})
    if stats:
        _err(stats_line(generation.stats))


# ----------------------------------------------------------------------------- info


def _info_rows(mf: "ModelFile") -> list[tuple[str, str]]:
    """Label/value pairs describing a model file."""
    from pagellm.chat import ChatTemplate

    meta = mf.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else None  # a hostile file may hold anything under this key
    heads, heads_kv = mf.arch_get("attention.head_count"), mf.arch_get("attention.head_count_kv")
    try:
        template = ChatTemplate.from_metadata(meta, tokenizer_tokens=tokens or [])
        template_row = "yes" if not template.is_fallback else f"none (fallback: {template.name})"
    except ValueError as error:  # info describes the file; a broken template is part of the description
        template_row = f"invalid ({' '.join(str(error).split())[:120]})"
    rows = [
        ("file", f"{mf.path} ({_size(mf.file_size)}, GGUF v{mf.version})"),
        ("name", str(meta.get("general.name", "-"))),
        ("architecture", mf.architecture),
        ("parameters", f"{_count(mf.parameter_count)} ({mf.parameter_count:,})"),
        ("weights", _size(mf.weight_bytes)),
        ("layers", str(mf.arch_get("block_count", len(mf.block_groups)))),
        ("context length", str(mf.arch_get("context_length", "-"))),
        ("embedding", str(mf.arch_get("embedding_length", "-"))),
        ("feed-forward", str(mf.arch_get("feed_forward_length", "-"))),
        ("heads", f"{heads} (kv {heads_kv if heads_kv is not None else heads})" if heads is not None else "-"),
        ("tokenizer", f"{meta.get('tokenizer.ggml.model', '-')}, {len(tokens) if tokens is not None else '?'} tokens"),
        ("chat template", template_row),
    ]
    return rows


def _type_rows(mf: "ModelFile") -> list[list[str]]:
    """GGML type, bytes and share of the weights, largest first."""
    total = mf.weight_bytes or 1
    by_type = sorted(mf.bytes_by_type().items(), key=lambda kv: -kv[1])
    return [[name, _size(nbytes), f"{nbytes / total:.1%}"] for name, nbytes in by_type]


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--ram", metavar="SIZE|auto", default=None,
              help="Also show what would be pinned and streamed in this budget (PinnedHotSet defaults).")
@click.option("--offload", metavar="SPEC", default=None, help="Like --ram, for any policy spelling.")
@_CTX_OPTION
@_debug_option
def info(model: str, ram: str | None, offload: str | None, ctx: int | None) -> None:
    """Describe a GGUF model: architecture, size, types, layers, tokenizer, chat template."""
    from pagellm.modelfile import ModelFile

    mf = ModelFile.open(model)
    rows = _info_rows(mf)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label.ljust(width)}  {value}")
    click.echo("\nbytes by GGML type:")
    for name, nbytes, share in _type_rows(mf):
        click.echo(f"  {name:<8} {nbytes:>12}  {share:>6}")
    if ram is not None or offload is not None:
        opts = EngineOptions(ctx, None, offload, ram, "auto")
        policy = opts.policy(model)
        click.echo(f"\nplacement under {describe_policy(policy)}:")
        for line in _plan(mf, policy, opts.n_ctx(mf)).lines():
            click.echo(f"  {line}")


# ----------------------------------------------------------------------------- plan


def _plan(mf: "ModelFile", policy: "AnyPolicy", n_ctx: int, profile: "MachineProfile | None" = None) -> Any:
    """The planner's Plan for a policy on this machine (cached calibration, or defaults)."""
    from pagellm.offload.planner import MachineProfile, plan_offload

    return plan_offload(mf, policy, profile or MachineProfile.load_or_default(), n_ctx=n_ctx)


def _calibrate(mf: "ModelFile", seconds: float, threads: int | None) -> "MachineProfile":
    """Measure disk and compute on this machine, showing the phase on a terminal."""
    from pagellm.offload.planner import calibrate

    if not _show_progress():
        return calibrate(mf, seconds=seconds, threads=threads)
    phases = ("disk", "compute")
    with click.progressbar(length=len(phases), label="calibrating", file=sys.stderr, show_eta=False,
                           item_show_func=lambda phase: phase) as bar:
        def progress(phase: str) -> None:
            # calibrate names the phase it starts; the bar counts the phases already finished
            bar.update(phases.index(phase) - bar.pos if phase in phases else 0, phase)

        profile = calibrate(mf, seconds=seconds, threads=threads, progress=progress)
        bar.update(len(phases) - bar.pos)
    return profile


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@_RAM_OPTION
@_OFFLOAD_OPTION
@_CTX_OPTION
@click.option("--measure", is_flag=True, help="Calibrate disk bandwidth and compute speed on this machine first "
                                               "(a few seconds; cached for later plans).")
@click.option("--seconds", type=float, default=5.0, show_default=True, hidden=True)
@click.option("-t", "--threads", type=int, default=None, metavar="N", help="Threads for --measure (default: all).")
@_debug_option
def plan(model: str, ram: str | None, offload: str | None, ctx: int | None, measure: bool, seconds: float,
         threads: int | None) -> None:
    """Show the planner's placement for a budget and the predicted bytes read and tokens/s.

    Predictions use this machine's disk bandwidth and compute speed: measured with --measure (and
    cached), else the last measurement, else rough defaults.
    """
    from pagellm.modelfile import ModelFile

    if ram is None and offload is None:
        raise click.UsageError("give a budget: --ram SIZE|auto or --offload SPEC")
    mf = ModelFile.open(model)
    opts = EngineOptions(ctx, threads, offload, ram, "auto")
    policy = opts.policy(model)
    profile = _calibrate(mf, seconds, threads) if measure else None
    result = _plan(mf, policy, opts.n_ctx(mf), profile)
    click.echo(f"{Path(model).name} under {describe_policy(policy)}:")
    for line in result.lines():
        click.echo(f"  {line}")


# ----------------------------------------------------------------------------- measuring in a child process


def evict_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop the file's pages from the OS cache so a run starts cold (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass  # not Linux or not allowed: the numbers are then warm-cache numbers
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Measurement:
    """What one generation in a fresh process reported."""

    policy: str
    stats: dict[str, Any]
    token_ids: list[int]
    text: str
    memory: dict[str, int]
    load_seconds: float


def measure_in_subprocess(model: str, policy: str, n_tokens: int, prompt: str, seed: int,
                          ctx: int | None = None, threads: int | None = None, io_mode: str = "auto") -> Measurement:
    """Generate in a fresh process (so peak RSS is this run's) after evicting the file from the page cache."""
    evict_page_cache(model)
    cmd = [sys.executable, "-m", "pagellm.cli", "_measure", model, "--offload", policy, "-n", str(n_tokens),
           "-p", prompt, "--seed", str(seed), "--io-mode", io_mode]
    if ctx:
        cmd += ["--ctx", str(ctx)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise CliError(f"run under {policy} failed: {reason.removeprefix(PROG + ': error: ')}")
    return Measurement(**json.loads(proc.stdout.strip().splitlines()[-1]))


@cli.command("_measure", hidden=True)
@click.argument("model")
@click.option("--offload", required=True)
@click.option("-n", "n_tokens", type=int, default=32)
@click.option("-p", "--prompt", default="Once upon a time")
@click.option("--seed", type=int, default=42)
@click.option("--ctx", type=int, default=None)
@click.option("--threads", type=int, default=None)
@click.option("--io-mode", type=click.Choice(IO_MODES), default="auto")
@click.option("--warmup", type=int, default=2, help="Tokens generated first (compiles kernels, fills the pager).")
@_debug_option
def measure_command(model: str, offload: str, n_tokens: int, prompt: str, seed: int, ctx: int | None,
                    threads: int | None, io_mode: str, warmup: int) -> None:
    """Internal: one timed generation, printed as JSON (bench and demo run it per row)."""
    from pagellm.engine import EngineConfig, InferenceEngine
    from pagellm.offload.policy import OffloadPolicy
    from pagellm.sampling import SamplerConfig

    config = EngineConfig(model, context_size=ctx, n_threads=threads, sampler=SamplerConfig(seed=seed),
                          offload_policy=OffloadPolicy.parse(offload), io_mode=io_mode)
    t0 = time.perf_counter()
    engine = InferenceEngine(config).load_model()
    load_seconds = time.perf_counter() - t0
    try:
        if warmup > 0:
            # Numba compiles on first call; a short warm-up keeps compilation out of the timed tokens.
            engine.generate(prompt, max_tokens=warmup)
        generation = engine.generate(prompt, max_tokens=n_tokens)
        memory = engine.memory_summary()
    finally:
        engine.close()
    out = Measurement(str(config.offload_policy), generation.stats.as_dict(), generation.token_ids,
                      generation.text, memory, load_seconds)
    click.echo(json.dumps(out.__dict__))


# ----------------------------------------------------------------------------- bench


def _policy_label(policy: "AnyPolicy") -> str:
    """A short name for a policy in tables."""
    return type(policy).__name__


def _bench_policies(kinds: Sequence[str], budgets: Sequence[int]) -> list["AnyPolicy"]:
    """The policy × budget grid."""
    from pagellm.offload.policy import Budget, PinnedHotSet

    make = {"budget": Budget, "pinned": PinnedHotSet}
    return [make[kind](budget) for budget in budgets for kind in kinds]


def _bench_row(mf: "ModelFile", policy: "AnyPolicy", m: Measurement, n_ctx: int) -> list[str]:
    """One table row: measured figures and the ratio to the planner's bound for this policy."""
    stats = m.stats
    budget = policy.ram_budget_bytes()
    try:
        bound = 1.0 / _plan(mf, policy, n_ctx).floor_seconds_per_token
    except Exception:  # noqa: BLE001 - a planner failure must not lose the measured row
        bound = 0.0
    decode = float(stats["decode_tokens_per_s"])
    return [
        _policy_label(policy), _size(budget) if budget else "all",
        f"{decode:.2f}", f"{_size(stats['bytes_read_per_token'])}", f"{stats['hit_rate']:.1%}",
        f"{stats['stall_share']:.1%}", _size(stats["peak_rss_bytes"]),
        f"{bound:.2f}" if bound else "-", f"{decode / bound:.2f}" if bound else "-",
    ]


BENCH_HEADERS = ["policy", "budget", "decode tok/s", "read/token", "hit rate", "stalled", "peak RSS",
                 "bound tok/s", "ratio"]


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.argument("more_sizes", nargs=-1, metavar="[SIZE...]")
@click.option("--ram", "sizes", multiple=True, metavar="SIZE", required=True,
              help="Budget(s) to measure: --ram 1GiB 2GiB, --ram 1GiB --ram 2GiB or --ram 1GiB,2GiB.")
@click.option("--policy", "kinds", type=click.Choice(["budget", "pinned"]), multiple=True,
              default=("budget", "pinned"), show_default=True, help="Policies to measure at each budget.")
@click.option("--baseline/--no-baseline", default=None,
              help="Also measure NoOffload (default: when the model fits in the available RAM).")
@click.option("-n", "n_tokens", type=int, default=32, show_default=True, help="Tokens generated per row.")
@click.option("-p", "--prompt", default="Once upon a time", show_default=True)
@click.option("-s", "--seed", type=int, default=42, show_default=True)
@_CTX_OPTION
@click.option("-t", "--threads", type=int, default=None, metavar="N", help="Compute threads (default: all cores).")
@click.option("--io-mode", type=click.Choice(IO_MODES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON lines instead of a table.")
@_debug_option
def bench(model: str, more_sizes: tuple[str, ...], sizes: tuple[str, ...], kinds: tuple[str, ...],
          baseline: bool | None, n_tokens: int, prompt: str, seed: int, ctx: int | None, threads: int | None,
          io_mode: str, as_json: bool) -> None:
    """Measure decode speed, bytes read, stalls and peak RSS for each policy x budget.

    Each row runs in a fresh process with the file evicted from the page cache, so its peak RSS
    and reads are its own. "bound" is the planner's floor for the budget: the faster of compute
    and reading the non-resident bytes at disk bandwidth; "ratio" is measured over bound.
    """
    from pagellm.modelfile import ModelFile
    from pagellm.offload.policy import NoOffload, parse_size
    from pagellm.offload.pressure import available_ram_bytes

    mf = ModelFile.open(model)
    budgets = [parse_size(s) for item in (*sizes, *more_sizes) for s in item.split(",") if s.strip()]
    policies: list[AnyPolicy] = _bench_policies(kinds, budgets)
    if baseline or (baseline is None and mf.weight_bytes < 0.8 * available_ram_bytes()):
        policies.insert(0, NoOffload())
    n_ctx = EngineOptions(ctx, None, None, None, io_mode).n_ctx(mf)
    rows: list[list[str]] = []
    with _progress_items(policies, "benchmarking") as items:
        for policy in items:
            m = measure_in_subprocess(model, str(policy), n_tokens, prompt, seed, ctx, threads, io_mode)
            if as_json:
                click.echo(json.dumps({"policy": m.policy, **m.stats, "memory": m.memory}))
            rows.append(_bench_row(mf, policy, m, n_ctx))
    if not as_json:
        click.echo(f"{Path(model).name}: {_size(mf.weight_bytes)} of weights, {n_tokens} tokens per row")
        click.echo(_table(BENCH_HEADERS, rows, right=[False] + [True] * (len(BENCH_HEADERS) - 1)))


@contextmanager
def _progress_items(items: Sequence[Any], label: str) -> Iterator[Any]:
    """Iterate ``items`` behind a progress bar on a terminal, plainly otherwise."""
    if not _show_progress():
        yield items
        return
    with click.progressbar(items, label=label, file=sys.stderr, item_show_func=lambda i: str(i) if i else None) as bar:
        yield bar


# ----------------------------------------------------------------------------- serve


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.option("--api-key", default=None, envvar="PAGELLM_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (also read from PAGELLM_API_KEY).")
@click.option("--alias", "--model-name", "model_name", default=None, metavar="NAME",
              help="Model name the API reports (default: the file name without .gguf).")
@click.option("-np", "--parallel", "--max-batch", "max_batch", type=int, default=8, show_default=True,
              help="Requests decoded together (each layer read once serves all of them).")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Requests waiting beyond these get 429.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@sampling_options
@engine_options
@_debug_option
def serve(model: str, host: str, port: int, api_key: str | None, model_name: str | None, max_batch: int,
          max_queue: int, log_level: str, sampling: SamplingOptions, engine_opts: EngineOptions) -> None:
    """Serve the model over an OpenAI-compatible HTTP API.

    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming as SSE), /health,
    /metrics. The sampling options set the defaults a request does not override.
    """
    from pagellm.modelfile import ModelFile
    from pagellm.server import serve as serve_http

    ModelFile.open(model)  # fail fast with a one-line error before the server starts
    config = engine_opts.engine_config(model, sampling.sampler_config())
    serve_http(model, host=host, port=port, api_key=api_key, engine_config=config, model_name=model_name,
               log_level=log_level, max_batch=max_batch, max_queue=max_queue)


# ----------------------------------------------------------------------------- make-model


def _quant_type(name: str) -> str:
    """Normalise a --type: upper case, and a llama.cpp K-quant mix name (Q4_K_M) to its base type."""
    upper = name.strip().upper()
    return _QUANT_MIXES.get(upper, upper)


@cli.command("make-model")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--shape", default="tiny", show_default=True, metavar="|".join(["tiny", "tinyllama-1b", "llama-7b"]),
              help="Model shape.")
@click.option("--type", "ggml_type", default="Q8_0", show_default=True, metavar="TYPE",
              help="GGML type of the weights: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, F16, BF16, F32 "
                   "(Q4_K_M and other mix names map to their base type).")
@click.option("-s", "--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@_debug_option
def make_model_command(out: str, shape: str, ggml_type: str, seed: int, force: bool) -> None:
    """Write a GGUF with random weights and a real tokenizer, for demos and benchmarks."""
    from pagellm.synth import SHAPES, make_model

    if shape not in SHAPES:
        raise CliError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    path = Path(out)
    if path.exists() and not force:
        raise CliError(f"{out} exists (use --force to overwrite)")
    t0 = time.perf_counter()
    progress, close = _write_progress(f"writing {path.name}")
    try:
        make_model(path, shape, _quant_type(ggml_type), seed=seed, progress=progress)
    finally:
        close()
    _err(f"wrote {out}: {shape}, {_quant_type(ggml_type)}, {_size(path.stat().st_size)} "
         f"in {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class DemoSetup:
    """The demo's synthetic model and run: sized so it finishes in under 2 minutes on 2 cores."""

    name: str
    shape: Any  # synth.ModelShape
    ggml_type: str
    budget_share: float  # the budget as a share of the weights
    n_tokens: int


def _demo_setups() -> dict[str, DemoSetup]:
    """The default demo and a tiny one (for tests and a quick look)."""
    from pagellm.synth import SHAPES, ModelShape

    # 16 layers of 1024 wide at Q8_0: about 250 MiB, of which the token embedding and the output
    # head (pinned) are 70 MiB. Larger models make paging's cost plain but push past 2 minutes.
    demo = ModelShape(n_layer=16, n_embd=1024, n_ff=2816, n_head=16, n_head_kv=4, n_vocab=32000, n_ctx=2048)
    return {
        "demo": DemoSetup("demo", demo, "Q8_0", 0.4, 16),
        "tiny": DemoSetup("tiny", SHAPES["tiny"], "Q8_0", 0.4, 4),
    }


def _demo_model(setup: DemoSetup) -> Path:
    """The cached demo model, made on first use."""
    import platformdirs

    from pagellm.synth import make_model

    cache = Path(platformdirs.user_cache_dir(PROG))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"demo-{setup.name}-{setup.ggml_type}-v1.gguf"
    if not path.exists():
        _err(f"making the demo model once: {path}")
        progress, close = _write_progress("writing demo model")
        try:
            make_model(path, setup.shape, setup.ggml_type, seed=0, progress=progress)
        finally:
            close()
    return path


def _demo_budget(path: Path, share: float) -> int:
    """``share`` of the weights, raised if needed to fit the pinned set plus two streamed units."""
    from pagellm.modelfile import ModelFile
    from pagellm.offload.pager import LayerPager
    from pagellm.offload.policy import PinnedHotSet

    mf = ModelFile.open(path)
    units, _, pinned, _ = LayerPager.describe(mf, PinnedHotSet(mf.weight_bytes), 4096)
    pinned_bytes = sum(u.resident_capacity for u in units if u.name in pinned)
    largest = max((u.capacity for u in units if u.name not in pinned), default=0)
    return max(int(mf.weight_bytes * share), pinned_bytes + 2 * largest)


def _demo_table(weight_bytes: int, budget: int, base: Measurement, paged: Measurement) -> str:
    """The two runs side by side."""
    b, p = base.stats, paged.stats
    same = "yes" if base.token_ids == paged.token_ids else "NO"
    rows = [
        ["weights held in RAM", _size(weight_bytes), f"at most {_size(budget)}"],
        ["prompt tok/s", f"{b['prompt_tokens_per_s']:.1f}", f"{p['prompt_tokens_per_s']:.1f}"],
        ["decode tok/s", f"{b['decode_tokens_per_s']:.2f}", f"{p['decode_tokens_per_s']:.2f}"],
        ["bytes read / token", _size(b["bytes_read_per_token"]), _size(p["bytes_read_per_token"])],
        ["hit rate", f"{b['hit_rate']:.1%}", f"{p['hit_rate']:.1%}"],
        ["stalled on I/O", f"{b['stall_share']:.1%}", f"{p['stall_share']:.1%}"],
        ["peak RSS", _size(b["peak_rss_bytes"]), _size(p["peak_rss_bytes"])],
        ["same tokens", "", same],
    ]
    return _table(["", "NoOffload", "PinnedHotSet"], rows, right=[False, True, True])


@cli.command()
@click.option("--size", "size_name", type=click.Choice(["demo", "tiny"]), default="demo", hidden=True)
@click.option("-t", "--threads", type=int, default=None, metavar="N", help="Compute threads (default: all cores).")
@_debug_option
def demo(size_name: str, threads: int | None) -> None:
    """See paging at work, no download needed.

    Makes (once, in your cache directory) a synthetic llama model larger than the budget it
    then uses, generates the same tokens with every weight in RAM (NoOffload) and paged within
    the budget (PinnedHotSet), and prints the two sets of figures side by side.
    """
    t0 = time.perf_counter()
    setup = _demo_setups()[size_name]
    path = _demo_model(setup)
    budget = _demo_budget(path, setup.budget_share)
    from pagellm.modelfile import ModelFile
    from pagellm.offload.policy import PinnedHotSet

    weight_bytes = ModelFile.open(path).weight_bytes
    runs: list[Measurement] = []
    for label, policy in (("NoOffload", "none"), (f"PinnedHotSet in {_size(budget)}", str(PinnedHotSet(budget)))):
        _err(f"[{len(runs) + 1}/2] generating {setup.n_tokens} tokens under {label} ...")
        runs.append(measure_in_subprocess(str(path), policy, setup.n_tokens, "Once upon a time", 42, 256, threads))
    click.echo(f"\nA synthetic llama model ({setup.shape.n_layer} layers, {setup.ggml_type}, {_size(weight_bytes)} "
               f"of weights), run twice with seed 42:")
    click.echo(f"all in RAM, then paged within {_size(budget)} ({budget / weight_bytes:.0%} of the weights).\n")
    click.echo(_demo_table(weight_bytes, budget, *runs))
    click.echo(f"\n(random weights: the text is noise; the point is the same tokens from less RAM.) "
               f"{time.perf_counter() - t0:.0f} s")


# ----------------------------------------------------------------------------- entry point


def _error_message(error: BaseException) -> str:
    """One line saying what went wrong, for errors the user can act on."""
    from pagellm.modelfile import ModelFileError
    from pagellm.offload.pager import PagerError

    text = " ".join(str(error).split())
    if isinstance(error, (CliError, ModelFileError, PagerError, ValueError)):
        return text or type(error).__name__
    if isinstance(error, OSError):
        return f"{error.strerror or text}{': ' + str(error.filename) if error.filename else ''}"
    return f"{type(error).__name__}: {text} (this is a bug; run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning failures into one line and an exit code."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a model's bytes must never crash the terminal writer
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        _state["debug"] = True  # also for errors raised while click parses the arguments
    try:
        cli.main(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see '{e.ctx.command_path} --help')"
        _err(f"{PROG}: error: {' '.join(e.format_message().split())}{hint}")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _err(f"\n{PROG}: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        # The reader (head, a closed pager) went away: not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if _state["debug"]:
            traceback.print_exc()
        _err(f"{PROG}: error: {_error_message(e)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
