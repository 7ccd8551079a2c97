"""The model section: a Llama-style decoder, described field by field or taken from a
Hugging Face Llama directory (`hf: DIR`, or a directory passed where a model file goes)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import yaml

from hetero.config.fields import Section, boolean, integer, name, number, text
from hetero.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    name: str = "model"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Pretrained:
    """The Hugging Face directory a run starts from (its weights load before step 1 unless the run
    resumes a checkpoint of its own), and the fingerprint it had when the run was described
    (hetero.model.hf.fingerprint: config.json and the safetensors index or headers, not the weights).
    Kept apart from ModelConfig, which describes the architecture checkpoints are checked against."""

    hf: str
    fingerprint: str

    def to_dict(self) -> dict:
        return {"hf": self.hf, "fingerprint": self.fingerprint}


def read_model(section: Section) -> ModelConfig:
    """The architecture of a model section (`hf: DIR` without `layers`: from DIR/config.json)."""
    return read_model_source(section)[0]


def read_model_source(section: Section) -> tuple[ModelConfig, Pretrained | None]:
    """The model section's architecture and, with `hf: DIR`, where its pretrained weights are. With
    `hf:` alone (optionally `seq_len`, `name`, `fingerprint`) the architecture is DIR/config.json's;
    with the fields too (what `hetero run` keeps in a run directory) the fields are the architecture
    and DIR is read only when the weights load."""
    if "hf" not in section.data:
        return _read_fields(section), None
    base = os.path.dirname(os.path.abspath(section.doc.source))
    directory = os.path.normpath(os.path.join(base, section.get("hf", text(4096))))
    recorded = section.get("fingerprint", text(200), None)
    if "layers" in section.data:
        return _read_fields(section), Pretrained(directory, recorded or hf_fingerprint(directory))
    model = hf_model(directory)
    seq_len = section.get("seq_len", integer(1, model.seq_len), model.seq_len)
    model_name = section.get("name", name, model.name)
    section.finish()
    pretrained = Pretrained(directory, hf_fingerprint(directory))
    if recorded and recorded != pretrained.fingerprint:
        section.fail("fingerprint", f"{directory} has changed since it was recorded ({recorded}, now "
                                    f"{pretrained.fingerprint})")
    return dataclasses.replace(model, seq_len=seq_len, name=model_name), pretrained


def hf_model(directory: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama directory (named after it)."""
    from hetero.model.hf import check_checkpoint, read_hf_config   # hetero.model imports this module

    model = read_hf_config(directory)
    check_checkpoint(directory, model)      # a missing shard or tensor: refused before any worker starts
    label = re.sub(r"[^A-Za-z0-9_.-]", "-", os.path.basename(os.path.normpath(directory))).lstrip("-_.")[:64]
    return dataclasses.replace(model, name=label or "hf-model")


def hf_source(directory: str) -> tuple[ModelConfig, Pretrained]:
    """A directory given where a model file goes: its architecture and pretrained source."""
    directory = os.path.abspath(directory)
    return hf_model(directory), Pretrained(directory, hf_fingerprint(directory))


def hf_fingerprint(directory: str) -> str:
    from hetero.model.hf import fingerprint

    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no such directory (expected a Hugging Face Llama checkpoint: "
                        f"config.json + *.safetensors)")
    return fingerprint(directory)


def model_text(model: ModelConfig, pretrained: Pretrained) -> str:
    """A model file that stands on its own for a run started from `pretrained` (what a run
    directory keeps as model.yaml): the architecture field by field, and the source recorded."""
    section = {**dataclasses.asdict(model), **pretrained.to_dict()}
    return (f"# the model of a run started from the Hugging Face model {pretrained.hf}\n"
            "# (its weights are not copied: a resume loads the run's own checkpoint)\n"
            + yaml.safe_dump({"model": section}, sort_keys=False))


def _read_fields(section: Section) -> ModelConfig:
    heads = section.get("heads", integer(1, 1024))
    model = ModelConfig(
        name=section.get("name", name, "model"),
        layers=section.get("layers", integer(1, 1024)),
        hidden=section.get("hidden", integer(1, 1 << 17)),
        heads=heads,
        kv_heads=section.get("kv_heads", integer(1, 1024), heads),
        ffn_hidden=section.get("ffn_hidden", integer(1, 1 << 20)),
        vocab=section.get("vocab", integer(2, 1 << 22)),
        seq_len=section.get("seq_len", integer(1, 1 << 20)),
        tie_embeddings=section.get("tie_embeddings", boolean, False),
        norm_eps=section.get("norm_eps", number(0.0, 1.0), 1e-5),
        rope_theta=section.get("rope_theta", number(0.0, 1e9), 10000.0),
    )
    section.finish()
    if model.heads % model.kv_heads:
        section.fail("kv_heads", f"must divide heads ({model.heads}); got {model.kv_heads}")
    if model.hidden % model.heads:
        section.fail("hidden", f"must be a multiple of heads ({model.heads}); got {model.hidden}")
    if model.head_dim % 2:
        section.fail("hidden", f"hidden / heads = {model.head_dim} must be even for rotary embeddings")
    return model
