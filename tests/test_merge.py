"""The least-squares merge against independent references: a planted exact case, a token-by-token
least-squares solve, and the whole prune pass measured again on the written checkpoint."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import build_tiny_model, tiny_config, write_calibration_text
from transformers import AutoModelForCausalLM

from grape.checkpoint import load_pruned
from grape.merge import MergeFit, fit_down_projections, merge_groups
from grape.model_io import load_tokenizer
from grape.surgery import prune_block
from grape_kernels.architectures import get_adapter


def _block(arch: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    for name, value in changes.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config).float()
    adapter = get_adapter(model.config)
    block = adapter.moe_block(adapter.decoder_layers(model)[0])
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    return block, adapter


def _hidden_units(arch: str, experts, index: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input, written out per architecture (not grape's helper)."""
    if arch == "mixtral":  # gate_up (E, 2I, H) = [gate; up], SiLU
        gate, up = (x @ experts.gate_up_proj[index].T).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    gate_up = x @ experts.gate_up_proj[index] + experts.gate_up_proj_bias[index]  # GPT-OSS: (E, H, 2I), interleaved
    gate, up = gate_up[..., ::2].clamp(max=experts.limit), gate_up[..., 1::2].clamp(-experts.limit, experts.limit)
    return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)


def test_a_group_the_survivor_can_represent_is_reproduced_exactly() -> None:
    """Member m is survivor n with its hidden units permuted and its own down projection; both
    are always routed together with weight 1/2, and after the merge n alone gets weight 1. The
    group's output is then D* h_n with D* = (D_n + D_m P) / 2: the fit must find D*, which the
    weight average cannot (it mixes unaligned hidden units)."""
    block, adapter = _block("mixtral", num_local_experts=4)
    experts, router = block.experts, adapter.router(block)
    hidden, inter = 32, experts.down_proj.shape[2]
    direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
    perm = torch.randperm(inter)
    with torch.no_grad():
        router.weight[0] = router.weight[1] = 10 * direction  # n = 0 and m = 1: always the top two
        router.weight[2] = router.weight[3] = -10 * direction
        gate, up = experts.gate_up_proj[0].chunk(2, dim=0)
        experts.gate_up_proj[1] = torch.cat([gate[perm], up[perm]])
    x = 5 * direction + 0.3 * torch.randn(4096, hidden)
    original = copy.deepcopy(block)
    pruned = copy.deepcopy(block)
    prune_block(pruned, adapter, [0, 2, 3])

    fit = fit_down_projections(original, pruned, adapter, merge_groups([0, 2, 3], {1: 0}), x.split(1000), ridge=1e-12)
    planted = (experts.down_proj[0] + experts.down_proj[1][:, torch.argsort(perm)]) / 2
    torch.testing.assert_close(pruned.experts.down_proj[0], planted, rtol=1e-4, atol=1e-5)
    assert fit.record[0]["tokens"] == 4096
    assert fit.record[0]["error_after"] < 1e-8 < 0.01 < fit.record[0]["error_before"]
    with torch.no_grad():
        want = original(x[None]).squeeze(0)
        torch.testing.assert_close(pruned(x[None]).squeeze(0), want, rtol=1e-4, atol=1e-4)
        averaged = copy.deepcopy(block)
        prune_block(averaged, adapter, [0, 2, 3], merge_into={1: 0}, freq=torch.ones(4))
        assert (averaged(x[None]).squeeze(0) - want).norm() > 0.1 * want.norm()


@torch.no_grad()
def _reference_fit(arch, original, pruned, adapter, groups, x, ridge):
    """Token by token: the design rows w'_n(t) [h_n(t), 1], the group's share of the unpruned
    output from transformers' own experts forward (other experts' weights zeroed), and the ridge
    solve as an augmented least-squares problem."""
    _, weights, selected = adapter.router(original)(x)
    _, pruned_weights, pruned_selected = adapter.router(pruned)(x)
    has_bias = hasattr(pruned.experts, "down_proj_bias")
    solutions = {}
    for j, members in groups.items():
        rows, targets = [], []
        for t in range(x.shape[0]):
            slots = (pruned_selected[t] == j).nonzero().flatten()
            if slots.numel() == 0:
                continue
            h = _hidden_units(arch, pruned.experts, j, x[t : t + 1]).double().squeeze(0)
            if has_bias:
                h = torch.cat([h, torch.ones(1, dtype=torch.float64)])
            rows.append(float(pruned_weights[t, slots[0]]) * h)
            share = torch.where(torch.isin(selected[t : t + 1], torch.tensor(members)), weights[t : t + 1], 0.0)
            targets.append(original.experts(x[t : t + 1], selected[t : t + 1], share).double().squeeze(0))
        design, target = torch.stack(rows), torch.stack(targets)
        lam = ridge * float((design * design).sum(0).mean())
        augmented = torch.cat([design, math.sqrt(lam) * torch.eye(design.shape[1], dtype=torch.float64)])
        padded = torch.cat([target, torch.zeros(design.shape[1], target.shape[1], dtype=torch.float64)])
        solutions[j] = torch.linalg.lstsq(augmented, padded).solution.T  # (H, dim)
    return solutions


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_the_fit_is_the_least_squares_solution_of_the_routed_tokens(arch) -> None:
    block, adapter = _block(arch)
    keep, merge_into = [0, 2, 3, 5], {1: 2, 4: 2, 6: 5, 7: 0}
    original, pruned = copy.deepcopy(block), copy.deepcopy(block)
    prune_block(pruned, adapter, keep)
    x = torch.randn(600, 32)
    groups = merge_groups(keep, merge_into)
    assert groups == {1: [2, 1, 4], 3: [5, 6], 0: [0, 7]}
    reference = _reference_fit(arch, original, pruned, adapter, groups, x, ridge=1e-3)
    before = copy.deepcopy(pruned)
    fit = fit_down_projections(original, pruned, adapter, groups, x.split(128), ridge=1e-3)
    experts = pruned.experts
    for j, solution in reference.items():
        transposed = arch == "gpt_oss"
        down = experts.down_proj[j].T if transposed else experts.down_proj[j]
        inter = down.shape[1]
        torch.testing.assert_close(down.double(), solution[:, :inter], rtol=1e-4, atol=1e-5)
        if arch == "gpt_oss":
            torch.testing.assert_close(experts.down_proj_bias[j].double(), solution[:, inter], rtol=1e-4, atol=1e-5)
        assert fit.record[groups[j][0]]["error_after"] < fit.record[groups[j][0]]["error_before"]
    untouched = [j for j in range(len(keep)) if j not in groups]
    for name, tensor in experts.named_parameters():
        if name.startswith("down_proj"):
            assert torch.equal(tensor[untouched], getattr(before.experts, name)[untouched])
        else:
            assert torch.equal(tensor, getattr(before.experts, name)), name  # only the down projections move


