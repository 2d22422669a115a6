"""Masks: exact counts per row / per N:M group, lowest scores go, and pattern validation."""

from __future__ import annotations

import pytest
import torch

from grape.sparsity.masks import nm_mask, parse_pattern, pruned_per_row, unstructured_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.7, 0.99])
def test_unstructured_exact_count_and_lowest_scores(sparsity: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 100, generator=gen, dtype=torch.float64)
    mask = unstructured_mask(scores, sparsity)
    expected = int(round(sparsity * 100))  # exact here: s * 100 is an integer in real arithmetic
    assert (~mask).sum(dim=1).tolist() == [expected] * 7
    for row in range(7):
        kept, pruned = scores[row][mask[row]], scores[row][~mask[row]]
        if pruned.numel() and kept.numel():
            assert pruned.max() < kept.min()


def test_pruned_per_row_is_floor() -> None:
    assert pruned_per_row(0.5, 7) == 3
    assert pruned_per_row(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floating point
    assert pruned_per_row(0.0, 10) == 0


def test_ties_are_broken_by_position() -> None:
    mask = unstructured_mask(torch.zeros(2, 6, dtype=torch.float64), 0.5)
    assert mask.tolist() == [[False, False, False, True, True, True]] * 2


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_keeps_best_n_in_every_group(n: int, m: int) -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 4 * m, generator=gen, dtype=torch.float64)
    mask = nm_mask(scores, n, m)
    groups_mask = mask.reshape(5, 4, m)
    groups_scores = scores.reshape(5, 4, m)
    assert (groups_mask.sum(dim=2) == n).all()
    for r in range(5):
        for g in range(4):
            kept = groups_scores[r, g][groups_mask[r, g]]
            pruned = groups_scores[r, g][~groups_mask[r, g]]
            assert pruned.max() < kept.min()


def test_nm_rejects_width_not_multiple_of_m() -> None:
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_parse_pattern_accepts() -> None:
    assert str(parse_pattern("unstructured")) == "unstructured"
    assert parse_pattern("unstructured").sparsity is None
    pattern = parse_pattern(" 2:4 ")
    assert (pattern.n, pattern.m, pattern.sparsity) == (2, 4, 0.5)


@pytest.mark.parametrize(
    ("text", "why"),
    [("3:2", "0 < N < M"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"), ("a:b", "integers"), ("2:4:8", "integers"), ("", "integers")],
)
def test_parse_pattern_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_pattern(text)


def test_check_width_names_the_matrix() -> None:
    with pytest.raises(ValueError, match="does not divide the input width 6 of layer 0 down_proj"):
        parse_pattern("2:4").check_width(6, "layer 0 down_proj")
