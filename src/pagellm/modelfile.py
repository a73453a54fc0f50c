"""A GGUF model file: metadata, tensor table and the tensor groups the pager works with.

The header is parsed here with every count and length checked against the bytes that remain,
so a hostile file can never make us allocate or loop without bound. gguf-py's ``GGUFReader``
cannot promise that (a numeric array whose count runs past the end of the file makes it loop
forever on empty reads), so we use gguf-py for the format's constants and type sizes and for
writing, and keep the reading of untrusted headers to ourselves.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version, tensor count, kv count
MAX_TENSORS = 1 << 20  # the largest real models have a few thousand tensors
MAX_KV = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16
MAX_ARRAY_DEPTH = 3
MAX_ALIGNMENT = 1 << 16
MAX_ELEMENTS = 1 << 50  # far beyond any file; keeps byte arithmetic honest
# Memory bounds: a metadata string becomes a Python str of up to 4 bytes per byte read, and each string
# of an array costs ~50 bytes of object overhead, so both are capped well above any real file (chat
# templates are tens of KiB; the largest vocabularies and merge lists hold well under a million entries).
MAX_STRING_BYTES = 1 << 25
MAX_ARRAY_STRINGS = 1 << 22

# Smallest encodings, used to reject counts that the remaining bytes cannot possibly hold.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, np.dtype] = {
    t: np.dtype(fmt.replace("?", "B")) for t, fmt in _SCALAR_FORMATS.items()
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
TOKEN_EMBEDDING = "token_embd"
GLOBALS = "globals"
OUTPUT_HEAD = "output"


class ModelFileError(Exception):
    """A GGUF file that cannot be used; the message is one line naming the file and the problem."""


class TensorInfo(NamedTuple):
    """Where one tensor lives: GGML type, shape (GGUF order, ne0 first), absolute offset, bytes."""

    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorGroup:
    """The unit of residency: tensors read and evicted together."""

    name: str
    tensor_names: tuple[str, ...]
    nbytes: int  # sum of the tensors' bytes
    start: int  # file span covering all the tensors
    end: int
    contiguous: bool  # no other group's tensor lies inside [start, end): one read serves all


class _Cursor:
    """Bounded little-endian reads over the mapped file; every read checks what remains."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}")

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > self.remaining:
            raise self.fail(
                f"truncated: {what} needs {nbytes} bytes at offset {self.pos}, "
                f"only {self.remaining} remain"
            )

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str, max_bytes: int = MAX_STRING_BYTES) -> str:
        length = self.u64(f"length of {what}")
        if length > max_bytes:
            raise self.fail(f"{what} has length {length}, more than the {max_bytes} allowed")
        self.need(length, what)
        # Decoded straight from the mapping: no intermediate bytes copy of a long string.
        with memoryview(self.buf) as mv:
            raw = mv[self.pos : self.pos + length]
            try:
                text = str(raw, "utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"{what} is not valid UTF-8") from None
            finally:
                raw.release()
        self.pos += length
        return text

    def array(self, what: str, depth: int) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        elem_type = self.value_type(f"element type of {what}")
        count = self.u64(f"length of {what}")
        min_elem = 8 if elem_type in (GGUFValueType.STRING, GGUFValueType.ARRAY) else (
            struct.calcsize(_SCALAR_FORMATS[elem_type])
        )
        if count * min_elem > self.remaining:
            raise self.fail(
                f"{what} claims {count} elements, more than the {self.remaining} remaining bytes hold"
            )
        if elem_type == GGUFValueType.STRING and count > MAX_ARRAY_STRINGS:
            raise self.fail(f"{what} holds {count} strings, more than the {MAX_ARRAY_STRINGS} allowed")
        if elem_type in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[elem_type]
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return values.astype(bool) if elem_type == GGUFValueType.BOOL else values
        return [self.value(elem_type, f"{what}[{i}]", depth + 1) for i in range(count)]

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} is {raw}, not a GGUF value type") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth + 1)
        return self.scalar(vtype, what)


def _tensor_nbytes(cur: _Cursor, name: str, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor from its type and shape, rejecting shapes the type cannot hold."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if any(d == 0 for d in shape):
        raise cur.fail(f"tensor {name!r} has a zero dimension in shape {list(shape)}")
    n_elements = 1
    for d in shape:
        n_elements *= d  # Python ints: no silent 64-bit wrap-around
        if n_elements > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} shape {list(shape)} has an absurd element count")
    if shape[0] % block_size:
        raise cur.fail(
            f"tensor {name!r}: row length {shape[0]} is not a multiple of "
            f"{ggml_type.name}'s block of {block_size}"
        )
    return n_elements // block_size * type_size


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
    name = cur.string(f"name of tensor {index}", MAX_NAME_BYTES)
    n_dims = cur.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
    shape = tuple(cur.u64(f"dimension {i} of tensor {name!r}") for i in range(n_dims))
    raw_type = cur.u32(f"type of tensor {name!r}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        ggml_type = None
    if ggml_type is None or ggml_type not in GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name!r} has unknown GGML type {raw_type}")
    rel_offset = cur.u64(f"offset of tensor {name!r}")
    return name, ggml_type, shape, rel_offset


