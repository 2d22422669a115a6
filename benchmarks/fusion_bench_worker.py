"""Run fusion-bench's own MoE-Pruner on a local Mixtral with given calibration ids.

Runs inside the fusion-bench environment (``~/.cache/grape/venvs/fusionbench``, built by ``.ci/fusion_bench_env``: fusion-bench with the
transformers 4.x it is written for, whose Mixtral experts are ``nn.Linear`` w1/w2/w3 modules
that fusion-bench hooks); it imports neither grape nor anything that needs the network.
:mod:`benchmarks.moe_pruner_reference` starts it and compares its output with grape's.

The only adaptations, both because this machine has no Hub access:

- the model is loaded from a local directory with ``MixtralForCausalLM.from_pretrained``
  instead of through a fusion-bench ``CausalLMPool`` config;
- the calibration batches are the token ids grape used (one sequence per batch, as
  fusion-bench's own c4 loader yields them), instead of ``get_loaders("c4", ...)``. They go
  through fusion-bench's own ``prepare_calibration_input``, and the pruning itself is
  fusion-bench's unmodified ``MoEPruner.prune_using_calibration_data_``.

Writes ``experts.safetensors`` (every routed expert's pruned w1/w2/w3, keyed
``{layer}.{expert}.{w1|w2|w3}``) and ``dense_logits.safetensors`` (the unpruned model's logits
on the first calibration sequence, so the caller can check both transformers versions compute
the same model).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch
from fusion_bench.method.moe_pruner import MoEPruner
from fusion_bench.method.moe_pruner.utils.prune import prepare_calibration_input
from fusion_bench.method.pruning.prune_utils import PruningType
from safetensors.torch import load_file, save_file
from transformers import MixtralForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--ids", required=True, help="safetensors file with an 'ids' (N, L) tensor")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = load_file(args.ids)["ids"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    model.seqlen = int(ids.shape[1])  # what fusion-bench's run() sets from max_seqlen
    with torch.no_grad():
        dense_logits = model(ids[:1]).logits.float().contiguous()
    save_file({"logits": dense_logits}, str(out / "dense_logits.safetensors"))

    started = time.perf_counter()
    pruner = MoEPruner(
        nsamples=int(ids.shape[0]),
        seed=0,
        device="cpu",
        prune_type=PruningType.UNSTRUCTURED,
        sparsity_ratio=args.sparsity,
        n=2,
        m=4,
    )
    batches = [(ids[i : i + 1], None) for i in range(ids.shape[0])]
    with torch.no_grad():
        inps, outs, mask, position_ids, position_embeddings = prepare_calibration_input(model, batches, "cpu")
    pruner.prune_using_calibration_data_(
        model,
        inps=inps,
        outs=outs,
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
    )
    elapsed = time.perf_counter() - started

    tensors = {}
    for index, layer in enumerate(model.model.layers):
        for expert, mlp in enumerate(layer.block_sparse_moe.experts):
            for name in ("w1", "w2", "w3"):
                tensors[f"{index}.{expert}.{name}"] = getattr(mlp, name).weight.detach().contiguous()
    save_file(tensors, str(out / "experts.safetensors"))
    (out / "run.json").write_text(
        json.dumps(
            {
                "fusion_bench": version("fusion-bench"),
                "transformers": version("transformers"),
                "torch": torch.__version__,
                "samples": int(ids.shape[0]),
                "seq_len": int(ids.shape[1]),
                "sparsity": args.sparsity,
                "prune_s": round(elapsed, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
