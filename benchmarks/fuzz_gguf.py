"""Fuzz GGUF opening: mutated fixture headers and hand-made hostile files through the engine's checks and `pagellm info`.

Usage: python benchmarks/fuzz_gguf.py [--cases 100000] [--seed 0] [--fixtures DIR] [--cli-sample 40]
       [--crash-dir /tmp/pagellm-fuzz-crashes]

Seeds are the headers of the fixture GGUFs (the 32k-token vocabularies cut to 512 tokens so a case
parses in about a millisecond), re-encoded here so that every length, count, type and offset field
has a known position. Each case applies a few mutations: random byte changes and bit flips, inserted
and deleted ranges, a length/count/dimension/offset field set to a hostile value (2^63, 2^64-1, 2^40,
...), a truncation, or a semantic change made before encoding (a key of the wrong type, a missing or
duplicated key, overlapping or misaligned tensors, unknown GGML types, shapes that overflow). The
tensor data is not written: the file is extended sparsely to its full size on tmpfs (/dev/shm).

Every case runs ModelFile.open, what `pagellm info MODEL` computes (cli._info_rows and
cli._type_rows) and the engine's own checks (engine.check_model: ModelArgs, GGML types, tokenizer).
Only ModelFileError may escape. A 2 s interval timer turns a hang into a failure; peak RSS growth of
each case is measured by resetting VmHWM before it. A sample also runs `pagellm info` in a
subprocess, which must answer with one line. Prints the count, exceptions by type, the commonest
error messages, the slowest case and the peak RSS.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CASE_LIMIT_S = 2.0
RSS_SLACK_BYTES = 64 << 20  # the "small constant" above the file size that one case may add to the peak
VOCAB_LIMIT = 512

# GGUF value types (gguf.GGUFValueType), spelled out so the encoder reads as the format does.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}
_DTYPE = {t: np.dtype(f.replace("?", "B")) for t, f in _SCALAR.items()}
HOSTILE_U64 = (0, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
HOSTILE_U32 = (0, 1, 2, 3, 5, 13, 31, 33, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


class CaseTimeout(BaseException):
    """A case ran past its time limit (BaseException: no ``except Exception`` in the code under test can eat it)."""


# ---------------------------------------------------------------------------------------------- the format


@dataclass
class KV:
    """One metadata entry; ``value`` is a scalar, a str/bytes, or for arrays a list / numpy array."""

    key: str | bytes
    vtype: int
    value: Any
    elem_type: int | None = None  # arrays only


@dataclass
class Tensor:
    """One tensor-info entry."""

    name: str | bytes
    shape: list[int]
    ggml_type: int
    offset: int  # relative to the data section


@dataclass
class Header:
    """A GGUF header we can change and re-encode; ``data_size`` bytes of tensor data follow it."""

    kvs: list[KV]
    tensors: list[Tensor]
    data_size: int
    version: int = 3
    alignment: int = 32
    n_tensors: int | None = None  # override the counts (hostile cases)
    n_kv: int | None = None

    def copy(self) -> "Header":
        """A copy whose entries may be changed without touching this one."""
        return replace(self, kvs=[replace(kv) for kv in self.kvs],
                       tensors=[replace(t, shape=list(t.shape)) for t in self.tensors])

    def kv(self, key: str) -> KV | None:
        """The entry called ``key``."""
        return next((kv for kv in self.kvs if kv.key == key), None)


@dataclass(frozen=True)
class Field:
    """Where a numeric field sits in the encoded header: byte position, width (4 or 8) and its role."""

    pos: int
    width: int
    kind: str  # count, length, vtype, dims, dim, ggml_type, offset, value


@dataclass
class Encoded:
    """Encoded header bytes, the file size they imply, and the positions of their numeric fields."""

    data: bytes
    total_size: int
    fields: list[Field]


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.fields: list[Field] = []

    def num(self, fmt: str, value: Any, kind: str | None = None) -> None:
        if kind is not None:
            self.fields.append(Field(len(self.buf), struct.calcsize(fmt), kind))
        self.buf += struct.pack(fmt, value)

    def string(self, s: str | bytes, kind: str = "length") -> None:
        raw = s.encode() if isinstance(s, str) else s
        self.num("<Q", len(raw), kind)
        self.buf += raw

    def value(self, vtype: int, value: Any, elem_type: int | None) -> None:
        if vtype == STRING:
            self.string(value)
        elif vtype == ARRAY:
            self.num("<I", elem_type, "vtype")
            self.num("<Q", len(value), "count")
            if elem_type in _DTYPE:
                self.buf += np.asarray(value, dtype=_DTYPE[elem_type]).tobytes()
            elif elem_type == ARRAY:
                for inner_type, inner in value:
                    self.value(ARRAY, inner, inner_type)
            else:
                for item in value:
                    self.string(item, "elem_length")  # vocabulary entries: most of a header
        else:
            kind = "value" if vtype in (U8, I8, U16, I16, U32, I32, U64, I64) else None
            self.num(_SCALAR.get(vtype, "<I"), value, kind)  # an unknown type: four bytes of payload


def encode(h: Header, magic: bytes = b"GGUF") -> Encoded:
    """The header's bytes, padded to the alignment, and the size of the whole file."""
    w = _Writer()
    w.buf += magic
    w.num("<I", h.version, "value")
    w.num("<Q", len(h.tensors) if h.n_tensors is None else h.n_tensors, "count")
    w.num("<Q", len(h.kvs) if h.n_kv is None else h.n_kv, "count")
    for kv in h.kvs:
        w.string(kv.key)
        w.num("<I", kv.vtype, "vtype")
        w.value(kv.vtype, kv.value, kv.elem_type)
    for t in h.tensors:
        w.string(t.name)
        w.num("<I", len(t.shape), "dims")
        for d in t.shape:
            w.num("<Q", d, "dim")
        w.num("<I", t.ggml_type, "ggml_type")
        w.num("<Q", t.offset, "offset")
    w.buf += b"\0" * (-len(w.buf) % h.alignment)
    return Encoded(bytes(w.buf), len(w.buf) + h.data_size, w.fields)