def test_a_target_no_token_reaches_keeps_its_weights() -> None:
    block, adapter = _block("mixtral", num_local_experts=4)
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        adapter.router(block).weight[:3] = 10 * direction
        adapter.router(block).weight[3] = -10 * direction  # the target: never among the top two
    x = 5 * direction + 0.3 * torch.randn(64, 32)
    original, pruned = copy.deepcopy(block), copy.deepcopy(block)
    prune_block(pruned, adapter, [0, 1, 3])
    before = pruned.experts.down_proj.clone()
    fit = fit_down_projections(original, pruned, adapter, {2: [3, 2]}, [x])
    assert fit.rows == {} and fit.record == {}
    assert torch.equal(pruned.experts.down_proj, before)


def test_merge_fit_options_are_checked() -> None:
    with pytest.raises(ValueError, match="merge fit must be one of"):
        MergeFit(kind="mean")
    with pytest.raises(ValueError, match="gate_up must be one of"):
        MergeFit(gate_up="both")
    with pytest.raises(ValueError, match="ridge must be a positive"):
        MergeFit(ridge=0.0)


@torch.no_grad()
def _group_errors(model_dir, pruned_dir, ids, report) -> dict[tuple[int, int], float]:
    """Measured on the written checkpoint: per merge target, the relative error of its group's
    share on the inputs the pruned model gives the layer (what the pass fitted on)."""
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    student = load_pruned(pruned_dir, dtype=torch.float32).eval()
    adapter = get_adapter(student.config)
    inputs = {}
    hooks = [
        adapter.moe_block(layer).register_forward_pre_hook(lambda _m, args, i=i: inputs.setdefault(i, []).append(args[0]))
        for i, layer in enumerate(adapter.decoder_layers(student))
    ]
    student(input_ids=ids)
    for hook in hooks:
        hook.remove()
    errors = {}
    for layer_text, merged in report["merged_into"].items():
        layer = int(layer_text)
        keep = report["kept_experts"][layer_text]
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs[layer]])
        original = adapter.moe_block(adapter.decoder_layers(teacher)[layer])
        pruned = adapter.moe_block(adapter.decoder_layers(student)[layer])
        _, w, sel = adapter.router(original)(x)
        _, w2, sel2 = adapter.router(pruned)(x)
        for j, members in merge_groups(keep, {int(a): b for a, b in merged.items()}).items():
            routed = (sel2 == j).any(-1)
            share = torch.where(torch.isin(sel, torch.tensor(members)), w, 0.0)
            want = original.experts(x, sel, share)[routed]
            mine = torch.where(sel2 == j, w2, 0.0)
            got = pruned.experts(x, sel2, mine)[routed]
            errors[layer, members[0]] = float((got - want).square().sum() / want.square().sum())
    return errors


def test_prune_merge_fits_on_the_pruned_models_inputs(tmp_path) -> None:
    from grape.cli import main

    model_dir = build_tiny_model("mixtral", tmp_path / "model")
    calib = write_calibration_text(tmp_path / "calib.txt")
    common = [str(model_dir), "--method", "grape", "--experts-ratio", "0.5", "--calib", str(calib),
              "--calib-samples", "8", "--seq-len", "32", "--merge"]  # fmt: skip
    assert main(["prune", *common, "--out", str(tmp_path / "fit")]) == 0
    assert main(["prune", *common, "--merge-fit", "average", "--out", str(tmp_path / "avg")]) == 0
    report = json.loads((tmp_path / "fit" / "grape_report.json").read_text())
    assert report["options"]["merge_fit"] == {"kind": "least_squares", "ridge": 1e-3, "gate_up": "survivor"}
    assert report["merge_fits"] and json.loads((tmp_path / "avg" / "grape_report.json").read_text())["merge_fits"] is None

    from grape.data import build_calibration_ids, load_texts

    ids = build_calibration_ids(load_tokenizer(model_dir), load_texts(calib), num_samples=8, seq_len=32, seed=0)
    measured = _group_errors(model_dir, tmp_path / "fit", ids, report)
    recorded = {(int(l), int(e)): r["error_after"] for l, rec in report["merge_fits"].items() for e, r in rec.items()}
    assert measured.keys() == recorded.keys()
    for key, error in measured.items():
        assert error == pytest.approx(recorded[key], rel=1e-3, abs=1e-6), key
        assert error < report["merge_fits"][str(key[0])][str(key[1])]["error_before"]
