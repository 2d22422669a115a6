"""Expert-wise distillation on a tiny Mixtral: fixed masks, lower loss, exact resume, expert mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_checkpoint

import grape.distill_training
import grape.pipeline
from grape.checkpoint import load_pruned
from grape.distill import DistillOptions
from grape.distill import distill as run_distill
from grape.model_io import LazyCausalLM
from grape.sparsity.sparsify import SparsifyOptions, sparsify
from grape.surgery import prune_block

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A float32 teacher (2 layers, hidden 32, 4 experts) and students derived from it."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "experts" in name or ".gate." in name:
                param.normal_(0.0, 0.3)
    teacher.save_pretrained(root / "teacher")
    sparsify(SparsifyOptions(model=str(root / "teacher"), out=str(root / "sparse"), method="magnitude", sparsity=0.5))

    lazy = LazyCausalLM.open(root / "teacher")
    kept = {0: [0, 2, 3], 1: [1, 3]}
    save_checkpoint(
        lazy, root / "ragged", transform_layer=lambda i, layer: prune_block(layer.mlp, lazy.adapter, kept[i]),
        report={"step": "expert_pruning", "kept_experts": {str(k): v for k, v in kept.items()}},
    )
    return {"teacher": root / "teacher", "sparse": root / "sparse", "ragged": root / "ragged"}


def distill(student: Path, teacher: Path, data: torch.Tensor, *, out_dir: Path, **options) -> dict:
    return run_distill(DistillOptions(model=str(student), teacher=str(teacher), calib_ids=data, out=str(out_dir), **options))


def _data(samples: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def _experts(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_pruned(path, dtype=torch.float32).state_dict().items() if ".experts." in k}


def test_masks_stay_exact_and_the_loss_goes_down(models, tmp_path) -> None:
    report = distill(
        models["sparse"], models["teacher"], _data(), steps=6, lr=3e-3, lam=1.0, out_dir=tmp_path / "out", batch_size=4
    )
    before = load_pruned(models["sparse"], dtype=torch.float32).state_dict()
    after = load_pruned(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, tensor in before.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert torch.equal(after[name] == 0, tensor == 0), name  # same zeros, exactly
            assert not torch.equal(after[name], tensor), name  # and the kept weights trained
        else:
            assert torch.equal(after[name], tensor), name  # everything else frozen
    losses = [h["loss"] for h in report["history"]]  # one batch holds all the data: same loss every step
    assert losses[-1] < losses[0]
    assert report["history"][-1]["kd"] < report["history"][0]["kd"]
    assert report["expert_weight_zeros"]["masked"] == report["expert_weight_zeros"]["after"] > 0
    assert [s["step"] for s in report["previous_steps"]] == ["sparsify"]
    assert not (tmp_path / ".out.distill-ckpt").exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _full_and_interrupted(student: Path, teacher: Path, tmp_path: Path, monkeypatch, options: dict) -> dict:
    """An uninterrupted 4-step run into ``full`` (its report), and a run into ``out`` that is
    interrupted after its checkpoint at step 2, before the output is written."""
    full = distill(student, teacher, _data(), steps=4, out_dir=tmp_path / "full", **options)
    with monkeypatch.context() as patch:
        patch.setattr(grape.pipeline, "write_checkpoint", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            distill(student, teacher, _data(), steps=2, out_dir=tmp_path / "out", **options)
    return full


def test_resume_continues_from_the_saved_step(models, tmp_path, monkeypatch) -> None:
    options = dict(lr=3e-3, lam=0.5, batch_size=2, checkpoint_every=2)
    full = _full_and_interrupted(models["sparse"], models["teacher"], tmp_path, monkeypatch, options)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.distill-ckpt" / "state.safetensors").is_file()

    with pytest.raises(FileExistsError, match="--resume"):
        distill(models["sparse"], models["teacher"], _data(), steps=4, out_dir=tmp_path / "out", **options)
    with pytest.raises(ValueError, match="different lr"):
        distill(models["sparse"], models["teacher"], _data(), steps=4, out_dir=tmp_path / "out", resume=True, **(options | {"lr": 1e-3}))

    resumed = distill(models["sparse"], models["teacher"], _data(), steps=4, out_dir=tmp_path / "out", resume=True, **options)
    assert resumed["resumed_from_step"] == 2
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for mine, reference in zip(resumed["history"], full["history"]):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    want, got = _experts(tmp_path / "full"), _experts(tmp_path / "out")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert not (tmp_path / ".out.distill-ckpt").exists()


def test_student_experts_are_compared_with_their_original_teacher_experts(models, tmp_path) -> None:
    """A ragged student pruned without sparsity is its kept teacher experts: zero expert MSE."""
    report = distill(
        models["ragged"], models["teacher"], _data(), steps=1, lr=1e-6, lam=1.0, out_dir=tmp_path / "mapped", target="experts"
    )
    assert report["history"][0]["kd"] == 0.0
    assert report["kept_experts"] == {"0": [0, 2, 3], "1": [1, 3]}

    unmapped = tmp_path / "unmapped"
    unmapped.mkdir()
    for item in models["ragged"].iterdir():
        if item.name != "grape_report.json":
            (unmapped / item.name).symlink_to(item)
    report = distill(
        unmapped, models["teacher"], _data(), steps=1, lr=1e-6, lam=1.0, out_dir=tmp_path / "identity", target="experts"
    )
    assert report["kept_experts"] == {"0": [0, 1, 2], "1": [0, 1]}
    assert report["history"][0]["kd"] > 0.0


def _fail(*args, **kwargs):
    raise AssertionError("weights were loaded")


@pytest.mark.parametrize(
    ("options", "error", "why"),
    [
        ({"lam": -1.0}, ValueError, "lambda must be a non-negative"),
        ({"lr": 0.0}, ValueError, "lr must be a positive"),
        ({"steps": 0}, ValueError, "steps must be a positive integer"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be a positive integer"),
        ({"resume": True}, FileNotFoundError, "no distillation checkpoint"),
    ],
)
def test_bad_options_fail_before_loading_weights(options, error, why, models, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(grape.distill_training, "load_pruned", _fail)
    arguments = dict(steps=2, lr=1e-3, lam=1.0, out_dir=tmp_path / "out") | options
    with pytest.raises(error, match=why):
        distill(models["sparse"], models["teacher"], _data(), **arguments)


def test_bad_models_and_data_fail_before_training(models, tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    monkeypatch.setattr(grape.distill_training, "load_pruned", _fail)
    other = AutoModelForCausalLM.from_config(MixtralConfig(**(SMALL | {"hidden_size": 16}), num_local_experts=4))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="differ in hidden_size"):
        distill(models["sparse"], tmp_path / "other", _data(), steps=1, lr=1e-3, lam=1.0, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        distill(models["sparse"], models["teacher"], _data() + 64, steps=1, lr=1e-3, lam=1.0, out_dir=tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in models["ragged"].iterdir():
        if item.name != "grape_report.json":
            (broken / item.name).symlink_to(item)
    (broken / "grape_report.json").write_text(json.dumps({"kept_experts": {"0": [0, 2, 7], "1": [1, 3]}}))
    with pytest.raises(ValueError, match="the teacher has 4"):
        distill(broken, models["teacher"], _data(), steps=1, lr=1e-3, lam=1.0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def pruned(models, tmp_path_factory) -> dict[str, Path]:
    """Expert-pruned students of the teacher: layer 0 dropped to 3 experts and layer 1 kept
    whole, and a GRAPE merge to half the experts (through ``grape prune``)."""
    from grape.budget import Budget
    from grape.prune import PruneOptions, prune

    root = tmp_path_factory.mktemp("pruned")
    lazy = LazyCausalLM.open(models["teacher"])
    kept = {0: [0, 2, 3], 1: [0, 1, 2, 3]}
    save_checkpoint(
        lazy, root / "partial", transform_layer=lambda i, layer: prune_block(layer.mlp, lazy.adapter, kept[i]),
        report={"step": "expert_pruning", "kept_experts": {str(k): v for k, v in kept.items()}},
    )
    prune(PruneOptions(model=str(models["teacher"]), out=str(root / "merged"), calib_ids=_data(8), method="grape",
                       budget=Budget(ratio=0.5), merge=True, use_cache=False))  # fmt: skip
    return {"partial": root / "partial", "merged": root / "merged"}


def _changed(before: Path, after: Path) -> set[str]:
    old, new = (load_pruned(p, dtype=torch.float32).state_dict() for p in (before, after))
    assert old.keys() == new.keys()
    return {name for name in old if not torch.equal(old[name], new[name])}


def test_an_expert_pruned_student_trains_the_router_and_experts_of_the_layers_that_lost_experts(pruned, models, tmp_path) -> None:
    report = distill(pruned["partial"], models["teacher"], _data(), steps=4, lr=3e-3, out_dir=tmp_path / "out", batch_size=4)
    assert report["target"] == "blocks"
    assert report["trained"]["parts"] == ["router", "experts"] and report["trained"]["layers"] == [0]
    assert _changed(pruned["partial"], tmp_path / "out") == {
        "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
    }  # fmt: skip
    assert json.loads((tmp_path / "out" / "config.json").read_text())["grape_experts_per_layer"] == [3, 4]
    history = report["history"]  # one batch holds all the data: the same batch every step
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["kd"] < history[0]["kd"]


def test_the_block_term_is_the_unpruned_blocks_output_on_the_students_inputs(models, tmp_path) -> None:
    """Step 1's term against a direct computation: the student's block inputs captured from a
    plain forward, the teacher's blocks from transformers' own loading of the unpruned model."""
    from transformers import AutoModelForCausalLM

    report = distill(models["ragged"], models["teacher"], _data(), steps=1, lr=1e-6, out_dir=tmp_path / "out", batch_size=4)
    student = load_pruned(models["ragged"], dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32).eval()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(index: int, args: tuple, out: torch.Tensor) -> None:
        seen[index] = (args[0], out)

    for i, layer in enumerate(student.model.layers):
        layer.mlp.register_forward_hook(lambda _m, args, out, i=i: keep(i, args, out))
    with torch.no_grad():
        student(input_ids=_data())
        expected = sum(torch.nn.functional.mse_loss(out, teacher.model.layers[i].mlp(x)) for i, (x, out) in seen.items())
    assert report["trained"]["layers"] == [0, 1]
    assert report["history"][0]["kd"] == pytest.approx(float(expected), rel=1e-5)
    assert report["history"][0]["kd"] > 0


def test_router_recalibration_trains_the_routers_alone(pruned, models, tmp_path) -> None:
    report = distill(pruned["merged"], models["teacher"], _data(), steps=2, lr=3e-3, out_dir=tmp_path / "out", train="router")
    layers = report["trained"]["layers"]
    assert layers and report["trained"]["parts"] == ["router"]
    assert _changed(pruned["merged"], tmp_path / "out") == {f"model.layers.{i}.mlp.gate.weight" for i in layers}
    merged_report = json.loads((pruned["merged"] / "grape_report.json").read_text())
    assert report["kept_experts"] == merged_report["kept_experts"]
    assert report["experts_per_layer"] == merged_report["experts_per_layer"]


def test_an_expert_pruned_student_resumes_bit_for_bit(pruned, models, tmp_path, monkeypatch) -> None:
    options = dict(lr=3e-3, lam=0.5, batch_size=2, checkpoint_every=2)
    full = _full_and_interrupted(pruned["merged"], models["teacher"], tmp_path, monkeypatch, options)
    with pytest.raises(ValueError, match="different target, train"):
        distill(pruned["merged"], models["teacher"], _data(), steps=4, out_dir=tmp_path / "out", resume=True,
                target="experts", **options)  # fmt: skip
    resumed = distill(pruned["merged"], models["teacher"], _data(), steps=4, out_dir=tmp_path / "out", resume=True, **options)
    assert resumed["resumed_from_step"] == 2 and resumed["history"] == full["history"]
    want, got = (load_pruned(p, dtype=torch.float32).state_dict() for p in (tmp_path / "full", tmp_path / "out"))
    assert all(torch.equal(got[name], want[name]) for name in want)
