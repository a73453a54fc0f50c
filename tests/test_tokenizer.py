"""pagellm.tokenizer against llama.cpp's own tokenizer test vectors and the fixtures' prompts."""
from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.modelfile import ModelFile
from pagellm.tokenizer import StreamDecoder, Tokenizer
from shared_paths import fixture_meta, fixture_names, fixture_path, models_dir, tokenizer_vectors_dir

SEPARATOR = "\n__ggml_vocab_test__\n"

# Vocabularies that cannot match llama.cpp; each entry becomes xfail(strict=True) with its reason.
KNOWN_FAILURES: dict[str, str] = {}


def _vocab_names() -> list[str]:
    """Vocab GGUFs that come with llama.cpp's .inp/.out vectors (some vectors have no GGUF)."""
    try:
        folder = tokenizer_vectors_dir()
    except FileNotFoundError:
        return []
    return sorted(
        p.name[: -len(".gguf")]
        for p in folder.glob("ggml-vocab-*.gguf")
        if p.with_name(p.name + ".inp").exists() and p.with_name(p.name + ".out").exists()
    )


def _vocab_params() -> list:
    names = _vocab_names()
    if not names:
        return [pytest.param(None, marks=pytest.mark.skip(reason="shared tokenizer vectors missing"))]
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[n]))
        if n in KNOWN_FAILURES else n
        for n in names
    ]


@functools.lru_cache(maxsize=None)
def _tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(ModelFile.open(path).metadata)


def _vocab(name: str) -> Tokenizer:
    path = tokenizer_vectors_dir() / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return _tokenizer(path)


def _cases(name: str) -> list[tuple[str, list[int]]]:
    folder = tokenizer_vectors_dir()
    texts = (folder / f"{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    lines = (folder / f"{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(texts)
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines)]


@pytest.mark.parametrize("name", _vocab_params())
def test_llama_cpp_vectors(name: str) -> None:
    tok = _tokenizer(tokenizer_vectors_dir() / f"{name}.gguf")
    cases = _cases(name)
    assert cases
    wrong = [
        (text, expected, got)
        for text, expected in cases
        if (got := tok.encode(text, add_special=False, parse_special=False)) != expected
    ]
    assert not wrong, f"{len(wrong)}/{len(cases)} cases differ, first: {wrong[0]!r}"


def _fixture_params() -> list[str]:
    try:
        return fixture_names()
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("fixture", _fixture_params())
def test_fixture_prompt_and_continuation(fixture: str) -> None:
    meta = fixture_meta(fixture)
    tok = _tokenizer(fixture_path(fixture))
    assert tok.encode(meta["prompt"]) == meta["prompt_tokens"]
    assert tok.decode(meta["continuation_tokens"]) == meta["continuation_text"]
    # A prompt with BOS decodes back to itself (the SentencePiece prefix space is dropped).
    assert tok.decode(meta["prompt_tokens"]) == meta["prompt"]


def test_stories260k_own_vocabulary() -> None:
    path = models_dir() / "stories260K.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    tok = _tokenizer(path)
    assert (tok.model, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == ("llama", 512, 1, 2, True)
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    # PROVENANCE.md: greedy decoding from BOS; streamed pieces keep the leading space.
    ids = fixture_meta("stories260K-real-F32")["sequence_tokens"]
    dec = tok.stream_decoder()
    text = "".join(dec.push(t) for t in ids) + dec.flush()
    expected = " Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    assert text.startswith(expected)


ROUND_TRIP_TEXTS = [
    "Hello world",
    " Hello world",
    "  two leading spaces, and trailing  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "Ünïcödé: ça, naïve, Straße, 日本語のテキスト, русский, ελληνικά",
    "emoji 🦙🚀 and ZWJ 👩‍💻 sequences",
    "code: for (int i = 0; i < n; ++i) { x[i] = 'a'; }",
    "",
]


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2", "phi-3", "deepseek-coder", "falcon"])
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(name: str, text: str) -> None:
    tok = _vocab(name)
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_stories260k_byte_fallback() -> None:
    tok = _tokenizer(models_dir() / "stories260K.gguf")
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40))
def test_round_trip_random_text(text: str) -> None:
    # '▁' itself is excluded: SentencePiece writes spaces as '▁', so it cannot survive (as in llama.cpp).
    for name in ("llama-spm", "gpt-2"):
        tok = _vocab(name)
        assert tok.decode(tok.encode(text)) == text


def test_continuation_keeps_its_leading_space() -> None:
    tok = _vocab("llama-spm")
    ids = tok.encode("Once upon a time", add_special=False)
    assert tok.decode(ids) == " Once upon a time"  # a continuation: the space is real
    assert tok.decode([tok.bos_id, *ids]) == "Once upon a time"


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_stream_decoder_waits_for_complete_utf8(name: str) -> None:
    tok = _vocab(name)
    text = "this is 🦙.cpp — ok"
    ids = tok.encode(text, add_special=False)
    partial = [t for t in ids if tok.token_to_piece(t) == "\ufffd"]
    assert partial, "the emoji should be split over tokens that are not whole characters"
    dec = StreamDecoder(tok)
    pushed = [dec.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pushed)
    assert "".join(pushed) + dec.flush() == tok.decode(ids)
    # Exactly one push releases the whole emoji at once.
    assert sum("🦙" in p for p in pushed) == 1


def test_stream_decoder_byte_fallback_emoji() -> None:
    tok = _vocab("llama-spm")
    ids = tok.encode("🦙", add_special=False)
    assert ids == [29871, 243, 162, 169, 156]  # '▁' then the four <0xNN> byte tokens
    dec = tok.stream_decoder()
    assert [dec.push(t) for t in ids] == [" ", "", "", "", "🦙"]
    assert dec.flush() == ""
    assert tok.token_to_bytes(243) == b"\xf0"
    assert tok.token_to_piece(243) == "\ufffd"  # a lone byte is not text
    dec = tok.stream_decoder()
    dec.push(243)
    assert dec.flush() == "\ufffd"  # an unfinished character at the end is reported, not lost


