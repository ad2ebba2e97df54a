"""The issue form's amounts: what a page shows can be typed back, to the minor unit, in
every currency (a person copies ``1,500`` JPY or ``12.345`` KWD from the invoice page)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import FormData

from service.entrypoints.console.pages import FormProblem, issue_data, minor_units
from service.entrypoints.display import major_units

CURRENCIES = ["usd", "jpy", "kwd", "clf", "eur"]


@given(amount=st.integers(min_value=0, max_value=10**15), currency=st.sampled_from(CURRENCIES))
def test_a_shown_amount_reads_back_as_the_same_minor_units(amount: int, currency: str) -> None:
    assert minor_units(major_units(amount, currency), currency, "amount") == amount


@pytest.mark.parametrize("text", ["1.234", "-5", "1e3", "12.", "１２", "0x10", "1.2.3", "abc"])
def test_an_amount_that_is_not_one_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(FormProblem) as refused:
        minor_units(text, "usd", "refund_amount")
    assert refused.value.field == "refund_amount"


def test_the_form_becomes_the_contracts_credit_note_issue_data() -> None:
    form = FormData([
        ("mode", "lines"), ("reason", "product_unsatisfactory"), ("memo", "broken"),
        ("line-0-id", "il_1"), ("line-0-quantity", "1"), ("line-0-amount", ""),
        ("line-1-id", "il_2"), ("line-1-quantity", ""), ("line-1-amount", "12.50"),
        ("line-2-id", "il_3"), ("line-2-quantity", ""), ("line-2-amount", ""),
        ("refund_amount", "10"), ("credit_amount", ""), ("out_of_band_amount", "5.5")])
    assert issue_data(form, "usd") == {
        "reason": "product_unsatisfactory", "memo": "broken",
        "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1},
                  {"type": "invoice_line_item", "invoice_line_id": "il_2", "amount": 1250}],
        "refund_amount": 1000, "out_of_band_amount": 550}
    assert issue_data(FormData([("mode", "amount"), ("amount", "1,500")]), "jpy") == {
        "reason": "other", "amount": 1500}
    with pytest.raises(FormProblem, match="at least one line"):
        issue_data(FormData([("mode", "lines"), ("line-0-id", "il_1")]), "usd")
    with pytest.raises(FormProblem, match="not both"):
        issue_data(FormData([("line-0-id", "il_1"), ("line-0-quantity", "1"),
                             ("line-0-amount", "2")]), "usd")
