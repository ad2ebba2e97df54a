"""Money arithmetic on integer minor units: the only place that rounds.

Every amount in the service is an ``int`` of the currency's minor unit. The two
operations that can create a fractional minor unit live here:

- :func:`proportion` scales one amount by a ratio and rounds half away from
  zero (a single value);
- :func:`allocate` splits one amount into parts by weights with the
  largest-remainder method, so the parts always add up to the whole.

Both work on integers only (no float, no Decimal), so results are exact and
the same on every machine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BASIS_POINTS = 10_000
_CURRENCY = re.compile(r"[a-z]{3}")


def is_currency(code: str) -> bool:
    """A lowercase ISO 4217 alphabetic code, such as ``usd`` or ``jpy``."""
    return _CURRENCY.fullmatch(code) is not None


def round_half_away(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half away from zero."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    magnitude = (2 * abs(numerator) + denominator) // (2 * denominator)
    return magnitude if numerator >= 0 else -magnitude


def proportion(amount: int, part: int, whole: int) -> int:
    """``amount * part / whole``, rounded half away from zero; 0 when whole is 0."""
    if whole == 0:
        return 0
    return round_half_away(amount * part, whole)


def basis_points(amount: int, bps: int) -> int:
    """``amount * bps / 10_000``, rounded half away from zero."""
    return round_half_away(amount * bps, BASIS_POINTS)


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` over ``weights`` so that the parts sum to ``total`` exactly.

    Largest-remainder method: each part is first floored, then the minor units
    left over go one each to the parts with the largest fractional remainders,
    ties going to the earlier part. Weights must be non-negative; when they are
    all zero the total must be zero too.
    """
    if total < 0:
        raise ValueError("total must not be negative")
    if any(weight < 0 for weight in weights):
        raise ValueError("weights must not be negative")
    whole = sum(weights)
    if whole == 0:
        if total != 0:
            raise ValueError("cannot allocate a non-zero total over zero weights")
        return [0 for _ in weights]
    floors = [total * weight // whole for weight in weights]
    remainders = [total * weight % whole for weight in weights]
    leftover = total - sum(floors)
    by_remainder = sorted(range(len(weights)), key=lambda index: (-remainders[index], index))
    for index in by_remainder[:leftover]:
        floors[index] += 1
    return floors
