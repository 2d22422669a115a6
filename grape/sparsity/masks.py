"""Keep-masks from score matrices: unstructured per output row, or N:M along the input.

Everything here works on matrices in (out, in) orientation (rows = output channels, columns =
input channels), whatever layout the model stores; :mod:`grape.sparsity.layout` does the
orientation. A mask is ``True`` where the weight is kept.

Ties are broken by position (a stable sort), so equal scores (e.g. exact-zero weights, or an
input channel that never fired) always give the same mask on every run and every machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = ["SparsityPattern", "parse_pattern", "pruned_per_row", "unstructured_mask", "nm_mask", "keep_mask"]


@dataclass(frozen=True)
class SparsityPattern:
    """Where zeros go: ``n == m == 0`` means unstructured, otherwise keep ``n`` of every ``m``."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes (None for unstructured, where the user chooses)."""
        return 1.0 - self.n / self.m if self.structured else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    def check_width(self, in_features: int, what: str) -> None:
        """Raise unless ``m`` divides the input width (groups must tile the row exactly)."""
        if self.structured and in_features % self.m:
            raise ValueError(
                f"pattern {self}: M={self.m} does not divide the input width {in_features} of {what}"
            )


def parse_pattern(text: str) -> SparsityPattern:
    """``"unstructured"`` or ``"N:M"`` with integers 0 < N < M, else a ValueError saying why."""
    text = text.strip()
    if text.lower() == "unstructured":
        return SparsityPattern()
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match is None:
        raise ValueError(f"pattern {text!r} is neither 'unstructured' nor N:M with integers (e.g. '2:4')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {text!r}: need 0 < N < M (keep N of every M input weights)")
    return SparsityPattern(n, m)


def pruned_per_row(sparsity: float, in_features: int) -> int:
    """How many weights each row loses: floor(sparsity * in), as Wanda and MoE-Pruner do.

    The tiny epsilon absorbs binary rounding (0.29 * 100 is 28.999...96 in floating point).
    """
    return min(in_features, math.floor(sparsity * in_features + 1e-9))


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (out, in) pruning exactly ``pruned_per_row`` lowest scores in every row."""
    rows, cols = scores.shape
    k = pruned_per_row(sparsity, cols)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (out, in) keeping the ``n`` best of every ``m`` consecutive input columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input width ({cols}) to be a multiple of M")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(2, order, False)
    return mask.reshape(rows, cols)


def keep_mask(scores: torch.Tensor, pattern: SparsityPattern, sparsity: float) -> torch.Tensor:
    """The keep-mask of one (out, in) score matrix under ``pattern``."""
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity)
