"""Quantized release checkpoints through the real command line: prune (drop, merge), sparsify, distill, info.

References are independent of grape's writer: the source's own stored bytes, transformers' reading
of the source (with the dropped experts masked out of routing), and the same command run on an
unquantized copy of the source that transformers dequantized and saved (same weights, so the same
plan): its output is what the quantized output must stand for.
"""

import json
from pathlib import Path

import pytest
import torch
from quant_models import build_fp8_checkpoint, build_mxfp4_checkpoint, mask_dropped_experts
from safetensors.torch import load_file
from tiny_models import save_tiny_tokenizer, write_calibration_text

from grape.checkpoint import load_pruned
from grape.cli import main
from grape.info import model_info
from grape.model_io import LazyCausalLM
from grape.quant.formats import check_tensors, detect_format, tensor_infos
from grape.quant.fp8 import relative_error

ARCHS = ("qwen3_moe", "deepseek_v3", "gpt_oss")
CALIB = ["--calib-samples", "4", "--seq-len", "16"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant_cli")


@pytest.fixture(scope="module")
def calib(work) -> Path:
    return write_calibration_text(work / "calib.txt")


@pytest.fixture(scope="module", autouse=True)
def cache(work):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRAPE_CACHE", str(work / "cache"))
        yield


_SOURCES: dict[str, Path] = {}


def _source(arch: str, work: Path) -> Path:
    if arch not in _SOURCES:
        directory = work / f"{arch}-source"
        _SOURCES[arch] = build_mxfp4_checkpoint(directory) if arch == "gpt_oss" else build_fp8_checkpoint(arch, directory)
    return _SOURCES[arch]


def _dequantized_copy(source: Path, out: Path) -> Path:
    """transformers' own reading of ``source``, saved unquantized (bf16): the unquantized twin."""
    from transformers import AutoModelForCausalLM

    if not out.exists():
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(out)
        save_tiny_tokenizer(out)
    return out


def _run(*args) -> int:
    return main([str(a) for a in args])


def _report(out: Path) -> dict:
    return json.loads((out / "grape_report.json").read_text())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _experts_of(tensors: dict, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Expert ``expert``'s stored tensors in layer ``layer``: per-expert FP8 keys or rows of fused MXFP4 ones."""
    prefix = f"model.layers.{layer}.mlp.experts."
    out = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        rest = key.removeprefix(prefix)
        head, _, tail = rest.partition(".")
        if head.isdigit():
            if int(head) == expert:
                out[tail] = value
        else:
            out[rest] = value[expert]
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_copies_kept_experts_and_loads_with_the_masked_sources_logits(arch, work, calib):
    from transformers import AutoModelForCausalLM

    source = _source(arch, work)
    out = work / f"{arch}-drop"
    assert _run("prune", source, "--method", "grape", "--experts-ratio", "0.25", "--calib", calib, *CALIB, "--out", out) == 0
    report = _report(out)
    kept = {int(layer): ids for layer, ids in report["kept_experts"].items()}
    source_config, out_config = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert out_config["quantization_config"] == source_config["quantization_config"]
    check_tensors(detect_format(out_config), tensor_infos(out))

    stored, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    for layer, ids in kept.items():
        for new, old in enumerate(ids):
            ours, theirs = _experts_of(written, layer, new), _experts_of(stored, layer, old)
            assert ours.keys() == theirs.keys() and ours
            for name in ours:
                assert ours[name].dtype == theirs[name].dtype and torch.equal(_bits(ours[name]), _bits(theirs[name])), (layer, new, name)
    main_layers = range(source_config["num_hidden_layers"])
    routed = lambda tensors: sum(  # noqa: E731
        t.numel() * t.element_size() for k, t in tensors.items() if ".mlp.experts." in k and int(k.split(".")[2]) in main_layers
    )
    assert routed(written) * 8 * len(kept) == routed(stored) * sum(map(len, kept.values()))
    assert report["quantization"]["format"] == detect_format(source_config).method and "requantized" not in report["quantization"]

    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    mask_dropped_experts(reference, arch, kept)
    ids = torch.randint(0, reference.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    expected = _logits(reference, ids)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(remote, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(load_pruned(out, dtype=torch.float32).eval(), ids), expected, rtol=1e-5, atol=1e-5)

    if arch == "deepseek_v3":  # the MTP layer: kept whole, byte for byte, and the scalar count is its count
        mtp = f"model.layers.{source_config['num_hidden_layers']}."
        keys = sorted(k for k in stored if k.startswith(mtp))
        assert keys and sorted(k for k in written if k.startswith(mtp)) == keys
        assert all(torch.equal(_bits(written[k]), _bits(stored[k])) for k in keys)
        assert out_config["num_nextn_predict_layers"] == 1 and out_config["n_routed_experts"] == 8


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_merge_requantizes_the_merged_experts_and_reports_the_error(arch, work, calib):
    source = _source(arch, work)
    twin = _dequantized_copy(source, work / f"{arch}-bf16")
    args = ("--method", "frequency", "--keep-experts", "6", "--merge", "--calib", calib, *CALIB)
    out, twin_out = work / f"{arch}-merge", work / f"{arch}-bf16-merge"
    assert _run("prune", source, *args, "--out", out) == 0 and _run("prune", twin, *args, "--out", twin_out) == 0
    report, twin_report = _report(out), _report(twin_out)
    assert report["kept_experts"] == twin_report["kept_experts"] and report["merged_into"] == twin_report["merged_into"]
    assert report["merged_into"]

    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(twin_out, trust_remote_code=True, dtype=torch.float32)
    errors = report["quantization"]["requantized"]["per_tensor"]
    limit = 0.05 if arch == "qwen3_moe" else 0.2  # FP8's and MXFP4's own rounding error on these weights
    for layer, targets in report["merged_into"].items():
        kept = report["kept_experts"][layer]
        for target in set(targets.values()):
            j = kept.index(target)
            for leaf in ("gate_up_proj", "down_proj"):
                ours_w = getattr(ours.model.layers[int(layer)].mlp.experts, leaf)[j]
                exact_w = getattr(merged.model.layers[int(layer)].mlp.experts, leaf)[j]
                error = relative_error(exact_w, ours_w)
                # the least-squares merge refits down_proj only: gate_up_proj keeps the source's values
                assert (0 < error < limit) if leaf == "down_proj" else (error < limit)
                if arch == "gpt_oss":  # one error per re-quantized fused row
                    assert error == pytest.approx(errors[f"model.layers.{layer}.mlp.experts.{leaf}[{j}]"], rel=1e-6)
    assert 0 < report["quantization"]["requantized"]["max_relative_error"] < limit


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss"])
def test_sparsify_masks_codes_with_zero_error(arch, work, calib):
    from transformers import AutoModelForCausalLM

    source = _source(arch, work)
    twin = _dequantized_copy(source, work / f"{arch}-bf16")
    args = ("--method", "moe_pruner", "--sparsity", "0.5", "--calib", calib, *CALIB)
    out, twin_out = work / f"{arch}-sparse", work / f"{arch}-bf16-sparse"
    assert _run("sparsify", source, *args, "--out", out) == 0 and _run("sparsify", twin, *args, "--out", twin_out) == 0
    report = _report(out)
    assert report["expert_weights"] == _report(twin_out)["expert_weights"] and report["expert_weights"]["sparsity"] == 0.5
    assert "pruned_weights" in report["quantization"] and "requantized" not in report["quantization"]

    # the quantized output stands for exactly what the unquantized command wrote: same zeros, same kept values
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    exact = AutoModelForCausalLM.from_pretrained(twin_out, dtype=torch.bfloat16).state_dict()
    experts = [k for k in exact if ".mlp.experts." in k and not k.endswith("_bias")]
    assert experts and all(torch.equal(ours[k], exact[k]) for k in experts)
    stored, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    scales = [k for k in stored if k.endswith(("_scale_inv", "_scales"))]
    assert scales and all(torch.equal(_bits(written[k]), _bits(stored[k])) for k in scales)
    if arch == "deepseek_v3":
        mtp = [k for k in stored if k.startswith("model.layers.3.")]
        assert mtp and all(torch.equal(_bits(written[k]), _bits(stored[k])) for k in mtp)


def test_distill_on_a_quantized_student_is_refused_by_name(work, calib, capsys):
    source = _source("qwen3_moe", work)
    rc = _run("distill", source, "--teacher", source, "--data", calib, "--steps", "1", "--out", work / "distilled")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "fp8" in err and "distill" in err
    assert not (work / "distilled").exists()


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda config: config["quantization_config"].update(quant_method="gptq"), "gptq"),
        (lambda config: config.pop("quantization_config"), "F8_E4M3"),
    ],
)
def test_other_formats_and_undeclared_quantized_tensors_are_refused_before_any_work(change, named, work, calib, capsys, tmp_path):
    source = _source("qwen3_moe", work)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in source.iterdir():
        (broken / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    change(config)
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    rc = _run("prune", broken, "--method", "frequency", "--keep-experts", "6", "--calib", calib, *CALIB, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and named in err, err
    assert _run("info", broken) == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_layers_and_info_count_what_transformers_dequantizes(arch, work):
    from transformers import AutoModelForCausalLM

    source = _source(arch, work)
    for dtype in (None, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(source, **({} if dtype is None else {"dtype": dtype}))
        expected = model.state_dict()
        lazy = LazyCausalLM.open(source, dtype=dtype)
        for index in range(lazy.num_layers):
            with lazy.materialized_layer(index) as layer:
                for name, value in layer.state_dict().items():
                    theirs = expected[f"model.layers.{index}.{name}"]
                    # transformers keeps DeepSeek's router in float32 (_keep_in_fp32_modules_strict): same values
                    assert torch.equal(_bits(value), _bits(theirs.to(value.dtype))), name
            if lazy.experts_name(index) is not None:
                with lazy.materialized_experts(index, range(2, 5)) as experts:
                    for name, value in experts.named_parameters():
                        assert torch.equal(value, expected[f"model.layers.{index}.mlp.experts.{name}"][2:5].to(value.dtype)), name
    info = model_info(source)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert info["parameters"] - info["mtp_parameters"] == sum(v.numel() for k, v in expected.items() if k not in tied)
    assert info["quantization"] == detect_format(json.loads((source / "config.json").read_text())).method
    assert info["tensor_bytes"] == sum(t.numel() * t.element_size() for t in load_file(source / "model.safetensors").values())
