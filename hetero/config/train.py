"""The train section: batch, precision, optimizer, checkpoints and data."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hetero.config.fields import Section, choice, integer, number, text

DTYPES = ("fp32", "bf16", "fp16")
DATA_KINDS = ("synthetic", "tokens", "text")
ON_NAN = ("stop", "skip")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str          # resolved against the train file's folder
    every: int        # steps between checkpoints
    keep: int | None = None   # sealed checkpoints kept (the newest; `latest` always); None: all


@dataclass(frozen=True)
class DataConfig:
    kind: str         # synthetic | tokens (a flat file of uint16/uint32 token ids) | text (UTF-8)
    path: str | None = None
    token_dtype: str = "uint16"


@dataclass(frozen=True)
class TrainConfig:
    global_batch: int
    micro_batch: int
    steps: int
    lr: float
    dtype: str = "fp32"
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"   # after warm-up: constant, or cosine / linear decay to min_lr
    min_lr: float = 0.0
    on_nan: str = "stop"     # a non-finite loss or gradient norm: stop the job, or skip that step's update
    checkpoint: CheckpointConfig | None = None
    data: DataConfig = DataConfig(kind="synthetic")


def read_train(section: Section) -> TrainConfig:
    base = os.path.dirname(os.path.abspath(section.doc.source))
    train = TrainConfig(
        global_batch=section.get("global_batch", integer(1, 1 << 24)),
        micro_batch=section.get("micro_batch", integer(1, 1 << 16)),
        steps=section.get("steps", integer(1, 1 << 30)),
        lr=section.get("lr", number(0.0, 10.0)),
        dtype=section.get("dtype", choice(*DTYPES), "fp32"),
        seed=section.get("seed", integer(0, (1 << 63) - 1), 0),
        weight_decay=section.get("weight_decay", number(0.0, 10.0, low_inclusive=True), 0.0),
        grad_clip=section.get("grad_clip", number(0.0, 1e6, low_inclusive=True), 1.0),
        warmup_steps=section.get("warmup_steps", integer(0, 1 << 30), 0),
        lr_schedule=section.get("lr_schedule", choice(*LR_SCHEDULES), "constant"),
        min_lr=section.get("min_lr", number(0.0, 10.0, low_inclusive=True), 0.0),
        on_nan=section.get("on_nan", choice(*ON_NAN), "stop"),
        checkpoint=_read_checkpoint(section, base),
        data=_read_data(section, base),
    )
    section.finish()
    if train.micro_batch > train.global_batch:
        section.fail("micro_batch", f"must not exceed global_batch ({train.global_batch}); got {train.micro_batch}")
    if train.global_batch % train.micro_batch:
        section.fail("micro_batch", f"must divide global_batch ({train.global_batch}); got {train.micro_batch}")
    _check_schedule(section, train)
    return train


def _check_schedule(section: Section, train: TrainConfig) -> None:
    if "min_lr" in section.data and train.lr_schedule == "constant":
        section.fail("min_lr", "applies only to lr_schedule: cosine or linear (the schedule is constant)")
    if train.min_lr > train.lr:
        section.fail("min_lr", f"must not exceed lr ({train.lr:g}); got {train.min_lr:g}")


def _read_checkpoint(section: Section, base: str) -> CheckpointConfig | None:
    ckpt = section.section("checkpoint", None)
    if ckpt is None:
        return None
    config = CheckpointConfig(
        dir=os.path.join(base, ckpt.get("dir", text(4096))),
        every=ckpt.get("every", integer(1, 1 << 30)),
        keep=ckpt.get("keep", integer(1, 1 << 30), None),
    )
    ckpt.finish()
    return config


def _read_data(section: Section, base: str) -> DataConfig:
    if section.data.get("data", "synthetic") == "synthetic":
        section.used.add("data")
        return DataConfig(kind="synthetic")
    data = section.section("data")
    kind = data.get("kind", choice(*DATA_KINDS))
    if kind == "synthetic":
        data.finish()
        return DataConfig(kind="synthetic")
    path = os.path.join(base, data.get("path", text(4096)))
    token_dtype = data.get("token_dtype", choice("uint16", "uint32"), "uint16") if kind == "tokens" else "uint16"
    data.finish()
    if not os.path.isfile(path):
        data.fail("path", f"no such file: {path}")
    return DataConfig(kind=kind, path=path, token_dtype=token_dtype)
