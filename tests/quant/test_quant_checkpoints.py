"""Release-layout checkpoints end to end: grape reads every parameter as transformers does, bit for bit;
drop mode copies the kept experts' bytes, and the result loads in transformers with the masked source's logits.

Qwen3-MoE and DeepSeek-V3 (dense first layer, shared experts, group routing, an MTP layer) in
block-scaled FP8, GPT-OSS in MXFP4. The pruned checkpoints are written here with grape.quant's
layout functions plus router slicing: the same pieces the checkpoint writer will call.
"""

import json
from pathlib import Path

import pytest
import torch
from quant_models import build_fp8_checkpoint, build_mxfp4_checkpoint, mask_dropped_experts
from safetensors.torch import load_file, save_file

from grape.quant.formats import MXFP4, check_tensors, detect_format, tensor_infos
from grape.quant.layout import kept_expert_tensors, read_mxfp4_experts, read_parameter
from grape_kernels.architectures import get_adapter
from grape_kernels.ragged_modeling import GRAPE_COUNTS_KEY, GRAPE_LAYOUT_KEY, make_ragged_class

# kept experts per MoE layer; DeepSeek keeps the same number in each of its 2 groups of 4
KEPT = {
    "qwen3_moe": {0: [0, 2, 3, 5, 6, 7], 1: [1, 2, 3, 4, 6, 7]},
    "gpt_oss": {0: [0, 1, 3, 4, 6, 7], 1: [0, 2, 3, 4, 5, 6]},
    "deepseek_v3": {1: [0, 1, 3, 4, 5, 7], 2: [1, 2, 5, 6]},  # layer 0 is dense; layer 3 is MTP
}


