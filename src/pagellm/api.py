"""``LLM``: a Python API shaped like llama-cpp-python's ``Llama``, plus the prompt and response shapes
the OpenAI-compatible server shares with it.

A llama-cpp-python script ports by changing the import and the class name::

    from pagellm import LLM
    llm = LLM("model.gguf", n_ctx=2048, offload="pinned:2GiB,last=4")
    print(llm("Q: Name the planets. A:", max_tokens=32, stop=["Q:"])["choices"][0]["text"])
"""
from __future__ import annotations

import re
import secrets
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pagellm.chat import CHATML_TEMPLATE, ChatTemplate, _prepare_messages
from pagellm.engine import EngineConfig, GenerationStats, InferenceEngine, SequenceState
from pagellm.offload.policy import AnyPolicy, NoOffload, OffloadPolicy, format_size
from pagellm.sampling import SamplerConfig
from pagellm.tokenizer import Tokenizer

# llama-cpp-python's "no seed" value (LLAMA_DEFAULT_SEED): fresh entropy on every call.
_LLAMA_DEFAULT_SEED = 0xFFFFFFFF

# Llama() keyword arguments that only tune llama.cpp's own machinery (GPU, mmap, batching, ...).
# Accepting them keeps ported scripts running; they change nothing about the output here.
_IGNORED_INIT_ARGS = frozenset({
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "rpc_servers", "vocab_only", "use_mmap",
    "use_mlock", "n_ubatch", "n_threads_batch", "offload_kqv", "flash_attn", "op_offload", "swa_full",
    "logits_all", "last_n_tokens_size", "numa", "mul_mat_q", "no_perf", "type_k", "type_v", "spm_infill",
    "embedding", "lora_scale",
})
# Llama() keyword arguments that would change the numbers; accepted only at their "off" value.
_INIT_ARGS_AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "rope_scaling_type": (None, -1), "pooling_type": (None, -1, 0), "rope_freq_base": (None, 0.0),
    "rope_freq_scale": (None, 0.0), "yarn_ext_factor": (None, -1.0), "yarn_attn_factor": (None, 1.0),
    "yarn_beta_fast": (None, 32.0), "yarn_beta_slow": (None, 1.0), "yarn_orig_ctx": (None, 0),
    "lora_base": (None,), "lora_path": (None,), "kv_overrides": (None, {}), "draft_model": (None,),
    "chat_handler": (None,), "tokenizer": (None,),
}
# EngineConfig fields a caller may set through LLM(**extra).
_ENGINE_FIELDS = frozenset({"io_mode", "replacement", "prefill_chunk_size"})

# Sampling arguments of create_completion / create_chat_completion that pagellm does not
# implement, with the values at which they do nothing (those are accepted silently).
_UNSUPPORTED_AT: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "typical_p": (1.0,), "tfs_z": (1.0,), "mirostat_mode": (0,), "logprobs": (None, False),
    "top_logprobs": (None,), "grammar": (None,), "logit_bias": (None, {}), "logits_processor": (None,),
    "stopping_criteria": (None,), "functions": (None,), "function_call": (None,), "tools": (None,),
    "tool_choice": (None,), "response_format": (None,),
}


# -- prompts --------------------------------------------------------------------------------


