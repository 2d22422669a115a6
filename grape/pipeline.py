"""The one shape of every command that writes a checkpoint: prune, sparsify and distill.

Each command is a :class:`Pipeline` subclass, and :func:`run_pipeline` takes every one through
the same named stages, in this order:

``open``
    The input model, lazily (:class:`~grape.model_io.LazyCausalLM`: config, skeleton and
    headers; no weight is read). The device is checked here.
``validate``
    Everything cheap: the command's options against the model (budget, pattern, layer
    widths, positions), the calibration data read and tokenised, then the output claimed
    (:func:`~grape.output_guard.claim_output`: location, free space, no other run). Bad input
    is refused here, in seconds, or not at all.
``calibrate``
    The forward passes over the calibration data (statistics, captured expert inputs,
    training steps), layer by layer.
``plan``
    What to change, from what calibration produced (a pruning plan; nothing for commands
    that decide while calibrating).
``write``
    The model streamed layer by layer into the claimed output
    (:func:`~grape.checkpoint.write_checkpoint`), each materialised layer passed through
    :meth:`Pipeline.transform_layer` first.
``report``
    ``grape_report.json`` and the plot, assembled once in memory from the shared header,
    the command's :meth:`Pipeline.report_sections` and what the write produced, written
    into the claim before it is renamed into place.

Options are one type: :class:`CommonOptions` (model, output, device, dtype, seed, calibration
data, cache) plus each command's own fields in a subclass. A stage is a method; a new command
overrides the stages it needs and inherits the rest (see README, "Development").
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from grape.checkpoint import estimated_bytes, expert_counts, write_checkpoint
from grape.data import build_calibration_ids, load_texts, tokenize_documents
from grape.dry_run import check_fits, estimate
from grape.errors import InputError
from grape.layer_writer import ExpertEdit
from grape.memory import memory_budget
from grape.memory_model import Workload
from grape.model_io import LazyCausalLM, check_positions, load_tokenizer, parse_dtype
from grape.output_guard import claim_output
from grape.report import previous_report, write_report

__all__ = ["STAGES", "CommonOptions", "Pipeline", "stage_labels", "run_pipeline", "dry_run"]

STAGES = ("open", "validate", "calibrate", "plan", "write", "report")


def stage_labels(*, calibrate: str, plan: str, write: str) -> dict[str, str]:
    """Which report ``timings_s`` key each stage is counted under (opening and validating are
    ``setup``; the report is counted with the write)."""
    return {"open": "setup", "validate": "setup", "calibrate": calibrate, "plan": plan, "write": write, "report": write}


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """What every writing command takes (the per-command part is a subclass).

    Attributes:
        model: the input model directory (or a Hub id where the network allows).
        out: the output directory (see :mod:`grape.output_guard` for the rules).
        overwrite: replace a previous grape output at ``out``.
        device, dtype: where and in which floating-point type to compute (None: the
            checkpoint's dtype; outputs keep the checkpoint's dtype either way).
        seed: chooses the calibration windows (and whatever else the command draws).
        calib: calibration (or training) text: a file, folder, ``.jsonl`` or Hub dataset.
        calib_ids: already tokenised calibration windows (N, L), instead of ``calib``.
        calib_samples, seq_len: how many windows of how many tokens ``calib`` is cut into.
        batch_size: windows per forward pass.
        use_cache: reuse cached calibration statistics (commands that have them).
        max_memory: bytes the run may hold (None: see :func:`grape.memory.memory_budget`).
    """

    model: str
    out: str
    overwrite: bool = False
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    calib: str | None = None
    calib_ids: torch.Tensor | None = None
    calib_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    use_cache: bool = True
    max_memory: int | None = None

    not_recorded: ClassVar[tuple[str, ...]] = ("out", "calib_ids", "overwrite", "max_memory")
    """How a run was started rather than what it computes: left out of the report, so that a
    repeated or resumed run writes the same report."""

    def to_json(self) -> dict[str, Any]:
        """The options as they go into the report (no output path, tensors or run modes)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.not_recorded}
        return {k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in values.items()}


