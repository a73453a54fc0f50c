"""Kernel speed per GGML type: mat-vec GB/s of weight bytes and ms per call, dequantize speed.

Usage: python benchmarks/kernels.py [--types Q4_0,Q8_0] [--threads 1,2] [--crossover]

Weights are 2048x5632 and 5632x2048 (rows x cols: a TinyLlama-sized feed-forward pair). Each
call reads a different copy of the weights, enough copies to overflow the last-level cache, so
the figures are what decoding a model larger than the cache sees; the first line measures the
machine's plain read bandwidth the same way, the ceiling a mat-vec can reach. Times are the best
of all calls, with the median beside it (this is meant for shared, noisy machines too). ``--crossover`` also times
matmul with n vectors, fused kernel against tiled dequantize + BLAS, the basis of
``pagellm.kernels.FUSED_MATMUL_MAX_VECTORS``.
"""
from __future__ import annotations

import argparse
import time

import gguf
import numba
import numpy as np
from gguf import GGMLQuantizationType as T

from pagellm import kernels

SHAPES = ((2048, 5632), (5632, 2048))
CACHE_OVERFLOW_BYTES = 256 << 20  # total bytes cycled through per measurement: well past any L3
TRIALS = 5
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
              T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_weights(t: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes [rows, row_bytes] of valid random weights (finite f16 scales)."""
    if t in (T.F32, T.F16, T.BF16):
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        if t == T.F32:
            return w.view(np.uint8)
        return w.astype(np.float16).view(np.uint8) if t == T.F16 else gguf.quants.BF16.quantize(w)
    block_size, type_size = gguf.GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[t]:
        scales = rng.uniform(-0.01, 0.01, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def copies_past_cache(raw: np.ndarray) -> list[np.ndarray]:
    """Distinct copies of ``raw`` adding up to CACHE_OVERFLOW_BYTES (at least 2)."""
    n = max(2, -(-CACHE_OVERFLOW_BYTES // raw.nbytes))
    return [raw] + [raw.copy() for _ in range(n - 1)]


def call_seconds(call, n_variants: int) -> tuple[float, float]:
    """(best, median) seconds of one call over TRIALS passes through ``n_variants`` inputs.

    The best call is what the kernel can do; the median shows how much a busy machine took away.
    """
    call(0)
    seconds = []
    for _ in range(TRIALS):
        for i in range(n_variants):
            start = time.perf_counter()
            call(i)
            seconds.append(time.perf_counter() - start)
    return float(np.min(seconds)), float(np.median(seconds))


@numba.njit(parallel=True, nogil=True, fastmath=True)
def _sum_rows(matrix):
    sums = np.empty(matrix.shape[0], dtype=np.float32)
    for r in numba.prange(matrix.shape[0]):
        row = matrix[r]
        total = np.float32(0.0)
        for c in range(row.shape[0]):
            total += row[c]
        sums[r] = total
    return sums


def read_bandwidth(threads: int) -> float:
    """GB/s of summing the rows of 1 GiB of float32 with ``threads`` threads: the mat-vec ceiling."""
    kernels.set_num_threads(threads)
    matrix = np.ones(((1 << 30) // 4 // 4096, 4096), dtype=np.float32)
    return matrix.nbytes / call_seconds(lambda i: _sum_rows(matrix), 3)[0] / 1e9


def bench_type(t: T, thread_counts: list[int], rng: np.random.Generator) -> None:
    for rows, cols in SHAPES:
        variants = copies_past_cache(random_weights(t, rows, cols, rng))
        nbytes = variants[0].nbytes
        x = rng.standard_normal(cols, dtype=np.float32)
        out = np.empty(rows, dtype=np.float32)
        figures = []
        for threads in thread_counts:
            kernels.set_num_threads(threads)
            best, median = call_seconds(lambda i: kernels.matvec(variants[i], t, cols, x, out), len(variants))
            figures.append(f"{threads}T {nbytes / best / 1e9:5.1f} GB/s {best * 1e3:5.2f} ms (median {median * 1e3:5.2f})")
        kernels.set_num_threads(thread_counts[-1])
        best, _ = call_seconds(lambda i: kernels.dequantize(variants[i], t, cols), min(len(variants), 4))
        print(f"{t.name:5s} {rows:5d}x{cols:<5d} {nbytes / 1e6:5.1f} MB | matvec " + " | ".join(figures)
              + f" | dequantize {thread_counts[-1]}T {rows * cols / best / 1e9:5.2f} Gweights/s {best * 1e3:5.2f} ms",
              flush=True)


def bench_crossover(t: T, threads: int, rng: np.random.Generator) -> None:
    kernels.set_num_threads(threads)
    kernel = kernels.KERNELS[t]
    for rows, cols in SHAPES:
        raw = random_weights(t, rows, cols, rng)
        for n in (1, 2, 4, 8, 12, 16, 32, 64):
            X = rng.standard_normal((n, cols), dtype=np.float32)
            out = np.empty((n, rows), dtype=np.float32)

            def fused(i):
                if t in kernels._MULTI_VECTOR_TYPES:
                    kernel.matvec(raw, X, out)
                else:
                    for v in range(n):
                        kernel.matvec(raw, X[v], out[v])

            f = call_seconds(fused, 3)[0]
            b = call_seconds(lambda i: kernels._tiled_blas_matmul(kernel, raw, cols, X, out), 3)[0]
            print(f"{t.name:5s} {rows:5d}x{cols:<5d} n={n:3d} fused {f * 1e3:7.2f} ms  tiled BLAS {b * 1e3:7.2f} ms"
                  f"  {'fused' if f < b else 'BLAS'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(t.name for t in sorted(kernels.SUPPORTED_TYPES, key=lambda t: t.value)))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--crossover", action="store_true", help="also time matmul: fused vs tiled BLAS")
    args = parser.parse_args()
    types = [T[name.strip()] for name in args.types.split(",")]
    thread_counts = [int(n) for n in args.threads.split(",")]
    rng = np.random.default_rng(0)
    print("read bandwidth: " + " | ".join(f"{n}T {read_bandwidth(n):5.1f} GB/s" for n in thread_counts), flush=True)
    for t in types:
        bench_type(t, thread_counts, rng)
    if args.crossover:
        for t in types:
            bench_crossover(t, thread_counts[-1], rng)


if __name__ == "__main__":
    main()
