"""The GGUF vocabulary as a tokenizer that gives the same ids as llama.cpp.

The merge loops run in Rust inside a ``tokenizers.Tokenizer``; everything llama.cpp does around
them is reproduced here in Python, because that is where the libraries differ:

- special tokens are split out of the text first, longest text first, the way llama.cpp's
  ``tokenizer_st_partition`` does. User-defined tokens are always split out; control and unknown
  tokens only with ``parse_special=True``, so user text can never smuggle in control tokens.
- SentencePiece (``llama``) vocabularies: llama.cpp merges the adjacent pair whose merged text is
  the highest-scoring token, leftmost on ties, then falls back to ``<0xNN>`` byte tokens. That is
  a BPE whose merge ranks are the merged tokens' scores, so we build exactly that BPE.
- GPT-2 byte-level BPE (``gpt2``): the pre-tokenizer regexes are llama.cpp's, chosen by
  ``tokenizer.ggml.pre``, applied one after the other, then GPT-2's byte-to-unicode mapping and
  the file's merges.
- WordPiece (``bert``): llama.cpp's own normalisation and word splitting, then greedy
  longest-match WordPiece.
"""
from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models
from tokenizers import pre_tokenizers as hf_pre

SUPPORTED_MODELS = ("llama", "gpt2", "bert")

# Token attributes as llama.cpp keeps them (a bit set per token).
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type values (gguf-py's TokenType) → attributes.
_TYPE_TO_ATTR = np.array(
    [ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE],
    dtype=np.int32,
)

_SPACE_MARK = "\u2581"  # '▁', SentencePiece's visible space
# C isspace() in the "C" locale: what llama.cpp strips around lstrip/rstrip special tokens.
_C_SPACE = " \t\n\v\f\r"

# Texts llama.cpp recognises as end-of-turn / end-of-generation tokens (facts from
# llama.cpp's src/llama-vocab.cpp). Order matters only for choosing eot_id.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)

# -- GPT-2 pre-tokenizer regexes, per tokenizer.ggml.pre (facts from llama.cpp) -----------------
# llama.cpp runs these with std::regex over a text in which every non-ASCII code point is
# replaced by a byte standing for its Unicode category, so \p{L}, \p{N}, \p{P} ... mean the same
# as Oniguruma's real Unicode classes; the regexes are used unchanged.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp runs the GPT-2 regex with a hand-written matcher that ends in "\s+"; with the regex
# alone a lone whitespace before a word is left unmatched, which Split keeps as a piece anyway,
# but spelling the fallback out makes the equivalence obvious.
_GPT2_FULL = _GPT2 + r"|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION_ALTS = r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
_CONTRACTIONS = "(?:" + _CONTRACTION_ALTS + ")"
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
)
_CASED_WORDS2 = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
)
_CJK_DEEPSEEK3 = r"[一-龥぀-ゟ゠-ヿ]+"
_PUNCT_WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"

_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (
        r"[\p{P}\$\+<=>\^~\|]+",
        _GPT2,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
    "llama3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "gpt2": (_GPT2_FULL,),
    "deepseek-llm": (
        r"[\r\n]",
        # Cased letters. Six of them are written as escapes because they have singleton
        # canonical decompositions (e.g. U+212A KELVIN SIGN): a literal copy would not survive
        # Unicode normalisation by editors and tools.
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚ"
        "Ḁ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        # std::regex's "$" is the end of the piece; Oniguruma's "$" would also match before a
        # newline inside it, so say "\z".
        r"\s+\z",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ),
    "deepseek-v3": (r"\p{N}{1,3}", _CJK_DEEPSEEK3, _PUNCT_WORDS),
    "deepseek-coder": (
        r"[\r\n]",
        r"\s?\p{L}+",
        r"\s?\p{P}+",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}",
    ),
    "falcon": (
        r"[\p{P}\$\+<=>\^~\|`]+",
        _GPT2,
        r"[0-9][0-9][0-9]",
    ),
    "starcoder": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
    "qwen35": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bloom": (_BLOOM,),
    "chatglm4": (_LLAMA3,),
    "viking": (_BLOOM, r"\p{N}"),
    "tekken": (
        _CASED_WORDS + "|" + _CASED_WORDS2 + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "chameleon": (
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2,
    ),
    "gpt4o": (
        _CASED_WORDS + _CONTRACTIONS + "?|" + _CASED_WORDS2 + _CONTRACTIONS
        + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    ),
    "grok-2": (_QWEN2,),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    ),
}