def header_from_fixture(path: Path, vocab_limit: int = VOCAB_LIMIT) -> Header:
    """A fixture's header (read with gguf-py: the fixtures are trusted), its vocabulary cut to ``vocab_limit``."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    kvs = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = int(f.types[0])
        if vtype == ARRAY:
            elem = int(f.types[1])
            values = f.contents()
            if key.startswith("tokenizer.ggml."):
                values = values[:vocab_limit]
            value = np.asarray(values, dtype=_DTYPE[elem]) if elem in _DTYPE else list(values)
            kvs.append(KV(key, ARRAY, value, elem))
        else:
            kvs.append(KV(key, vtype, f.contents()))
    data_start = min(int(t.data_offset) for t in reader.tensors)
    tensors = [Tensor(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset) - data_start)
               for t in reader.tensors]
    alignment = int(reader.fields["general.alignment"].contents()) if "general.alignment" in reader.fields else 32
    return Header(kvs, tensors, path.stat().st_size - data_start, int(reader.fields["GGUF.version"].contents()),
                  alignment)


# ------------------------------------------------------------------------------------------- mutations


def _hostile_value(rng: random.Random, kind_of: int) -> KV:
    """A value of a random type, differing from ``kind_of`` where possible (for key retyping)."""
    choices: list[tuple[int, Any, int | None]] = [
        (STRING, rng.choice(["", "12", "x" * 40, "llama", "\u00e9\u4e2d", "none", "linear"]), None),
        (F32, rng.choice([1.5, -1.0, 0.0, float("nan"), float("inf"), 1e30]), None),
        (F64, rng.choice([2.0, float("nan"), -0.0]), None),
        (I32, rng.choice([-1, 0, -2**31, 7]), None),
        (U32, rng.choice([0, 1, 3, 2**32 - 1]), None),
        (U64, rng.choice([0, 2**40, 2**63, 2**64 - 1]), None),
        (I64, rng.choice([-1, -2**63]), None),
        (BOOL, rng.choice([True, False]), None),
        (U8, rng.choice([0, 255]), None),
        (ARRAY, np.arange(rng.choice([0, 1, 4, 300]), dtype=np.uint32), U32),
        (ARRAY, np.full(rng.choice([1, 3]), 0.5, dtype=np.float32), F32),
        (ARRAY, ["a", "", "<s>"][: rng.randint(0, 3)], STRING),
        (ARRAY, [(U32, np.arange(2, dtype=np.uint32))], ARRAY),
    ]
    different = [c for c in choices if c[0] != kind_of] or choices
    vtype, value, elem = rng.choice(different)
    return KV("", vtype, value, elem)


def _mutate_header(h: Header, rng: random.Random) -> str:
    """One semantic change to ``h`` (in place); returns what it did."""
    op = rng.choice(["retype", "retype", "retype", "drop_kv", "dup_kv", "shape", "offset", "ggml_type",
                     "tensor_name", "drop_tensor", "alignment", "arch", "counts", "key_name"])
    if op == "retype" and h.kvs:
        kv = rng.choice(h.kvs)
        new = _hostile_value(rng, kv.vtype)
        kv.vtype, kv.value, kv.elem_type = new.vtype, new.value, new.elem_type
        return f"retype {kv.key!r} -> {new.vtype}"
    if op == "drop_kv" and h.kvs:
        return f"drop {h.kvs.pop(rng.randrange(len(h.kvs))).key!r}"
    if op == "dup_kv" and h.kvs:
        kv = rng.choice(h.kvs)
        h.kvs.insert(rng.randrange(len(h.kvs) + 1), replace(kv))
        return f"duplicate {kv.key!r}"
    if op == "key_name" and h.kvs:
        kv = rng.choice(h.kvs)
        kv.key = rng.choice([b"\xff\xfe", b"", b"llama.block_count", kv.key.encode() + b"\0" if isinstance(kv.key, str) else b"k"])
        return f"rename key to {kv.key!r}"
    if not h.tensors:
        return "nothing"
    t = rng.choice(h.tensors)
    if op == "shape":
        i = rng.randrange(len(t.shape))
        t.shape[i] = rng.choice([0, 1, 3, 31, 33, 2**32, 2**40, 2**63, 2**64 - 1, t.shape[i] * 2, t.shape[i] + 1])
        if rng.random() < 0.2:
            t.shape = t.shape + [rng.choice([1, 2, 2**32])] if rng.random() < 0.5 else t.shape[:1]
        return f"shape of {t.name!r} -> {t.shape}"
    if op == "offset":
        other = rng.choice(h.tensors)
        t.offset = rng.choice([other.offset, other.offset + 32, t.offset + 1, t.offset + 16, h.data_size,
                               h.data_size + 32, 2**40, 2**63, 2**64 - 1 - 31])
        return f"offset of {t.name!r} -> {t.offset}"
    if op == "ggml_type":
        t.ggml_type = rng.choice([4, 5, 16, 17, 19, 20, 29, 30, 31, 39, 40, 77, 2**31, 2**32 - 1, 0, 1, 2, 8, 12, 14])
        return f"type of {t.name!r} -> {t.ggml_type}"
    if op == "tensor_name":
        t.name = rng.choice([b"\xc3\x28", "", "blk.99999999999999999999.attn_q.weight", "blk.-1.x", "token_embd",
                             "output.weight", "blk.0." + "x" * 200, h.tensors[0].name])
        return f"rename tensor to {t.name!r}"
    if op == "drop_tensor":
        h.tensors.remove(t)
        return f"drop tensor {t.name!r}"
    if op == "alignment":
        value = rng.choice([0, 1, 3, 24, 64, 4096, 1 << 16, 1 << 17, 2**31])
        existing = h.kv("general.alignment")
        if existing is None:
            h.kvs.append(KV("general.alignment", U32, value))
        else:
            existing.vtype, existing.value, existing.elem_type = U32, value, None
        if value and not value & (value - 1) and value <= 4096:
            h.alignment = value  # a legal alignment: pad for it, so the case reaches the tensors
        return f"alignment -> {value}"
    if op == "arch":
        arch = h.kv("general.architecture")
        if arch is not None:
            arch.value = rng.choice(["qwen2", "mistral", "qwen3", "gpt2", "", "llama\0", "bert"])
            return f"architecture -> {arch.value!r}"
    if op == "counts":
        if rng.random() < 0.5:
            h.n_tensors = rng.choice([0, len(h.tensors) + 1, 2**40, 2**64 - 1])
        else:
            h.n_kv = rng.choice([0, len(h.kvs) + 1, 2**63, 2**64 - 1])
        return f"counts -> tensors {h.n_tensors}, kv {h.n_kv}"
    return "nothing"


def _mutate_bytes(enc: Encoded, rng: random.Random) -> tuple[bytes, int, str]:
    """One byte-level change to the encoded header; returns the new bytes, file size and what it did."""
    data, total = bytearray(enc.data), enc.total_size
    # Most of a header is vocabulary strings; aim most changes at the structure around them instead.
    # (An earlier insert or delete may have moved fields: positions are hints, clipped to the data.)
    fields = [f for f in enc.fields if f.pos + f.width <= len(data)]
    structure = [f for f in fields if f.kind != "elem_length"] or fields
    pool = structure if rng.random() < 0.7 else fields

    def position() -> int:
        if pool and rng.random() < 0.6:
            f = rng.choice(pool)
            return min(len(data) - 1, max(0, f.pos + rng.randrange(-4, f.width + 4)))
        return rng.randrange(len(data))

    op = rng.choice(["flip", "flip", "bits", "field", "field", "field", "insert", "delete", "truncate", "append"])
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            data[position()] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif op == "bits":
        for _ in range(rng.randint(1, 4)):
            data[position()] ^= 1 << rng.randrange(8)
    elif op == "field" and pool:
        f = rng.choice(pool)
        if f.width == 8:
            (old,) = struct.unpack_from("<Q", data, f.pos)
            value = rng.choice(HOSTILE_U64 + ((old + 1) % 2**64, max(old - 1, 0), (old * 2) % 2**64))
            struct.pack_into("<Q", data, f.pos, value)
        else:
            struct.pack_into("<I", data, f.pos, rng.choice(HOSTILE_U32 + (rng.randrange(2**32),)))
        return bytes(data), total, f"field {f.kind}@{f.pos}"
    elif op == "insert":
        pos = position()
        if rng.random() < 0.5:
            src = rng.randrange(len(data))
            chunk = bytes(data[src : src + rng.randint(1, 64)])
        else:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        data[pos:pos] = chunk
        total += len(chunk)
        return bytes(data), total, f"insert {len(chunk)}@{pos}"
    elif op == "delete":
        pos = position()
        n = min(rng.randint(1, 64), len(data) - pos)
        del data[pos : pos + n]
        total -= n
        return bytes(data), total, f"delete {n}@{pos}"
    elif op == "truncate":
        total = rng.randrange(len(data)) if rng.random() < 0.7 else rng.randrange(len(data), max(total, len(data) + 1))
        return bytes(data), total, f"truncate to {total}"
    elif op == "append":
        total += rng.randint(1, 4096)
        return bytes(data), total, "append"
    return bytes(data), total, op


@dataclass(frozen=True)
class Case:
    """One file to try: header bytes, the whole file's size, and how it was made."""

    name: str
    data: bytes
    total_size: int
    may_open: bool = False  # a hand-made case that is allowed to open (e.g. a broken chat template)


