"""One rule for turning "how many" into a count: of weights, of ranks, of anything.

An amount is either a count or a fraction of a whole n, and says which:

    count(16)        16, checked to lie in [0, n]
    fraction(0.05)   ⌊0.05·n⌋, in exact arithmetic on the decimal typed (``count_for``)

Plain numbers keep their conventional meaning (an ``int`` is a count, a ``float`` a fraction:
``r=1`` is one rank, ``r=1.0`` all of them), and strings from the command line say it
explicitly: ``"16"`` is a count, ``"0.9"`` or ``"90%"`` a fraction. Selection, the rank-level
edits and the analysis all resolve amounts here, so the same amount means the same count in
each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Amount", "amount", "count", "count_for", "fraction", "resolve"]


def count_for(fraction: float, n: int, name: str = "fraction") -> int:
    """k = ⌊fraction·n⌋ for a fraction in [0, 1], in exact integer arithmetic on the decimal the
    float stands for (its shortest repr: 0.29 is 29/100, not 0.28999999999999998), so a count is
    what a person means on every shape: 0.29·100 = 29, and 0.97·(11008·4096) is not one more
    than ⌊0.97·45088768⌋ as a relative tolerance would make it."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    return math.floor(Fraction(repr(float(fraction))) * n)


@dataclass(frozen=True)
class Amount:
    """A count (``is_fraction=False``) or a fraction of a whole."""

    value: int | float
    is_fraction: bool

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else str(self.value)

    def of(self, n: int, name: str = "amount", *, whole: str = "n", where: str = "") -> int:
        """The count this amount stands for out of ``n``; an amount that does not fit is an
        error naming ``name``, the ``whole`` (e.g. "R") and ``where`` (e.g. a layer)."""
        prefix = f"{where}: " if where else ""
        if self.is_fraction:
            if not 0.0 <= self.value <= 1.0:
                raise ValueError(
                    f"{prefix}{name} = {self.value} as a fraction of {whole} must lie in [0, 1]"
                )
            return count_for(self.value, n, name)
        if not 0 <= self.value <= n:
            raise ValueError(
                f"{prefix}{name} = {self.value} is outside [0, {whole}] = [0, {n}]; give a "
                f"fraction of {whole} (a float, or pyattr.counts.fraction) to treat sizes alike"
            )
        return self.value


def count(n: int) -> Amount:
    """An explicit count."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"a count must be an int, got {n!r}")
    return Amount(n, False)


def fraction(f: float) -> Amount:
    """An explicit fraction of the whole (``fraction(1)`` is all of it)."""
    if isinstance(f, bool) or not isinstance(f, (int, float)):
        raise TypeError(f"a fraction must be a number, got {f!r}")
    return Amount(float(f), True)


def amount(value: Amount | int | float | str, name: str = "amount") -> Amount:
    """``value`` as an Amount: an int is a count, a float a fraction, a string "16" a count and
    "0.9" or "90%" a fraction."""
    if isinstance(value, Amount):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a count or a fraction, got {value!r}")
    if isinstance(value, int):
        return count(value)
    if isinstance(value, float):
        return fraction(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                return fraction(float(text[:-1]) / 100)
            if any(c in text for c in ".eE"):
                return fraction(float(text))
            return count(int(text))
        except ValueError:
            raise ValueError(
                f"{name} must be a count (16) or a fraction (0.9 or 90%), got {value!r}"
            ) from None
    raise TypeError(f"{name} must be a count or a fraction, got {type(value).__name__}")


def resolve(
    value: Amount | int | float | str | None,
    n: int,
    name: str = "amount",
    *,
    whole: str = "n",
    where: str = "",
) -> int | None:
    """The count ``value`` stands for out of ``n`` (``None`` stays ``None``)."""
    if value is None:
        return None
    return amount(value, name).of(n, name, whole=whole, where=where)
