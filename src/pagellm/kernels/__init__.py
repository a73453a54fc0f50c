"""Kernel dispatch: dequantize, mat-vec and mat-mul on raw GGUF tensor bytes, by GGML type.

``raw`` is the tensor's bytes exactly as stored in the file (a view over the pager's buffer),
either 1-D for the whole tensor or ``[rows, row_bytes]``; ``cols`` is GGUF ``ne[0]``, the
weights per row. Results are float32. The per-type kernels live in ``floats``, ``legacy``
and ``kquants``, each exposing ``KERNELS: dict[GGMLQuantizationType, TypeKernels]``.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numba
import numpy as np
import threadpoolctl
from gguf import GGMLQuantizationType

# Work stealing (TBB) degrades gracefully when another process takes a core; OpenMP's static
# schedule waits at every barrier for a descheduled thread, and decode measured 15x slower
# with it on a 2-core machine with one busy core (0.95 against 14.4 tokens/s). Set before
# the first parallel launch, which is when numba picks its layer; NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "omp", "workqueue"]


def _load_tbb() -> bool:
    """Load the ``tbb`` wheel's libtbb.so.12 so numba's TBB layer can link to it; whether it loaded.

    pip puts the library in the environment's ``lib/``, which is not on the loader's path (conda's
    is): numba's TBB layer then fails to import and numba quietly falls back to OpenMP, whose idle
    worker also spins at 100% of a core while the forward pass waits for a read.
    """
    import ctypes
    from importlib import metadata

    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name == "libtbb.so.12":
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                return False
    return False


_load_tbb()

# BLAS runs single-threaded: its callers parallelise over tiles (see _tiled_blas_matmul), and
# OpenBLAS's own threads stall at barriers whenever another process holds a core. The limit is
# kept for the life of the process.
_BLAS_LIMIT = threadpoolctl.threadpool_limits(limits=1, user_api="blas")

from . import activations, floats, kquants, legacy  # noqa: E402  (after the threading layer is chosen)
from .base import TypeKernels  # noqa: E402
from .attention import FUSED_MAX_QUERIES, attend, halves_heads_first  # noqa: E402

__all__ = [
    "KERNELS",
    "SUPPORTED_TYPES",
    "TypeKernels",
    "dequantize",
    "is_supported",
    "matmul",
    "matvec",
    "row_bytes",
    "attend",
    "halves_heads_first",
    "get_num_threads",
    "set_num_threads",
    "threads_limited",
]

_MODULES = (floats, legacy, kquants)
KERNELS: dict[GGMLQuantizationType, TypeKernels] = {t: k for m in _MODULES for t, k in m.KERNELS.items()}
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(KERNELS)

# Types whose matvec also takes x [n, cols] -> out [n, rows] and reads the weights once for all n.
_MULTI_VECTOR_TYPES = frozenset().union(*(getattr(m, "MULTI_VECTOR_TYPES", frozenset()) for m in _MODULES))

# Up to this many vectors matmul runs the fused mat-vec kernel (weights read once, never
# materialised); beyond it, it dequantizes tiles of rows and lets BLAS multiply. Measured with
# benchmarks/kernels.py --crossover (2 threads, AMD EPYC Zen 4, 2048x5632 and 5632x2048): the
# multi-vector kernels (F32/F16/BF16, Q8_0..Q5_1) match tiled BLAS at n ~ 32 and lose by ~1.3x
# at 64; one mat-vec per vector (the K-quants) matches it at n ~ 12-16.
FUSED_MATMUL_MAX_VECTORS = 32
LOOPED_MATVEC_MAX_VECTORS = 12
# float32 bytes of dequantized rows per BLAS tile: bounded scratch even for a 32000-row output head
_TILE_BYTES = 8 << 20  # per-thread scratch; larger tiles keep BLAS efficient

_scratch = threading.local()


def _type(ggml_type) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"unknown GGML type {ggml_type!r}") from None


def _kernels(ggml_type) -> TypeKernels:
    t = _type(ggml_type)
    kernels = KERNELS.get(t)
    if kernels is None:
        raise ValueError(f"GGML type {t.name} is not supported (supported: {sorted(k.name for k in SUPPORTED_TYPES)})")
    return kernels


def is_supported(ggml_type) -> bool:
    """Whether kernels exist for ``ggml_type`` (a GGMLQuantizationType or its integer value)."""
    try:
        return GGMLQuantizationType(ggml_type) in KERNELS
    except ValueError:
        return False


def row_bytes(ggml_type, cols: int) -> int:
    """Bytes one row of ``cols`` weights of ``ggml_type`` occupies in the file."""
    kernels = _kernels(ggml_type)
    if cols <= 0 or cols % kernels.block_size != 0:
        raise ValueError(
            f"{_type(ggml_type).name} rows hold whole blocks of {kernels.block_size} weights; got {cols} columns"
        )
    return cols // kernels.block_size * kernels.type_size


def _as_rows(raw: np.ndarray, ggml_type, cols: int) -> np.ndarray:
    """``raw`` as a C-contiguous uint8 ``[rows, row_bytes]`` view, without copying."""
    raw = np.asarray(raw)
    if not raw.flags.c_contiguous:
        raise ValueError("raw tensor bytes must be C-contiguous (a view over the file's bytes)")
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)  # gguf's reader hands F32/F16 tensors over as float arrays
    width = row_bytes(ggml_type, cols)
    if raw.size % width != 0:
        raise ValueError(f"{raw.size} bytes are not whole rows of {width} bytes ({cols} {_type(ggml_type).name} weights)")
    return raw.reshape(raw.size // width, width)


def _as_vectors(x: np.ndarray, cols: int, ndim: int) -> np.ndarray:
    """``x`` as C-contiguous float32 with ``ndim`` dimensions and ``cols`` last (copied only if needed)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != ndim or x.shape[-1] != cols:
        want = "[cols]" if ndim == 1 else "[n, cols]"
        raise ValueError(f"x must be {want} with cols={cols}; got shape {x.shape}")
    return x


