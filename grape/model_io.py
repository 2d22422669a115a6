"""Open a causal LM lazily: the module tree on the meta device, weights read from safetensors on demand.

Pruning a 100B-parameter MoE must not need 100B parameters in memory. :class:`LazyCausalLM`
builds the transformers model skeleton without allocating weights, and materialises one
decoder layer at a time straight from the safetensors shards, so peak memory follows the
largest layer plus the calibration activations.

transformers 5 stores experts as fused 3-D tensors but ``save_pretrained`` writes (and the Hub
serves) many MoE checkpoints with one tensor per expert (``experts.3.w1.weight`` or
``experts.3.gate_proj.weight``, Mixtral under ``block_sparse_moe``). :class:`CheckpointIndex`
resolves a module parameter name to the checkpoint tensors it comes from, stacking per-expert
tensors when needed. Both layouts are tested.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from grape.errors import InputError
from grape_kernels.architectures import MoEAdapter, get_adapter

__all__ = [
    "CheckpointError",
    "CheckpointIndex",
    "LazyCausalLM",
    "TOKENIZER_FILES",
    "resolve_model_path",
    "parse_dtype",
    "parse_device",
    "load_config",
    "load_tokenizer",
    "check_positions",
]


class CheckpointError(InputError):
    """A model directory is missing, incomplete, or holds corrupt safetensors."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""The files that make up a model's tokenizer (and generation defaults): copied into outputs."""

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


def load_config(model_dir: Path):
    """The transformers config of ``model_dir``; an unreadable ``config.json`` is one clear error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read {model_dir / 'config.json'}: {exc}; is it a transformers model directory?"
        ) from exc


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


_PER_EXPERT_SOURCES = {
    # fused target -> per-expert tensor names, concatenated along dim 0 of each expert
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


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


class CheckpointIndex:
    """Which safetensors file holds which tensor, with header validation up front."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index_file = model_dir / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise CheckpointError(f"no .safetensors weights in {model_dir}")
        self._handles = {}
        self.key_to_file: dict[str, str] = {}
        for name in files:
            handle = self._open(model_dir / name)
            self._handles[name] = handle
            for key in handle.keys():
                self.key_to_file[key] = name
        missing = [k for k, f in weight_map.items() if k not in self.key_to_file]
        if missing:
            raise CheckpointError(f"{len(missing)} tensors listed in the index are missing, e.g. {missing[0]}")

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise CheckpointError(f"weights file {path} is missing")
        try:
            handle = safe_open(str(path), framework="pt")
            size = path.stat().st_size
            for key in handle.keys():
                # get_slice reads only the header; a truncated file has offsets past its end
                handle.get_slice(key)
            _check_offsets(path, size)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"corrupt or truncated safetensors file {path}: {exc}") from exc
        return handle

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.key_to_file[key]].get_tensor(key)

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.key_to_file[key]].get_slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        """Bytes tensor ``key`` takes in its file, from the header alone."""
        part = self._handles[self.key_to_file[key]].get_slice(key)
        numel = 1
        for dim in part.get_shape():
            numel *= dim
        return numel * _DTYPE_BYTES.get(part.get_dtype(), 4)

    def sources_for(self, param_name: str) -> list[str] | None:
        """Checkpoint keys that make up module parameter ``param_name`` (None when absent)."""
        for candidate in _name_variants(param_name):
            if candidate in self:
                return [candidate]
        for candidate in _name_variants(param_name):
            head, _, leaf = candidate.rpartition(".experts.")
            for parts in _PER_EXPERT_SOURCES.get(leaf, ()):
                keys = self._per_expert_keys(f"{head}.experts", parts)
                if keys:
                    return keys
        return None

    def _per_expert_keys(self, prefix: str, parts: tuple[str, ...]) -> list[str]:
        keys = []
        index = 0
        while all(f"{prefix}.{index}.{p}.weight" in self for p in parts):
            keys.extend(f"{prefix}.{index}.{p}.weight" for p in parts)
            index += 1
        return keys

    def load(self, param_name: str) -> torch.Tensor | None:
        """The tensor for module parameter ``param_name``, stacking per-expert tensors if needed."""
        keys = self.sources_for(param_name)
        if keys is None:
            return None
        if len(keys) == 1 and not re.search(r"\.experts\.\d+\.", keys[0]):
            return self.get(keys[0])
        leaf = param_name.rpartition(".experts.")[2]
        parts_per_expert = 2 if leaf == "gate_up_proj" else 1
        tensors = [self.get(k) for k in keys]
        experts = [
            torch.cat(tensors[i : i + parts_per_expert], dim=0)
            for i in range(0, len(tensors), parts_per_expert)
        ]
        return torch.stack(experts)