@pytest.fixture(scope="module", params=list(KEPT))
def source(request, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    directory = tmp_path_factory.mktemp(arch) / "source"
    if arch == "gpt_oss":
        return arch, build_mxfp4_checkpoint(directory)
    return arch, build_fp8_checkpoint(arch, directory)


def _load(directory: Path, dtype=None, ragged: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    cls = make_ragged_class(AutoModelForCausalLM._model_mapping[type(config)]) if ragged else AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    return cls.from_pretrained(directory, config=config, **kwargs).eval()


def _grape_reading(tensors: dict, fmt, name: str, like: torch.Tensor) -> torch.Tensor:
    """What grape's lazy loader produces for module parameter ``name``, from the checkpoint's stored tensors."""
    if fmt.method == MXFP4 and f"{name}_blocks" in tensors:
        return read_mxfp4_experts(tensors, name, like.dtype)
    head, _, leaf = name.rpartition(".experts.")
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(leaf) if head else None
    if parts is None:
        return read_parameter(tensors, name, fmt, like.dtype)
    return torch.stack([
        torch.cat([read_parameter(tensors, f"{head}.experts.{j}.{p}.weight", fmt, like.dtype) for p in parts])
        for j in range(like.shape[0])
    ])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_every_parameter_equals_transformers_dequantization(source, dtype):
    arch, directory = source
    model = _load(directory, dtype)
    assert not hasattr(model.config, "quantization_config")  # transformers drops it after dequantizing
    tensors = load_file(str(directory / "model.safetensors"))
    fmt = detect_format(json.loads((directory / "config.json").read_text()))
    checked = 0
    for name, value in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq") or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        ours = _grape_reading(tensors, fmt, name, value)
        assert ours.dtype == value.dtype and ours.shape == value.shape, name
        assert torch.equal(_bits(ours), _bits(value)), name
        checked += 1
    assert checked > 20


def _write_dropped(source_dir: Path, out_dir: Path, kept: dict[int, list[int]]) -> Path:
    """A pruned checkpoint: kept experts' stored tensors, routers sliced, MTP layer and everything else unchanged."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_dir)
    adapter = get_adapter(config)
    tensors = load_file(str(source_dir / "model.safetensors"))
    block = adapter.block_attr
    experts = {f"model.layers.{layer}.{block}.experts": ids for layer, ids in kept.items()}
    routers = {f"model.layers.{layer}.{block}.{adapter.router_attr}.": ids for layer, ids in kept.items()}
    out = {}
    for key, value in tensors.items():
        if any(key.startswith(prefix + ".") for prefix in experts):
            continue
        router = next((ids for prefix, ids in routers.items() if key.startswith(prefix)), None)
        out[key] = value if router is None else value.index_select(0, torch.tensor(router))
    for prefix, ids in experts.items():
        out.update(kept_expert_tensors(tensors, tensors.keys(), prefix, ids))
    counts = {len(ids) for ids in kept.values()}
    if len(counts) == 1 and not getattr(config, "num_nextn_predict_layers", 0):
        setattr(config, adapter.count_key, counts.pop())
    else:  # ragged; the scalar count stays the MTP layer's (unpruned) count
        setattr(config, GRAPE_COUNTS_KEY, [len(kept[i]) if i in kept else None for i in range(config.num_hidden_layers)])
        setattr(config, GRAPE_LAYOUT_KEY, {"block_attr": block, "router_attr": adapter.router_attr})
    out_dir.mkdir()
    save_file(out, str(out_dir / "model.safetensors"), {"format": "pt"})
    config.save_pretrained(out_dir)
    return out_dir


def test_drop_mode_copies_bytes_and_loads_with_the_masked_sources_logits(source, tmp_path):
    arch, directory = source
    kept = KEPT[arch]
    out = _write_dropped(directory, tmp_path / "pruned", kept)
    source_tensors, pruned = load_file(str(directory / "model.safetensors")), load_file(str(out / "model.safetensors"))
    fmt = detect_format(json.loads((out / "config.json").read_text()))
    assert fmt.is_quantized and dict(fmt.config) == json.loads((directory / "config.json").read_text())["quantization_config"]
    check_tensors(fmt, tensor_infos(out))

    # the kept experts are the source's bytes and scales, unchanged
    for layer, ids in kept.items():
        prefix = f"model.layers.{layer}.mlp.experts"
        for key, value in pruned.items():
            if not key.startswith(prefix + "."):
                continue
            rest = key.removeprefix(prefix + ".")
            if rest.split(".")[0].isdigit():
                new, tail = rest.split(".", 1)
                original = source_tensors[f"{prefix}.{ids[int(new)]}.{tail}"]
            else:
                original = source_tensors[key][ids]
            assert value.dtype == original.dtype and torch.equal(_bits(value), _bits(original)), key
    source_bytes = sum(t.numel() * t.element_size() for k, t in source_tensors.items() if ".experts." in k and ".layers.3." not in k)
    pruned_bytes = sum(t.numel() * t.element_size() for k, t in pruned.items() if ".experts." in k and ".layers.3." not in k)
    assert pruned_bytes == source_bytes * sum(map(len, kept.values())) // (8 * len(kept))

    ragged = arch == "deepseek_v3"
    model = _load(out, torch.float32, ragged=ragged)
    reference = _load(directory, torch.float32)
    mask_dropped_experts(reference, arch, kept)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_mtp_layer_is_kept_whole_and_consistent_with_the_config(tmp_path_factory):
    directory = build_fp8_checkpoint("deepseek_v3", tmp_path_factory.mktemp("mtp") / "source")
    out = _write_dropped(directory, directory.parent / "pruned", KEPT["deepseek_v3"])
    config = json.loads((out / "config.json").read_text())
    source_tensors, pruned = load_file(str(directory / "model.safetensors")), load_file(str(out / "model.safetensors"))
    mtp = f"model.layers.{config['num_hidden_layers']}."
    mtp_keys = sorted(k for k in source_tensors if k.startswith(mtp))
    assert config["num_nextn_predict_layers"] == 1
    assert any(".eh_proj." in k for k in mtp_keys) and any(".experts.7." in k for k in mtp_keys)
    assert sorted(k for k in pruned if k.startswith(mtp)) == mtp_keys
    assert all(torch.equal(_bits(pruned[k]), _bits(source_tensors[k])) for k in mtp_keys)
    assert config["n_routed_experts"] == 8 == 1 + max(int(k.split(".experts.")[1].split(".")[0]) for k in mtp_keys if ".experts." in k)


def test_transformers_builds_the_kept_mtp_layer_from_the_scalar_count(tmp_path):
    """61 decoder layers as in DeepSeek-V3: transformers finds the MTP layer by its hard-coded name ``model.layers.61``."""
    from transformers.modeling_layers import MtpModel

    directory = build_fp8_checkpoint("deepseek_v3", tmp_path / "source", num_hidden_layers=61)
    out = _write_dropped(directory, tmp_path / "pruned", {i: [0, 1, 3, 4, 5, 7] for i in range(1, 61)})
    model = _load(out, torch.float32, ragged=True)
    assert model.model.layers[60].mlp.experts.gate_up_proj.shape[0] == 6
    mtp = MtpModel.from_pretrained(model, device_map={"": "cpu"})
    assert mtp.layers[0].mtp_block.mlp.experts.gate_up_proj.shape[0] == 8  # the kept MTP layer, whole
    source_eh_proj = load_file(str(directory / "model.safetensors"))["model.layers.61.eh_proj.weight"]
    assert torch.equal(mtp.layers[0].eh_proj.weight, source_eh_proj.float())
