"""The one place tests locate ``../shared`` (fixtures, models, tokenizer vectors)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """Return the shared folder beside the repository root (override with PAGELLM_SHARED)."""
    override = os.environ.get("PAGELLM_SHARED")
    path = Path(override) if override else REPO_ROOT.parent / "shared"
    if not path.is_dir():
        raise FileNotFoundError(f"shared folder not found at {path} (set PAGELLM_SHARED)")
    return path


def fixtures_dir() -> Path:
    return shared_dir() / "fixtures"


def fixture_names() -> list[str]:
    """Names of all GGUF fixtures with llama.cpp reference outputs."""
    return sorted(p.stem for p in fixtures_dir().glob("*.gguf"))


def fixture_path(name: str) -> Path:
    return fixtures_dir() / f"{name}.gguf"


def fixture_meta(name: str) -> dict:
    return json.loads((fixtures_dir() / f"{name}.json").read_text())


def fixture_logits(name: str) -> np.ndarray:
    return np.load(fixtures_dir() / f"{name}.logits.npy")


def tokenizer_vectors_dir() -> Path:
    return shared_dir() / "tokenizer-vectors"


def models_dir() -> Path:
    return shared_dir() / "models"
