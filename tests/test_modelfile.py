import struct

import gguf
import numpy as np
import pytest
from gguf_bytes import ARRAY, STRING, UINT32, gguf as make_gguf, gstr, kv, kv_str, kv_u32, simple_model, tensor_info
from shared_paths import fixture_names, fixture_path

from pagellm.modelfile import ModelFile, ModelFileError

FIXTURES = fixture_names()


@pytest.mark.parametrize("name", ["stories260K-real-Q8_0", "synth-llama-Q4_K_M", "synth-qwen2-F16"])
def test_tensor_table_matches_gguf_reader(name):
    path = fixture_path(name)
    mf = ModelFile.open(path)
    reader = gguf.GGUFReader(path)
    assert set(mf.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        info = mf.tensors[t.name]
        assert info.ggml_type == t.tensor_type
        assert info.shape == tuple(int(d) for d in t.shape)
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes
    assert mf.architecture == reader.get_field("general.architecture").contents()
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = mf.metadata[key]
        expected = field.contents()
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, np.asarray(expected, dtype=value.dtype))
        elif isinstance(value, float):
            assert value == pytest.approx(expected)
        else:
            assert value == expected


@pytest.mark.parametrize("name", FIXTURES)
def test_groups_in_forward_order(name):
    mf = ModelFile.open(fixture_path(name))
    n_blocks = mf.arch_get("block_count")
    groups = mf.groups
    assert groups[0] == "token_embd"
    assert groups[1 : 1 + n_blocks] == [f"blk.{i}" for i in range(n_blocks)]
    assert groups[1 + n_blocks] == "globals"
    assert groups[2 + n_blocks :] == (["output"] if "output.weight" in mf.tensors else [])
    assert sum(mf.group_bytes(g) for g in groups) == mf.weight_bytes
    assert all(mf.group(g).contiguous for g in groups)
    assert set().union(*(mf.group(g).tensor_names for g in groups)) == set(mf.tensors)


def open_bytes(tmp_path, data: bytes, name="m.gguf") -> ModelFile:
    p = tmp_path / name
    p.write_bytes(data)
    return ModelFile.open(p)


def test_hand_built_model_opens(tmp_path):
    mf = open_bytes(tmp_path, make_gguf(*simple_model()))
    assert mf.groups == ["blk.0"] and mf.group("blk.0").nbytes == 1024


