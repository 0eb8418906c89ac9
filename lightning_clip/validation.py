"""Argument checks shared by the callback, the clip rules and the remedies.

Each raises ``ValueError`` with a message that names the argument in backquotes, the value and what is
allowed: ``GradientClippingCLI`` turns that message into one ``error:`` line naming the YAML key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def _is_number(value: Any) -> bool:
    # numbers.Real takes numpy's scalars (np.float32, np.int64: numpy registers them) without importing numpy;
    # np.bool_ is not registered. bool is an int to Python, but `eps: true` in a YAML file is a mistake, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    """A real number that is not NaN (±inf allowed here; callers narrow it). numpy scalars count, bools do not."""
    if value is None and allow_none:
        return
    if not _is_number(value) or math.isnan(value):
        kind = "a number or None" if allow_none else "a number"
        raise ValueError(f"`{name}` must be {kind}, got {value!r} ({type(value).__name__}).")


def check_positive(name: str, value: Any, *, allow_inf: bool = False, allow_none: bool = False) -> None:
    """``value > 0``; finite unless ``allow_inf``; None only if ``allow_none``."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"`{name}` is required: a positive number, got None.")
    check_number(name, value)
    if value <= 0 or (math.isinf(value) and not allow_inf):
        allowed = "a positive number or float('inf')" if allow_inf else "a finite positive number"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def check_finite(name: str, value: Any, *, allow_none: bool = False) -> None:
    """A finite real number (None only if ``allow_none``)."""
    check_number(name, value, allow_none=allow_none)
    if value is not None and math.isinf(value):
        raise ValueError(f"`{name}` must be a finite number{' or None' if allow_none else ''}, got {value!r}.")


def check_in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = True,
    high_open: bool = True,
    allow_none: bool = False,
) -> None:
    """``low < value < high`` (each end open or closed)."""
    if value is None and allow_none:
        return
    check_number(name, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {interval}{' or None' if allow_none else ''}, got {value!r}.")


def check_count(name: str, value: Any, *, allow_none: bool = True) -> None:
    """A positive integer (or None); numpy integers count, bools do not."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    """One of ``allowed``."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")


def check_optional_str(name: str, value: Any | None) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string or None, got {value!r}.")


def check_read(kind: str, choice: str, reads: Iterable[str], settings: dict[str, Any] | None) -> dict[str, Any]:
    """Refuse a setting (not None) that the chosen ``kind`` (``mode``/``nan_policy``) would silently ignore.

    ``reads``: the option names the choice reads. Returns the settings that are set.
    """
    reads = tuple(reads)
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    ignored = {k: v for k, v in given.items() if k not in reads}
    if ignored:
        listed = ", ".join(f"{k}={v!r}" for k, v in ignored.items())
        raise ValueError(
            f"`{next(iter(ignored))}` does not apply to {kind}={choice!r} (it reads {', '.join(reads) or 'no option'});"
            f" got {listed}."
        )
    return given