class _PreType(NamedTuple):
    """What tokenizer.ggml.pre selects in llama.cpp besides the regexes."""

    regexes: str  # key into _REGEXES
    ignore_merges: bool  # a pre-token that is itself a token is not merged further
    add_bos: bool  # default of tokenizer.ggml.add_bos_token
    no_bos: bool  # no default BOS id


_PRE_TYPES: dict[str, _PreType] = {}


def _pre(names: Iterable[str], regexes: str, ignore_merges: bool = False, add_bos: bool = False,
         no_bos: bool = False) -> None:
    for name in names:
        _PRE_TYPES[name] = _PreType(regexes, ignore_merges, add_bos, no_bos)


_pre(["default"], "default")
_pre(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "jina-v5-nano"], "llama3", ignore_merges=True, add_bos=True)
_pre(["dbrx", "smaug-bpe"], "dbrx")
_pre(["deepseek-llm"], "deepseek-llm")
_pre(["deepseek-coder"], "deepseek-coder")
_pre(["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], "deepseek-v3")
_pre(["falcon"], "falcon")
_pre(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
      "mellum", "modern-bert", "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt",
      "olmo", "jais", "trillion", "granite-docling"], "gpt2")
_pre(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
      "mellum2"], "starcoder")
_pre(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
      "solar-open"], "qwen2")
