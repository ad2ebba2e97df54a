"""Allow-list entries ending in ``/*`` admit every source under that prefix (the console
publishes as ``/console/<user>``), and nothing that merely starts with the same letters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.entrypoints.translators import source_allowed

ALLOWED = ["/billing", "/console/*"]


def test_a_prefix_entry_admits_what_is_under_it_and_nothing_else() -> None:
    assert source_allowed("/console/otto", ALLOWED)
    assert source_allowed("/console/a%20b", ALLOWED)
    assert source_allowed("/console/team/otto", ALLOWED)
    assert source_allowed("/billing", ALLOWED)
    for refused in ("/console", "/console/", "/consoles/otto", "/consolex", "/billing/x",
                    "/BILLING", "console/otto", "/console*", ""):
        assert not source_allowed(refused, ALLOWED), refused


def test_an_exact_entry_is_matched_exactly_even_with_a_star_inside() -> None:
    assert source_allowed("/a*b", ["/a*b"])
    assert not source_allowed("/axb", ["/a*b"])
    assert not source_allowed("/anything", ["*"])  # a bare star is no wildcard


@given(user=st.text(min_size=1, max_size=30), other=st.text(max_size=30))
def test_prefix_matching_is_exactly_startswith_the_prefix_and_its_slash(
        user: str, other: str) -> None:
    assert source_allowed(f"/console/{user}", ["/console/*"])
    assert source_allowed(other, ["/console/*"]) == (
        other.startswith("/console/") and len(other) > len("/console/"))
