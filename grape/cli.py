"""The ``grape`` command line: prune, sparsify, distill, eval, info, demo.

Each subcommand validates its arguments (paths, ranges, output directory) before any heavy
work and exits with status 2 and a one-line message on bad input, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _budget(kind: str) -> Callable[[str], object]:
    """An argparse type making a :class:`grape.budget.Budget` (validated there, once)."""

    def parse(text: str):
        from grape.budget import Budget, BudgetError

        try:
            value = float(text) if kind == "ratio" else int(text)
            return Budget(ratio=value) if kind == "ratio" else Budget(keep_experts=value)
        except (ValueError, BudgetError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _memory_size(text: str) -> int:
    from grape.memory import parse_memory_size

    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_output_flags(parser: argparse.ArgumentParser, *, plannable: bool = False) -> None:
    """``--out``/``--overwrite``; a ``plannable`` command also takes ``--dry-run [--json]`` (then no ``--out``)."""
    parser.add_argument("--out", required=not plannable, help="output directory (never inside or around an input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an empty directory or a previous grape output")
    if plannable:
        parser.add_argument("--dry-run", action="store_true",
                            help="read only config.json and weight headers; print per-layer experts and bytes, "
                                 "predicted peak memory, output size and calibration FLOPs; write nothing")
        parser.add_argument("--json", dest="plan_json", action="store_true", help="with --dry-run: print one JSON object")


def _add_calibration_flags(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--calib", required=required, help="calibration text: .txt file, folder of .txt, .jsonl with 'text', or a Hub dataset")
    parser.add_argument("--calib-samples", type=_positive_int, default=64, help="calibration sequences (default 64)")
    parser.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for calibration (default cpu)")
    parser.add_argument("--dtype", default=None, help="working dtype (float32, bfloat16, float16; default: the checkpoint's)")
    parser.add_argument("--max-memory", type=_memory_size, default=None, metavar="SIZE",
                        help="memory this run may use, e.g. 20GB (default: 90%% of the available memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grape", description="Prune Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    every = argparse.ArgumentParser(add_help=False)
    every.add_argument("--debug", action="store_true", help="show the traceback of an error (also GRAPE_DEBUG=1)")

    p = sub.add_parser("prune", parents=[every], help="remove or merge whole experts (GRAPE or a baseline)")
    p.add_argument("model", help="model directory (or Hub id where the network allows)")
    from grape.methods import available_methods
    from grape.sparsity.scores import CRITERIA

    p.add_argument("--method", required=True, choices=available_methods())
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--experts-ratio", dest="budget", type=_budget("ratio"), help="fraction of all routed experts to remove")
    budget.add_argument("--keep-experts", dest="budget", type=_budget("keep"), help="routed experts to keep per layer")
    p.add_argument("--merge", action="store_true", help="merge removed experts into their nearest neighbour")
    p.add_argument("--merge-fit", choices=("least_squares", "average"), default="least_squares",
                   help="--merge: refit each merge target's down projection by least squares on the calibration "
                   "tokens (default), or average the merged weights by routed-token frequency")
    p.add_argument("--merge-ridge", type=float, default=1e-3, help="--merge-fit least_squares: relative ridge (default 1e-3)")
    _add_calibration_flags(p, required=False)  # checked by the pipeline: a dry run needs no text
    p.add_argument("--sequential", action="store_true", help="calibrate each layer on the already pruned layers' outputs")
    p.add_argument("--sample-tokens", type=_positive_int, default=512, help="tokens per layer on which every expert is evaluated (default 512)")
    p.add_argument("--entropy-floor", type=float, default=None, help="GRAPE: minimum normalised entropy of removals over layers")
    p.add_argument("--no-cache", action="store_true", help="recompute calibration statistics even if cached")
    _add_output_flags(p, plannable=True)
    p.set_defaults(func=_cmd_prune)

    s = sub.add_parser("sparsify", parents=[every], help="unstructured or N:M weight sparsity inside experts (MoE-Pruner)")
    s.add_argument("model")
    s.add_argument("--method", default="moe_pruner", choices=CRITERIA.names())
    s.add_argument("--sparsity", type=float, required=True, help="fraction of expert weights to zero, in [0, 1)")
    s.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4")
    _add_calibration_flags(s, required=False)
    _add_output_flags(s, plannable=True)
    s.set_defaults(func=_cmd_sparsify)

    d = sub.add_parser("distill", parents=[every], help="expert-wise knowledge distillation of a pruned model")
    d.add_argument("model", metavar="student", help="the pruned or sparsified model to train")
    d.add_argument("--teacher", required=True)
    d.add_argument("--data", dest="calib", required=True, help="training text (same formats as --calib)")
    d.add_argument("--steps", type=_positive_int, default=100)
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the teacher-output MSE term (0: LM loss only)")
    d.add_argument("--target", choices=("auto", "experts", "blocks"), default="auto",
                   help="compare each expert with the teacher expert it came from, or each MoE block with the teacher's "
                   "unpruned block (auto: blocks when some layer lost experts)")
    d.add_argument("--train", choices=("auto", "router", "experts", "router+experts"), default="auto",
                   help="what to train in the layers pruning changed (auto: experts for --target experts, "
                   "router+experts for blocks)")
    d.add_argument("--batch-size", type=_positive_int, default=4)
    d.add_argument("--seq-len", type=_positive_int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--checkpoint-every", type=_positive_int, default=50)
    d.add_argument("--resume", action="store_true")
    _add_output_flags(d)
    d.set_defaults(func=_cmd_distill, device="cpu", dtype=None)

    e = sub.add_parser("eval", parents=[every], help="perplexity (and lm-eval tasks where installed)")
    e.add_argument("model")
    e.add_argument("--ppl", action="append", default=[], help="text file/folder to compute perplexity on (repeatable)")
    e.add_argument("--seq-len", type=_positive_int, default=512)
    e.add_argument("--batch-size", type=_positive_int, default=4)
    e.add_argument("--max-tokens", type=_positive_int, default=None)
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (grape ships grape_stdlib_next_line)")
    e.add_argument("--task-text", action="append", default=[], metavar="FILE",
                   help="build grape's next-line task grape_next_line_<stem> from this held-out text (repeatable)")
    e.add_argument("--tasks-path", action="append", default=[], metavar="DIR",
                   help="folder of local lm-eval task YAML files (repeatable)")
    e.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many items per task (or a fraction)")
    e.add_argument("--experts-implementation", default=None, help="e.g. grape, eager, grouped_mm")
    e.add_argument("--dtype", default=None)
    e.add_argument("--json", dest="json_out", default=None, help="write results here")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("info", parents=[every], help="per-layer experts, parameters and bytes (before/after with --compare)")
    i.add_argument("model")
    i.add_argument("--compare", default=None, help="another checkpoint (e.g. the original) to compare with")
    i.add_argument("--sparsity", action="store_true", help="also count exact zeros per layer and tensor type")
    i.add_argument("--json", dest="json_out", default=None)
    i.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", parents=[every], help="train/prune/evaluate a small MoE end to end (no Hub, no GPU)")
    demo.add_argument("--work-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="fewer calibration samples and eval tokens")
    demo.add_argument("--model", default=None, help="use this trained MoE directory instead of training one")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _common(args) -> dict:
    """The :class:`grape.pipeline.CommonOptions` fields every writing command's flags give."""
    return {
        "model": args.model, "out": args.out or "", "overwrite": args.overwrite, "device": args.device,
        "dtype": args.dtype, "seed": args.seed, "calib": args.calib, "seq_len": args.seq_len,
        "max_memory": getattr(args, "max_memory", None),  # distill has no --max-memory
    }  # fmt: skip


