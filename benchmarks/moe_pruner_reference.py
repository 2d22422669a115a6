"""grape's MoE-Pruner against fusion-bench's, on the same model and the same calibration tokens.

fusion-bench (PyPI ``fusion-bench``, ``fusion_bench/method/moe_pruner``) is an independent
implementation of MoE-Pruner. It is written for transformers 4.x, whose Mixtral experts are
``nn.Linear`` modules it hooks, so it runs in its own environment (``--venv``, created by
``.ci/fusion_bench_env``) through :mod:`benchmarks.fusion_bench_worker`; grape runs here.

Steps:

1. grape's calibration ids (``grape.data.build_calibration_ids``, exactly what
   ``grape sparsify --calib ... --calib-samples N --seq-len L --seed S`` draws) are written to
   a file that both implementations read.
2. grape sparsifies with ``moe_pruner`` (and ``wanda`` for context), and once more with
   down_proj scored on the *dense* expert intermediate, which is fusion-bench's order (its
   hooks collect every expert matrix's inputs in one forward pass before pruning any).
   That variant is a monkeypatch inside this script (:func:`dense_intermediate_order`), not
   an option of grape.
3. fusion-bench prunes in its environment; its expert weights come back in a file. Its model
   is the original with those expert weights put in, so every other weight is bit-identical.
4. Masks are compared per matrix: the fraction of kept positions the two share
   (|K_a & K_b| / |K_a|; both keep the same count per row), averaged per layer and matrix
   type, plus the fraction of rows whose kept sets are identical. Perplexity of every model
   on the held-out files.

Example (the README's MoE-Pruner reference table)::

    python benchmarks/moe_pruner_reference.py ../shared/models/mixtral-8x-pydoc \\
        --calib ../shared/models/mixtral-8x-pydoc/calib.txt \\
        --eval ../shared/models/mixtral-8x-pydoc/eval_docs.txt ../shared/models/mixtral-8x-pydoc/eval_code.txt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from grape.checkpoint import load_pruned
from grape.data import build_calibration_ids, load_texts
from grape.evaluation import perplexity
from grape.report import format_table
from grape.sparsity import sparsify as sparsify_module
from grape.sparsity.sparsify import SparsifyOptions, sparsify

WORKER = Path(__file__).with_name("fusion_bench_worker.py")
MATRICES = ("gate", "up", "down")


@contextlib.contextmanager
def dense_intermediate_order() -> Iterator[None]:
    """While active, grape scores down_proj on the intermediate of the *unpruned* gate_up_proj.

    grape's own order (module docs of :mod:`grape.sparsity.sparsify`) scores down_proj through
    the already pruned gate_up_proj; fusion-bench collects all inputs before pruning anything.
    A dense copy of each layer's experts is taken before it is pruned and the down_proj input
    statistics are computed from that copy.
    """
    real_sparsify, real_activation = sparsify_module.sparsify_experts, sparsify_module.expert_activation
    dense: dict[int, torch.nn.Module] = {}

    def sparsify_experts(experts, batches, plan, **kwargs):
        dense[id(experts)] = copy.deepcopy(experts)
        try:
            return real_sparsify(experts, batches, plan, **kwargs)
        finally:
            dense.pop(id(experts))

    def expert_activation(experts, index, x, **kwargs):
        return real_activation(dense.get(id(experts), experts), index, x, **kwargs)

    sparsify_module.sparsify_experts, sparsify_module.expert_activation = sparsify_experts, expert_activation
    try:
        yield
    finally:
        sparsify_module.sparsify_experts, sparsify_module.expert_activation = real_sparsify, real_activation


def _expert_matrices(model) -> dict[tuple[int, int, str], torch.Tensor]:
    """(layer, expert, gate|up|down) -> (out, in) weight of every routed expert of a Mixtral."""
    out = {}
    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        inter = experts.down_proj.shape[2]
        for e in range(experts.gate_up_proj.shape[0]):
            out[index, e, "gate"] = experts.gate_up_proj.data[e, :inter]
            out[index, e, "up"] = experts.gate_up_proj.data[e, inter:]
            out[index, e, "down"] = experts.down_proj.data[e]
    return out


def _put_fusion_bench_experts(model, tensors: dict[str, torch.Tensor]) -> None:
    """Replace every expert's weights by fusion-bench's w1 (gate), w3 (up), w2 (down)."""
    names = {"gate": "w1", "up": "w3", "down": "w2"}
    for (layer, expert, kind), weight in _expert_matrices(model).items():
        weight.copy_(tensors[f"{layer}.{expert}.{names[kind]}"].to(weight.dtype))


def compare_masks(a: dict, b: dict) -> dict:
    """Per layer and matrix type: mean shared fraction of kept positions, and identical rows."""
    result: dict = {}
    for key in sorted(a):
        layer, _, kind = key
        keep_a, keep_b = a[key] != 0, b[key] != 0
        shared = (keep_a & keep_b).sum(1).double() / keep_a.sum(1).clamp_min(1).double()
        identical = (keep_a == keep_b).all(1).double()
        entry = result.setdefault(layer, {}).setdefault(kind, {"shared": [], "identical_rows": []})
        entry["shared"].append(float(shared.mean()))
        entry["identical_rows"].append(float(identical.mean()))
    return {
        layer: {kind: {k: sum(v) / len(v) for k, v in stats.items()} for kind, stats in kinds.items()}
        for layer, kinds in result.items()
    }


def _mask_rows(name: str, comparison: dict) -> list[dict]:
    rows = []
    for layer in sorted(comparison):
        row = {"pair": name, "layer": layer}
        for kind in MATRICES:
            row[f"{kind} shared"] = round(comparison[layer][kind]["shared"], 4)
            row[f"{kind} same rows"] = round(comparison[layer][kind]["identical_rows"], 4)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", nargs="+", required=True)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--max-eval-tokens", type=int, default=40960)
    default_venv = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grape" / "venvs" / "fusionbench"
    parser.add_argument("--venv", default=str(default_venv), help="fusion-bench environment (.ci/fusion_bench_env builds it)")
    parser.add_argument("--out", default="benchmarks/results/moe_pruner_reference")
    args = parser.parse_args()
    model_dir = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = build_calibration_ids(
        tokenizer, load_texts(args.calib), num_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_file({"ids": ids.contiguous()}, str(work / "calib_ids.safetensors"))
        variants = {"grape moe_pruner": ("moe_pruner", None), "grape wanda": ("wanda", None),
                    "grape moe_pruner, dense down_proj inputs": ("moe_pruner", dense_intermediate_order)}
        for name, (method, patch) in variants.items():
            started = time.perf_counter()
            with patch() if patch else contextlib.nullcontext():
                sparsify(SparsifyOptions(
                    model=str(model_dir), out=str(work / name), method=method, sparsity=args.sparsity, calib_ids=ids,
                    calib_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]), seed=args.seed,
                ))  # fmt: skip
            timings[name] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        subprocess.run(
            [str(Path(args.venv) / "bin" / "python"), str(WORKER), str(model_dir), "--ids",
             str(work / "calib_ids.safetensors"), "--sparsity", str(args.sparsity), "--out", str(work / "fusion-bench")],
            check=True,
        )
        timings["fusion-bench moe_pruner (whole worker)"] = round(time.perf_counter() - started, 1)
        run_info = json.loads((work / "fusion-bench" / "run.json").read_text())

        dense = load_pruned(model_dir, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = dense(ids[:1]).logits.float()
        theirs = load_file(str(work / "fusion-bench" / "dense_logits.safetensors"))["logits"]
        logit_gap = float((logits - theirs).abs().max())

        models = {"original": load_pruned(model_dir, dtype=torch.bfloat16)}
        for name in variants:
            models[name] = load_pruned(work / name, dtype=torch.bfloat16)
        reference = load_pruned(model_dir, dtype=torch.bfloat16)
        _put_fusion_bench_experts(reference, load_file(str(work / "fusion-bench" / "experts.safetensors")))
        models["fusion-bench moe_pruner"] = reference

        matrices = {name: _expert_matrices(m) for name, m in models.items()}
        pairs = {
            "grape vs fusion-bench": ("grape moe_pruner", "fusion-bench moe_pruner"),
            "grape dense-down vs fusion-bench": ("grape moe_pruner, dense down_proj inputs", "fusion-bench moe_pruner"),
            "grape vs grape dense-down": ("grape moe_pruner", "grape moe_pruner, dense down_proj inputs"),
            "grape moe_pruner vs grape wanda": ("grape moe_pruner", "grape wanda"),
        }
        comparisons = {pair: compare_masks(matrices[a], matrices[b]) for pair, (a, b) in pairs.items()}

        ppl_rows = []
        for name, model in models.items():
            model = model.float().eval()
            row = {"model": name}
            for path in args.eval:
                row[Path(path).stem] = round(
                    perplexity(model, tokenizer, path, seq_len=512, max_tokens=args.max_eval_tokens)["perplexity"], 3
                )
            ppl_rows.append(row)
            print(format_table([row], list(row)), flush=True)

    mask_rows = [row for pair, comparison in comparisons.items() for row in _mask_rows(pair, comparison)]
    results = {
        "args": vars(args),
        "fusion_bench_run": run_info,
        "dense_logit_max_abs_gap_between_transformers_versions": logit_gap,
        "timings_s": timings,
        "perplexity": ppl_rows,
        "masks": comparisons,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = "\n\n".join(
        [
            format_table(ppl_rows, list(ppl_rows[0])),
            format_table(mask_rows, list(mask_rows[0])),
            f"dense logits, transformers {run_info['transformers']} (fusion-bench) vs this environment: "
            f"max |difference| {logit_gap:.3g}",
        ]
    )
    (out_dir / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
