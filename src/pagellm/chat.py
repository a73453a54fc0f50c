"""Render chat messages into a prompt with the model's own Jinja chat template.

GGUF files carry the Hugging Face template as ``tokenizer.chat_template``; it
is rendered the way ``transformers`` renders it (same environment options,
globals and filters) so prompts match what the model was trained on.

The template comes from a downloaded file, so it is untrusted code: it runs in
Jinja's immutable sandbox, and any attempt to reach unsafe attributes
(``__class__``, ``__globals__``, …) fails at once instead of quietly rendering
nothing.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# Used when a model has a template we cannot find but its vocabulary knows
# ChatML's markers (Qwen, many fine-tunes): the model then understands them.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Used otherwise. A model without a template is usually a base model, for
# which "<|im_start|>" is not one token but a handful of meaningless pieces;
# a plain transcript is text such a model has seen and can continue. The
# generation prompt ends at "assistant:" with no space because SentencePiece
# and BPE vocabularies put the space at the start of the next word.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

_TEMPLATE_KEY = "tokenizer.chat_template"


class _GenerationBlock(Extension):
    """Accept ``{% generation %}…{% endgeneration %}`` and render its body unchanged."""

    # transformers uses this tag to mark assistant tokens for training masks;
    # some templates carry it, and rendering them must not fail on it.
    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        """Parse the block and return its body as-is."""
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made to fail loudly on unsafe attribute access."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """Raise instead of returning an Undefined that renders as an empty string."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> None:
    """Template global: templates call it to reject a conversation they cannot format."""
    raise jinja2.TemplateError(message)


def _strftime_now(date_format: str) -> str:
    """Template global: the current local time formatted with ``date_format``."""
    return datetime.now().strftime(date_format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Template filter: plain json.dumps, as transformers defines it."""
    # Jinja's built-in tojson escapes <, >, & and ' for HTML; prompts are not
    # HTML, and models were trained on the unescaped JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment() -> _ChatSandbox:
    """Build the environment with the options and helpers transformers gives templates."""
    environment = _ChatSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _one_line(error: BaseException) -> str:
    """An exception's message collapsed onto one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class ChatTemplate:
    """A compiled chat template plus the special-token text it refers to."""

    def __init__(
        self, template: str | None, bos_token: str = "", eos_token: str = "", *, name: str | None = None
    ) -> None:
        self.source = template if template is not None else PLAIN_TEMPLATE
        # "model" for the file's own template; "plain" and "chatml" name our fallbacks.
        self.name = name or ("plain" if template is None else "model")
        self.is_fallback = self.name != "model"
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _make_environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"chat template syntax error on line {error.lineno}: {_one_line(error)}") from None
        except RecursionError:  # a template nested thousands deep exhausts the parser's stack
            raise ValueError("chat template is nested too deeply to compile") from None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tokenizer_tokens: Sequence[str] | None = None) -> ChatTemplate:
        """Build the template a GGUF file declares, or a fallback suited to its vocabulary."""
        tokens = tokenizer_tokens if tokenizer_tokens is not None else metadata.get("tokenizer.ggml.tokens")
        bos = _token_text(metadata.get("tokenizer.ggml.bos_token_id"), tokens)
        eos = _token_text(metadata.get("tokenizer.ggml.eos_token_id"), tokens)
        template = metadata.get(_TEMPLATE_KEY)
        if isinstance(template, (bytes, bytearray)):
            template = bytes(template).decode("utf-8", errors="replace")
        if isinstance(template, str) and template.strip():
            return cls(template, bos, eos)
        if isinstance(tokens, (list, tuple)) and _knows_chatml(tokens):
            return cls(CHATML_TEMPLATE, bos, eos, name="chatml")
        return cls(None, bos, eos)

    @property
    def default_stop(self) -> tuple[str, ...]:
        """Stop strings the fallback formats need (real templates rely on the EOS token)."""
        if self.name == "plain":
            return ("\nuser:",)  # the model would otherwise write the user's next turn
        if self.name == "chatml":
            return ("<|im_end|>",)
        return ()

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` into a prompt; ValueError for bad messages or template failures."""
        prepared = _prepare_messages(messages)
        # transformers passes tools and documents even when absent, and some
        # templates test "is not none" rather than "is defined".
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": None,
            "documents": None,
            **extra,
            "messages": prepared,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(context)
        except Exception as error:  # noqa: BLE001 - the template is untrusted code; any failure is its failure
            raise ValueError(f"chat template error: {_one_line(error)}") from None


def _token_text(token_id: Any, tokens: Sequence[str] | None) -> str:
    """The text of ``token_id`` in the vocabulary, or "" when unknown."""
    if token_id is None or tokens is None:
        return ""
    try:
        index = int(token_id)
    except (TypeError, ValueError, OverflowError):  # a hostile file's id may be a string, an array or inf
        return ""
    if not isinstance(tokens, (list, tuple)):
        return ""
    if 0 <= index < len(tokens):
        text = tokens[index]
        return text.decode("utf-8", errors="replace") if isinstance(text, (bytes, bytearray)) else str(text)
    return ""


def _knows_chatml(tokens: Sequence[str]) -> bool:
    """Whether ChatML's turn markers are tokens of this vocabulary."""
    wanted = {"<|im_start|>", "<|im_end|>"}
    for token in tokens:
        wanted.discard(token)
        if not wanted:
            return True
    return False


def _prepare_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate messages and return copies with text-part lists joined into strings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}].role must be a non-empty string, got {role!r}")
        copy = dict(message)
        copy["content"] = _content_text(message, index)
        prepared.append(copy)
    return prepared


def _content_text(message: Mapping[str, Any], index: int) -> str | None:
    """A message's content as one string (None only for an assistant turn that only calls tools)."""
    if "content" not in message or message["content"] is None:
        # OpenAI clients send content null on assistant turns that carry tool calls.
        if message.get("tool_calls"):
            return None
        raise ValueError(f"messages[{index}].content is missing")
    content = message["content"]
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part_index, part in enumerate(content):
            where = f"messages[{index}].content[{part_index}]"
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ValueError(f"{where} must be a text part {{'type': 'text', 'text': ...}}, got {part!r:.80}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.text must be a string, got {part.get('text')!r:.80}")
            texts.append(part["text"])
        # Joined with newlines, as vLLM does: every text-only template handles
        # a string, while few handle a list of parts.
        return "\n".join(texts)
    raise ValueError(
        f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
    )


__all__ = ["ChatTemplate", "CHATML_TEMPLATE", "PLAIN_TEMPLATE"]
