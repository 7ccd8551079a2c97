"""Load a local Hugging Face Llama checkpoint (config.json + *.safetensors, one
file or sharded with model.safetensors.index.json) into a stage of any layer
range and TP degree. Nothing is downloaded; pickled *.bin weights are not read.

HF Llama's q/k weights are already in the half-rotation layout its rotate_half
(and accelerators.ops.rotary) uses, so tensors load as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Iterator, Mapping

import torch

from hetero.config.model import ModelConfig
from hetero.errors import ConfigError, UserError
from hetero.model import layout
from hetero.model.llama import LlamaStage
from hetero.model.parallel import TensorParallel
from hetero.model.state import load_full_state_dict

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# ModelConfig fields that change the weights or the math (not name, not seq_len).
ARCHITECTURE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab",
                       "tie_embeddings", "norm_eps", "rope_theta")

# config.json key -> ModelConfig field
_REQUIRED = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "num_attention_heads": "heads",
    "intermediate_size": "ffn_hidden",
    "vocab_size": "vocab",
    "max_position_embeddings": "seq_len",
}


def read_hf_config(directory: str) -> ModelConfig:
    """ModelConfig from a HF Llama config.json; UserError for anything this
    model does not compute the same way (scaled RoPE, biases, other activations)."""
    path = os.path.join(_check_dir(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing: {directory} is a directory, and a directory is read as a Hugging Face "
                        f"model, which needs config.json (or give a YAML file)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", "expected a JSON object")

    def fail(key: str, message: str):
        raise ConfigError(path, key, message)

    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        fail("model_type", f"{model_type!r} is not supported; only 'llama'")
    fields: dict[str, Any] = {}
    for key, field in _REQUIRED.items():
        fields[field] = _positive_int(data, key, fail)
    heads = fields["heads"]
    fields["kv_heads"] = _positive_int(data, "num_key_value_heads", fail, default=heads)
    if data.get("hidden_act", "silu") != "silu":
        fail("hidden_act", f"{data['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key):
            fail(key, "biases are not supported; must be false")
    if data.get("rope_scaling"):
        fail("rope_scaling", "scaled RoPE is not supported; must be null")
    fields["rope_theta"] = _rope_theta(data, fail)
    fields["tie_embeddings"] = bool(data.get("tie_word_embeddings", False))
    eps = data.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        fail("rms_norm_eps", f"must be a number in (0, 1), got {eps!r}")
    fields["norm_eps"] = float(eps)

    if fields["hidden"] % heads or (fields["hidden"] // heads) % 2:
        fail("hidden_size", f"hidden_size / num_attention_heads must be an even integer "
                            f"({fields['hidden']} / {heads})")
    head_dim = data.get("head_dim")
    if head_dim is not None and head_dim != fields["hidden"] // heads:
        fail("head_dim", f"{head_dim} != hidden_size / num_attention_heads "
                         f"({fields['hidden'] // heads}); a separate head_dim is not supported")
    if heads % fields["kv_heads"]:
        fail("num_key_value_heads", f"{fields['kv_heads']} must divide num_attention_heads ({heads})")
    return ModelConfig(**fields)


def load_hf_checkpoint(stage: LlamaStage, directory: str) -> None:
    """Fill `stage` with its slices of the checkpoint in `directory`; the
    checkpoint's config must describe the stage's model."""
    check_matches(stage, directory)
    with SafetensorsCheckpoint(directory) as checkpoint:
        load_full_state_dict(stage, checkpoint, source=directory)


def fingerprint(directory: str) -> str:
    """What identifies a checkpoint directory without reading its weights: SHA-256 over config.json,
    the safetensors index and every weight file's header (names, dtypes, shapes, offsets) and size.
    A run records it beside the path, never a copy of the weights."""
    digest = hashlib.sha256()
    names = [CONFIG_FILE, *(name for name in [INDEX_FILE] if os.path.isfile(os.path.join(directory, name)))]
    names += sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as handle:
                data = handle.read() if not name.endswith(".safetensors") else _header(handle)
            size = os.path.getsize(path)
        except OSError as exc:
            raise UserError(f"{path}: not readable ({exc.strerror or exc})") from None
        digest.update(f"{name}\0{size}\0".encode() + data)
    return "sha256:" + digest.hexdigest()


def _header(handle) -> bytes:
    """A safetensors file's length prefix and JSON header (bounded: a damaged prefix reads little)."""
    prefix = handle.read(8)
    length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
    return prefix + handle.read(min(length, 100 << 20))


