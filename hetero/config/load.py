"""Load cluster, model and train descriptions from YAML files.

A file holds one section (its fields at the top level) or several, under the
top-level keys `cluster:`, `model:` and `train:`. A bare file's kind is told by
the field that only that kind has (islands, layers or hf, global_batch). A directory given for the
model is a Hugging Face Llama checkpoint (hetero.config.model.hf_source).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Literal, overload

from hetero.config.cluster import ClusterConfig, read_cluster
from hetero.config.fields import Section, describe
from hetero.config.model import ModelConfig, Pretrained, hf_source, read_model_source
from hetero.config.train import TrainConfig, read_train
from hetero.config.yaml_io import read_yaml
from hetero.data.sidecar import read_sidecar
from hetero.errors import ConfigError, UserError

READERS = {"cluster": read_cluster, "model": read_model_source, "train": read_train}
# The field that tells a bare file's kind.
MARKERS = {"islands": "cluster", "layers": "model", "hf": "model", "global_batch": "train"}


@dataclass(frozen=True)
class Job:
    """What the loaded files describe; any part may be absent."""

    cluster: ClusterConfig | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None
    sources: tuple = ()                 # (kind, path) for each part, in load order
    pretrained: Pretrained | None = None   # the Hugging Face model a run starts from, if any

    @overload
    def require(self, first: Literal["cluster"], second: Literal["model"], third: Literal["train"], /) -> FullJob: ...

    @overload
    def require(self, *kinds: str) -> Job: ...

    def require(self, *kinds: str) -> Job:
        """This job, or one line naming the first part missing. Asked for all three parts
        (cluster, model, train, in that order), it returns them typed as present: a FullJob."""
        missing = [kind for kind in kinds if getattr(self, kind) is None]
        if missing:
            raise _missing(missing)
        if {"cluster", "model", "train"} <= set(kinds) and not isinstance(self, FullJob):
            return FullJob(**{f.name: getattr(self, f.name) for f in fields(self)})
        return self

    def require_cluster(self) -> ClusterConfig:
        """The cluster, or the same one line as require("cluster")."""
        if self.cluster is None:
            raise _missing(["cluster"])
        return self.cluster

    def require_model(self) -> ModelConfig:
        """The model, or the same one line as require("model")."""
        if self.model is None:
            raise _missing(["model"])
        return self.model


@dataclass(frozen=True)
class FullJob(Job):
    """A Job whose cluster, model and train are all present (what Job.require of all three returns):
    the types say so, so no caller re-checks for None."""

    cluster: ClusterConfig
    model: ModelConfig
    train: TrainConfig


def _missing(kinds: list[str]) -> UserError:
    return UserError(f"no {' or '.join(kinds)} description given "
                     f"(pass --{kinds[0]} FILE, or a file with a '{kinds[0]}:' section)")


def load_sections(path: str, want: str | None = None) -> dict:
    """Read one file; return {kind: config} for each section it holds.

    `want` names the kind the caller expects (from --cluster/--model/--train):
    a bare file is then read as that kind, and a sectioned file must contain it. A directory is a
    Hugging Face model: {"model": ModelConfig, "pretrained": Pretrained}, as is a model section
    with `hf:`.
    """
    if os.path.isdir(path):
        if want not in (None, "model"):
            raise ConfigError(path, "", f"is a directory; a {want} description is a YAML file")
        model, pretrained = hf_source(path)
        return {"model": model, "pretrained": pretrained}
    doc = read_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(path, "", f"expected a mapping at the top level, got {describe(doc.data)}")
    sectioned = [key for key in doc.data if key in READERS]
    if sectioned:
        root = Section(doc, "", doc.data)
        found = {kind: READERS[kind](root.section(kind)) for kind in READERS if kind in doc.data}
        root.finish()
        _split_model(found)
        if want and want not in found:
            raise ConfigError(path, "", f"has no '{want}:' section (it has {', '.join(found)})")
        return found
    kind = want or _bare_kind(path, doc.data)
    return _split_model({kind: READERS[kind](Section(doc, "", doc.data))})


def _split_model(found: dict) -> dict:
    """The model reader's (ModelConfig, Pretrained | None) as two entries: "model" and "pretrained"."""
    if "model" in found:
        found["model"], pretrained = found["model"]
        if pretrained is not None:
            found["pretrained"] = pretrained
    return found


def _bare_kind(path: str, data: dict) -> str:
    kinds = {MARKERS[key] for key in data if key in MARKERS}
    if len(kinds) == 1:
        return kinds.pop()
    raise ConfigError(path, "", "cannot tell what this file describes: expected the top-level field "
                                "'islands' (cluster), 'layers' or 'hf' (model) or 'global_batch' (train), "
                                "or sections cluster:, model:, train:")


def load_files(paths: list[str]) -> Job:
    """Load several files into one Job; each kind may be described only once."""
    parts: dict = {}
    origin: dict = {}
    for path in paths:
        for kind, config in load_sections(path).items():
            if kind == "pretrained":
                parts[kind] = config
                continue
            if kind in parts:
                raise ConfigError(path, kind, f"a {kind} is already described in {origin[kind]}")
            parts[kind] = config
            origin[kind] = path
    job = Job(**parts, sources=tuple(origin.items()))
    check_job(job, origin)
    return job


def load_job(cluster: str | None = None, model: str | None = None, train: str | None = None) -> Job:
    """Load the files given as --cluster, --model and --train (one file may serve several)."""
    parts: dict = {}
    origin: dict = {}
    cache: dict = {}
    for kind, path in (("cluster", cluster), ("model", model), ("train", train)):
        if path is None:
            continue
        if path not in cache:
            cache[path] = load_sections(path, want=kind)
        sections = cache[path]
        if kind not in sections:
            raise ConfigError(path, "", f"has no '{kind}:' section (it has {', '.join(sections)})")
        parts[kind] = sections[kind]
        if kind == "model" and "pretrained" in sections:
            parts["pretrained"] = sections["pretrained"]
        origin[kind] = path
    job = Job(**parts, sources=tuple(origin.items()))
    check_job(job, origin)
    return job


def check_job(job: Job, origin: dict) -> None:
    """Rules that span files."""
    data = job.train.data if job.train else None
    if job.model and data is not None and data.kind == "tokens" and data.path is not None:
        # Refused here, before any worker starts (each worker checks again against the file itself).
        meta = read_sidecar(data.path)
        if meta is not None and meta["vocab_size"] > job.model.vocab:
            raise ConfigError(origin["train"], "data.path",
                              f"{data.path}: its tokenizer's vocabulary ({meta['vocab_size']}) is larger "
                              f"than model '{job.model.name}''s vocab ({job.model.vocab}) in {origin['model']}")
    if job.model and job.cluster:
        from hetero.planning import model_spec      # planning reads Job: imported here, not at the top
        from partitioner.costs import layer_params

        one_layer = layer_params(model_spec(job.model))     # the cost model's count, the one definition
        for island in job.cluster.islands:
            chip = job.cluster.chip(island.chip)
            # A chip too small for even one layer's weights (2 bytes each) can never hold a stage.
            if one_layer * 2 > chip.memory_gb * 1e9:
                raise ConfigError(origin["cluster"], f"islands[{job.cluster.islands.index(island)}].chip",
                                  f"chip {island.chip} ({chip.memory_gb:g} GB) cannot hold even one layer "
                                  f"of model '{job.model.name}'")