def mutated_cases(seeds: dict[str, Header], n: int, seed: int) -> Iterator[Case]:
    """``n`` cases from the seeds, reproducible from ``seed``."""
    rng = random.Random(seed)
    names = sorted(seeds)
    encoded = {name: encode(seeds[name]) for name in names}  # unchanged seeds: encode once
    for i in range(n):
        name = names[i % len(names)]
        steps = []
        roll = rng.random()
        if roll < 0.35:  # a semantic change, then maybe bytes too
            h = seeds[name].copy()
            steps.append(_mutate_header(h, rng))
            enc = encode(h)
            n_bytes = 0 if roll < 0.25 else rng.randint(1, 2)
        else:
            enc, n_bytes = encoded[name], rng.randint(1, 3)
        data, total = enc.data, enc.total_size
        for _ in range(n_bytes):
            data, total, what = _mutate_bytes(Encoded(data, total, enc.fields), rng)
            steps.append(what)
        yield Case(f"{i}:{name}: {'; '.join(steps)}", data, max(total, 0))


# ------------------------------------------------------------------------------------------ hand-made cases


def _with(h: Header, change: Callable[[Header], Any]) -> Header:
    out = h.copy()
    change(out)
    return out


def _set_kv(key: str, vtype: int, value: Any, elem: int | None = None) -> Callable[[Header], None]:
    def change(h: Header) -> None:
        kv = h.kv(key)
        if kv is None:
            h.kvs.append(KV(key, vtype, value, elem))
        else:
            kv.vtype, kv.value, kv.elem_type = vtype, value, elem
    return change


