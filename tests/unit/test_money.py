"""Money arithmetic: single values round half away from zero; spreads add up exactly."""

from __future__ import annotations

import pytest

from service.domain import money


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (5, 2, 3),  # 2.5 -> 3, not banker's 2
        (25, 10, 3),  # 2.5 -> 3
        (15, 10, 2),  # 1.5 -> 2
        (1, 2, 1),  # 0.5 -> 1
        (24_999, 10_000, 2),  # just under a half rounds down
        (25_000, 10_000, 3),  # exactly a half rounds up
        (1, 3, 0),
        (2, 3, 1),
        (7, 7, 1),
        (0, 7, 0),
    ],
)
def test_positive_values_round_half_away_from_zero(numerator: int, denominator: int, expected: int) -> None:
    assert money.round_half_away(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (-5, 2, -3),  # -2.5 -> -3
        (-25, 10, -3),
        (-15, 10, -2),
        (-1, 2, -1),
        (-24_999, 10_000, -2),
        (-1, 3, 0),
        (-2, 3, -1),
    ],
)
def test_negative_values_round_half_away_from_zero(numerator: int, denominator: int, expected: int) -> None:
    assert money.round_half_away(numerator, denominator) == expected


def test_rounding_is_symmetric_around_zero() -> None:
    for numerator in range(-50, 51):
        for denominator in (1, 2, 3, 4, 7, 10):
            assert money.round_half_away(-numerator, denominator) == -money.round_half_away(
                numerator, denominator
            )


@pytest.mark.parametrize("denominator", [0, -1, -10])
def test_rounding_refuses_a_denominator_that_is_not_positive(denominator: int) -> None:
    with pytest.raises(ValueError, match="denominator"):
        money.round_half_away(10, denominator)


def test_proportion_rounds_a_single_share_half_away_from_zero() -> None:
    assert money.proportion(1_000, 1, 3) == 333
    assert money.proportion(2_000, 1, 3) == 667
    assert money.proportion(2_000, 3_333, 9_999) == 667
    assert money.proportion(5, 1, 2) == 3


def test_proportion_of_a_zero_whole_is_zero() -> None:
    assert money.proportion(1_000, 5, 0) == 0


def test_basis_points_of_an_invoice_total() -> None:
    assert money.basis_points(500_000, 1_000) == 50_000  # 10% of 5,000.00
    assert money.basis_points(9_999, 2_000) == 2_000  # 1,999.8 -> 2,000
    assert money.basis_points(5, 5_000) == 3  # 2.5 -> 3
    assert money.basis_points(-5, 5_000) == -3
    assert money.basis_points(12_345, 0) == 0
    assert money.basis_points(12_345, 10_000) == 12_345


def test_allocate_parts_add_up_to_the_total_exactly() -> None:
    parts = money.allocate(100, [1, 1, 1])
    assert parts == [34, 33, 33]
    assert sum(parts) == 100


def test_allocate_of_an_exact_split_has_no_leftover() -> None:
    assert money.allocate(5_000, [1_000] * 10) == [500] * 10


def test_allocate_gives_leftover_units_to_the_largest_fractions() -> None:
    # 10 over 1:2:4 is 1.43, 2.86, 5.71: floors 1, 2, 5 leave 2 units,
    # which go to the .86 and .71 parts, not to the first one.
    assert money.allocate(10, [1, 2, 4]) == [1, 3, 6]


def test_allocate_breaks_ties_by_order() -> None:
    assert money.allocate(2, [1, 1, 1]) == [1, 1, 0]
    assert money.allocate(1_000, [1_000, 1_000, 1_000]) == [334, 333, 333]


def test_allocate_the_largest_fraction_wins_even_when_it_comes_last() -> None:
    # 7 over 3:3:4 is 2.1, 2.1, 2.8: the single leftover unit goes to the last part.
    assert money.allocate(7, [3, 3, 4]) == [2, 2, 3]


def test_allocate_gives_nothing_to_zero_weights() -> None:
    assert money.allocate(5, [0, 3, 0, 2]) == [0, 3, 0, 2]
    assert money.allocate(7, [0, 1, 0]) == [0, 7, 0]


def test_allocate_of_zero_is_all_zeros() -> None:
    assert money.allocate(0, [1, 2, 3]) == [0, 0, 0]
    assert money.allocate(0, [0, 0]) == [0, 0]
    assert money.allocate(0, []) == []


def test_allocate_refuses_a_negative_total() -> None:
    with pytest.raises(ValueError, match="total"):
        money.allocate(-1, [1, 1])


def test_allocate_refuses_a_negative_weight() -> None:
    with pytest.raises(ValueError, match="weights"):
        money.allocate(10, [5, -1])


def test_allocate_refuses_a_non_zero_total_over_zero_weights() -> None:
    with pytest.raises(ValueError, match="zero weights"):
        money.allocate(10, [0, 0])
    with pytest.raises(ValueError, match="zero weights"):
        money.allocate(10, [])


@pytest.mark.parametrize("code", ["usd", "jpy", "eur"])
def test_lowercase_iso_codes_are_currencies(code: str) -> None:
    assert money.is_currency(code)


@pytest.mark.parametrize("code", ["USD", "Usd", "us", "usdd", "", "u$d"])
def test_other_strings_are_not_currencies(code: str) -> None:
    assert not money.is_currency(code)


def test_a_code_with_a_trailing_newline_is_not_a_currency() -> None:
    # ``$`` also matches just before a final newline, so "usd\n" would slip through.
    assert not money.is_currency("usd\n")
