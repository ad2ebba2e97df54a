"""How amounts and event names are shown to people: ``60.00 USD``, ``credit_note.issued``.

Money travels as integer minor units; a person reads major units with the
currency. The conversion is integer arithmetic on the currency's exponent
(ISO 4217), never a float.
"""

from __future__ import annotations

#: ISO 4217 currencies whose minor unit is not a hundredth (the rest have two decimals).
_EXPONENTS = {
    **dict.fromkeys(("bif", "clp", "djf", "gnf", "isk", "jpy", "kmf", "krw", "mga", "pyg",
                     "rwf", "ugx", "uyi", "vnd", "vuv", "xaf", "xof", "xpf"), 0),
    **dict.fromkeys(("bhd", "iqd", "jod", "kwd", "lyd", "omr", "tnd"), 3),
    **dict.fromkeys(("clf", "uyw"), 4),
}


def exponent(currency: str) -> int:
    """How many decimals the currency's major unit has (2 unless ISO 4217 says otherwise)."""
    return _EXPONENTS.get(currency.lower(), 2)


def major_units(amount: int, currency: str) -> str:
    """``6000, "usd"`` -> ``"60.00"``; ``1500, "jpy"`` -> ``"1,500"`` (thousands separated)."""
    places = exponent(currency)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**places)
    return f"{sign}{whole:,}" + (f".{fraction:0{places}d}" if places else "")


def money(amount: int | None, currency: str) -> str:
    """An amount as a person reads it: ``60.00 USD``; empty when there is none."""
    if amount is None:
        return ""
    return f"{major_units(amount, currency)} {currency.upper()}"
