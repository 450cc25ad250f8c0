"""Range checks for the commands' numeric options: the same rule and the same sentence in train,
eval, bench and profile (a value out of range is refused, never replaced by a default)."""
from __future__ import annotations

import math


def check_ranges(args, minimums: dict[str, float]) -> None:
    """Raise ValueError naming the first option of `minimums` ({dest: smallest allowed value}) that is
    set on `args` (not None) and below its minimum or not a finite number."""
    for dest, low in minimums.items():
        value = getattr(args, dest, None)
        if value is not None:
            check_minimum("-T" if dest == "T" else "--" + dest.replace("_", "-"), value, low)


def check_minimum(flag: str, value: float, low: float) -> None:
    """The sentence of check_ranges for one value: ValueError unless `value` is a finite number >= low."""
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{flag} must be a number >= {low:g}, got {value}")