def _patch_first(kind: str, value: int, nth: int = 0) -> Callable[[Encoded], Encoded]:
    """Set the ``nth`` field of ``kind`` in the encoded bytes to ``value``."""
    def patch(enc: Encoded) -> Encoded:
        f = [f for f in enc.fields if f.kind == kind][nth]
        data = bytearray(enc.data)
        struct.pack_into("<Q" if f.width == 8 else "<I", data, f.pos, value)
        return Encoded(bytes(data), enc.total_size, enc.fields)
    return patch


def hand_cases(h: Header) -> list[Case]:
    """The issue's hostile files, built from a llama seed (the stories260K fixture's header)."""
    arch = h.kv("general.architecture").value
    first, second = h.tensors[0], h.tensors[1]
    headers: dict[str, Header] = {
        "tensor offset past the end": _with(h, lambda x: setattr(x.tensors[0], "offset", x.data_size + 4096)),
        "tensor offset 2^64-32": _with(h, lambda x: setattr(x.tensors[0], "offset", 2**64 - 32)),
        "overlapping tensors": _with(h, lambda x: setattr(x.tensors[1], "offset", first.offset)),
        "tensors overlapping by 32 bytes": _with(h, lambda x: setattr(x.tensors[1], "offset", first.offset + 32)),
        "shape product overflows 64 bits": _with(h, lambda x: setattr(x.tensors[0], "shape", [2**32, 2**32, 2**32])),
        "shape 2^63 x 2": _with(h, lambda x: setattr(x.tensors[0], "shape", [2**63, 2])),
        "shape 2^64-1": _with(h, lambda x: setattr(x.tensors[0], "shape", [2**64 - 1])),
        "zero dimension": _with(h, lambda x: setattr(x.tensors[0], "shape", [0, 8])),
        "five dimensions": _with(h, lambda x: setattr(x.tensors[0], "shape", [1, 1, 1, 1, 1])),
        "misaligned tensor offset": _with(h, lambda x: setattr(x.tensors[1], "offset", second.offset + 1)),
        "unknown GGML type 77": _with(h, lambda x: setattr(x.tensors[0], "ggml_type", 77)),
        "removed GGML type 4": _with(h, lambda x: setattr(x.tensors[0], "ggml_type", 4)),
        "GGML type 2^32-1": _with(h, lambda x: setattr(x.tensors[0], "ggml_type", 2**32 - 1)),
        "tensor count 2^40": _with(h, lambda x: setattr(x, "n_tensors", 2**40)),
        "tensor count 2^64-1": _with(h, lambda x: setattr(x, "n_tensors", 2**64 - 1)),
        "kv count 2^63": _with(h, lambda x: setattr(x, "n_kv", 2**63)),
        "duplicate tensor": _with(h, lambda x: x.tensors.append(replace(x.tensors[0]))),
        "duplicate key": _with(h, lambda x: x.kvs.append(replace(x.kvs[0]))),
        "token_embd 1-D": _with(h, lambda x: setattr(x.tensors[[t.name for t in x.tensors].index("token_embd.weight")],
                                                   "shape", [64 * 512])),
        "version 1": _with(h, lambda x: setattr(x, "version", 1)),
        "big-endian version": _with(h, lambda x: setattr(x, "version", 3 << 16)),
        "unknown value type 99": _with(h, _set_kv("x.unknown", 99, 0)),
        "arrays nested 5 deep": _with(h, _set_kv("x.nested", ARRAY, [(ARRAY, [(ARRAY, [(ARRAY, [(U32, [1])])])])], ARRAY)),
        "alignment 0": _with(h, _set_kv("general.alignment", U32, 0)),
        "alignment 3": _with(h, _set_kv("general.alignment", U32, 3)),
        "alignment 2^31": _with(h, _set_kv("general.alignment", U32, 2**31)),
        "alignment a string": _with(h, _set_kv("general.alignment", STRING, "32")),
        "architecture an integer": _with(h, _set_kv("general.architecture", U32, 1)),
        "architecture unsupported": _with(h, _set_kv("general.architecture", STRING, "gpt2")),
        "architecture missing": _with(h, lambda x: x.kvs.remove(x.kv("general.architecture"))),
        f"{arch}.block_count 2^32-1": _with(h, _set_kv(f"{arch}.block_count", U32, 2**32 - 1)),
        f"{arch}.block_count 2^63 (u64)": _with(h, _set_kv(f"{arch}.block_count", U64, 2**63)),
        "tokenizer tokens an integer": _with(h, _set_kv("tokenizer.ggml.tokens", U32, 5)),
        "tokenizer tokens an array of ints": _with(h, _set_kv("tokenizer.ggml.tokens", ARRAY, np.arange(512, dtype=np.uint32), U32)),
        "tokenizer scores strings": _with(h, _set_kv("tokenizer.ggml.scores", ARRAY, ["x"] * 512, STRING)),
        "tokenizer token_type floats as strings": _with(h, _set_kv("tokenizer.ggml.token_type", STRING, "1")),
        "tokenizer merges ints": _with(h, _set_kv("tokenizer.ggml.merges", ARRAY, np.arange(4, dtype=np.int32), I32)),
        "tokenizer model an integer": _with(h, _set_kv("tokenizer.ggml.model", U32, 1)),
        "tokenizer model unknown": _with(h, _set_kv("tokenizer.ggml.model", STRING, "rwkv")),
        "bos id a string": _with(h, _set_kv("tokenizer.ggml.bos_token_id", STRING, "1")),
        "bos id a float (inf)": _with(h, _set_kv("tokenizer.ggml.bos_token_id", F32, float("inf"))),
        "add_bos_token an array": _with(h, _set_kv("tokenizer.ggml.add_bos_token", ARRAY, np.ones(3, np.uint8), U8)),
        "scores shorter than tokens": _with(h, _set_kv("tokenizer.ggml.scores", ARRAY, np.zeros(3, np.float32), F32)),
    }
    may_open: set[str] = set()
    required = ["block_count", "embedding_length", "attention.head_count", "feed_forward_length",
                "attention.layer_norm_rms_epsilon", "context_length", "attention.head_count_kv",
                "rope.dimension_count", "attention.key_length", "rope.freq_base"]
    wrong = [("a string", STRING, "12", None), ("a float", F32, 1.5, None), ("negative", I32, -4, None),
             ("zero", U32, 0, None), ("a bool", BOOL, True, None), ("an array", ARRAY, np.arange(3, dtype=np.uint32), U32),
             ("NaN", F32, float("nan"), None), ("2^63", U64, 2**63, None)]
    # Numbers that are legal, only absurd: a huge epsilon or RoPE base computes nonsense, not a crash, and
    # the context is capped by the engine; these may open.
    absurd_but_legal = {("attention.layer_norm_rms_epsilon", "2^63"), ("rope.freq_base", "2^63"),
                        ("context_length", "2^63")}
    for key in required:
        for label, vtype, value, elem in wrong:
            if key.endswith("epsilon") and label == "a float" or key.endswith("freq_base") and label == "a float":
                continue  # a float is the right type for these
            headers[f"{arch}.{key} {label}"] = _with(h, _set_kv(f"{arch}.{key}", vtype, value, elem))
            if (key, label) in absurd_but_legal:
                may_open.add(f"{arch}.{key} {label}")
        if key in ("block_count", "embedding_length", "attention.head_count", "feed_forward_length",
                   "attention.layer_norm_rms_epsilon"):
            headers[f"{arch}.{key} missing"] = _with(h, lambda x, k=key: x.kvs.remove(x.kv(f"{arch}.{k}")))
    headers[f"{arch}.rope.scaling.type an array"] = _with(h, _set_kv(f"{arch}.rope.scaling.type", ARRAY, ["a"], STRING))
    headers[f"{arch}.rope.scaling.factor a string"] = _with(
        _with(h, _set_kv(f"{arch}.rope.scaling.type", STRING, "linear")), _set_kv(f"{arch}.rope.scaling.factor", STRING, "2"))

    cases = [Case(name, *_as_pair(encode(x)), may_open=name in may_open) for name, x in headers.items()]
    base = encode(h)
    patches = {
        "string length 2^63": _patch_first("length", 2**63, 1),
        "key length 2^64-1": _patch_first("length", 2**64 - 1, 0),
        "token array length 2^63": _patch_first("count", 2**63, 2),
        "token array length 2^40": _patch_first("count", 2**40, 2),
        "value type 2^32-1": _patch_first("vtype", 2**32 - 1, 0),
        "tensor dims 2^32-1": _patch_first("dims", 2**32 - 1, 0),
        "tensor name length 2^63": _patch_first("length", 2**63, sum(1 for f in base.fields if f.kind == "length") - 1),
    }
    cases += [Case(name, *_as_pair(patch(base))) for name, patch in patches.items()]
    cases += [Case(f"truncated at {k}/10 of the header", base.data[: len(base.data) * k // 10], len(base.data) * k // 10)
              for k in range(10)]
    cases += [Case("tensor data cut short", base.data, base.total_size - 1000),
              Case("empty file", b"", 0), Case("23 bytes", b"GGUF" + b"\0" * 19, 23),
              Case("wrong magic", b"GGML" + base.data[4:], base.total_size)]
    template = "chat template"
    cases += [
        Case(f"{template}: syntax error", *_as_pair(encode(_with(h, _set_kv("tokenizer.chat_template", STRING, "{% if %}")))),
             may_open=True),
        Case(f"{template}: nested 5000 deep", *_as_pair(encode(_with(h, _set_kv(
            "tokenizer.chat_template", STRING, "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")))), may_open=True),
        Case(f"{template}: an integer", *_as_pair(encode(_with(h, _set_kv("tokenizer.chat_template", U32, 7)))),
             may_open=True),
    ]
    return cases


def _as_pair(enc: Encoded) -> tuple[bytes, int]:
    return enc.data, enc.total_size


# -------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What one case did."""

    error: str  # "ok", "ModelFileError", or the name of an exception that should not have escaped
    message: str
    seconds: float
    rss_growth: int


@dataclass
class Tally:
    """Figures over many cases."""

    count: int = 0
    by_type: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)
    slowest: tuple[float, str] = (0.0, "")
    rss_growth: tuple[int, str, int] = (0, "", 0)  # bytes, case, file size
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # case, error, traceback
    over_bound: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, case: Case, out: Outcome, tb: str = "") -> None:
        """Count one case; keep the details of anything that is not a ModelFileError or a success."""
        self.count += 1
        self.by_type[out.error] += 1
        if out.error == "ModelFileError":
            self.messages[_message_class(out.message)] += 1
        if out.seconds > self.slowest[0]:
            self.slowest = (out.seconds, case.name)
        if out.rss_growth > self.rss_growth[0]:
            self.rss_growth = (out.rss_growth, case.name, case.total_size)
        if out.rss_growth > case.total_size + RSS_SLACK_BYTES:
            self.over_bound.append((case.name, out.rss_growth, case.total_size))
        if out.error not in ("ok", "ModelFileError") or out.seconds > CASE_LIMIT_S:
            self.failures.append((case.name, f"{out.error}: {out.message} ({out.seconds:.2f} s)", tb))

    @property
    def ok(self) -> bool:
        """No case let anything but a ModelFileError escape, ran too long or used too much memory."""
        return not self.failures and not self.over_bound


def _message_class(message: str) -> str:
    """A ModelFileError message without the path and numbers, to count kinds of errors."""
    text = message.split(": ", 1)[-1]
    words = ["#" if any(c.isdigit() for c in w) else w for w in text.split()[:7]]
    return " ".join(words)


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise CaseTimeout()


class Runner:
    """Writes cases to one tmpfs file and runs them under a time limit, measuring peak RSS growth."""

    def __init__(self, workdir: Path):
        from pagellm import cli
        from pagellm.engine import check_model
        from pagellm.modelfile import ModelFile, ModelFileError
        from pagellm.offload.pressure import peak_rss_bytes, process_rss_bytes, reset_peak_rss

        self.path = workdir / "case.gguf"
        self._open, self._error, self._check = ModelFile.open, ModelFileError, check_model
        self._info = (cli._info_rows, cli._type_rows)
        self._rss, self._peak, self._reset_peak = process_rss_bytes, peak_rss_bytes, reset_peak_rss
        self.can_reset_peak = reset_peak_rss()
        signal.signal(signal.SIGALRM, _on_alarm)

    def write(self, case: Case) -> None:
        """The case's bytes, extended (sparsely) to its full size."""
        with open(self.path, "wb") as f:
            f.write(case.data[: case.total_size])
            f.truncate(case.total_size)

    def run(self, case: Case) -> tuple[Outcome, str]:
        """Run one case; returns its outcome and, for an unexpected exception, the traceback."""
        self.write(case)
        self._reset_peak()
        base = self._rss()
        error, message, tb = "ok", "", ""
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S * 2)  # past the limit is a failure; this only ends a hang
        try:
            mf = self._open(self.path)
            for rows in self._info:
                rows(mf)
            self._check(mf)
        except CaseTimeout:
            error, message = "timeout", f"still running after {CASE_LIMIT_S * 2:g} s"
        except self._error as e:
            error, message = "ModelFileError", str(e)
            if "\n" in message or str(self.path) not in message:
                error = "BadModelFileErrorMessage"
        except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
            error, message, tb = type(e).__name__, str(e)[:300], traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - t0
        growth = max(0, self._peak() - base) if self.can_reset_peak else 0
        return Outcome(error, message, seconds, growth), tb