def _planned(args, pipeline) -> bool:
    """Print ``--dry-run``'s plan of ``pipeline`` and return True; False for a real run (needs ``--out``)."""
    if not args.dry_run:
        if args.out is None:
            from grape.errors import InputError

            raise InputError("--out is required (or --dry-run to only plan the run)")
        return False
    from grape.dry_run import format_plan
    from grape.pipeline import dry_run

    plan, budget = dry_run(pipeline)
    print(json.dumps({**plan, "memory_budget_bytes": budget}) if args.plan_json else format_plan(plan, budget=budget))
    return True


def _cmd_prune(args) -> None:
    from grape.merge import MergeFit
    from grape.pipeline import run_pipeline
    from grape.prune import PruneOptions, PrunePipeline

    options = {} if args.entropy_floor is None else {"entropy_floor": args.entropy_floor}
    pipeline = PrunePipeline(
        PruneOptions(
            **_common(args), calib_samples=args.calib_samples, method=args.method, budget=args.budget, merge=args.merge,
            merge_fit=MergeFit(kind=args.merge_fit, ridge=args.merge_ridge), sequential=args.sequential,
            sample_tokens=args.sample_tokens, use_cache=not args.no_cache,
            method_options=options,
        )
    )  # fmt: skip
    if _planned(args, pipeline):
        return
    report = run_pipeline(pipeline)
    print(f"wrote {Path(args.out).resolve()}")
    print(f"experts per layer: {report['experts_per_layer']}")
    print(f"parameters: {report['parameters_before']:,} -> {report['parameters_after']:,}; time {report['timings_s']['total']:.1f}s")