class Pipeline(ABC):
    """One writing command; :func:`run_pipeline` calls its stages (see the module docs).

    Subclasses set ``step`` (the report's name for the command), ``timing_labels`` (which
    stages the report's ``timings_s`` groups under which key) and implement
    :meth:`validate` and :meth:`report_sections`; the other stages default to what most
    commands need or to nothing.
    """

    step: ClassVar[str]
    timing_labels: ClassVar[Mapping[str, str]] = stage_labels(calibrate="calibration", plan="planning", write="save")

    def __init__(self, options: CommonOptions) -> None:
        self.options = options
        self.lazy: LazyCausalLM | None = None
        self.ids: torch.Tensor | None = None

    # ---- stages ---------------------------------------------------------------------------
    def open(self) -> None:
        """Open the model whose layers :meth:`write` streams to the output."""
        o = self.options
        self.lazy = LazyCausalLM.open(o.model, dtype=parse_dtype(o.dtype), device=o.device)

    @abstractmethod
    def validate(self) -> None:
        """Check the command's options against the model; load calibration data if needed."""

    def validate_plan(self) -> None:  # noqa: B027  (a stage a command may leave out)
        """The part of :meth:`validate` a dry run does too: options against the skeleton, no data."""

    def workload(self) -> Workload | None:
        """What the run does, for the memory model (:mod:`grape.dry_run`; None: not modelled)."""
        return None

    def calibrate(self) -> None:  # noqa: B027  (a stage a command may leave out)
        """Forward passes over the calibration data (nothing by default)."""

    def plan(self) -> None:  # noqa: B027  (a stage a command may leave out)
        """Decide what to change from what calibration produced (nothing by default)."""

    def transform_layer(self, index: int, layer: nn.Module) -> None:  # noqa: B027  (a stage a command may leave out)
        """Change one materialised decoder layer before it is written (nothing by default)."""

    def expert_edit(self, index: int) -> ExpertEdit | None:
        """What :meth:`transform_layer` does to layer ``index``'s routed experts (None: anything).

        Saying it lets the writer stream kept experts without materialising them (drop mode) and
        keep a quantized source's bytes wherever they did not change (:mod:`grape.layer_writer`).
        """
        return None

    @abstractmethod
    def report_sections(self) -> dict[str, Any]:
        """The command's own part of the report (called after the write)."""

    def finished(self) -> None:  # noqa: B027  (a stage a command may leave out)
        """Called once the output is in place (e.g. to remove resumable state)."""

    # ---- what the runner asks ------------------------------------------------------------------
    def inputs(self) -> dict[str, Path | str | None]:
        """Everything the output must stay clear of (see :func:`grape.output_guard.check_disjoint`)."""
        return {"input model": self.lazy.model_dir, "calibration data": self.options.calib}

    def estimated_bytes(self) -> int:
        """About how big the output will be (refused up front if the disk has less free)."""
        return estimated_bytes(self.lazy)

    @property
    def plot_title(self) -> str:
        return f"{self.step}: routed experts per layer"

    def load_calibration(self, *, required_by: str) -> torch.Tensor:
        """The calibration windows: ``calib_ids`` as given, or ``calib`` read and cut.

        Raises:
            InputError: no data given, data too short, or windows beyond the model's positions.
        """
        o = self.options
        ids = o.calib_ids
        if ids is None:
            if o.calib is None:
                raise InputError(f"{required_by} needs calibration data: pass --calib TEXT")
            check_positions(self.lazy.config, o.seq_len)
            tokenizer = load_tokenizer(self.lazy.model_dir)
            texts = load_texts(o.calib)
            samples = self.calibration_samples(tokenize_documents(tokenizer, texts).numel() // o.seq_len)
            ids = build_calibration_ids(tokenizer, texts, num_samples=samples, seq_len=o.seq_len, seed=o.seed)
        if ids.dim() != 2 or ids.numel() == 0:
            raise InputError(f"{required_by} needs calibration data: a non-empty (samples, seq_len) id tensor, got {tuple(ids.shape)}")
        check_positions(self.lazy.config, int(ids.shape[1]))
        return ids

    def calibration_samples(self, windows: int) -> int:
        """How many of the ``windows`` the text holds to draw (default: ``calib_samples``)."""
        return self.options.calib_samples

    def calibration_summary(self) -> dict[str, Any] | None:
        """Where the calibration windows came from, for the report."""
        if self.ids is None:
            return None
        source = str(self.options.calib) if self.options.calib_ids is None else "calib_ids"
        samples, seq_len = self.ids.shape
        return {"source": source, "samples": int(samples), "seq_len": int(seq_len), "tokens": int(self.ids.numel())}


class _StageClock:
    """Seconds per stage, grouped under a command's report keys."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - begin

    def report(self, labels: Mapping[str, str]) -> dict[str, float]:
        grouped: dict[str, float] = {}
        for stage in STAGES:
            if stage in self.seconds:
                grouped[labels[stage]] = grouped.get(labels[stage], 0.0) + self.seconds[stage]
        grouped["total"] = time.perf_counter() - self.started
        return {k: round(v, 3) for k, v in grouped.items()}


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_pipeline(pipeline: Pipeline) -> dict[str, Any]:
    """Run ``pipeline`` through :data:`STAGES`; returns the report written with the output."""
    clock = _StageClock()
    o = pipeline.options
    with clock("open"):
        pipeline.open()
    lazy = pipeline.lazy
    with clock("validate"):
        pipeline.validate()
        work = pipeline.workload()
        if work is not None:
            check_fits(lazy, work, o.max_memory)
        claim = claim_output(o.out, inputs=pipeline.inputs(), overwrite=o.overwrite, needed_bytes=pipeline.estimated_bytes())
    with claim:
        with clock("calibrate"):
            pipeline.calibrate()
        with clock("plan"):
            pipeline.plan()
        with clock("write"):
            counts_before, parameters_before = expert_counts(lazy.model, lazy), _parameters(lazy.model)
            written = write_checkpoint(lazy, claim.tmp, transform_layer=pipeline.transform_layer, expert_edit=pipeline.expert_edit)
        with clock("report"):
            report: dict[str, Any] = {
                "grape_version": __import__("grape").__version__,
                "step": pipeline.step,
                "source_model": str(lazy.model_dir),
                "architecture": lazy.adapter.name,
                "seed": o.seed,
                **pipeline.report_sections(),
                "options": o.to_json(),
                "experts_per_layer_before": counts_before,
                "experts_per_layer": expert_counts(lazy.model, lazy),
                "parameters_before": parameters_before,
                "parameters_after": _parameters(lazy.model),
                "bytes_on_disk": sum((claim.tmp / name).stat().st_size for name in written.files),
            }
            if written.quantization is not None:
                report["quantization"] = written.quantization
            previous = previous_report(lazy.model_dir)
            if previous is not None:
                report["previous_steps"] = previous.pop("previous_steps", []) + [previous]
            report["timings_s"] = clock.report(pipeline.timing_labels)
            report = write_report(claim.tmp, report, plot_title=pipeline.plot_title)
        claim.commit()
    pipeline.finished()
    return report


def dry_run(pipeline: Pipeline) -> tuple[dict[str, Any], int]:
    """The run's plan from ``config.json`` and headers only (:mod:`grape.dry_run`) and its memory budget.

    Reads no tensor data, no tokenizer and no calibration text; writes nothing.
    """
    o = pipeline.options
    pipeline.lazy = LazyCausalLM.open_for_plan(o.model, dtype=parse_dtype(o.dtype))
    pipeline.validate_plan()
    budget = memory_budget(o.max_memory)
    calib = o.calib if o.calib_ids is None else None
    return estimate(pipeline.lazy, pipeline.workload(), budget=budget, calib=calib), budget
