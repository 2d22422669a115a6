"""Output-aware merging: refit each merge target's down projection by least squares.

Averaging two experts' *weights* does not average their *outputs*: an expert is nonlinear, and
two experts trained apart number their hidden units differently, so the average of their
gate/up rows is a third function that neither computed (measured on the trained test model: the
weight average is worse than dropping, README "A merge that beats drop"). What a merge has to
preserve is the layer's output on the tokens the merged group served. Given the target's hidden
activations, that output is *linear* in the target's down projection, so the best down
projection has a closed form.

**The fit.** Expert n survives and absorbs group G_n (n and the experts merged into it). On the
calibration tokens t that the *pruned* router sends to n, with routing weight w'_n(t) and the
target's down-projection input h_n(t) = act(gate(x_t)) * up(x_t), the merged expert contributes
w'_n(t) D h_n(t) to the layer output. The group's share of the unpruned output is

    y_G(t) = sum over m in G_n routed for t of w_m(t) o_m(x_t)

(original routing weights and expert outputs). D minimises sum_t ||w'_n(t) D h_n(t) - y_G(t)||^2
+ lambda ||D||^2, so with phi(t) = w'_n(t) h_n(t):

    A = sum_t phi phi^T,   B = sum_t y_G phi^T,   D = B (A + lambda I)^-1,

accumulated in float64, and with an expert bias (GPT-OSS) phi gains a last entry w'_n(t), so the
bias is fitted with D. Why this target rather than the full residual (the unpruned output minus
the other selected experts' outputs): two merge targets that share a token would then each try
to absorb the other's deficit and correct it twice; each target answering for its own group's
share adds up to the unpruned output wherever the pruned router picks the right targets.

**The ridge** is relative: lambda = ``ridge`` * trace(A) / dim(A) (default 1e-3), a fraction of
the mean feature energy, so it does not depend on the layer's scale. It keeps the solve well
posed when the tokens do not span the intermediate space (few tokens, dead hidden units) and
barely biases a well-determined fit. A target no calibration token reaches keeps the weights
the surgery gave it.

**The target's gate/up** [``gate_up="survivor"``, default]: the surviving expert's own rows,
unchanged (the surgery drops the others), so h_n is a function the model really learned and
only D changes. ``gate_up="average"`` keeps the surgery's frequency-weighted average instead
and fits D on its activations. Router rows are the survivor's, as in every merge.

**Which inputs.** The fit runs as its own pass over the calibration windows after planning
(:func:`fit_merges`), layer by layer through :func:`grape.calibration.runner.run_layerwise`
in sequential mode: each layer is fitted on the inputs the pruned model gives it (earlier
layers already pruned and fitted), against the unpruned layer's output on those same inputs.
The pass keeps the fitted rows (the merge targets' down projections, in the model's dtype) in
memory until the write applies them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from grape.calibration.runner import run_layerwise
from grape.model_io import LazyCausalLM
from grape_kernels.architectures import MoEAdapter
from grape_kernels.experts_module import expert_activation, expert_forward

__all__ = ["MergeFit", "FittedRows", "FittedLayer", "merge_groups", "fit_down_projections", "apply_fitted", "fit_merges"]

FITS = ("least_squares", "average")
GATE_UPS = ("survivor", "average")


@dataclass(frozen=True)
class MergeFit:
    """How merged experts get their weights (see the module docs).

    Attributes:
        kind: ``"least_squares"`` (fit the down projection) or ``"average"`` (the
            frequency-weighted weight average alone, grape's earlier merge).
        ridge: relative ridge of the least-squares fit.
        gate_up: ``"survivor"`` or ``"average"``: the merge target's gate/up rows.
    """

    kind: str = "least_squares"
    ridge: float = 1e-3
    gate_up: str = "survivor"

    def __post_init__(self) -> None:
        if self.kind not in FITS:
            raise ValueError(f"merge fit must be one of {', '.join(FITS)}, got {self.kind!r}")
        if self.gate_up not in GATE_UPS:
            raise ValueError(f"merge gate_up must be one of {', '.join(GATE_UPS)}, got {self.gate_up!r}")
        if not self.ridge > 0:
            raise ValueError(f"merge ridge must be a positive number, got {self.ridge}")

    @property
    def averages_weights(self) -> bool:
        """Whether the surgery averages the merged experts' weights (else it keeps the survivor's)."""
        return self.kind == "average" or self.gate_up == "average"

    def to_json(self) -> dict:
        if self.kind == "average":
            return {"kind": self.kind}
        return {"kind": self.kind, "ridge": self.ridge, "gate_up": self.gate_up}


FittedRows = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per experts-module tensor name, (rows in the pruned layer, their fitted values)."""