def dequantize(raw: np.ndarray, ggml_type, cols: int) -> np.ndarray:
    """The float32 weights ``[rows, cols]`` of a tensor's raw bytes."""
    rows = _as_rows(raw, ggml_type, cols)
    out = np.empty((rows.shape[0], cols), dtype=np.float32)
    _kernels(ggml_type).dequantize(rows, out)
    return out


def matvec(raw: np.ndarray, ggml_type, cols: int, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``W @ x`` as float32 ``[rows]`` straight from the raw bytes (W is never materialised)."""
    rows = _as_rows(raw, ggml_type, cols)
    x = _as_vectors(x, cols, 1)
    if out is None:
        out = np.empty(rows.shape[0], dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (rows.shape[0],) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape ({rows.shape[0]},)")
    if _type(ggml_type) in _MULTI_VECTOR_TYPES:
        # as one vector of a batch: the same machine code, and one numba signature to compile, not two
        _kernels(ggml_type).matvec(rows, x.reshape(1, cols), out.reshape(1, -1))
    else:
        _kernels(ggml_type).matvec(rows, x, out)
    return out


def matmul(raw: np.ndarray, ggml_type, cols: int, X: np.ndarray) -> np.ndarray:
    """``X @ W.T`` as float32 ``[n, rows]`` for ``X`` float32 ``[n, cols]``."""
    t = _type(ggml_type)
    kernels = _kernels(t)
    rows = _as_rows(raw, t, cols)
    X = _as_vectors(X, cols, 2)
    n = X.shape[0]
    out = np.empty((n, rows.shape[0]), dtype=np.float32)
    if t in _MULTI_VECTOR_TYPES and n <= FUSED_MATMUL_MAX_VECTORS:
        kernels.matvec(rows, X, out)
    elif t not in _MULTI_VECTOR_TYPES and n <= LOOPED_MATVEC_MAX_VECTORS:
        for v in range(n):
            kernels.matvec(rows, X[v], out[v])
    else:
        if kernels.quantizes_activations:  # the product the fused kernels compute, whatever the batch
            X = activations.round_trip_q8_0(X)
        _tiled_blas_matmul(kernels, rows, cols, X, out)
    return out


def warm_up(ggml_types: Iterable) -> None:
    """Load (or compile) every kernel path a forward pass takes for these types, on tiny zero weights.

    Numba loads each kernel on its first call; doing it before any weight is read lets the
    engine hand back the compiler's pages (``release_compiler_pages``) before the budget fills.
    """
    for t in {_type(g) for g in ggml_types if is_supported(g)}:
        cols = _kernels(t).block_size * max(1, 256 // _kernels(t).block_size)
        raw = np.zeros(4 * row_bytes(t, cols), dtype=np.uint8)
        dequantize(raw, t, cols)
        for n in (1, 2, FUSED_MATMUL_MAX_VECTORS + 1):  # mat-vec, several vectors, the tiled BLAS path
            matmul(raw, t, cols, np.zeros((n, cols), dtype=np.float32))
    cache = np.zeros((1, 1, 8), dtype=np.float16)  # attention over the KV cache: decoding, and a prompt
    attend(np.zeros((1, 1, 8), dtype=np.float32), cache, cache, 0)
    halves_heads_first(cache)


def _tiled_blas_matmul(kernels: TypeKernels, rows: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray) -> None:
    """out = X @ W.T, a tile of rows at a time: dequantize into a per-thread scratch, then BLAS.

    Tiles go to a small pool of threads, each running single-threaded numba and BLAS (both
    release the GIL). Idle workers take the next tile, so a core lost to another process slows
    the product in proportion; OpenBLAS's own threads wait at a barrier for a descheduled peer
    and measured 20-40x slower on small products, and slower on large ones, with one core busy.
    """
    tile_rows = min(max(16, _TILE_BYTES // (4 * cols)), rows.shape[0])
    starts = range(0, rows.shape[0], tile_rows)

    def one_tile(first: int) -> None:
        last = min(first + tile_rows, rows.shape[0])
        tile = _scratch_buffer(tile_rows * cols).reshape(tile_rows, cols)[: last - first]
        numba.set_num_threads(1)  # per calling thread
        kernels.dequantize(rows[first:last], tile)
        # W_tile @ X.T measured 3x faster with OpenBLAS than X @ W_tile.T in these shapes, and
        # writing through ``out=`` into a strided slice misses BLAS: compute fresh, copy in.
        out[:, first:last] = (tile @ X.T).T

    workers = min(numba.get_num_threads(), len(starts))
    if workers <= 1:
        threads = numba.get_num_threads()
        try:
            for first in starts:
                one_tile(first)
        finally:
            numba.set_num_threads(threads)
        return
    list(_tile_pool(workers).map(one_tile, starts))


_pools: dict[int, ThreadPoolExecutor] = {}


def _tile_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of ``workers`` threads for BLAS tiles, made once."""
    pool = _pools.get(workers)
    if pool is None:
        pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="pagellm-blas")
    return pool


def _scratch_buffer(n_floats: int) -> np.ndarray:
    """A reusable float32 buffer of at least ``n_floats`` for this thread (no page faults per call)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < n_floats:
        buffer = np.empty(n_floats, dtype=np.float32)
        _scratch.buffer = buffer
    return buffer[:n_floats]


@contextmanager
def threads_limited(n: int | None) -> Iterator[None]:
    """Run numba kernels launched from this thread on at most ``n`` threads inside the block (None: no limit)."""
    before = numba.get_num_threads()
    if n is None or n >= before:
        yield
        return
    numba.set_num_threads(max(1, n))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def get_num_threads() -> int:
    """The number of threads numba kernels launched from the calling thread use."""
    return numba.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the number of threads numba kernels launched from the calling thread use."""
    numba.set_num_threads(n)
