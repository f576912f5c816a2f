"""Sizes as people write them: '8G' in, '7.50 GiB' out.

Owns KiB/MiB/GiB, `parse_bytes` (what --vram reads) and `format_bytes` (how the plan prints bytes). A leaf of the
planner: imports tinyrl.errors only.
"""

from __future__ import annotations

import re

from tinyrl.errors import UserError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'8G', '7.5GiB', '8000M', '8GB' or a plain byte count -> bytes. K/M/G/T and KiB..TiB are binary
    (powers of 1024), KB..TB are decimal, as `--vram 8G` means the 8 GiB a card advertises.

    >>> parse_bytes("8G") == 8 * 2**30, parse_bytes("8000M") == 8000 * 2**20, parse_bytes("8GB")
    (True, True, 8000000000)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UserError(f"cannot read the size {text!r}: write it like 8G, 7.5GiB, 8000M or 8GB")
        number, prefix, suffix = match.groups()
        power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
        decimal = suffix.lower() == "b" and power > 0  # "GB" without the i
        value = int(float(number) * ((1000 if decimal else 1024) ** power))
    if value <= 0:
        raise UserError(f"the size {text!r} must be more than 0 bytes")
    return value


def format_bytes(n: float) -> str:
    """Bytes for people: '512.0 MiB', '7.50 GiB'."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"