_pre(["qwen35"], "qwen35")
_pre(["poro-chat", "bloom", "gpt3-finnish"], "bloom")
_pre(["glm4", "chatglm-bpe"], "chatglm4", no_bos=True)
_pre(["viking"], "viking")
_pre(["tekken"], "tekken", ignore_merges=True, add_bos=True)
_pre(["chameleon"], "chameleon", add_bos=True)
_pre(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], "gpt4o")
_pre(["bailingmoe", "bailingmoe2", "llada-moe"], "bailingmoe")
_pre(["seed-coder"], "seed-coder")
_pre(["grok-2"], "grok-2")
_pre(["minicpm5"], "minicpm5", ignore_merges=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _meta_int(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return None if value is None else int(value)


class Tokenizer:
    """A GGUF vocabulary: encode/decode with llama.cpp's semantics."""

    def __init__(self, metadata: Mapping[str, Any]):
        """Build from a GGUF key/value table; prefer :meth:`from_metadata`."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            raise ValueError(
                f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                f"supported: {', '.join(SUPPORTED_MODELS)}"
            )
        self._model: str = model
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        n_vocab = len(tokens)
        # llama.cpp renames empty tokens so that every token has a distinct, non-empty text.
        self._tokens: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        token_to_id: dict[str, int] = {}
        for i, t in enumerate(self._tokens):
            token_to_id.setdefault(t, i)
        self._token_to_id = token_to_id

        types = metadata.get("tokenizer.ggml.token_type")
        scores = metadata.get("tokenizer.ggml.scores")
        for key, values in (("token_type", types), ("scores", scores)):
            if values is not None and len(values) < n_vocab:
                raise ValueError(f"tokenizer.ggml.{key} has {len(values)} entries for {n_vocab} tokens")
        if types is None:
            attrs = np.full(n_vocab, ATTR_NORMAL, dtype=np.int32)
        else:
            types = np.asarray(types, dtype=np.int64)[:n_vocab]
            attrs = np.where((types >= 0) & (types < len(_TYPE_TO_ATTR)),
                             _TYPE_TO_ATTR[np.clip(types, 0, len(_TYPE_TO_ATTR) - 1)], ATTR_UNDEFINED)
            attrs = attrs.astype(np.int32)
        self._attrs = attrs
        self._scores = None if scores is None else np.asarray(scores, dtype=np.float32)[:n_vocab]

        pre = metadata.get("tokenizer.ggml.pre") or "default"
        self._pre: str = pre
        # Defaults per vocabulary type, as llama.cpp sets them before reading the file's keys.
        pre_type = _PRE_TYPES["default"]
        if model == "llama":
            ids = {"bos": 1, "eos": 2, "unk": 0, "sep": None, "pad": None, "mask": None}
            add_space_prefix, add_bos, add_eos, add_sep = True, True, False, False
        elif model == "bert":
            ids = {"bos": 101, "eos": None, "unk": 100, "sep": 102, "pad": 0, "mask": 103}
            add_space_prefix, add_bos, add_eos, add_sep = False, True, False, True
        else:
            ids = {"bos": 11, "eos": 11, "unk": None, "sep": None, "pad": None, "mask": None}
            add_space_prefix, add_bos, add_eos, add_sep = False, False, False, False
            if pre not in _PRE_TYPES:
                raise ValueError(
                    f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre) for a gpt2 vocabulary; "
                    f"supported: {', '.join(sorted(_PRE_TYPES))}"
                )
            pre_type = _PRE_TYPES[pre]
            add_bos = pre_type.add_bos
            if pre_type.no_bos:
                ids["bos"] = None
        ids.update({"eot": None, "eom": None, "fim_pre": None, "fim_suf": None, "fim_mid": None,
                    "fim_pad": None, "fim_rep": None, "fim_sep": None})
        for name in ids:
            if ids[name] is not None and ids[name] >= n_vocab:
                ids[name] = None
        key_of = {
            "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id",
            "eom": "eom_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
            "pad": "padding_token_id", "mask": "mask_token_id", "fim_pre": "fim_pre_token_id",
            "fim_suf": "fim_suf_token_id", "fim_mid": "fim_mid_token_id",
            "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id",
            "fim_sep": "fim_sep_token_id",
        }
        deprecated = {"fim_pre": "prefix_token_id", "fim_suf": "suffix_token_id",
                      "fim_mid": "middle_token_id"}
        for name, key in list(key_of.items()) + list(deprecated.items()):
            value = _meta_int(metadata, "tokenizer.ggml." + key)
            # An id outside the vocabulary (e.g. 0xFFFFFFFF for "none") keeps the default.
            if value is not None and 0 <= value < n_vocab:
                ids[name] = value
        self._add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        self._add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        self._add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", add_eos))
        self._add_sep = bool(metadata.get("tokenizer.ggml.add_sep_token", add_sep))
        if model == "bert":
            # llama.cpp's WordPiece always wraps the text in [CLS] ... [SEP], whatever the flags say.
            self._add_bos = self._add_sep = True
        self._wpm_lowercase = bool(metadata.get("tokenizer.ggml.normalizer.lowercase", True))
        self._wpm_strip_accents = bool(
            metadata.get("tokenizer.ggml.normalizer.strip_accents", self._wpm_lowercase))

        for flag, enabled, name in (("add_bos_token", self._add_bos, "bos"),
                                    ("add_eos_token", self._add_eos, "eos"),
                                    ("add_sep_token", self._add_sep, "sep")):
            if enabled and ids[name] is None:
                raise ValueError(f"tokenizer.ggml.{flag} is true, but the {name} token id is not set")
        self._detect_special_tokens(ids)
        self._ids = ids
        self._set_token_attributes(metadata)

        # Texts split out before tokenization, longest first (stable, so ties go to the lower id),
        # indexed by first character: some vocabularies have thousands of them, and only those
        # starting with a character of the text can occur in it.
        special = np.flatnonzero(self._attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
        entries = [(int(i), self._tokens[i], int(self._attrs[i])) for i in special]
        entries.sort(key=lambda e: -len(e[1]))
        self._special_all = _index_by_first_char(entries)
        self._special_user = _index_by_first_char(
            [e for e in entries if not e[2] & (ATTR_CONTROL | ATTR_UNKNOWN)])

        # Strings the merges need but the vocabulary lacks get ids past the end; their encoded
        # occurrences are expanded afterwards the way llama.cpp handles such leftovers.
        self._extra_tokens: list[str] = []
        if model == "llama":
            self._hf = self._build_spm()
        elif model == "gpt2":
            self._hf = self._build_bpe(_REGEXES[pre_type.regexes], pre_type.ignore_merges, metadata)
        else:
            self._hf = self._build_wpm()
        self._piece_cache: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build a tokenizer from a GGUF key/value table (``ModelFile.metadata``)."""
        return cls(metadata)

    # -- construction -------------------------------------------------------------------------

    def _detect_special_tokens(self, ids: dict[str, int | None]) -> None:
        """Find EOT/EOM/FIM tokens by text and collect end-of-generation ids, as llama.cpp does."""
        attrs = self._attrs
        t2i = self._token_to_id

        def promote(tid: int) -> None:
            """Mark a control-looking token as control."""
            # llama.cpp treats a control-looking token as control even when the file says not.
            attrs[tid] |= ATTR_CONTROL

        for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
            if ids[name] is not None:
                continue
            for text in texts:
                tid = t2i.get(text)
                if tid is not None:
                    ids[name] = tid
                    promote(tid)
                    break
        for tid in np.flatnonzero(attrs & ATTR_CONTROL):
            if "unused" in self._tokens[tid]:
                attrs[tid] |= ATTR_UNUSED

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for text in _EOG_TEXTS:
            tid = t2i.get(text)
            if tid is not None:
                eog.add(tid)
                promote(tid)
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            # gpt-oss: these must render in the output, so llama.cpp makes them user-defined.
            tid = t2i.get(text)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
        texts = {self._tokens[t]: t for t in eog}
        if "<|end|>" in texts and (
            ("<|return|>" in texts and "<|call|>" in texts)
            or ("<|calls|>" in texts and "<|flush|>" in texts)
        ):
            # o200k_harmony / solar-open: <|end|> ends a message, not the generation.
            eog.discard(texts["<|end|>"])
            attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts and "</s>" in texts:
            eog.discard(texts["</s>"])  # gemma4 / paddleocr
            attrs[texts["</s>"]] = ATTR_NORMAL
        self._eog = frozenset(eog)

    def _set_token_attributes(self, metadata: Mapping[str, Any]) -> None:
        """Per-model lstrip/rstrip flags that llama.cpp sets by model name."""
        name = str(metadata.get("general.name", "")).lower()
        pre = str(metadata.get("tokenizer.ggml.pre", ""))
        arch = str(metadata.get("general.architecture", ""))
        t2i = self._token_to_id
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
            s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
        ):
            if "<mask>" in t2i:
                self._attrs[t2i["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            special = self._attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)
            self._attrs[special != 0] |= ATTR_RSTRIP
            if "</s>" in t2i:
                self._attrs[t2i["</s>"]] |= ATTR_RSTRIP
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                if text in t2i:
                    self._attrs[t2i[text]] &= ~ATTR_RSTRIP
        elif "modern-bert" in name and "[MASK]" in t2i:
            self._attrs[t2i["[MASK]"]] |= ATTR_LSTRIP

    def _build_spm(self) -> HFTokenizer:
        """SentencePiece as BPE: every split of a token into two pieces that can exist as symbols
        is a merge, ranked by the merged token's score, highest first: llama.cpp's merge order."""
        tokens, t2i = self._tokens, self._token_to_id
        scores = self._scores if self._scores is not None else np.zeros(len(tokens), np.float32)
        merge_token: list[int] = []
        merges: list[tuple[str, str]] = []
        for tid, text in enumerate(tokens):
            last = len(text) - 1
            for k in range(1, last + 1):
                # Symbols are tokens or single characters: a character outside the vocabulary
                # still takes part in llama.cpp's merges and becomes <0xNN> bytes only if it is
                # left unmerged.
                left = text[:k]
                if k == 1 or left in t2i:
                    right = text[k:]
                    if k == last or right in t2i:
                        merges.append((left, right))
                        merge_token.append(tid)
        extra: dict[str, int] = {}
        for pair in merges:
            for piece in pair:
                if piece not in t2i and piece not in extra:
                    self._add_extra(piece, extra)
        merge_ids = np.asarray(merge_token, dtype=np.int64)
        # Equal scores go to the lower token id; llama.cpp picks the leftmost pair instead, which
        # a static rank cannot express (it matters only when two such pairs overlap).
        order = np.lexsort((merge_ids, -scores[merge_ids].astype(np.float64)))
        merges = [merges[i] for i in order]
        unk = self._ids["unk"]
        model = hf_models.BPE(
            vocab={**t2i, **extra} if extra else t2i,
            merges=merges,
            unk_token=self._tokens[unk] if unk is not None else None,
            byte_fallback=bool(np.any(self._attrs & ATTR_BYTE)),
        )
        return HFTokenizer(model)

    def _add_extra(self, text: str, extra: dict[str, int]) -> None:
        extra[text] = len(self._tokens) + len(self._extra_tokens)
        self._extra_tokens.append(text)

    def _build_bpe(self, regexes: Sequence[str], ignore_merges: bool,
                   metadata: Mapping[str, Any]) -> HFTokenizer:
        """Byte-level BPE with llama.cpp's pre-tokenizer regexes for this vocabulary."""
        t2i = self._token_to_id
        # llama.cpp keeps the first rank of a repeated merge; dict.fromkeys keeps first occurrences.
        lines = list(dict.fromkeys(metadata.get("tokenizer.ggml.merges") or ()))
        merges = [(line[:pos], line[pos + 1:]) for line in lines if (pos := line.find(" ", 1)) > 0]
        # tokenizers panics on a merge whose pieces are not tokens; llama.cpp merges by rank
        # whether or not the result is a token and looks such a leftover up byte by byte at the
        # end, so missing pieces get ids past the vocabulary (see _expand_extra).
        extra: dict[str, int] = {}
        for text in [t for a, b in merges for t in (a, b, a + b) if t not in t2i]:
            if text not in extra:
                self._add_extra(text, extra)
        model = hf_models.BPE(vocab={**t2i, **extra} if extra else t2i, merges=merges,
                              ignore_merges=ignore_merges)
        hf = HFTokenizer(model)
        steps = [hf_pre.Split(Regex(r), behavior="isolated") for r in regexes]
        steps.append(hf_pre.ByteLevel(add_prefix_space=False, use_regex=False))
        hf.pre_tokenizer = hf_pre.Sequence(steps)
        return hf

    def _build_wpm(self) -> HFTokenizer:
        """WordPiece: llama.cpp stores word-initial pieces with a '▁' prefix and continuations
        bare; WordPiece wants them bare and with '##', so the texts are converted."""
        vocab: dict[str, int] = {}
        for tid, text in enumerate(self._tokens):
            key = text[1:] if text.startswith(_SPACE_MARK) else "##" + text
            if key and key not in vocab:
                vocab[key] = tid
        unk = self._ids["unk"]
        unk_text = self._tokens[unk] if unk is not None else "[UNK]"
        if unk is not None:
            vocab[unk_text] = unk
        model = hf_models.WordPiece(vocab=vocab, unk_token=unk_text,
                                    max_input_chars_per_word=1 << 30)
        return HFTokenizer(model)

    # -- properties ---------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The vocabulary type: 'llama' (SentencePiece), 'gpt2' (byte-level BPE) or 'bert'."""
        return self._model

    @property
    def pre(self) -> str:
        """The pre-tokenizer name (tokenizer.ggml.pre), 'default' when absent."""
        return self._pre

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence token id."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence token id."""
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        """End-of-turn token id, from the file or recognised by its text; None if there is none."""
        return self._ids["eot"]

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id."""
        return self._ids["unk"]

    @property
    def sep_id(self) -> int | None:
        """Separator token id (BERT's [SEP])."""
        return self._ids["sep"]

    @property
    def pad_id(self) -> int | None:
        """Padding token id."""
        return self._ids["pad"]

    @property
    def add_bos(self) -> bool:
        """Whether encode(add_special=True) puts BOS in front."""
        return self._add_bos

    @property
    def add_eos(self) -> bool:
        """Whether encode(add_special=True) appends EOS."""
        return self._add_eos

    @property
    def eog_ids(self) -> frozenset[int]:
        """All ids that end generation (EOS, EOT, EOM and the others llama.cpp recognises)."""
        return self._eog

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (the merge / WordPiece model only)."""
        return self._hf

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation."""
        return token_id in self._eog

    def is_control(self, token_id: int) -> bool:
        """True for control and unknown tokens (rendered only when special text is asked for)."""
        return bool(self._attrs[self._check_id(token_id)] & (ATTR_CONTROL | ATTR_UNKNOWN))

    def token_text(self, token_id: int) -> str:
        """The token's raw text as stored in the vocabulary."""
        return self._tokens[self._check_id(token_id)]

    def _check_id(self, token_id: int) -> int:
        # Without this a negative id would silently index from the end of the arrays.
        if not 0 <= token_id < len(self._tokens):
            raise ValueError(f"token id {token_id} outside the vocabulary of {len(self._tokens)} tokens")
        return token_id

    def token_id(self, text: str) -> int | None:
        """The id of the token whose raw text is ``text``, or None."""
        return self._token_to_id.get(text)

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``, as llama_tokenize(text, add_special, parse_special) gives them."""
        text = _valid_text(text)
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if self._model == "llama":
            if add_special and self._add_bos:
                out.append(self._ids["bos"])
            # SentencePiece prefixes a space to the text at the start and after each special token.
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self._add_space_prefix and prev_special:
                    frag = " " + frag
                out.extend(self._encode_piece(frag.replace(" ", _SPACE_MARK)))
                prev_special = False
            if add_special and self._add_eos:
                out.append(self._ids["eos"])
        elif self._model == "gpt2":
            if add_special and self._add_bos:
                out.append(self._ids["bos"])
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(self._encode_piece(frag))
            if add_special and self._add_eos:
                out.append(self._ids["eos"])
        else:
            if add_special and self._add_bos:
                out.append(self._ids["bos"])
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    words = self._wpm_words(frag)
                    if words:
                        out.extend(self._hf.encode(words, is_pretokenized=True,
                                                   add_special_tokens=False).ids)
            if add_special and self._add_sep:
                out.append(self._ids["sep"])
        return out

    def _encode_piece(self, text: str) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if self._extra_tokens and max(ids, default=0) >= len(self._tokens):
            ids = self._expand_extra(ids)
        return ids

    def _expand_extra(self, ids: list[int]) -> list[int]:
        """Replace pieces that are not real tokens the way llama.cpp does: SentencePiece emits their
        bytes as <0xNN> tokens; byte-level BPE looks each byte up as a one-byte token."""
        n_vocab = len(self._tokens)
        out: list[int] = []
        for tid in ids:
            if tid < n_vocab:
                out.append(tid)
                continue
            raw = self._extra_tokens[tid - n_vocab].encode("utf-8")
            for b in raw:
                if self._model == "llama":
                    found = self._token_to_id.get(f"<0x{b:02X}>")
                    if found is None and b < 0x80:
                        found = self._token_to_id.get(chr(b))
                else:
                    found = self._token_to_id.get(chr(b)) if b < 0x80 else None
                if found is not None:
                    out.append(found)
                elif self._model == "llama" and self._ids["unk"] is not None:
                    out.append(self._ids["unk"])
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special-token texts out of ``text`` (llama.cpp's tokenizer_st_partition)."""
        fragments: list[str | int] = [text]
        index = self._special_all if parse_special else self._special_user
        candidates = [e for c in set(text).intersection(index) for e in index[c]]
        candidates.sort()
        for _, tid, tok_text, attr in candidates:
            if tok_text not in text:
                continue
            lstrip = bool(attr & ATTR_LSTRIP)
            rstrip = bool(attr & ATTR_RSTRIP)
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int):
                    split.append(frag)
                    continue
                start = 0
                while True:
                    pos = frag.find(tok_text, start)
                    if pos < 0:
                        break
                    left = frag[start:pos]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        split.append(left)
                    split.append(tid)
                    start = pos + len(tok_text)
                    if rstrip:
                        while start < len(frag) and frag[start] in _C_SPACE:
                            start += 1
                if start < len(frag):
                    split.append(frag[start:])
            fragments = split
        return fragments

    def _wpm_words(self, text: str) -> list[str]:
        """llama.cpp's WordPiece pre-processing: lowercase, strip accents, split on whitespace and
        around punctuation, ASCII symbols and CJK ideographs."""
        words: list[str] = []
        word: list[str] = []
        for ch in text:
            if self._wpm_strip_accents:
                # llama.cpp maps each code point to the first code point of its NFD form.
                ch = unicodedata.normalize("NFD", ch)[0]
            cpt = ord(ch)
            if ch in _WHITESPACE:
                if word:
                    words.append("".join(word))
                    word = []
                continue
            cat = unicodedata.category(ch)
            if cpt == 0 or cpt == 0xFFFD or (cat[0] == "C" and cat != "Cn"):
                continue
            if self._wpm_strip_accents and cat[0] == "M":
                continue
            if self._wpm_lowercase:
                lower = ch.lower()
                ch = lower[0] if lower else ch
            if cat[0] == "P" or (cpt < 0x7F and cat[0] == "S") or _is_cjk(cpt):
                if word:
                    words.append("".join(word))
                    word = []
                words.append(ch)
            else:
                word.append(ch)
        if word:
            words.append("".join(word))
        return words

    # -- decoding -----------------------------------------------------------------------------

    def token_to_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token ``token_id`` stands for; control tokens give b'' unless ``special``."""
        attr = int(self._attrs[self._check_id(token_id)])
        if not special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece(token_id, attr)
            self._piece_cache[token_id] = piece
        return piece

    def _piece(self, token_id: int, attr: int) -> bytes:
        text = self._tokens[token_id]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        if not attr & ATTR_NORMAL:
            return b""  # unused and undefined tokens render as nothing, as in llama.cpp
        if self._model == "gpt2":
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in text)
            except KeyError:
                return text.encode("utf-8")
        return text.replace(_SPACE_MARK, " ").encode("utf-8")

    def token_to_piece(self, token_id: int, special: bool = True) -> str:
        """The token's text; a lone byte of a multi-byte character comes out as U+FFFD."""
        return self.token_to_bytes(token_id, special).decode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text for ``ids``; control tokens are left out when ``skip_special``.

        Like llama-cpp-python, a SentencePiece/WordPiece sequence that starts with BOS loses the
        one space the encoder put in front of the text, so decode(encode(s)) == s; any other
        sequence (a continuation) keeps its leading space.
        """
        pieces = [self.token_to_bytes(int(t), not skip_special) for t in ids]
        if (self._model != "gpt2" and len(pieces) > 1 and int(ids[0]) == self._ids["bos"]
                and pieces[1].startswith(b" ")):
            pieces[1] = pieces[1][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for streaming generated tokens."""
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self._model!r}, pre={self._pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self._add_bos})")


class StreamDecoder:
    """Turns generated token ids into text, releasing characters only once their UTF-8 is complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        """Decode tokens of ``tokenizer``; control tokens are dropped when ``skip_special``."""
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; returns the text completed by it (often '', e.g. mid-character)."""
        return self._utf8.decode(self._tokenizer.token_to_bytes(int(token_id), self._special))

    def flush(self) -> str:
        """Text still held back at the end of the stream (U+FFFD for an unfinished character)."""
        return self._utf8.decode(b"", final=True)


# Unicode White_Space, the set llama.cpp splits WordPiece words on.
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def _index_by_first_char(
    entries: Sequence[tuple[int, str, int]],
) -> dict[str, list[tuple[int, int, str, int]]]:
    """Special-token entries grouped by first character, each tagged with its place in order."""
    index: dict[str, list[tuple[int, int, str, int]]] = {}
    for order, (tid, text, attr) in enumerate(entries):
        index.setdefault(text[0], []).append((order, tid, text, attr))
    return index


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(text: str) -> str:
    """``text`` with lone surrogates (which UTF-8 cannot carry) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _is_cjk(cpt: int) -> bool:
    """CJK ideograph ranges llama.cpp's WordPiece splits into single-character words."""
    return (
        0x4E00 <= cpt <= 0x9FFF or 0x3400 <= cpt <= 0x4DBF or 0x20000 <= cpt <= 0x2A6DF
        or 0x2A700 <= cpt <= 0x2B73F or 0x2B740 <= cpt <= 0x2B81F or 0x2B920 <= cpt <= 0x2CEAF
        or 0xF900 <= cpt <= 0xFAFF or 0x2F800 <= cpt <= 0x2FA1F
    )