def _cmd_sparsify(args) -> None:
    from grape.pipeline import run_pipeline
    from grape.sparsity.sparsify import SparsifyOptions, SparsifyPipeline

    pipeline = SparsifyPipeline(
        SparsifyOptions(
            **_common(args), calib_samples=args.calib_samples, method=args.method, sparsity=args.sparsity,
            pattern=args.pattern,
        )
    )  # fmt: skip
    if _planned(args, pipeline):
        return
    report = run_pipeline(pipeline)
    totals = report["expert_weights"]
    print(f"wrote {Path(args.out).resolve()}")
    print(
        f"{report['method']} {report['pattern']}: {totals['zeros']:,} of {totals['total']:,} routed expert "
        f"weights are zero ({totals['sparsity']:.2%}); time {report['timings_s']['total']:.1f}s"
    )


def _cmd_distill(args) -> None:
    from grape.distill import DistillOptions, distill

    report = distill(
        DistillOptions(
            **_common(args), teacher=args.teacher, steps=args.steps, lr=args.lr, lam=args.lam,
            batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, resume=args.resume,
            target=args.target, train=args.train,
        )
    )  # fmt: skip
    first, last = report["first"], report["last"]
    print(f"wrote {Path(args.out).resolve()}")
    print(
        f"steps {report['resumed_from_step'] or 0} -> {report['steps']}: CE {first['ce']:.4f} -> {last['ce']:.4f}, "
        f"{report['target'][:-1]} MSE {first['kd']:.4g} -> {last['kd']:.4g}; time {report['timings_s']['total']:.1f}s"
    )


