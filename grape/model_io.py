"""Open a causal LM lazily: the module tree on the meta device, weights read from safetensors on demand.

Pruning a 100B-parameter MoE must not need 100B parameters in memory. :class:`LazyCausalLM`
builds the transformers model skeleton without allocating weights, and materialises one
decoder layer at a time straight from the safetensors shards, so peak memory follows the
largest layer plus the calibration activations.

Which file holds which tensor, and how a module parameter maps to checkpoint tensors (fused or
one per expert), is :class:`grape.checkpoint_files.CheckpointIndex`'s job; this module builds
and fills the model. Both layouts are tested.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from grape.checkpoint_files import CheckpointError, CheckpointIndex, load_config, source_format, weight_files_present
from grape.errors import InputError
from grape.memory import return_freed_memory_promptly, trim_freed_memory
from grape.quant.formats import QuantFormat, check_tensors
from grape_kernels.architectures import MoEAdapter, get_adapter

__all__ = ["LazyCausalLM", "resolve_model_path", "parse_dtype", "parse_device", "load_tokenizer", "check_positions"]


_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``"float32"``... -> torch dtype; None keeps the checkpoint's."""
    if name is None or name == "auto":
        return None
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def parse_device(name: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or an InputError saying what to use instead.

    ``torch.device("cuda")`` succeeds on a CPU-only build and fails only when the first tensor
    moves, so availability is checked here, before any work.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise InputError("--device meta holds no data; use cpu, cuda, cuda:N or mps")
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise InputError(
            f"--device {device}: no {device.type} device is available to this torch build "
            f"({torch.__version__}); use --device cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise InputError(f"--device {device}: only {count} {device.type} device(s) are visible")
    return device


def check_positions(config, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse a window longer than the model's positions before anything is run on it."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise InputError(f"{flag} {seq_len} exceeds the model's max_position_embeddings ({limit}); use at most {limit}")


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or a CheckpointError naming the missing files.

    Without vocabulary files transformers tries to convert a "slow" tokenizer and reports a
    missing sentencepiece/tiktoken package, which sends the user after the wrong problem.
    """
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in _VOCABULARY_FILES):
        raise CheckpointError(
            f"no tokenizer files in {model_dir} (none of {', '.join(_VOCABULARY_FILES)}); "
            "copy them from the original model"
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise CheckpointError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc


def resolve_model_path(name_or_path: str) -> Path:
    """A local model directory, or a Hub snapshot when ``name_or_path`` is a Hub id and the network allows."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a transformers model directory")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is None:
        raise CheckpointError(f"model path {name_or_path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"],
            )
        )
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(
            f"{name_or_path!r} is not a local directory and could not be fetched from the Hub ({exc})"
        ) from exc