def _check_offsets(path: Path, size: int) -> None:
    """Raise if the header promises more bytes than the file holds (a truncated download)."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"truncated safetensors file {path}: {size} bytes, header needs {8 + header_len + end}")


def _name_variants(name: str) -> list[str]:
    """Names a parameter may have in a checkpoint (Mixtral's legacy ``block_sparse_moe``)."""
    variants = [name]
    if ".mlp." in name:
        variants.append(name.replace(".mlp.", ".block_sparse_moe.", 1))
    return variants


class LazyCausalLM:
    """A ``*ForCausalLM`` whose weights live on disk until a module is materialised."""

    def __init__(
        self,
        model_dir: Path,
        model: nn.Module,
        index: CheckpointIndex,
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

    @classmethod
    def open(
        cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> LazyCausalLM:
        """Validate the checkpoint and build the skeleton; no weight is read yet.

        Raises :class:`~grape_kernels.architectures.UnsupportedModelError` for non-MoE models and
        :class:`CheckpointError` for missing/corrupt weights, both before any heavy work.
        """
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        device = parse_device(device)
        model_dir = resolve_model_path(str(name_or_path))
        config = load_config(model_dir)
        get_adapter(config)
        index = CheckpointIndex(model_dir)
        checkpoint_dtype = _config_dtype(config)
        dtype = dtype or checkpoint_dtype
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        from grape_kernels.ragged_modeling import apply_ragged_experts

        apply_ragged_experts(model)
        model.eval()
        model.config.dtype = checkpoint_dtype  # from_config(dtype=...) overwrote it
        lazy = cls(model_dir, model, index, dtype, device, checkpoint_dtype)
        lazy._check_complete()
        return lazy

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
    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Load every parameter and persistent buffer of ``module`` (named ``prefix``) from disk.

        Floating-point parameters take the working dtype; buffers keep the checkpoint's dtype
        (e.g. DeepSeek's float32 correction bias). Buffers absent from the checkpoint keep the
        value the module initialised them with.
        """
        skip = _non_persistent(module)
        tensors = list(module.named_parameters()) + [
            (n, b) for n, b in module.named_buffers() if n not in skip
        ]
        for name, current in tensors:
            full = f"{prefix}.{name}" if prefix else name
            if self._is_tied(full):
                full = "model.embed_tokens.weight"
            value = self.index.load(full)
            if value is None:
                if isinstance(current, nn.Parameter):
                    raise CheckpointError(f"no tensor for {full} in {self.model_dir}")
                continue
            if tuple(value.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"{full}: checkpoint shape {tuple(value.shape)} != model shape {tuple(current.shape)}"
                )
            is_param = isinstance(current, nn.Parameter)
            dtype = self.dtype if (is_param and value.is_floating_point()) else value.dtype
            _set_tensor(module, name, value.to(device=self.device, dtype=dtype))

    def release(self, module: nn.Module) -> None:
        """Return ``module``'s parameters to the meta device (free their memory)."""
        for name, param in list(module.named_parameters()):
            _set_tensor(module, name, torch.empty_like(param, device="meta"))

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}"

    @contextlib.contextmanager
    def materialized_layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with real weights for the duration of the ``with`` block."""
        layer = self.adapter.decoder_layers(self.model)[index]
        self.materialize(layer, self.layer_prefix(index))
        try:
            yield layer
        finally:
            self.release(layer)

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
