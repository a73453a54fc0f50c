"""pagellm: run GGUF language models in less RAM than the model, under a declared offload policy.

The names below load lazily, so ``import pagellm`` (and ``pagellm --help``) stays fast: the engine
pulls in numba kernels, which take a while to import.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("pagellm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "LLM": "pagellm.api",
    "EngineConfig": "pagellm.engine",
    "InferenceEngine": "pagellm.engine",
    "GenerationError": "pagellm.engine",
    "OffloadPolicy": "pagellm.offload.policy",
    "NoOffload": "pagellm.offload.policy",
    "Budget": "pagellm.offload.policy",
    "PinnedHotSet": "pagellm.offload.policy",
    "SamplerConfig": "pagellm.sampling",
}

if TYPE_CHECKING:
    from pagellm.api import LLM
    from pagellm.engine import EngineConfig, GenerationError, InferenceEngine
    from pagellm.offload.policy import Budget, NoOffload, OffloadPolicy, PinnedHotSet
    from pagellm.sampling import SamplerConfig


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagellm' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "__version__"]