def _cmd_eval(args) -> None:
    from grape.checkpoint import load_pruned
    from grape.checkpoint_files import load_config
    from grape.errors import InputError
    from grape.evaluation import evaluate_tasks, perplexity
    from grape.model_io import check_positions, load_tokenizer, parse_dtype, resolve_model_path

    if not args.ppl and not args.tasks:
        raise InputError("nothing to evaluate: give --ppl FILE and/or --tasks")
    path = resolve_model_path(args.model)
    check_positions(load_config(path), args.seq_len)
    kwargs = {"dtype": parse_dtype(args.dtype) or "auto"}
    if args.experts_implementation:
        import grape_kernels  # noqa: F401  (registers the "grape" experts implementation)

        kwargs["experts_implementation"] = args.experts_implementation
    tokenizer = load_tokenizer(path)
    model = load_pruned(path, **kwargs)
    results: dict = {"model": str(path)}
    for source in args.ppl:
        res = perplexity(model, tokenizer, source, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
        if not math.isfinite(res["perplexity"]):
            raise InputError(
                f"perplexity on {source} is {res['perplexity']}: the model's logits hold NaN or Inf "
                "(try --dtype float32, or check the checkpoint's weights)"
            )
        results.setdefault("ppl", {})[source] = res
        print(f"{source}: perplexity {res['perplexity']:.4f} over {res['tokens']} tokens")
    if len(args.ppl) == 1:
        results.update({k: results["ppl"][args.ppl[0]][k] for k in ("perplexity", "tokens")})
    if args.tasks:
        results["tasks"] = evaluate_tasks(
            model, tokenizer, args.tasks.split(","), batch_size=args.batch_size, limit=args.limit,
            task_paths=args.tasks_path, task_texts=args.task_text,
        )  # fmt: skip
        print(json.dumps(results["tasks"], indent=2, default=str))
    if args.json_out:
        from grape.report import write_json_atomic

        write_json_atomic(results, args.json_out)


def _cmd_info(args) -> None:
    from grape.info import compare_info, model_info
    from grape.info_format import format_comparison, format_info

    if args.compare:
        info = compare_info(args.compare, args.model, sparsity=args.sparsity)
        print(format_comparison(info))
    else:
        info = model_info(args.model, sparsity=args.sparsity)
        print(format_info(info))
    if args.json_out:
        from grape.report import write_json_atomic

        write_json_atomic(info, args.json_out)


def _cmd_demo(args) -> None:
    from grape.demo import run_demo

    run_demo(work_dir=args.work_dir, quick=args.quick, model=args.model)


_CALIBRATING_COMMANDS = ("prune", "sparsify")
"""Commands whose calibration feeds matmuls a new shape on almost every call
(:func:`grape.memory.bound_kernel_caches`); the others keep oneDNN's default caches."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``grape`` command; returns the exit status (0 ok, 2 error, 130/143 interrupted).

    Every error reaches the user as one line ``grape <command>: error: ...``; ``--debug`` or
    ``GRAPE_DEBUG=1`` re-raises it with its traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in _CALIBRATING_COMMANDS:
        from grape.memory import bound_kernel_caches

        bound_kernel_caches()  # before the command's first oneDNN matmul (importing makes none)
    debug = args.debug or os.environ.get("GRAPE_DEBUG", "") not in ("", "0")
    func: Callable = args.func
    with _one_line_warnings(), _sigterm_interrupts():
        try:
            func(args)
        except _Terminated:
            print(f"grape {args.command}: terminated; no output was written", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print(f"grape {args.command}: interrupted; no output was written", file=sys.stderr)
            return 130
        except Exception as exc:
            if _Terminated.requested:  # a library turned our _Terminated into its own error
                print(f"grape {args.command}: terminated; no output was written", file=sys.stderr)
                return 143
            if debug:
                raise
            print(f"grape {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
    return 0


def _one_line(exc: Exception) -> str:
    """The user-facing line for ``exc``: our own messages as they are, OS errors explained,
    anything else marked as a bug with the way to see its traceback."""
    from grape.errors import GrapeError, describe_os_error

    if isinstance(exc, (GrapeError, ValueError, ImportError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = describe_os_error(exc)
    else:
        text = f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback and report it"
    return " ".join(text.split()) or type(exc).__name__


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (temporary output, lock) runs.

    ``requested`` records the signal itself: raised inside torch's C++ (a tensor being built
    from a buffer), the exception can come back as an unrelated ``TypeError``, and the exit
    status must still say "terminated", not "error".
    """

    requested = False


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def terminate(_signum, _frame):
        _Terminated.requested = True
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """grape's own warnings print as ``grape: warning: ...``; other libraries' keep their format."""
    from grape.errors import GrapeWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GrapeWarning):
            print(f"grape: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


if __name__ == "__main__":
    sys.exit(main())