class LazyCausalLM:
    """A ``*ForCausalLM`` whose weights live on disk until a module is materialised."""

    def __init__(
        self,
        model_dir: Path,
        model: nn.Module,
        index: CheckpointIndex | None,
        dtype: torch.dtype,
        device: str,
        checkpoint_dtype: torch.dtype | None = None,
    ):
        self.model_dir = model_dir
        self.model = model
        self.config = model.config
        self.adapter: MoEAdapter = get_adapter(model.config)
        self.index = index
        self.dtype = dtype
        self.device = torch.device(device)
        # the dtype the weights are stored in, which outputs keep whatever the working dtype
        self.checkpoint_dtype = checkpoint_dtype or dtype

    @property
    def format(self) -> QuantFormat:
        """The checkpoint's weight format (unquantized, block-scaled FP8 or MXFP4)."""
        return self.index.format if self.index is not None else source_format(self.model_dir)

    @classmethod
    def open(
        cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> LazyCausalLM:
        """Validate the checkpoint and build the skeleton; no weight is read yet.

        Raises :class:`~grape_kernels.architectures.UnsupportedModelError` for non-MoE models and
        :class:`CheckpointError` for missing/corrupt weights, both before any heavy work.
        """
        # before the skeleton: building it allocates (and frees) every expert tensor on the CPU
        # before moving it to the meta device; served from the heap, those blocks would leave it
        # fragmented, and later layers' transients resident, in proportion to the depth
        return_freed_memory_promptly()  # released layers must leave the RSS (grape.memory)
        lazy = cls._skeleton(name_or_path, dtype=dtype, device=device, weights=True)
        lazy._check_complete()
        return lazy

    @classmethod
    def open_for_plan(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> LazyCausalLM:
        """The skeleton and, where the weight files are all there, their headers (``index``; else None).

        For the dry run (:mod:`grape.dry_run`): a directory holding only ``config.json`` can be
        planned before its weights are downloaded. Nothing can be materialised from it, and
        nothing is fetched from the Hub (that would download the weights).
        """
        if not Path(name_or_path).exists():
            raise CheckpointError(f"--dry-run plans a local directory, and {str(name_or_path)!r} is not one (download its config.json)")
        return cls._skeleton(name_or_path, dtype=dtype, device="cpu", weights=False)

    @classmethod
    def _skeleton(cls, name_or_path, *, dtype: torch.dtype | None, device, weights: bool) -> LazyCausalLM:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        device = parse_device(device)
        model_dir = resolve_model_path(str(name_or_path))
        config = load_config(model_dir)
        get_adapter(config)
        fmt = source_format(model_dir)
        index = None
        if weights or weight_files_present(model_dir):
            index = CheckpointIndex(model_dir, fmt)
            check_tensors(fmt, index.tensor_infos())
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the skeleton holds dequantized weights, as transformers' does
        checkpoint_dtype = _config_dtype(config)
        dtype = dtype or checkpoint_dtype
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        from grape_kernels.ragged_modeling import apply_ragged_experts

        apply_ragged_experts(model)
        model.eval()
        model.config.dtype = checkpoint_dtype  # from_config(dtype=...) overwrote it
        return cls(model_dir, model, index, dtype, device, checkpoint_dtype)

    def _check_complete(self) -> None:
        missing = [
            name
            for name, _ in self.model.named_parameters()
            if self.index.sources_for(name) is None and not self._is_tied(name)
        ]
        if missing:
            raise CheckpointError(
                f"{len(missing)} parameters have no tensor in {self.model_dir}, e.g. {missing[0]}"
            )

    def _is_tied(self, name: str) -> bool:
        return name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    # ---- materialisation -------------------------------------------------------------------
    def materialize(self, module: nn.Module, prefix: str, *, exclude: str | None = None) -> None:
        """Load every parameter and persistent buffer of ``module`` (named ``prefix``) from disk.

        Floating-point parameters take the working dtype; buffers keep the checkpoint's dtype
        (e.g. DeepSeek's float32 correction bias). Buffers absent from the checkpoint keep the
        value the module initialised them with. Tensors under the submodule ``exclude`` (a name
        relative to ``module``) stay on the meta device.
        """
        skip = _non_persistent(module)
        tensors = list(module.named_parameters()) + [
            (n, b) for n, b in module.named_buffers() if n not in skip
        ]
        if exclude is not None:
            tensors = [(n, t) for n, t in tensors if not n.startswith(f"{exclude}.")]
        for name, current in tensors:
            full = f"{prefix}.{name}" if prefix else name
            if self._is_tied(full):
                full = "model.embed_tokens.weight"
            is_param = isinstance(current, nn.Parameter)
            # parameters take the working dtype (quantized ones are dequantized straight into it)
            value = self.index.load(full, self.dtype if is_param and current.is_floating_point() else None)
            if value is None:
                if is_param:
                    raise CheckpointError(f"no tensor for {full} in {self.model_dir}")
                continue
            if tuple(value.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"{full}: checkpoint shape {tuple(value.shape)} != model shape {tuple(current.shape)}"
                )
            _set_tensor(module, name, value.to(device=self.device))

    def release(self, module: nn.Module) -> None:
        """Return ``module``'s parameters to the meta device (free their memory, pages included)."""
        for name, param in list(module.named_parameters()):
            _set_tensor(module, name, torch.empty_like(param, device="meta"))
        trim_freed_memory()

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}"

    def experts_name(self, index: int) -> str | None:
        """The routed-experts module of decoder layer ``index``, relative to the layer (None: dense)."""
        layer = self.adapter.decoder_layers(self.model)[index]
        return None if self.adapter.moe_block(layer) is None else f"{self.adapter.block_attr}.experts"

    @contextlib.contextmanager
    def materialized_layer(self, index: int, *, routed_experts: bool = True) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with real weights for the duration of the ``with`` block.

        With ``routed_experts=False`` the routed experts stay on the meta device (attention,
        router and shared experts are loaded): a layer too large for memory is then calibrated
        and written one group of experts at a time (:meth:`materialized_experts`).
        """
        layer = self.adapter.decoder_layers(self.model)[index]
        exclude = None if routed_experts else self.experts_name(index)
        self.materialize(layer, self.layer_prefix(index), exclude=exclude)
        try:
            yield layer
        finally:
            self.release(layer)

    @contextlib.contextmanager
    def materialized_experts(self, index: int, experts: range) -> Iterator[nn.Module]:
        """The routed-experts module of layer ``index`` holding only experts ``experts`` (local 0..n-1).

        Only those experts' bytes are read (per-expert tensors, or rows of fused and MXFP4 ones);
        afterwards the module is back on the meta device with its full shapes.
        """
        layer = self.adapter.decoder_layers(self.model)[index]
        module = self.adapter.moe_block(layer).experts
        prefix = f"{self.layer_prefix(index)}.{self.experts_name(index)}"
        count = int(module.num_experts)
        originals = dict(module.named_parameters(recurse=False))
        try:
            for name, meta in originals.items():
                grouped = meta.dim() > 0 and meta.shape[0] == count
                value = self.index.load(f"{prefix}.{name}", self.dtype, experts if grouped else None)
                expected = (len(experts), *meta.shape[1:]) if grouped else tuple(meta.shape)
                if value is None or tuple(value.shape) != expected:
                    found = None if value is None else tuple(value.shape)
                    raise CheckpointError(f"{prefix}.{name}: checkpoint rows {found} != expected {expected}")
                _set_tensor(module, name, value.to(device=self.device))
            yield module
        finally:
            for name, meta in originals.items():
                module._parameters[name] = meta

    @property
    def num_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))


def _non_persistent(module: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in module.named_modules():
        for buf in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{buf}" if mod_name else buf)
    return names


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    current = getattr(owner, leaf)
    if isinstance(current, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
    else:
        owner._buffers[leaf] = value


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype
