"""Amounts shown to people: major units with the currency, exact for every integer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.entrypoints.display import exponent, major_units, money


def test_two_decimal_currencies_show_cents() -> None:
    assert money(6000, "usd") == "60.00 USD"
    assert money(5, "eur") == "0.05 EUR"
    assert money(123456789, "usd") == "1,234,567.89 USD"


def test_zero_and_three_decimal_currencies_follow_iso_4217() -> None:
    assert money(1500, "jpy") == "1,500 JPY"
    assert money(1500, "kwd") == "1.500 KWD"


def test_negative_amounts_keep_their_sign() -> None:
    assert major_units(-5, "usd") == "-0.05"


def test_nothing_shows_as_empty() -> None:
    assert money(None, "usd") == ""


@given(st.integers(min_value=-(10**18), max_value=10**18),
       st.sampled_from(["usd", "jpy", "kwd", "clf", "eur"]))
def test_the_shown_amount_reads_back_to_the_same_minor_units(amount: int, currency: str) -> None:
    shown = major_units(amount, currency).replace(",", "")
    negative = shown.startswith("-")
    whole, _, fraction = shown.lstrip("-").partition(".")
    assert len(fraction) == exponent(currency)
    value = int(whole) * 10 ** exponent(currency) + int(fraction or 0)
    assert (-value if negative else value) == amount
