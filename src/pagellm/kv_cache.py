"""Preallocated key/value cache for one sequence."""
from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values per layer and position, stored as float16 as llama.cpp stores them.

    The arrays are allocated once for the whole context; their pages are only touched, and so
    only count towards the process's memory, as positions fill.
    """

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, dtype: type = np.float16):
        self.n_ctx = n_ctx
        self.keys = np.zeros((n_layer, n_ctx, n_head_kv, head_dim), dtype=dtype)
        self.values = np.zeros((n_layer, n_ctx, n_head_kv, head_dim), dtype=dtype)
        self.n_tokens = 0  # positions filled (shared by all layers once a forward pass completes)

    @property
    def nbytes(self) -> int:
        """Bytes the cache takes when full."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes holding filled positions."""
        return self.nbytes * self.n_tokens // self.n_ctx

    def room(self) -> int:
        """Positions still free."""
        return self.n_ctx - self.n_tokens

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write keys/values for positions ``start .. start+len(k)`` of ``layer``."""
        end = start + k.shape[0]
        if end > self.n_ctx:
            raise ValueError(f"context full: position {end - 1} is beyond the context of {self.n_ctx}")
        self.keys[layer, start:end] = k
        self.values[layer, start:end] = v

    def truncate(self, n_tokens: int) -> None:
        """Forget positions from ``n_tokens`` on (to reuse a shared prompt prefix)."""
        self.n_tokens = max(0, min(n_tokens, self.n_tokens))

    def reset(self) -> None:
        """Forget every position."""
        self.n_tokens = 0