@dataclass
class FittedLayer:
    """One layer's fit: the rows to write, and per merge target (original index) the tokens it
    was fitted on and the relative error of its group's share before and after the fit."""

    rows: FittedRows
    record: dict[int, dict[str, float | int]]


def merge_groups(keep: list[int], merge_into: Mapping[int, int]) -> dict[int, list[int]]:
    """Pruned-layer index of every merge target -> the original experts of its group (target first)."""
    position = {expert: i for i, expert in enumerate(sorted(keep))}
    groups: dict[int, list[int]] = {}
    for source, target in sorted(merge_into.items()):
        groups.setdefault(position[target], [target]).append(source)
    return groups


def _layout(experts: nn.Module) -> tuple[bool, bool, int, int]:
    """(transposed storage, expert biases, hidden size, intermediate size) of an experts module."""
    transposed, has_bias = bool(getattr(experts, "is_transposed", False)), bool(getattr(experts, "has_bias", False))
    _, rows, columns = experts.down_proj.shape
    return (transposed, has_bias, columns, rows) if transposed else (transposed, has_bias, rows, columns)


@torch.no_grad()
def fit_down_projections(
    original: nn.Module,
    pruned: nn.Module,
    adapter: MoEAdapter,
    groups: Mapping[int, list[int]],
    inputs: Iterable[torch.Tensor],
    *,
    ridge: float = MergeFit.ridge,
) -> FittedLayer:
    """Least-squares down projections of ``pruned``'s merge targets, written into it in place.

    Args:
        original: the unpruned MoE block (routing and outputs of the group members).
        pruned: the same block after the surgery (kept experts only, pruned-layer indices).
        groups: pruned-layer index of each merge target -> original indices of its group.
        inputs: the MoE block's input tokens, in chunks of shape (..., H).
        ridge: relative ridge (see the module docs).

    Returns:
        The fitted rows, in the block's dtype (:func:`apply_fitted` writes them into another
        copy of the pruned block), and the fit's record.
    """
    experts = pruned.experts
    transposed, has_bias, hidden_size, intermediate = _layout(experts)
    dim = intermediate + int(has_bias)
    reference = copy.deepcopy(original.experts).float()
    gram = {j: torch.zeros(dim, dim, dtype=torch.float64) for j in groups}
    cross = {j: torch.zeros(hidden_size, dim, dtype=torch.float64) for j in groups}
    target_sq = {j: torch.zeros((), dtype=torch.float64) for j in groups}
    tokens = dict.fromkeys(groups, 0)
    for x in inputs:
        x = x.reshape(-1, x.shape[-1])
        _, weights, selected = adapter.router(original)(x)
        _, pruned_weights, pruned_selected = adapter.router(pruned)(x)
        for j, members in groups.items():
            rows, slot = torch.where(pruned_selected == j)
            if rows.numel() == 0:
                continue
            xs = x[rows]
            phi = expert_activation(experts, j, xs, dtype=torch.float32)
            if has_bias:
                phi = torch.cat([phi, torch.ones_like(phi[:, :1])], dim=1)
            phi = (phi * pruned_weights[rows, slot].float().unsqueeze(1)).double()
            target = torch.zeros(rows.numel(), hidden_size, dtype=torch.float64)
            chosen = selected[rows]
            for member in members:
                hit, member_slot = torch.where(chosen == member)
                if hit.numel():
                    out = expert_forward(reference, member, xs[hit].float()).double()
                    target.index_add_(0, hit, out * weights[rows[hit], member_slot].double().unsqueeze(1))
            gram[j] += phi.T @ phi
            cross[j] += target.T @ phi
            target_sq[j] += target.square().sum()
            tokens[j] += int(rows.numel())
    fitted: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
    record: dict[int, dict[str, float | int]] = {}
    for j, members in groups.items():
        if not gram[j].diagonal().any():
            continue  # no calibration token reaches this target: keep the surgery's weights
        lam = ridge * float(gram[j].diagonal().mean())
        solution = torch.linalg.solve(gram[j] + lam * torch.eye(dim, dtype=torch.float64), cross[j].T).T  # (H, dim)
        before = _current(experts, j, transposed, has_bias)
        energy = float(target_sq[j])
        record[members[0]] = {
            "tokens": tokens[j],
            "error_before": _error(before, gram[j], cross[j], energy) / energy if energy else 0.0,
            "error_after": _error(solution, gram[j], cross[j], energy) / energy if energy else 0.0,
        }
        down = solution[:, :intermediate]
        _add_row(fitted, "down_proj", j, down.T if transposed else down)
        if has_bias:
            _add_row(fitted, "down_proj_bias", j, solution[:, intermediate])
    rows = {
        name: (torch.tensor(indices), torch.stack(values).to(getattr(experts, name).dtype))
        for name, (indices, values) in fitted.items()
    }
    apply_fitted(pruned, rows)
    return FittedLayer(rows, record)