def run_cases(runner: Runner, cases: Iterator[Case] | list[Case], tally: Tally,
              progress_every: int = 0) -> Tally:
    """Run cases into ``tally``, printing a progress line every ``progress_every`` cases."""
    t0 = time.perf_counter()
    for case in cases:
        out, tb = runner.run(case)
        tally.add(case, out, tb)
        if progress_every and tally.count % progress_every == 0:
            print(f"  {tally.count:>7} cases  {time.perf_counter() - t0:7.1f} s  "
                  f"unexpected {len(tally.failures)}  slowest {tally.slowest[0] * 1e3:.1f} ms", flush=True)
    return tally


def cli_one_line(path: Path, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``pagellm info PATH`` in a subprocess; (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "pagellm.cli", "info", str(path)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stderr


def check_cli(runner: Runner, cases: list[Case]) -> list[str]:
    """Problems with `pagellm info` on these cases: anything but exit 0, or exit 1 with one 'pagellm: error:' line."""
    problems = []
    for case in cases:
        runner.write(case)
        code, err = cli_one_line(runner.path)
        lines = err.strip().splitlines()
        if code == 0:
            continue
        if code != 1 or len(lines) != 1 or not lines[0].startswith("pagellm: error:") or "this is a bug" in err:
            problems.append(f"{case.name}: exit {code}, stderr {err.strip()[:300]!r}")
    return problems


def load_seeds(fixtures: Path) -> dict[str, Header]:
    """The seed headers: both stories260K files whole, the synthetic llama and qwen2 with a cut vocabulary."""
    names = ["stories260K-real-Q8_0", "stories260K-real-F32", "synth-llama-Q4_K_M", "synth-qwen2-F16"]
    return {name: header_from_fixture(fixtures / f"{name}.gguf") for name in names}


def check_encoder(fixtures: Path, seeds: dict[str, Header]) -> None:
    """The re-encoded stories260K header is byte-identical to the file's: the field map is trustworthy."""
    raw = (fixtures / "stories260K-real-Q8_0.gguf").read_bytes()
    enc = encode(seeds["stories260K-real-Q8_0"])
    if raw[: len(enc.data)] != enc.data or enc.total_size != len(raw):
        raise SystemExit("encoder does not reproduce stories260K-real-Q8_0's header; fix the encoder first")


def _default_fixtures() -> Path:
    shared = os.environ.get("PAGELLM_SHARED")
    return Path(shared) / "fixtures" if shared else REPO_ROOT.parent / "shared" / "fixtures"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="mutated cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixtures", type=Path, default=_default_fixtures())
    parser.add_argument("--cli-sample", type=int, default=40, help="cases also run through `pagellm info` in a subprocess")
    parser.add_argument("--crash-dir", type=Path, default=Path(tempfile.gettempdir()) / "pagellm-fuzz-crashes")
    args = parser.parse_args(argv)

    seeds = load_seeds(args.fixtures)
    check_encoder(args.fixtures, seeds)
    workdir = Path(tempfile.mkdtemp(prefix="pagellm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    runner = Runner(workdir)
    from pagellm.offload.pressure import peak_rss_bytes, process_rss_bytes

    rss_start = process_rss_bytes()
    print(f"seeds: {', '.join(f'{n} ({len(encode(h).data)} B header)' for n, h in seeds.items())}")
    print(f"case file: {runner.path} (tmpfs); per-case limit {CASE_LIMIT_S:g} s; "
          f"peak RSS reset per case: {runner.can_reset_peak}")

    hand = hand_cases(seeds["stories260K-real-Q8_0"])
    hand_tally = Tally()
    print(f"\nhand-made cases ({len(hand)}):")
    for case in hand:
        out, tb = runner.run(case)
        allowed = out.error == "ModelFileError" or (case.may_open and out.error == "ok")
        hand_tally.add(case, out, tb)
        if not allowed and out.error in ("ok",):
            hand_tally.failures.append((case.name, "opened, but should have been refused", ""))
        print(f"  {'ok ' if allowed else 'BAD'} {case.name:<44} {out.seconds * 1e3:6.1f} ms  {out.error}: "
              f"{out.message.split(': ', 1)[-1][:90]}")

    print(f"\nmutated cases ({args.cases}, seed {args.seed}):")
    t0 = time.perf_counter()
    tally = run_cases(runner, mutated_cases(seeds, args.cases, args.seed), Tally(), progress_every=max(1, args.cases // 10))
    elapsed = time.perf_counter() - t0

    sample = [c for i, c in enumerate(mutated_cases(seeds, args.cases, args.seed)) if i % max(1, args.cases // max(1, args.cli_sample // 2)) == 0]
    sample = (sample + hand[:: max(1, len(hand) // max(1, args.cli_sample // 2))])[: args.cli_sample]
    cli_problems = check_cli(runner, sample) if args.cli_sample else []

    print(f"\ncases: {tally.count} mutated in {elapsed:.1f} s ({tally.count / elapsed:.0f}/s) + {hand_tally.count} hand-made")
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in (tally.by_type + hand_tally.by_type).most_common()))
    print("commonest ModelFileError kinds:")
    for kind, n in tally.messages.most_common(12):
        print(f"  {n:>7}  {kind}")
    slow = max(tally.slowest, hand_tally.slowest)
    print(f"slowest case: {slow[0] * 1e3:.1f} ms  ({slow[1][:120]})")
    growth = max(tally.rss_growth, hand_tally.rss_growth)
    print(f"largest peak-RSS growth in one case: {growth[0] / 2**20:.2f} MiB (file {growth[2] / 2**20:.2f} MiB; "
          f"{growth[1][:100]})")
    print(f"process RSS: {rss_start / 2**20:.0f} MiB at start, {process_rss_bytes() / 2**20:.0f} MiB at end, "
          f"peak {peak_rss_bytes() / 2**20:.0f} MiB")
    print(f"`pagellm info` subprocess sample: {len(sample)} cases, {len(cli_problems)} not answered with one line")
    failures = hand_tally.failures + tally.failures
    if failures or cli_problems or tally.over_bound or hand_tally.over_bound:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        for name, what, tb in failures[:20]:
            print(f"UNEXPECTED {name[:100]}: {what}\n{tb}")
        for problem in cli_problems[:20]:
            print(f"CLI {problem}")
        for name, grew, size in (tally.over_bound + hand_tally.over_bound)[:20]:
            print(f"MEMORY {name[:100]}: grew {grew} B for a file of {size} B")
        _save_failures(args.crash_dir, seeds, args, failures, hand)
        print(f"FAIL: {len(failures)} unexpected outcomes (cases saved under {args.crash_dir})")
        return 1
    print("PASS: only ModelFileError escaped, every case within the time and memory bounds")
    return 0


def _save_failures(crash_dir: Path, seeds: dict[str, Header], args: argparse.Namespace,
                   failures: list[tuple[str, str, str]], hand: list[Case]) -> None:
    """Write the failing cases' bytes so they can be replayed with `pagellm info`."""
    wanted = {name for name, _, _ in failures}
    by_name = {c.name: c for c in hand}
    for case in mutated_cases(seeds, args.cases, args.seed):
        if case.name in wanted:
            by_name[case.name] = case
    for i, name in enumerate(sorted(wanted)):
        case = by_name.get(name)
        if case is not None:
            with open(crash_dir / f"case-{i}.gguf", "wb") as f:
                f.write(case.data[: case.total_size])
                f.truncate(case.total_size)
            (crash_dir / f"case-{i}.txt").write_text(name + "\n")


if __name__ == "__main__":
    sys.exit(main())
