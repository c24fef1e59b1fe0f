"""Byte helpers. Bytes are ints everywhere inside; GiB (2**30) only when shown."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def format_gib(n_bytes: float, digits: int = 2) -> str:
    """'12.34 GiB'; keeps the sign so deltas read naturally."""
    return f"{n_bytes / GiB:,.{digits}f} GiB"


def format_bytes(n_bytes: float) -> str:
    """Human size with binary units, for small numbers (workspaces, per-layer costs)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """Parameter counts: 8.03B, 124.4M, 6.7K."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= threshold:
            return f"{n / threshold:.2f}{suffix}" if suffix in "TB" else f"{n / threshold:.1f}{suffix}"
    return str(int(n))
