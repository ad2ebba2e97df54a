"""Derived ids computed with SHA-1 directly are the ids ``uuid.uuid5`` gave (issue 13).

Credit-note, event and refund ids are stored and published; the redelivery of
an event finds its first effect by them. A different id for the same trigger
would make a redelivered event a second credit note, so the fast function must
give exactly the bytes ``uuid.uuid5`` gave, for any name.
"""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from service.domain.commands import Trigger
from service.domain.credit_note import derived_id
from service.domain.refunds import PaymentCash, refund_id_for, uuid5_hex

#: the namespaces the ids have always used (changing one changes every id)
NOTES = uuid.UUID("6c1f3a52-8d0e-4b7c-9f51-2f1d6a0c7e11")
REFUNDS = uuid.UUID("0b9e3c5e-7f44-4a53-9a53-5be4d1f0c2a7")

names = st.text(alphabet=st.characters(codec=None), max_size=300)  # surrogates too


@given(namespace=st.binary(min_size=16, max_size=16), name=names)
def test_uuid5_hex_is_uuid5_for_any_namespace_and_name(namespace: bytes, name: str) -> None:
    try:
        expected = uuid.uuid5(uuid.UUID(bytes=namespace), name).hex
    except UnicodeEncodeError:  # a lone surrogate: refused by both, never a different id
        try:
            uuid5_hex(namespace, name)
        except UnicodeEncodeError:
            return
        raise AssertionError("uuid5_hex encoded a name uuid5 refuses") from None
    assert uuid5_hex(namespace, name) == expected


@given(source=names, id_=names, purpose=names, prefix=st.sampled_from(["cn", "evt", "x"]))
def test_derived_ids_are_the_uuid5_ids(source: str, id_: str, purpose: str, prefix: str) -> None:
    trigger = Trigger(source, id_, "credit_note.issue")
    try:
        expected = prefix + "_" + uuid.uuid5(NOTES, "\n".join((source, id_, purpose))).hex[:24]
    except UnicodeEncodeError:
        return
    assert derived_id(prefix, trigger, purpose) == expected


@given(note=names, payment_id=st.none() | names, sequence=st.integers(1, 10**6))
def test_refund_ids_are_the_uuid5_ids(note: str, payment_id: str | None, sequence: int) -> None:
    name = f"+{payment_id}" if payment_id is not None else f"#{sequence}"
    try:
        expected = "rf_" + uuid.uuid5(REFUNDS, f"{note}\n{name}").hex[:24]
    except UnicodeEncodeError:
        return
    assert refund_id_for(note, PaymentCash(sequence, payment_id, applied=100)) == expected


def test_ids_already_stored_do_not_change() -> None:
    """Computed by the code before issue 13 (``uuid.uuid5``)."""
    trigger = Trigger("/billing", "evt_1", "credit_note.issue")
    assert derived_id("cn", trigger) == "cn_4ba6ecedcad55a09abbdc085"
    assert derived_id("evt", trigger, "credit_note.issued") == "evt_71833e8e5d3056869ce14bd4"
    assert refund_id_for("cn_1", PaymentCash(1, "pay_1", applied=5)) == "rf_0f705411ee0654dc80f036a7"
    assert refund_id_for("cn_1", PaymentCash(2, None, applied=5)) == "rf_4f11abad865d5a00a1a0a886"