def check_checkpoint(directory: str, config: ModelConfig) -> None:
    """A UserError (one line) unless `directory` holds every tensor of the model `config` describes,
    each with its shape: read from the safetensors headers only, so a missing shard or tensor is
    refused before any worker starts rather than on the rank that needs it."""
    with SafetensorsCheckpoint(directory) as checkpoint:
        names = layout.model_names(config)
        missing = [name for name in names if name not in checkpoint]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(f"{directory}: missing tensor(s) {shown}")
        for name in names:
            found, needed = tuple(checkpoint.shape(name)), layout.full_shape(config, name)
            if found != needed:
                raise UserError(f"{directory}: {name} has shape {found}, the model needs {needed}")


def pretrained_tensors(stage: LlamaStage, directory: str,
                       expected: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(module parameter name, full fp32 host tensor) for each of `stage`'s own parameters, read one
    at a time from the checkpoint in `directory` (other stages' layers are never read). `expected`:
    the fingerprint the run recorded; a directory that changed since is refused."""
    check_matches(stage, directory)
    if expected is not None and fingerprint(directory) != expected:
        raise UserError(f"{directory}: has changed since the run recorded it ({expected}); "
                        f"start a new run from it, or restore it")
    check_checkpoint(directory, stage.config)
    with SafetensorsCheckpoint(directory) as checkpoint:
        for module, _ in stage.named_parameters():
            yield module, checkpoint[stage.hf_name(module)].float()


def check_matches(stage: LlamaStage, directory: str) -> None:
    """A UserError unless the checkpoint's config.json describes the stage's model."""
    config = read_hf_config(directory)
    diffs = [f"{field} {getattr(config, field)!r} vs {getattr(stage.config, field)!r}"
             for field in ARCHITECTURE_FIELDS if getattr(config, field) != getattr(stage.config, field)]
    if diffs:
        raise UserError(f"{os.path.join(directory, CONFIG_FILE)}: describes another model than the "
                        f"stage's (checkpoint vs stage: {', '.join(diffs)})")


def load_hf_stage(directory: str, layer_range: tuple[int, int] | None = None, *,
                  first: bool | None = None, last: bool | None = None,
                  tp: TensorParallel | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> LlamaStage:
    """Build a stage (default: the whole model) from a HF checkpoint directory."""
    config = read_hf_config(directory)
    stage = LlamaStage(config, layer_range, first, last, tp, dtype, device, seed=None)
    load_hf_checkpoint(stage, directory)
    return stage


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint directory by name, read lazily: a stage reads
    only its own layers, whichever shard file holds them."""

    def __init__(self, directory: str):
        self.directory = _check_dir(directory)
        self._open: dict[str, Any] = {}   # file name -> safe_open handle
        self._where = self._index()       # tensor name -> file name

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._open.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle(self._where[name]).get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> list[int]:
        """A tensor's shape from its file's header, without reading it."""
        return self._handle(self._where[name]).get_slice(name).get_shape()

    def _index(self) -> dict[str, str]:
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index_path}: not a safetensors index with a weight_map ({exc})") from None
            for file in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.directory, file)):
                    raise UserError(f"{index_path}: names {file}, which is missing")
            return dict(weight_map)
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if SINGLE_FILE in files:
            files = [SINGLE_FILE]
        if len(files) != 1:
            found = "none" if not files else f"{len(files)} without {INDEX_FILE}"
            raise UserError(f"{self.directory}: expected {SINGLE_FILE} or sharded *.safetensors with "
                            f"{INDEX_FILE}; found {found} (pickled *.bin weights are not read)")
        return {name: files[0] for name in self._handle(files[0]).keys()}

    def _handle(self, file: str):
        if file not in self._open:
            from safetensors import SafetensorError, safe_open

            path = os.path.join(self.directory, file)
            try:
                self._open[file] = safe_open(path, framework="pt", device="cpu")
            except (OSError, SafetensorError) as exc:
                raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
        return self._open[file]


def _check_dir(directory: str) -> str:
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no such directory (expected a Hugging Face Llama checkpoint: "
                        f"config.json + *.safetensors)")
    return directory


def _positive_int(data: dict, key: str, fail, default: Any = None) -> int:
    value = data.get(key, default)
    if value is None:
        fail(key, "missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(key, f"must be a positive integer, got {value!r}")
    return value


def _rope_theta(data: dict, fail) -> float:
    # transformers >= 5 nests RoPE settings in rope_parameters; 4.x keeps rope_theta on top.
    params = data.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            fail("rope_parameters", f"expected an object, got {params!r}")
        if params.get("rope_type", "default") != "default":
            fail("rope_parameters.rope_type", f"{params['rope_type']!r} is not supported; only 'default'")
        theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    else:
        theta = data.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        fail("rope_theta", f"must be a positive number, got {theta!r}")
    return float(theta)
