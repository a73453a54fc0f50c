"""Chat templates: real-world templates render exactly, the sandbox holds, errors are clear."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagellm.chat import CHATML_TEMPLATE, PLAIN_TEMPLATE, ChatTemplate

# Templates as their models publish them in tokenizer_config.json (and so in GGUF metadata).

LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

QWEN_2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
]


# ------------------------------------------------------------ real templates


def test_llama_2() -> None:
    template = ChatTemplate(LLAMA_2, "<s>", "</s>")
    assert template.render(CONVERSATION) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s><s>[INST] How are you? [/INST]"
    )
    assert template.render(CONVERSATION[1:2]) == "<s>[INST] Hi there [/INST]"


def test_llama_2_rejects_non_alternating_roles_cleanly() -> None:
    template = ChatTemplate(LLAMA_2, "<s>", "</s>")
    with pytest.raises(ValueError, match="^chat template error: Conversation roles must alternate") as caught:
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "\n" not in str(caught.value)


def test_qwen_2_chatml() -> None:
    template = ChatTemplate(QWEN_2, "", "<|im_end|>")
    assert template.render(CONVERSATION[1:2]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
    )


def test_llama_3() -> None:
    template = ChatTemplate(LLAMA_3, "<|begin_of_text|>", "<|eot_id|>")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi there \n"}]
    assert template.render(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_zephyr_relies_on_trim_and_lstrip_blocks() -> None:
    template = ChatTemplate(ZEPHYR, "<s>", "</s>")
    assert template.render(CONVERSATION[:2]) == (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    )
    assert template.render(CONVERSATION[:3], add_generation_prompt=False) == (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello.</s>\n"
    )


def test_lstrip_blocks_strips_indentation_before_tags() -> None:
    source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(source).render(CONVERSATION) == "[Hi there]\n[How are you?]\n"


# ----------------------------------------------------- transformers helpers


def test_tojson_has_transformers_semantics() -> None:
    source = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}"
    tools = [{"name": "f", "description": "<b>&'café'"}]
    out = ChatTemplate(source).render([], tools=tools)
    # No HTML escaping and no \u escapes, unlike Jinja's own tojson.
    assert out == (
        '[{"name": "f", "description": "<b>&\'café\'"}]'
        '|{\n  "name": "f",\n  "description": "<b>&\'café\'"\n}'
        '|{"a": 2, "b": 1}'
    )


def test_tools_and_documents_default_to_none() -> None:
    source = "{{ tools is none }} {{ documents is none }} {{ custom }}"
    assert ChatTemplate(source).render([], custom="x") == "True True x"
    assert ChatTemplate(source).render([], tools=[1], custom="y") == "False True y"


def test_strftime_now() -> None:
    before = datetime.now().strftime("%Y-%m-%d")
    out = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render([])
    assert out in {before, datetime.now().strftime("%Y-%m-%d")}


def test_loop_controls() -> None:
    source = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.content }};{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}"
    )
    assert ChatTemplate(source).render(CONVERSATION) == "Hi there;Hello.;"


def test_generation_tag_renders_its_body() -> None:
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<{{ m.content }}>"
        "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    assert ChatTemplate(source).render(CONVERSATION[1:3]) == "Hi there<Hello.>"


def test_extra_variables_and_special_tokens() -> None:
    template = ChatTemplate("{{ bos_token }}{{ greeting }}{{ eos_token }}{{ add_generation_prompt }}", "<s>", "</s>")
    assert template.render([], add_generation_prompt=False, greeting="hi") == "<s>hi</s>False"


# ------------------------------------------------------------------ sandbox

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ messages[0]['__class__'] }}",
    "{{ messages.append(1) }}",
    "{% set x = messages.pop() %}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escape_raises_a_clean_error(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"^chat template error: access to attribute '\w+' of '\w+' object is unsafe$"):
        ChatTemplate(source).render(messages)
    assert not (tmp_path / "PWNED").exists()
    assert messages == [{"role": "user", "content": "hi"}]


def test_syntax_errors_become_value_errors() -> None:
    with pytest.raises(ValueError, match=r"^chat template syntax error on line 2: .*'endfor'"):
        ChatTemplate("ok\n{% for m in messages %}{{ m }}")


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ messages[0].content + 1 }}", "can only concatenate str"),
        ("{{ missing.attribute }}", "'missing' is undefined"),
        ("{{ 1 / 0 }}", "division by zero"),
    ],
)
def test_runtime_errors_become_one_line_value_errors(source: str, message: str) -> None:
    with pytest.raises(ValueError, match="^chat template error: .*" + message) as caught:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "messages, error",
    [
        ("hello", r"^messages must be a list of dicts, got str$"),
        ({"role": "user"}, r"^messages must be a list of dicts, got dict$"),
        ([{"role": "user", "content": "a"}, "b"], r"^messages\[1\] must be a dict, got str$"),
        ([{"content": "a"}], r"^messages\[0\]\.role must be a non-empty string, got None$"),
        ([{"role": 3, "content": "a"}], r"^messages\[0\]\.role must be a non-empty string, got 3$"),
        ([{"role": "user"}], r"^messages\[0\]\.content is missing$"),
        (
            [{"role": "user", "content": 5}],
            r"^messages\[0\]\.content must be a string or a list of text parts, got int$",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"^messages\[1\]\.content\[0\] must be a text part",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            r"^messages\[0\]\.content\[0\]\.text must be a string",
        ),
    ],
)
def test_message_validation(messages: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ChatTemplate(QWEN_2).render(messages)  # type: ignore[arg-type]


def test_text_parts_are_joined_and_the_callers_messages_untouched() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    messages = [{"role": "user", "content": parts, "name": "ann"}]
    out = ChatTemplate("{{ messages[0].content }}|{{ messages[0].name }}").render(messages)
    assert out == "first\nsecond|ann"
    assert messages[0]["content"] is parts


def test_tool_call_turn_may_have_null_content() -> None:
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]
    source = "{{ messages[0].content is none }} {{ messages[0].tool_calls[0].function.name }}"
    assert ChatTemplate(source).render(messages) == "True f"


# ---------------------------------------------------------------- fallbacks


def test_plain_fallback() -> None:
    template = ChatTemplate(None, "<s>", "</s>")
    assert template.is_fallback and template.name == "plain" and template.source == PLAIN_TEMPLATE
    assert template.render(CONVERSATION[:2]) == "system: You are terse.\nuser: Hi there\nassistant:"
    assert template.default_stop == ("\nuser:",)


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})))
def test_chatml_fallback_matches_the_format(messages: list[dict]) -> None:
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    template = ChatTemplate(CHATML_TEMPLATE, name="chatml")
    assert template.render(messages) == expected + "<|im_start|>assistant\n"
    assert template.render(messages, add_generation_prompt=False) == expected


# ------------------------------------------------------------ from_metadata

VOCAB = ["<unk>", "<s>", "</s>", "hello"]


def test_from_metadata_reads_template_and_special_tokens() -> None:
    metadata = {"tokenizer.chat_template": LLAMA_2, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    template = ChatTemplate.from_metadata(metadata, VOCAB)
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")
    assert template.name == "model" and not template.is_fallback
    assert template.render(CONVERSATION[1:3]) == "<s>[INST] Hi there [/INST] Hello. </s>"


def test_from_metadata_uses_tokens_from_metadata() -> None:
    metadata = {"tokenizer.ggml.tokens": VOCAB, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 99}
    template = ChatTemplate.from_metadata(metadata, None)
    assert (template.bos_token, template.eos_token, template.name) == ("<s>", "", "plain")


def test_from_metadata_chooses_chatml_when_the_vocabulary_knows_it() -> None:
    vocab = ["a", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    template = ChatTemplate.from_metadata({"tokenizer.ggml.eos_token_id": 3}, vocab)
    assert template.name == "chatml" and template.is_fallback and template.eos_token == "<|im_end|>"
    assert template.render(CONVERSATION[1:2]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert template.default_stop == ("<|im_end|>",)


def test_from_metadata_without_anything() -> None:
    template = ChatTemplate.from_metadata({"tokenizer.chat_template": "   "}, None)
    assert (template.name, template.bos_token, template.eos_token) == ("plain", "", "")


def test_from_metadata_bad_template_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="syntax error"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": "{% if %}"}, VOCAB)