class PromptBuilder:
    """Turns completion prompts and chat messages into token ids; user text never becomes control tokens.

    A chat template may write control tokens (``<|im_start|>``, ``bos_token``) and those are parsed as
    such, but text a user wrote is tokenized as plain text even when it spells a control token: otherwise
    anyone could close the user turn and open a system turn of their own.
    """

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.template = template
        specials = {}
        for tid in range(tokenizer.vocab_size):
            if tokenizer.is_control(tid):
                text = tokenizer.token_text(tid)
                if text:
                    specials.setdefault(text, tid)
        self._special_ids = specials
        # Longest first, so "<|im_start|>" wins over a shorter token that is its prefix.
        alternation = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(alternation) if alternation else None

    @classmethod
    def for_engine(cls, engine: InferenceEngine, chat_format: str | None = None,
                   chat_template: str | None = None) -> "PromptBuilder":
        """The builder for a loaded engine: its tokenizer and the file's chat template (or a given one)."""
        metadata = engine.model_file.metadata
        template = ChatTemplate.from_metadata(metadata)
        if chat_template is not None:
            template = ChatTemplate(chat_template, template.bos_token, template.eos_token)
        elif chat_format is not None:
            if chat_format != "chatml":
                raise ValueError(f"chat_format {chat_format!r} is not built in (only 'chatml'); by default "
                                 "the model's own template is used, or pass chat_template='<jinja source>'")
            template = ChatTemplate(CHATML_TEMPLATE, template.bos_token, template.eos_token, name="chatml")
        return cls(engine.tokenizer, template)

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary."""
        return self.tokenizer.vocab_size

    def text_ids(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of plain text: control-token spellings stay text; BOS when the vocabulary wants one."""
        ids = self.tokenizer.encode(text, add_special=add_bos, parse_special=False)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]  # llama-cpp-python evaluates an empty prompt as BOS alone
        return ids

    def check_ids(self, ids: Any) -> list[int]:
        """The ids as ints, or ValueError when one is not a token of this vocabulary."""
        out = []
        for position, tid in enumerate(ids):
            if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or not 0 <= tid < self.vocab_size:
                raise ValueError(f"prompt token {position} ({tid!r}) is not a token id in [0, {self.vocab_size})")
            out.append(int(tid))
        if not out:
            raise ValueError("the prompt has no tokens")
        return out

    def prompt_ids(self, prompt: str | bytes | Sequence[int]) -> list[int]:
        """Token ids of a completion prompt: text (tokenized as plain text) or token ids (checked)."""
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", errors="replace")
        if isinstance(prompt, str):
            return self.text_ids(prompt)
        return self.check_ids(prompt)

    def chat_ids(self, messages: Any) -> list[int]:
        """Token ids of ``messages`` rendered by the chat template with a generation prompt."""
        prepared = _prepare_messages(messages)
        # Render with a random marker in place of each user-written field, then put the real text back
        # as plain-text fragments. The marker cannot occur in the template's own text, so nothing a
        # user wrote can be mistaken for template text (searching for the content could be fooled).
        nonce = secrets.token_hex(8)
        marked, originals = [], []
        for message in prepared:
            copy = dict(message)
            for key in ("content", "name"):
                if isinstance(copy.get(key), str):
                    copy[key] = f"\ue000{nonce}:{len(originals)}\ue001"
                    originals.append(message[key])
            marked.append(copy)
        rendered = self.template.render(marked, add_generation_prompt=True)
        truth = self.template.render(prepared, add_generation_prompt=True)
        marker = re.compile("\ue000" + nonce + r":(\d+)\ue001")
        restored = marker.sub(lambda m: originals[int(m.group(1))], rendered)
        if restored != truth:
            # The template transforms user text (strip, split, ...); markers cannot show where it went.
            return self._fallback_ids(truth, originals)
        fragments: list[str | int] = []
        pos = 0
        for m in marker.finditer(rendered):
            fragments.extend(self._split_specials(rendered[pos : m.start()]))
            fragments.append(originals[int(m.group(1))])
            pos = m.end()
        fragments.extend(self._split_specials(rendered[pos:]))
        return self._encode_fragments(fragments)

    def _fallback_ids(self, rendered: str, user_texts: list[str]) -> list[int]:
        """Ids of a rendering whose user text cannot be located: safe only when no user text spells a control token."""
        if self._special_re is not None:
            for text in user_texts:
                found = self._special_re.search(text)
                if found:
                    raise ValueError(f"message text contains the control token {found.group(0)!r}, which this "
                                     "model's chat template would let through; remove it")
        return self._encode_fragments(self._split_specials(rendered))

    def _split_specials(self, text: str) -> list[str | int]:
        """Template text cut into plain-text pieces and the ids of the control tokens it spells."""
        if self._special_re is None or not text:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self._special_ids[m.group(0)])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _encode_fragments(self, fragments: list[str | int]) -> list[int]:
        """Encode runs of text between control tokens as llama.cpp does (each run on its own), BOS first."""
        ids: list[int] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                ids.extend(self.tokenizer.encode("".join(run), add_special=False, parse_special=False))
                run.clear()

        for fragment in fragments:
            if isinstance(fragment, int):
                flush()
                ids.append(fragment)
            else:
                run.append(fragment)
        flush()
        bos = self.tokenizer.bos_id
        # Most templates write bos_token themselves; add it only when the template did not.
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        if not ids:
            raise ValueError("the chat template rendered an empty prompt")
        return ids

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings the chat format needs on top of the end-of-generation tokens."""
        return self.template.default_stop


# -- response shapes (OpenAI's, as llama-cpp-python returns them) -----------------------------


def new_id(kind: str) -> str:
    """A fresh response id: ``cmpl-…`` for completions, ``chatcmpl-…`` for chat completions."""
    return f"{kind}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_dict(cid: str, created: int, model: str, text: str, finish_reason: str | None,
                    usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``text_completion`` object (a whole completion, or a streamed chunk when usage is None)."""
    out: dict[str, Any] = {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def chat_dict(cid: str, created: int, model: str, text: str, finish_reason: str,
              usage: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, str],
               finish_reason: str | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice carrying ``delta``."""
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def openai_finish_reason(reason: str | None) -> str:
    """The engine's finish reason in OpenAI's vocabulary ('stop' or 'length')."""
    return "length" if reason == "length" else "stop"


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of the values at which an unsupported option does nothing."""
    for n in neutral:
        if value is n:
            return True
        if isinstance(value, bool) or isinstance(n, bool):
            continue  # True == 1 would otherwise pass for a number
        try:
            if value == n:
                return True
        except Exception:  # noqa: BLE001 - e.g. an array, whose == is not a truth value
            continue
    return False


def reject_unsupported(**given: Any) -> None:
    """ValueError for a sampling feature pagellm lacks when it is asked for (its neutral value is fine)."""
    for name, value in given.items():
        if not _is_neutral(value, _UNSUPPORTED_AT[name]):
            raise ValueError(f"pagellm does not support {name}={value!r:.60}")


def stats_line(stats: GenerationStats) -> str:
    """One line of a generation's figures, for verbose output."""
    return (f"pagellm: prompt {stats.prompt_tokens} tok {stats.prompt_tokens_per_s:.1f} tok/s | "
            f"decode {stats.generated_tokens} tok {stats.decode_tokens_per_s:.1f} tok/s | "
            f"read {format_size(stats.bytes_read_per_token)}/tok | hits {stats.hit_rate:.1%} | "
            f"stall {stats.stall_share:.1%} | peak RSS {format_size(stats.peak_rss_bytes)}")


# -- LLM ------------------------------------------------------------------------------------------


class LLM:
    """A GGUF model under an offload policy, with llama-cpp-python's ``Llama`` methods and dict shapes."""

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        seed: int | None = None,
        offload: AnyPolicy | str | None = None,
        verbose: bool = False,
        **extra: Any,
    ) -> None:
        """Load ``model_path``; ``offload`` is a policy or its spelling ("none", "budget:4GiB", "pinned:...")."""
        options: dict[str, Any] = {}
        chat_format = extra.pop("chat_format", None)
        chat_template = extra.pop("chat_template", None)
        for name, value in extra.items():
            if name in _IGNORED_INIT_ARGS:
                continue
            if name == "n_batch":
                options["prefill_chunk_size"] = int(value)
            elif name in _ENGINE_FIELDS:
                options[name] = value
            elif name in _INIT_ARGS_AT_DEFAULT:
                if not _is_neutral(value, _INIT_ARGS_AT_DEFAULT[name]):
                    raise ValueError(f"pagellm does not support {name}={value!r}")
            else:
                raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")
        if offload is None:
            policy: AnyPolicy = NoOffload()
        elif isinstance(offload, str):
            policy = OffloadPolicy.parse(offload)
        elif isinstance(offload, OffloadPolicy):
            policy = offload
        else:
            raise TypeError(f"offload must be an OffloadPolicy or its text spelling, got {type(offload).__name__}")
        config = EngineConfig(
            model_path,
            context_size=n_ctx or None,  # llama-cpp-python's n_ctx=0 means "the model's own"
            n_threads=n_threads,
            offload_policy=policy,
            **options,
        )
        self.model_path = str(model_path)
        self.verbose = verbose
        self._engine: InferenceEngine | None = InferenceEngine(config).load_model()
        self._prompts = PromptBuilder.for_engine(self._engine, chat_format, chat_template)
        # A fixed seed makes the sequence of calls reproducible; each call draws its own seed from it.
        self._seeds = None if seed is None or seed == _LLAMA_DEFAULT_SEED else np.random.default_rng(seed)
        self.last_stats: GenerationStats | None = None
        if verbose:
            print(f"pagellm: loaded {self.model_path} (context {self._engine.n_ctx}, offload {policy})",
                  file=sys.stderr)

    # -- model facts --------------------------------------------------------------------------

    @property
    def engine(self) -> InferenceEngine:
        """The loaded engine (for the server and for figures the API does not wrap)."""
        if self._engine is None:
            raise RuntimeError("this LLM is closed")
        return self._engine

    @property
    def prompts(self) -> PromptBuilder:
        """How prompts and chat messages become token ids for this model."""
        return self._prompts

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF metadata as strings, like llama-cpp-python's (large arrays left out)."""
        return {k: str(v) for k, v in self.engine.model_file.metadata.items()
                if not isinstance(v, (list, tuple, np.ndarray))}

    @property
    def chat_template(self) -> ChatTemplate:
        """The chat template chat completions use."""
        return self._prompts.template

    @property
    def stats(self) -> GenerationStats:
        """Figures of all generations so far (tokens/s, bytes read, hits, stall time, peak RSS)."""
        return self.engine.stats

    def n_ctx(self) -> int:
        """The context size in tokens."""
        return self.engine.n_ctx

    def n_vocab(self) -> int:
        """Tokens in the vocabulary."""
        return self.engine.tokenizer.vocab_size

    def token_bos(self) -> int:
        """The beginning-of-sequence token id (-1 when the vocabulary has none)."""
        bos = self.engine.tokenizer.bos_id
        return -1 if bos is None else bos

    def token_eos(self) -> int:
        """The end-of-sequence token id (-1 when the vocabulary has none)."""
        eos = self.engine.tokenizer.eos_id
        return -1 if eos is None else eos

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control-token spellings like ``<s>`` as those tokens."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.engine.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        """The bytes of ``tokens`` (control tokens only with ``special``), as llama-cpp-python returns them."""
        tok = self.engine.tokenizer
        ids = [int(t) for t in tokens]
        out = b"".join(tok.token_to_bytes(t, special) for t in ids)
        # SentencePiece put a space before the first word; a sequence from BOS gives it back.
        if ids and ids[0] == tok.bos_id and out[:1] == b" ":
            out = out[1:]
        return out

    # -- completions --------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[int], *args: Any, **kwargs: Any) -> Any:
        """Same as ``create_completion``."""
        return self.create_completion(prompt, *args, **kwargs)

    def create_completion(
        self,
        prompt: str | bytes | Sequence[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: Any = None,
        logits_processor: Any = None,
        grammar: Any = None,
        logit_bias: dict[int, float] | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete ``prompt``: a ``text_completion`` dict, or an iterator of chunks when ``stream``.

        ``max_tokens`` None or <= 0 means up to the end of the context. Text prompts never turn
        control-token spellings into control tokens; pass token ids for that.
        """
        reject_unsupported(suffix=suffix, typical_p=typical_p, logprobs=logprobs, tfs_z=tfs_z,
                           mirostat_mode=mirostat_mode, stopping_criteria=stopping_criteria,
                           logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
        ids = self._prompts.prompt_ids(prompt)
        n_new = self._room(ids, max_tokens)
        sampler = self._sampler(temperature, top_p, min_p, top_k, repeat_penalty, frequency_penalty,
                                presence_penalty, seed)
        name = model if model is not None else self.model_path
        cid, created = new_id("cmpl"), int(time.time())
        prefix = ""
        if echo:
            prefix = prompt if isinstance(prompt, str) else self.detokenize(ids).decode("utf-8", errors="replace")
        if stream:
            return self._stream_completion(ids, n_new, sampler, stop, cid, created, name, prefix)
        result = self.engine.generate(ids, n_new, sampler=sampler, stop=stop)
        self._finished(result.stats)
        return completion_dict(cid, created, name, prefix + result.text, openai_finish_reason(result.finish_reason),
                               usage_dict(len(ids), len(result.token_ids)))

    def _stream_completion(self, ids: list[int], n_new: int, sampler: SamplerConfig, stop: Any, cid: str,
                           created: int, name: str, prefix: str) -> Iterator[dict[str, Any]]:
        if prefix:
            yield completion_dict(cid, created, name, prefix, None)
        seq = None
        for piece, seq in self._pieces(ids, n_new, sampler, stop):
            if piece:
                yield completion_dict(cid, created, name, piece, None)
        yield completion_dict(cid, created, name, "", openai_finish_reason(seq.finish_reason))

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        response_format: Any = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor: Any = None,
        grammar: Any = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation through the model's chat template: a ``chat.completion`` dict, or chunks."""
        reject_unsupported(functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
                           typical_p=typical_p, response_format=response_format, tfs_z=tfs_z,
                           mirostat_mode=mirostat_mode, logits_processor=logits_processor, grammar=grammar,
                           logit_bias=logit_bias, logprobs=logprobs, top_logprobs=top_logprobs)
        ids = self._prompts.chat_ids(messages)
        n_new = self._room(ids, max_tokens)
        sampler = self._sampler(temperature, top_p, min_p, top_k, repeat_penalty, frequency_penalty,
                                presence_penalty, seed)
        stops = merge_stops(stop, self._prompts.chat_stop)
        name = model if model is not None else self.model_path
        cid, created = new_id("chatcmpl"), int(time.time())
        if stream:
            return self._stream_chat(ids, n_new, sampler, stops, cid, created, name)
        result = self.engine.generate(ids, n_new, sampler=sampler, stop=stops)
        self._finished(result.stats)
        return chat_dict(cid, created, name, result.text, openai_finish_reason(result.finish_reason),
                         usage_dict(len(ids), len(result.token_ids)))

    def _stream_chat(self, ids: list[int], n_new: int, sampler: SamplerConfig, stops: list[str], cid: str,
                     created: int, name: str) -> Iterator[dict[str, Any]]:
        yield chat_chunk(cid, created, name, {"role": "assistant"})
        seq = None
        for piece, seq in self._pieces(ids, n_new, sampler, stops):
            if piece:
                yield chat_chunk(cid, created, name, {"content": piece})
        yield chat_chunk(cid, created, name, {}, openai_finish_reason(seq.finish_reason))

    # -- generation core ------------------------------------------------------------------------

    def _room(self, ids: list[int], max_tokens: int | None) -> int:
        """New tokens allowed: ``max_tokens`` capped to the context left after the prompt."""
        n_ctx = self.engine.n_ctx
        if len(ids) >= n_ctx:
            raise ValueError(f"Requested tokens ({len(ids)}) exceed context window of {n_ctx}")
        room = n_ctx - len(ids)
        if max_tokens is None or max_tokens <= 0:
            return room
        return min(int(max_tokens), room)

    def _sampler(self, temperature: float, top_p: float, min_p: float, top_k: int, repeat_penalty: float,
                 frequency_penalty: float, presence_penalty: float, seed: int | None) -> SamplerConfig:
        if seed is None and self._seeds is not None:
            seed = int(self._seeds.integers(0, 2**63 - 1))
        return SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, seed=seed)

    def _pieces(self, ids: list[int], n_new: int, sampler: SamplerConfig,
                stop: Any) -> Iterator[tuple[str, SequenceState]]:
        """Generate one sequence step by step, yielding (text piece, sequence) as text becomes final."""
        engine = self.engine
        pending: list[str] = []
        # Its own KV cache, so an abandoned stream cannot disturb a later call on the same LLM.
        seq = engine.start(ids, n_new, sampler=sampler, stop=stop, on_token=lambda _id, text: pending.append(text))
        try:
            while True:
                while pending:
                    yield pending.pop(0), seq
                if seq.done:
                    break
                engine.step([seq])
            yield "", seq
        finally:
            seq.cancel()  # a stream closed early stops generating; no-op once finished
        self._finished(seq.stats)

    def _finished(self, stats: GenerationStats | None) -> None:
        self.last_stats = stats
        if self.verbose and stats is not None:
            print(stats_line(stats), file=sys.stderr)

    # -- lifetime -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache (every call starts from an empty one anyway)."""
        self.engine.reset()

    def close(self) -> None:
        """Release the weights and the file; the LLM cannot be used afterwards."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down already
            pass


def merge_stops(stop: str | Sequence[str] | None, extra: Sequence[str]) -> list[str]:
    """The caller's stop strings plus the chat format's own, without duplicates or empty strings."""
    given = [stop] if isinstance(stop, str) else list(stop or [])
    out: list[str] = []
    for s in [*given, *extra]:
        if s and s not in out:
            out.append(s)
    return out


__all__ = ["LLM", "PromptBuilder"]
