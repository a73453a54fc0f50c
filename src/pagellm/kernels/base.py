"""The contract every GGML-type kernel module fulfils."""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class TypeKernels(NamedTuple):
    """Kernels for one GGML type, operating on raw block bytes as stored in the GGUF file.

    ``raw`` is always a C-contiguous uint8 array of shape ``(rows, row_bytes)`` (a view over
    the pager's buffer), where one row holds ``cols`` weights (``cols`` = GGUF ``ne[0]``).

    - ``dequantize(raw, out)``: writes float32 ``out[rows, cols]``.
    - ``matvec(raw, x, out)``: ``out[r] = sum_c W[r, c] * x[c]`` for float32 ``x[cols]``,
      ``out[rows]``; fused (never materialises W), numba ``parallel=True, nogil=True, cache=True``.
    - ``quantizes_activations``: ``matvec`` multiplies by x rounded to Q8_0 blocks, as llama.cpp
      does for this type (``activations``); every other path of ``matmul`` rounds x the same way.
    """

    block_size: int  # weights per block
    type_size: int  # bytes per block
    dequantize: Callable[[np.ndarray, np.ndarray], None]
    matvec: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
    quantizes_activations: bool = False