def _parse(path: Path, buf: mmap.mmap, size: int) -> tuple[int, dict[str, Any], dict[str, TensorInfo], int, int]:
    cur = _Cursor(buf, size, path)
    cur.need(HEADER_BYTES, "the GGUF header")
    magic = struct.unpack_from("<I", buf, 0)[0]
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {bytes(buf[0:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version >> 16 in SUPPORTED_VERSIONS:
            raise cur.fail("big-endian GGUF files are not supported")
        raise cur.fail(f"unsupported GGUF version {version} (expected one of {SUPPORTED_VERSIONS})")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata count")
    if tensor_count > MAX_TENSORS or tensor_count * _MIN_TENSOR_INFO_BYTES > cur.remaining:
        raise cur.fail(f"tensor count {tensor_count} is impossible for a file of {size} bytes")
    if kv_count > MAX_KV or kv_count * _MIN_KV_BYTES > cur.remaining:
        raise cur.fail(f"metadata count {kv_count} is impossible for a file of {size} bytes")

    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key {i}", MAX_NAME_BYTES)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.value_type(f"type of metadata {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", 32)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
        or alignment > MAX_ALIGNMENT
    ):
        raise cur.fail(f"general.alignment is {alignment!r} (expected a power of two up to {MAX_ALIGNMENT})")

    infos = [_read_tensor_info(cur, i) for i in range(tensor_count)]
    data_offset = -(-cur.pos // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, shape, rel_offset in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        if rel_offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {rel_offset} is not aligned to {alignment}")
        nbytes = _tensor_nbytes(cur, name, ggml_type, shape)
        offset = data_offset + rel_offset
        if offset + nbytes > size:
            raise cur.fail(
                f"tensor {name!r} reaches past the end of the file "
                f"(offset {offset} + {nbytes} bytes > file size {size}; truncated?)"
            )
        tensors[name] = TensorInfo(ggml_type, shape, offset, nbytes)

    by_offset = sorted(tensors.items(), key=lambda item: item[1].offset)
    for (name_a, a), (name_b, b) in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            raise cur.fail(f"tensors {name_a!r} and {name_b!r} overlap in the file")
    return version, metadata, tensors, alignment, data_offset


def _group_of(tensor_name: str) -> str:
    """The residency group a tensor belongs to, by llama.cpp's tensor naming."""
    m = _BLOCK_RE.match(tensor_name)
    if m:
        return f"blk.{int(m.group(1))}"
    if tensor_name.startswith("token_embd."):
        return TOKEN_EMBEDDING
    if tensor_name.startswith("output."):
        return OUTPUT_HEAD
    return GLOBALS


def _build_groups(tensors: dict[str, TensorInfo]) -> dict[str, TensorGroup]:
    members: dict[str, list[str]] = {}
    for name in tensors:
        members.setdefault(_group_of(name), []).append(name)

    def order(group: str) -> tuple[int, int]:
        if group == TOKEN_EMBEDDING:
            return (0, 0)
        if group.startswith("blk."):
            return (1, int(group[4:]))
        return (2, 0) if group == GLOBALS else (3, 0)

    spans = sorted((tensors[n].offset, tensors[n].offset + tensors[n].nbytes, g) for g, ns in members.items() for n in ns)
    groups: dict[str, TensorGroup] = {}
    for group in sorted(members, key=order):
        names = tuple(sorted(members[group], key=lambda n: tensors[n].offset))
        start = tensors[names[0]].offset
        end = max(tensors[n].offset + tensors[n].nbytes for n in names)
        foreign = any(g != group and s < end and e > start for s, e, g in spans)
        groups[group] = TensorGroup(
            name=group,
            tensor_names=names,
            nbytes=sum(tensors[n].nbytes for n in names),
            start=start,
            end=end,
            contiguous=not foreign,
        )
    return groups


class ModelFile:
    """An opened, validated GGUF model file. Holds no file handle and no tensor data."""

    def __init__(
        self,
        path: Path,
        file_size: int,
        version: int,
        metadata: dict[str, Any],
        tensors: dict[str, TensorInfo],
        alignment: int,
        data_offset: int,
    ):
        self.path = path
        self.file_size = file_size
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._groups = _build_groups(tensors)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "ModelFile":
        """Parse and validate a GGUF file's header; raises ModelFileError for anything wrong."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < HEADER_BYTES:
                    raise ModelFileError(f"{path}: too small to be a GGUF file ({size} bytes)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    parsed = _parse(path, buf, size)
        except ModelFileError:
            raise
        except IsADirectoryError:
            raise ModelFileError(f"{path}: is a directory, not a GGUF file") from None
        except FileNotFoundError:
            raise ModelFileError(f"{path}: no such file") from None
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
        return cls(path, size, *parsed)

    # -- metadata -------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        """``general.architecture`` (e.g. 'llama', 'qwen2')."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: general.architecture is missing or not a string")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or ``default``."""
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """A metadata value under the architecture's prefix (``{arch}.{key}``)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    # -- tensors and groups ---------------------------------------------------------------

    @property
    def groups(self) -> list[str]:
        """Group names in forward order: token embedding, blk.0 .. blk.N-1, globals, output head."""
        return list(self._groups)

    def group(self, name: str) -> TensorGroup:
        """The group called ``name``."""
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor group {name!r} (groups: {', '.join(self._groups)})") from None

    def group_bytes(self, name: str) -> int:
        """Bytes of the tensors in group ``name``."""
        return self.group(name).nbytes

    @property
    def block_groups(self) -> list[str]:
        """The ``blk.N`` groups, in order."""
        return [g for g in self._groups if g.startswith("blk.")]

    @property
    def weight_bytes(self) -> int:
        """Bytes of all tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def parameter_count(self) -> int:
        """Number of weights over all tensors."""
        return sum(int(np.prod(t.shape)) for t in self.tensors.values())

    def bytes_by_type(self) -> dict[str, int]:
        """Tensor bytes per GGML type name."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.ggml_type.name] = out.get(t.ggml_type.name, 0) + t.nbytes
        return out

    def __repr__(self) -> str:
        return f"ModelFile({str(self.path)!r}, {len(self.tensors)} tensors, {len(self._groups)} groups)"