def _current(experts: nn.Module, j: int, transposed: bool, has_bias: bool) -> torch.Tensor:
    """Expert ``j``'s down projection as the fit's (H, dim) unknown (bias as the last column)."""
    down = experts.down_proj[j].double()
    down = down.T if transposed else down
    return torch.cat([down, experts.down_proj_bias[j].double().unsqueeze(1)], dim=1) if has_bias else down


def _error(solution: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, energy: float) -> float:
    """sum_t ||D phi(t) - y(t)||^2 from the accumulated sums: tr(D A D^T) - 2 tr(D B^T) + sum ||y||^2."""
    return max(float((solution @ gram * solution).sum() - 2 * (solution * cross).sum()) + energy, 0.0)


def _add_row(fitted: dict, name: str, row: int, value: torch.Tensor) -> None:
    indices, values = fitted.setdefault(name, ([], []))
    indices.append(row)
    values.append(value)


@torch.no_grad()
def apply_fitted(block: nn.Module, fitted: FittedRows) -> None:
    """Write fitted rows into a pruned block's experts (same surgery, same indices)."""
    for name, (rows, values) in fitted.items():
        tensor = getattr(block.experts, name)
        tensor[rows] = values.to(tensor.dtype)


def fresh_skeleton(lazy: LazyCausalLM) -> nn.Module:
    """A new meta-device skeleton of ``lazy``'s model, for a pass that pruned layers in place."""
    return LazyCausalLM.open(lazy.model_dir, dtype=lazy.dtype, device=str(lazy.device)).model


def fit_merges(
    lazy: LazyCausalLM,
    input_ids: torch.Tensor,
    groups: Mapping[int, Mapping[int, list[int]]],
    surgery: Callable[[int, nn.Module], None],
    *,
    ridge: float = MergeFit.ridge,
    batch_size: int = 8,
) -> dict[int, FittedLayer]:
    """The least-squares pass over the calibration windows (see the module docs, "Which inputs").

    Args:
        groups: per layer, :func:`merge_groups` of its plan; every layer listed is pruned by
            ``surgery`` (in place, on a materialised decoder layer) before its outputs feed the
            next layer, and the layers with merge groups are fitted after the surgery.

    Returns:
        Per layer with merge groups, its fit (rows for :func:`apply_fitted`, and the record).
    """
    adapter = lazy.adapter
    fitted: dict[int, FittedLayer] = {}
    merging = [layer for layer, layer_groups in groups.items() if layer_groups]
    if not merging:
        return fitted

    def visit(index: int, layer: nn.Module, _hidden, forward) -> None:
        block = adapter.moe_block(layer)
        captured: list[torch.Tensor] = []
        handle = block.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
        try:
            forward()
        finally:
            handle.remove()
        original = copy.deepcopy(block) if groups[index] else None
        surgery(index, layer)
        if original is not None:
            fitted[index] = fit_down_projections(original, block, adapter, groups[index], captured, ridge=ridge)

    try:
        run_layerwise(
            lazy, input_ids, visit, batch_size=batch_size, sequential=True, layers=sorted(groups),
            stop_after=max(merging), desc="fitting merges",
        )  # fmt: skip
    finally:
        lazy.model = fresh_skeleton(lazy)  # the pass pruned the skeleton's layers in place
    return fitted