def test_special_token_text_is_not_parsed_by_default() -> None:
    spm = _vocab("llama-spm")
    text = "<s>Hello</s>"
    plain = spm.encode(text, add_special=False)
    assert spm.bos_id not in plain and spm.eos_id not in plain
    assert spm.decode(plain) == " " + text
    parsed = spm.encode(text, add_special=False, parse_special=True)
    assert parsed == [spm.bos_id, 15043, spm.eos_id]  # SentencePiece: a space after each special
    assert spm.decode(parsed, skip_special=False) == "<s>Hello</s>"
    assert spm.decode(parsed) == "Hello"

    gpt2 = _vocab("gpt-2")
    text = "a<|endoftext|>b"
    assert 50256 not in gpt2.encode(text)
    assert gpt2.encode(text, parse_special=True) == gpt2.encode("a") + [50256] + gpt2.encode("b")
    assert gpt2.decode(gpt2.encode(text)) == text


def test_user_defined_tokens_are_always_split_out() -> None:
    # llama.cpp splits user-defined tokens out even with parse_special=false (mpt's runs of spaces).
    mpt = _vocab("mpt")
    spaces = " " * 24
    assert mpt.token_text(50254) == spaces
    assert mpt.encode("a" + spaces + "b") == [mpt.token_id("a"), 50254, mpt.token_id("b")]


def test_phi3_special_tokens_eat_the_whitespace_after_them() -> None:
    # llama.cpp marks phi-3's special tokens rstrip, so the newline after each is dropped.
    phi3 = _vocab("phi-3")
    ids = phi3.encode("<|user|>\nHi<|end|>\n<|assistant|>", add_special=False, parse_special=True)
    assert ids == [32010, phi3.token_id("▁Hi"), 32007, 32001]
    # Control tokens stay text unless parsing is asked for.
    assert 32007 not in phi3.encode("<|end|>", add_special=False)


def test_properties_and_end_of_generation() -> None:
    spm = _vocab("llama-spm")
    assert (spm.model, spm.vocab_size, spm.bos_id, spm.eos_id, spm.eot_id) == ("llama", 32000, 1, 2, None)
    assert spm.add_bos and not spm.add_eos
    assert spm.is_eog(2) and not spm.is_eog(1) and not spm.is_eog(15043)
    assert spm.encode("Hello")[0] == 1 and spm.encode("Hello", add_special=False)[0] != 1

    gpt2 = _vocab("gpt-2")
    assert (gpt2.model, gpt2.bos_id, gpt2.eos_id, gpt2.eot_id, gpt2.add_bos) == ("gpt2", 50256, 50256, 50256, False)
    assert gpt2.encode("Hello") == gpt2.encode("Hello", add_special=False)
    assert gpt2.is_eog(50256)

    phi3 = _vocab("phi-3")
    assert phi3.eos_id == 32000
    assert phi3.is_eog(32000) and phi3.is_eog(32007)  # <|endoftext|> and <|end|>
    assert phi3.is_eog(2)  # "</s>" is recognised by its text, as llama.cpp does

    deepseek = _vocab("deepseek-coder")
    assert deepseek.add_bos and deepseek.encode("x")[0] == deepseek.bos_id == 32013

    bert = _vocab("bert-bge")
    ids = bert.encode("Hello World")
    assert ids[0] == 101 and ids[-1] == 102 and bert.decode(ids) == "hello world"


def test_token_ids_are_checked() -> None:
    tok = _vocab("gpt-2")
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(ValueError):
        tok.token_to_piece(tok.vocab_size)


def test_lone_surrogates_become_replacement_characters() -> None:
    tok = _vocab("gpt-2")
    assert tok.encode("a\ud83db") == tok.encode("a\ufffdb")


def test_unsupported_vocabularies_are_named() -> None:
    with pytest.raises(ValueError, match=r"'t5'.*llama.*gpt2"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match=r"'kimi-k2'.*gpt-2"):
        Tokenizer.from_metadata({
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "kimi-k2",
            "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
        })


def _grown_bpe_metadata(n_tokens: int) -> dict:
    """gpt-2's vocabulary grown to ``n_tokens`` with made-up merges, like a 150k-token model."""
    path = tokenizer_vectors_dir() / "ggml-vocab-gpt-2.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    md = dict(ModelFile.open(path).metadata)
    tokens = list(md["tokenizer.ggml.tokens"])
    merges = list(md["tokenizer.ggml.merges"])
    known = set(tokens)
    base = [t for t in tokens if t.isalpha()]
    rng = random.Random(0)
    while len(tokens) < n_tokens:
        a, b = rng.choice(base), rng.choice(base)
        if a + b not in known:
            known.add(a + b)
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    md["tokenizer.ggml.tokens"] = tokens
    md["tokenizer.ggml.merges"] = merges
    md["tokenizer.ggml.token_type"] = np.ones(len(tokens), dtype=np.int32)
    return md


def test_construction_of_a_150k_vocabulary_is_fast() -> None:
    md = _grown_bpe_metadata(150_000)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        tok = Tokenizer.from_metadata(md)
        best = min(best, time.perf_counter() - start)
    assert tok.vocab_size == 150_000
    assert tok.encode("Hello world") == [15496, 995]
    # About 0.5 s on an idle core; the bound only catches an accidentally quadratic build.
    assert best < 5.0, f"building a 150k-token tokenizer took {best:.2f} s"
