"""Build GGUF bytes by hand, including malformed ones, for tests of the model-file parser."""
from __future__ import annotations

import struct

STRING, ARRAY, UINT32, UINT64, INT32, FLOAT32 = 8, 9, 4, 10, 5, 6


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STRING, gstr(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def tensor_info(name: str, shape: list[int], ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", ggml_type, offset)


def gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3, n_tensors: int | None = None,
         n_kv: int | None = None, alignment: int = 32, magic: bytes = b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % alignment)
    return body + data


def simple_model(data_bytes: int = 64 * 4 * 2) -> tuple[list[bytes], list[bytes], bytes]:
    """Two F32 tensors of 64x2 in one block, well formed."""
    kvs = [kv_str("general.architecture", "llama")]
    tensors = [tensor_info("blk.0.attn_q.weight", [64, 2], 0, 0), tensor_info("blk.0.attn_k.weight", [64, 2], 0, 512)]
    return kvs, tensors, b"\x01" * (2 * data_bytes)
