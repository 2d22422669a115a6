"""``grape info`` as text: a :func:`grape.info.model_info` (or ``compare_info``) result as a
summary and markdown tables, readable in a terminal."""

from __future__ import annotations

from grape.files import human_bytes
from grape.info import RATIO_KEYS
from grape.report import format_table

__all__ = ["format_info", "format_comparison"]


def format_info(info: dict) -> str:
    """A :func:`model_info` result as text: a summary followed by a per-layer markdown table."""
    lines = [
        f"{info['path']}: {info['architecture']} ({info['model_type']}), "
        f"{info['num_layers']} decoder layers, top-{info['top_k']} routing",
        f"parameters: {info['parameters']:,} ({human_bytes(info['file_bytes'])} on disk in "
        f"{len(info['files'])} file(s); dtypes: {', '.join(sorted(info['dtypes']))})",
        f"routed experts: {info['total_experts']} in total, {info['routed_expert_parameters']:,} "
        f"parameters ({human_bytes(info['routed_expert_bytes'])})",
    ]
    if info.get("quantization", "none") != "none":
        lines.append(f"weights stored as {info['quantization']} (parameters counted as model parameters; bytes as stored)")
    if info.get("mtp_parameters"):
        lines.append(f"MTP layer(s): {info['mtp_parameters']:,} parameters (kept whole by grape)")
    if "sparsity" in info:
        sparsity = info["sparsity"]
        by_type = ", ".join(
            f"{k} {v['zero_fraction']:.2%}" for k, v in sparsity["by_type"].items() if v["parameters"]
        )
        lines.append(f"zeros: {sparsity['zero_fraction']:.2%} of all parameters ({by_type})")
    rows = []
    for layer in info["layers"]:
        row = {
            "layer": layer["layer"],
            "experts": "dense" if layer["experts"] is None else layer["experts"],
            "expert params": layer["expert_parameters"],
            "expert size": human_bytes(layer["expert_bytes"]),
        }
        if "zero_fraction" in layer:
            row["zeros"] = f"{layer['zero_fraction']:.2%}"
            row["expert zeros"] = _expert_zero_text(layer["zero_fraction_by_type"])
        rows.append(row)
    columns = ["layer", "experts", "expert params", "expert size"]
    if "sparsity" in info:
        columns += ["zeros", "expert zeros"]
    return "\n".join(lines) + "\n\n" + format_table(rows, columns)


def _expert_zero_text(by_type: dict[str, float]) -> str:
    parts = [f"{k} {by_type[k]:.2%}" for k in ("gate_up_proj", "down_proj") if k in by_type]
    return ", ".join(parts)


def format_comparison(comparison: dict) -> str:
    """A :func:`compare_info` result as text: totals with ratios, then experts per layer."""
    before, after, ratio = comparison["before"], comparison["after"], comparison["ratio"]
    summary = [
        {
            "": key.replace("_", " "),
            "before": before[key],
            "after": after[key],
            "after / before": ratio[key],
        }
        for key in RATIO_KEYS
    ]
    if "sparsity" in before and "sparsity" in after:
        summary.append(
            {
                "": "zero fraction",
                "before": before["sparsity"]["zero_fraction"],
                "after": after["sparsity"]["zero_fraction"],
            }
        )
    layers = [
        {
            "layer": b["layer"],
            "experts before": "dense" if b["experts"] is None else b["experts"],
            "experts after": "dense" if a["experts"] is None else a["experts"],
            "expert params before": b["expert_parameters"],
            "expert params after": a["expert_parameters"],
        }
        for b, a in zip(before["layers"], after["layers"])
    ]
    return (
        f"before: {before['path']}\nafter:  {after['path']}\n\n"
        + format_table(summary, ["", "before", "after", "after / before"])
        + "\n\n"
        + format_table(
            layers,
            [
                "layer",
                "experts before",
                "experts after",
                "expert params before",
                "expert params after",
            ],
        )
    )
