"""Command-line value syntax shared by the scheduler-override and guidance-spec parsers
(:mod:`fewstep.samplers.registry`, :mod:`fewstep.guidance.spec`). Pure Python: no torch."""

from __future__ import annotations

import json
import math
from typing import Any


def parse_value(text: str) -> Any:
    """A command-line value: JSON (numbers, true/false/null, lists, quoted strings), ``inf``/``-inf``,
    Python-style ``True``/``False``/``None``, otherwise the string itself."""
    s = text.strip()
    low = s.lower()
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    if low in ("-inf", "-infinity"):
        return -math.inf
    if s in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[s]
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets/quotes (so ``karras_rho=7,timesteps=[999,500]`` works)."""
    parts, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts
