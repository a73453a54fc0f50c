"""OffloadPolicy: what the user declares about keeping weights in RAM."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Union

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,  # llama.cpp / ollama habit: 4G means GiB
    "m": 2**20,
    "g": 2**30,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse '4GiB', '512MB', '1.5g' or a plain byte count into bytes; ValueError otherwise."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(
            f"bad size {text!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 4GiB"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be greater than zero")
    return value


def format_size(nbytes: float) -> str:
    """Bytes as a short human figure in binary units (e.g. '1.50 GiB')."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _check_budget(ram_bytes: object) -> None:
    if isinstance(ram_bytes, bool) or not isinstance(ram_bytes, int) or ram_bytes <= 0:
        raise ValueError(f"ram_bytes must be a positive integer number of bytes, got {ram_bytes!r}")


class OffloadPolicy:
    """Base of the policy variants; ``OffloadPolicy.parse`` reads the command-line spelling."""

    def ram_budget_bytes(self) -> int | None:
        """Bytes of weights the pager may hold, or None for no limit."""
        return None

    def is_disabled(self) -> bool:
        """True only for NoOffload: every weight stays in RAM and no pager is built."""
        return False

    @staticmethod
    def parse(text: str) -> "AnyPolicy":
        """Parse 'none', 'budget:4GiB', 'pinned:4GiB,embeddings=no,head=yes,last=4,prefetch=2'."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty offload policy: expected none, budget:SIZE or pinned:SIZE[,key=value...]")
        spec = text.strip()
        kind, _, rest = spec.partition(":")
        kind = kind.strip().lower()
        if kind in ("none", "no", "off"):
            if rest.strip():
                raise ValueError(f"offload policy {text!r}: 'none' takes no arguments")
            return NoOffload()
        if kind not in ("budget", "pinned"):
            raise ValueError(
                f"unknown offload policy {kind!r} in {text!r}: expected none, budget:SIZE or pinned:SIZE[,...]"
            )
        parts = [p.strip() for p in rest.split(",")]
        if not parts[0]:
            raise ValueError(f"offload policy {text!r}: missing size, e.g. {kind}:4GiB")
        ram_bytes = parse_size(parts[0])
        options = parts[1:]
        if kind == "budget":
            if options:
                raise ValueError(f"offload policy {text!r}: 'budget' takes only a size")
            return Budget(ram_bytes)
        return PinnedHotSet(ram_bytes, **_parse_pinned_options(text, options))


_BOOL_WORDS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
_PINNED_KEYS = {
    "embeddings": ("pin_embeddings", "bool"),
    "head": ("pin_output_head", "bool"),
    "last": ("pin_last_n_layers", "int"),
    "prefetch": ("prefetch_n_ahead", "int"),
}


def _parse_pinned_options(text: str, options: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for option in options:
        key, eq, value = (s.strip() for s in option.partition("="))
        if not eq or not value:
            raise ValueError(f"offload policy {text!r}: option {option!r} must be key=value")
        if key.lower() not in _PINNED_KEYS:
            raise ValueError(
                f"offload policy {text!r}: unknown key {key!r} (expected {', '.join(_PINNED_KEYS)})"
            )
        field, kind = _PINNED_KEYS[key.lower()]
        if kind == "bool":
            if value.lower() not in _BOOL_WORDS:
                raise ValueError(f"offload policy {text!r}: {key}={value!r} must be yes or no")
            out[field] = _BOOL_WORDS[value.lower()]
        else:
            if not value.isdigit():
                raise ValueError(f"offload policy {text!r}: {key}={value!r} must be a whole number >= 0")
            out[field] = int(value)
    return out


@dataclass(frozen=True)
class NoOffload(OffloadPolicy):
    """Every weight stays in RAM, as llama.cpp does."""

    def is_disabled(self) -> bool:
        return True

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class Budget(OffloadPolicy):
    """At most ``ram_bytes`` of weights resident; the pager evicts to fit."""

    ram_bytes: int

    def __post_init__(self) -> None:
        _check_budget(self.ram_bytes)

    def ram_budget_bytes(self) -> int | None:
        return self.ram_bytes

    def __str__(self) -> str:
        return f"budget:{self.ram_bytes}B"


@dataclass(frozen=True)
class PinnedHotSet(OffloadPolicy):
    """Like Budget, with embeddings, output head and the last N layers pinned, and prefetch."""

    ram_bytes: int
    pin_embeddings: bool = True
    pin_output_head: bool = True
    pin_last_n_layers: int = 0
    prefetch_n_ahead: int = 1

    MAX_PREFETCH: ClassVar[int] = 64

    def __post_init__(self) -> None:
        _check_budget(self.ram_bytes)
        for name in ("pin_embeddings", "pin_output_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        n = self.pin_last_n_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"pin_last_n_layers must be an integer >= 0, got {n!r}")
        p = self.prefetch_n_ahead
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= self.MAX_PREFETCH:
            raise ValueError(f"prefetch_n_ahead must be an integer from 0 to {self.MAX_PREFETCH}, got {p!r}")

    def ram_budget_bytes(self) -> int | None:
        return self.ram_bytes

    def __str__(self) -> str:
        yn = {True: "yes", False: "no"}
        return (
            f"pinned:{self.ram_bytes}B,embeddings={yn[self.pin_embeddings]},head={yn[self.pin_output_head]},"
            f"last={self.pin_last_n_layers},prefetch={self.prefetch_n_ahead}"
        )


AnyPolicy = Union[NoOffload, Budget, PinnedHotSet]
