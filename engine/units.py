"""Byte helpers. Bytes are ints everywhere inside; GiB (2**30) only when shown."""

from __future__ import annotations

import math

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

MINUS = "−"  # a real minus sign: reads better than a hyphen in columns of deltas


def gib(n_bytes: float) -> float:
    return n_bytes / GiB


def gib_number(n_bytes: float, digits: int = 2, *, signed: bool = False) -> str:
    """The one way memtui writes a GiB figure (without the unit): every screen, table, export and CLI line.

    `digits` decimals below 1,000 GiB and one fewer per further digit, thousands separated: 12.34,
    1,234.5, 12,345, 1,000,000; so a figure stays at most 7 characters up to 10^6 GiB (9 at 10^6) and
    columns never run together. `signed` writes changes: '+1.25', '−3.50', and '0.00' for none.
    """
    value = n_bytes / GiB
    magnitude = abs(value)
    whole_digits = int(math.log10(magnitude)) + 1 if magnitude >= 1 else 1
    for whole in (whole_digits, whole_digits + 1):  # the second pass when rounding adds a digit (999.996)
        decimals = max(digits - max(whole - 3, 0), 0)
        text = f"{magnitude:,.{decimals}f}"
        if len(text.split(".")[0].replace(",", "")) <= whole:
            break
    if float(text.replace(",", "")) == 0:
        return f"{0:.{decimals}f}"  # no "-0.00"
    if value < 0:
        return (MINUS if signed else "-") + text
    return ("+" if signed else "") + text


def format_gib(n_bytes: float, digits: int = 2, *, signed: bool = False) -> str:
    """'12.34 GiB' (gib_number with its unit); keeps the sign so deltas read naturally."""
    return f"{gib_number(n_bytes, digits, signed=signed)} GiB"


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
