"""Make the synthetic benchmark models (TinyLlama-shaped Q8_0/Q4_K/F16, 7B-shaped Q4_0) and time the writes.

Usage: python benchmarks/make_models.py OUT_DIR [--only tinyllama-1b:Q8_0 ...] [--seed S]
Files that already exist are skipped, so the script is cheap to re-run before other benchmarks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pagellm.synth import make_model

MODELS: list[tuple[str, str]] = [
    ("tinyllama-1b", "Q8_0"),
    ("tinyllama-1b", "Q4_K"),
    ("tinyllama-1b", "F16"),
    ("llama-7b", "Q4_0"),
]


def model_path(out_dir: Path, shape: str, ggml_type: str) -> Path:
    """Where the benchmark file for (shape, type) lives."""
    return out_dir / f"synth-{shape}-{ggml_type}.gguf"


def make_one(out_dir: Path, shape: str, ggml_type: str, seed: int) -> None:
    """Write one model unless it exists, printing seconds and MB/s."""
    path = model_path(out_dir, shape, ggml_type)
    if path.exists():
        print(f"{path.name}: exists ({path.stat().st_size / 1e6:.0f} MB), skipped")
        return
    start = time.perf_counter()
    make_model(path, shape, ggml_type, seed=seed)
    seconds = time.perf_counter() - start
    megabytes = path.stat().st_size / 1e6
    print(f"{path.name}: {megabytes:.0f} MB in {seconds:.1f} s = {megabytes / seconds:.0f} MB/s")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and make the requested models."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", nargs="*", metavar="SHAPE:TYPE", help="subset, e.g. llama-7b:Q4_0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    wanted = [tuple(item.split(":", 1)) for item in args.only] if args.only else MODELS
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for shape, ggml_type in wanted:
        make_one(args.out_dir, shape, ggml_type, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
