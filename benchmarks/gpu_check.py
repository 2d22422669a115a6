"""One GPU check: build the CUDA extension, run the GPU tests, benchmark the kernels; one report.

    python benchmarks/gpu_check.py --out gpu-check          # under 8 min on one H100/H200
    python benchmarks/gpu_check.py --out gpu-check --quick  # fewer token counts

Stages, each in its own process with its own time limit (a stage that fails or runs out of time
is recorded as such and the next one still runs):

1. ``build`` (120 s): ``python setup.py build_ext --inplace`` builds ``grape_kernels._C`` from
   ``csrc/`` (build files under ``--out``, the extension beside ``cuda_ops.py``, ignored by git),
   then checks that ``cuda_ops.available()``.
2. ``tests`` (240 s): every test that skips without a GPU, on the GPU: the Triton routing and
   grouped-GEMM tests compiled (not interpreted, bf16 cases included), the CUDA ops against the
   references, CUDA-graph capture, swapped models and ``torch.compile`` on GPU kernels (spread
   over 8 processes with pytest-xdist where it is installed: Triton compiles each variant).
3. ``bench`` (120 s): the routed-experts forward of a Mixtral-8x7B layer and of a ragged
   (pruned to 96 of 128 experts) Qwen3-30B-A3B layer in bf16, grape's ``triton`` backend
   against transformers' ``grouped_mm`` and, where importable, vLLM's ``fused_experts``, same
   inputs, outputs cross-checked. Reported: tokens/s, % of HBM bandwidth at decode (expert
   weights the call must read / time, against this GPU's measured copy bandwidth) and % of peak
   at prefill (routed FLOPs / time, against this GPU's measured bf16 GEMM rate).

Writes ``gpu_check.json`` and ``gpu_check.md`` (plus ``tests.xml`` and each stage's log) into
``--out``. Without a CUDA device it says so in one line and exits 2, writing nothing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_TESTS = ("test_triton_routing.py", "test_triton_grouped_gemm.py", "test_csrc_cuda_ops.py", "test_gpu_graphs.py")
TIME_LIMITS = {"build": 120, "tests": 240, "bench": 120}  # 8 minutes at the very most
TOKENS = (1, 16, 128, 1024, 4096)
QUICK_TOKENS = (1, 128, 4096)
DECODE_MAX_TOKENS = 16
PREFILL_MIN_TOKENS = 1024


@dataclass(frozen=True)
class Layer:
    """One MoE layer shape to benchmark: hidden size H, expert width I, experts E, top-k."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


LAYERS = (Layer("mixtral-8x7b", 4096, 14336, 8, 2), Layer("qwen3-30b-a3b-ragged-96", 2048, 768, 96, 8))


@dataclass
class StageResult:
    name: str
    status: str  # "ok", "failed", "timeout" or "skipped"
    seconds: float
    detail: str = ""


