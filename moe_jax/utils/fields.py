"""Field checks shared by every config dataclass, so that every bad value gets the same error.

    validation.one_of(self, "router", ROUTERS)
    validation.integer(self, "num_experts", minimum=1)
    validation.number(self, "capacity_factor", above=0)

Each check reads `getattr(config, field)` and raises `ConfigError` (a ValueError) worded

    <Class>.<field>=<value!r> <what is wrong>; <how to fix it>.

The experiment schema rewrites `<Class>.` into the config key (`config.moe.`), so an error from
a command-line override names the flag to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A config field holds a value it cannot take."""


def fail(config: Any, field: str, problem: str, fix: str = "", *,
         value: Any = None) -> NoReturn:
    """Raises the ConfigError of `config.field` (or of `value`, when given)."""
    value = getattr(config, field) if value is None else value
    message = f"{type(config).__name__}.{field}={value!r} {problem}"
    raise ConfigError(message + (f"; {fix}" if fix else "") + ".")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(config: Any, field: str, allowed: Sequence[Any], fix: str = "") -> None:
    """The field is one of `allowed`."""
    if getattr(config, field) not in allowed:
        fail(config, field, "is not supported", fix or f"use one of {tuple(allowed)}")


def integer(config: Any, field: str, *, minimum: int = 1, optional: bool = False,
            fix: str = "") -> None:
    """The field is an int >= minimum (or None, if optional)."""
    value = getattr(config, field)
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        kind = "None or an integer" if optional else "an integer"
        fail(config, field, f"must be {kind} >= {minimum}", fix)


def number(config: Any, field: str, *, above: float | None = None,
           at_least: float | None = None, below: float | None = None,
           at_most: float | None = None, fix: str = "") -> None:
    """The field is a finite int or float within the given bounds (open: above/below; closed:
    at_least/at_most)."""
    value = getattr(config, field)
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value)
          and (above is None or value > above) and (at_least is None or value >= at_least)
          and (below is None or value < below) and (at_most is None or value <= at_most))
    if ok:
        return
    low = (f"({above:g}" if above is not None else f"[{at_least:g}"
           if at_least is not None else None)
    high = (f"{below:g})" if below is not None else f"{at_most:g}]"
            if at_most is not None else None)
    if low and high:
        bound = f"in {low}, {high}"
    elif low:
        bound = f"a finite number {'>' if above is not None else '>='} {low[1:]}"
    elif high:
        bound = f"a finite number {'<' if below is not None else '<='} {high[:-1]}"
    else:
        bound = "a finite number"
    fail(config, field, f"must be {bound}", fix)


def boolean(config: Any, field: str) -> None:
    """The field is True or False."""
    if not isinstance(getattr(config, field), bool):
        fail(config, field, "must be True or False")


def text(config: Any, field: str, *, optional: bool = False, fix: str = "") -> None:
    """The field is a non-empty string (or None, if optional)."""
    value = getattr(config, field)
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        fail(config, field, "must be " + ("None or " if optional else "") + "a non-empty string",
             fix)