BAD = {
    "empty": (b"", "too small"),
    "bad magic": (make_gguf(*simple_model(), magic=b"GGML"), "not a GGUF file"),
    "version 1": (make_gguf(*simple_model(), version=1), "unsupported GGUF version 1"),
    "version 99": (make_gguf(*simple_model(), version=99), "unsupported GGUF version 99"),
    "big endian": (make_gguf(*simple_model(), version=3 << 16), "big-endian"),
    "tensor count 2^40": (make_gguf(*simple_model(), n_tensors=2**40), "tensor count"),
    "tensor count 2^64-1": (make_gguf(*simple_model(), n_tensors=2**64 - 1), "tensor count"),
    "kv count 2^63": (make_gguf(*simple_model(), n_kv=2**63), "metadata count"),
    "string length 2^63": (make_gguf([kv("general.architecture", STRING, gstr("x", 2**63))], []), "allowed"),
    "key length 2^63": (make_gguf([gstr("k", 2**63) + b"\0" * 16], []), "allowed"),
    "array length 2^63": (make_gguf([kv("a", ARRAY, struct.pack("<IQ", UINT32, 2**63))], []), "claims"),
    "string array length 2^62": (make_gguf([kv("a", ARRAY, struct.pack("<IQ", STRING, 2**62))], []), "claims"),
    "unknown value type": (make_gguf([kv("a", 99, b"\0" * 8)], []), "not a GGUF value type"),
    "nested arrays": (make_gguf([kv("a", ARRAY, struct.pack("<IQ", ARRAY, 1) * 5 + struct.pack("<IQ", UINT32, 0))], []), "nests"),
    "duplicate key": (make_gguf([kv_str("a", "x"), kv_str("a", "y")], []), "appears twice"),
    "bad utf8 key": (make_gguf([gstr(b"\xff\xfe") + struct.pack("<I", UINT32) + b"\0" * 4], []), "UTF-8"),
    "alignment wrong type": (make_gguf([kv_str("general.alignment", "32")], []), "general.alignment"),
    "alignment not power of 2": (make_gguf([kv_u32("general.alignment", 24)], [], alignment=24), "general.alignment"),
    "alignment zero": (make_gguf([kv_u32("general.alignment", 0)], [], alignment=1), "general.alignment"),
    "unknown ggml type": (make_gguf([], [tensor_info("t", [32], 77, 0)], b"\0" * 64), "unknown GGML type 77"),
    "removed ggml type": (make_gguf([], [tensor_info("t", [32], 4, 0)], b"\0" * 64), "unknown GGML type 4"),
    "offset past end": (make_gguf([], [tensor_info("t", [64], 0, 1 << 40)], b"\0" * 256), "past the end"),
    "truncated data": (make_gguf([], [tensor_info("t", [64, 64], 0, 0)], b"\0" * 100), "past the end"),
    "overlap": (make_gguf([], [tensor_info("a", [64], 0, 0), tensor_info("b", [64], 0, 128)], b"\0" * 512), "overlap"),
    "misaligned": (make_gguf([], [tensor_info("a", [8], 0, 4)], b"\0" * 64), "not aligned"),
    "shape overflow": (make_gguf([], [tensor_info("a", [2**32, 2**32, 2**32], 0, 0)], b"\0" * 64), "absurd element count"),
    "shape wraps 64 bits": (make_gguf([], [tensor_info("a", [2**63, 2], 0, 0)], b"\0" * 64), "absurd element count"),
    "zero dim": (make_gguf([], [tensor_info("a", [0, 4], 0, 0)], b"\0" * 64), "zero dimension"),
    "5 dims": (make_gguf([], [tensor_info("a", [1, 1, 1, 1, 1], 0, 0)], b"\0" * 64), "dimensions"),
    "row not block multiple": (make_gguf([], [tensor_info("a", [33, 2], 8, 0)], b"\0" * 256), "not a multiple"),
    "duplicate tensor": (make_gguf([], [tensor_info("a", [8], 0, 0), tensor_info("a", [8], 0, 32)], b"\0" * 64), "appears twice"),
    "truncated header": (make_gguf(*simple_model())[:100], "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_files_give_one_line_error(tmp_path, case):
    data, fragment = BAD[case]
    with pytest.raises(ModelFileError) as exc:
        open_bytes(tmp_path, data)
    msg = str(exc.value)
    assert fragment in msg
    assert "\n" not in msg and str(tmp_path / "m.gguf") in msg


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        ModelFile.open(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="directory"):
        ModelFile.open(tmp_path)


# (fixture, cases): the small-vocabulary file gets many cases; 32k/50k vocabularies take ~0.1 s a parse.
CORRUPTION_CASES = [("stories260K-real-Q8_0", 300), ("synth-llama-Q4_0", 25), ("synth-qwen2-F16", 25)]


@pytest.mark.parametrize("name,n_cases", CORRUPTION_CASES)
def test_every_truncation_is_a_model_file_error(tmp_path, name, n_cases):
    data = fixture_path(name).read_bytes()
    mf = ModelFile.open(fixture_path(name))
    header_end = mf.data_offset
    data_end = max(t.offset + t.nbytes for t in mf.tensors.values())
    cuts = sorted({*range(0, 64, 3), *np.linspace(64, header_end, n_cases).astype(int), *np.linspace(header_end, data_end - 1, 10).astype(int)})
    for cut in cuts:
        with pytest.raises(ModelFileError):
            open_bytes(tmp_path, data[:cut])


@pytest.mark.parametrize("name,n_cases", CORRUPTION_CASES)
def test_corrupted_headers_only_raise_model_file_error(tmp_path, name, n_cases):
    data = bytearray(fixture_path(name).read_bytes())
    header_end = ModelFile.open(fixture_path(name)).data_offset
    rng = np.random.default_rng(1234)
    for _ in range(n_cases):
        corrupt = bytearray(data[:header_end + 4096])
        for _ in range(rng.integers(1, 8)):
            pos = int(rng.integers(0, header_end))
            corrupt[pos] = int(rng.integers(0, 256)) if rng.random() < 0.7 else 0xFF
        try:
            open_bytes(tmp_path, bytes(corrupt))
        except ModelFileError:
            pass