def run_stage(name: str, command: list[str], limit_s: float, log: Path, env: dict | None = None) -> StageResult:
    """Run ``command`` (cwd: the repository) with a time limit; its output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=limit_s,
                                  env=env).returncode
        except subprocess.TimeoutExpired:
            return StageResult(name, "timeout", time.perf_counter() - start, f"stopped after {limit_s:.0f} s")
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    status = "ok" if code == 0 else "failed"
    return StageResult(name, status, time.perf_counter() - start, f"exit {code}: {tail[0][-300:]}")


def junit_summary(path: Path) -> dict:
    """Counts (tests, passed, failed, skipped) and failed test ids of a pytest ``--junitxml`` file."""
    if not path.is_file():
        return {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "failures": []}
    cases = list(ET.parse(path).getroot().iter("testcase"))
    failures = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
                or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"tests": len(cases), "passed": len(cases) - len(failures) - skipped, "failed": len(failures),
            "skipped": skipped, "failures": failures}


# ---- benchmark ----------------------------------------------------------------------------------
def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median seconds of a call: ``triton.testing.do_bench`` on CUDA, ``perf_counter`` rounds elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return cpu_time


def measure_peaks(device: torch.device, size: int) -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 GEMM rate (FLOP/s) measured on ``device``."""
    timer = _timer(device)
    src = torch.empty(size * size * 8, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / timer(lambda: dst.copy_(src))
    a = torch.randn(size, size, device=device).to(torch.bfloat16)
    gemm = 2 * size**3 / timer(lambda: torch.mm(a, a))
    return {"bandwidth": bandwidth, "gemm_flops": gemm}


def _experts_module(layer: Layer, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=layer.hidden, intermediate_size=layer.inter,
                           num_local_experts=layer.experts, num_experts_per_tok=layer.top_k)
    with torch.device(device):
        experts = MixtralExperts(config).to(dtype).requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(seed)
    for weight in (experts.gate_up_proj, experts.down_proj):
        weight.copy_(torch.randn(weight.shape, device=device, generator=g, dtype=dtype) * weight.shape[-1] ** -0.5)
    return experts


def implementations(device: torch.device) -> dict[str, Callable]:
    """``name -> fn(experts, hidden, ids, weights)``: grape's default backend there, grouped_mm, vLLM."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    from grape_kernels import experts_forward, select_backend

    calls = {
        f"grape-{select_backend(device)}": lambda m, h, i, w: experts_forward(m, h, i, w),
        "transformers-grouped_mm": grouped_mm_experts_forward,
    }
    if device.type == "cuda":
        try:
            from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts as vllm_fused_experts
        except Exception:  # not installed, or an incompatible build: a skipped row, not a failure
            vllm_fused_experts = None
        if vllm_fused_experts is not None:
            calls["vllm-fused_experts"] = lambda m, h, i, w: vllm_fused_experts(h, m.gate_up_proj, m.down_proj, w, i)
    return calls


def benchmark(layers: tuple[Layer, ...], tokens: tuple[int, ...], device: torch.device, peaks: dict,
              dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per (layer, tokens, implementation) on the same random routed inputs."""
    timer, rows = _timer(device), []
    calls = implementations(device)
    for layer in layers:
        experts = _experts_module(layer, device, dtype, seed=layer.hidden)
        for count in tokens:
            g = torch.Generator(device=device).manual_seed(count)
            hidden = torch.randn(count, layer.hidden, device=device, generator=g).to(dtype)
            logits = torch.randn(count, layer.experts, device=device, generator=g)
            weights, ids = logits.softmax(-1).topk(layer.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            hit = ids.unique().numel()
            weight_bytes = hit * 3 * layer.hidden * layer.inter * experts.gate_up_proj.element_size()
            flops = 6 * count * layer.top_k * layer.hidden * layer.inter
            with torch.inference_mode():
                reference = calls["transformers-grouped_mm"](experts, hidden, ids, weights).float()
                for name, call in calls.items():
                    row = {"layer": layer.name, "dtype": str(dtype).removeprefix("torch."), "tokens": count, "impl": name}
                    bound = functools.partial(call, experts, hidden, ids, weights)
                    try:
                        out = bound().float()
                        seconds = timer(bound)
                    except Exception as err:  # one implementation failing must not hide the others
                        rows.append({**row, "error": f"{type(err).__name__}: {err}"[:300]})
                        continue
                    row.update(
                        ms=seconds * 1e3,
                        tokens_per_s=count / seconds,
                        max_rel_err=((out - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item(),
                        hbm_pct=100 * weight_bytes / seconds / peaks["bandwidth"] if count <= DECODE_MAX_TOKENS else None,
                        peak_pct=100 * flops / seconds / peaks["gemm_flops"] if count >= PREFILL_MIN_TOKENS else None,
                    )
                    rows.append(row)
        del experts
    return rows


def _bench_main(out: Path, quick: bool) -> int:
    """The ``bench`` stage, in its own process: measure and write ``out/bench.json``."""
    device = torch.device("cuda")
    peaks = measure_peaks(device, size=8192)
    rows = benchmark(LAYERS, QUICK_TOKENS if quick else TOKENS, device, peaks)
    (out / "bench.json").write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=1))
    return 0


def _build_main(out: Path, quick: bool) -> int:
    """The ``build`` stage, in its own process: build ``grape_kernels._C`` and check that it loads."""
    command = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", str(out / "build")]
    subprocess.run(command, cwd=REPO, check=True)
    from grape_kernels import cuda_ops

    if not cuda_ops.available():
        print("setup.py ran, but grape_kernels._C does not load (see the build output above)")
        return 1
    return 0


IN_PROCESS_STAGES = {"build": _build_main, "bench": _bench_main}
STAGE_OUTPUTS = {"tests": "tests.xml", "bench": "bench.json"}


# ---- report -------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """The report as markdown: environment, stages, test counts, one benchmark table."""
    env, lines = report["environment"], ["# grape GPU check", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "| stage | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in report["stages"]]
    tests = report.get("tests")
    if tests:
        lines += ["", f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped."]
        lines += [f"- failed: `{name}`" for name in tests["failures"]]
    bench = report.get("benchmark")
    if bench:
        peaks = bench["peaks"]
        lines += ["", f"Measured: copy bandwidth {peaks['bandwidth'] / 1e12:.2f} TB/s, bf16 GEMM "
                  f"{peaks['gemm_flops'] / 1e12:.0f} TFLOP/s. Decode rows (T <= {DECODE_MAX_TOKENS}): % of that "
                  f"bandwidth for the expert weights read; prefill rows (T >= {PREFILL_MIN_TOKENS}): % of that GEMM rate.",
                  "", "| layer | tokens | implementation | ms | tokens/s | % HBM | % peak | max rel err vs grouped_mm |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for row in bench["rows"]:
            if "error" in row:
                lines.append(f"| {row['layer']} | {row['tokens']} | {row['impl']} | failed: {row['error']} |||||")
                continue
            lines.append(f"| {row['layer']} | {row['tokens']} | {row['impl']} | {row['ms']:.3f} | "
                         f"{row['tokens_per_s']:,.0f} | {_fmt(row['hbm_pct'], '.0f')} | {_fmt(row['peak_pct'], '.0f')} | "
                         f"{row['max_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out``, each written whole or not at all."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(report))):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)


def environment() -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the report and logs")
    parser.add_argument("--quick", action="store_true", help=f"benchmark only T in {QUICK_TOKENS}")
    parser.add_argument("--skip", choices=sorted(TIME_LIMITS), nargs="*", default=[], help="stages not to run")
    parser.add_argument("--stage", choices=sorted(IN_PROCESS_STAGES), help=argparse.SUPPRESS)  # a stage's process
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check.py needs a CUDA GPU and torch {torch.__version__} sees none here; nothing was run or written.",
              file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"--out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if args.stage is not None:
        return IN_PROCESS_STAGES[args.stage](out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"GRAPE_TRITON_TEST_DEVICE": "cuda"}
    own = [sys.executable, str(Path(__file__).resolve()), "--out", str(out)] + (["--quick"] if args.quick else [])
    commands = {
        "build": [*own, "--stage", "build"],
        "tests": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                  f"--junitxml={out / 'tests.xml'}", *(["-n", "8"] if importlib.util.find_spec("xdist") else []),
                  *(f"tests/kernels/{name}" for name in GPU_TESTS)],
        "bench": [*own, "--stage", "bench"],
    }
    report: dict = {"environment": environment(), "stages": []}
    for name, command in commands.items():
        if name in STAGE_OUTPUTS:
            (out / STAGE_OUTPUTS[name]).unlink(missing_ok=True)  # never report a previous run's results
        if name in args.skip:
            result = StageResult(name, "skipped", 0.0, "--skip")
        else:
            result = run_stage(name, command, TIME_LIMITS[name], out / f"{name}.log", env)
        report["stages"].append(asdict(result))
        print(f"{name}: {result.status} ({result.seconds:.0f} s) {result.detail}", flush=True)
        if name == "tests":
            report["tests"] = junit_summary(out / "tests.xml")
        if name == "bench" and (out / "bench.json").is_file():
            report["benchmark"] = json.loads((out / "bench.json").read_text())
        write_report(report, out)  # after every stage: a later timeout keeps what came before
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
