"""The plan file's format: its name and versions, the limits its numbers must keep, and the readers
that take a JSON object apart field by field, each refusal a PlanError naming the field
("stages[1].tp: expected a whole number, got 1.5"). partitioner.plan builds the Plan from them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

FORMAT = "hetero-plan"
VERSION = 1
INTERLEAVED_VERSION = 2     # written when any pipeline has virtual_stages > 1 (docs/plan-format.md)
MIXED_MICRO_BATCH_VERSION = 3   # written when the pipelines' micro_batch differ (interleaved or not)
SUBLAYER_VERSION = 4        # written when a stage boundary falls inside a layer (a stage's `blocks`)
SHORT_LAST_VERSION = 5      # written when a pipeline's last micro-batch is smaller (`last_micro_batch`)
VERSIONS = (VERSION, INTERLEAVED_VERSION, MIXED_MICRO_BATCH_VERSION, SUBLAYER_VERSION, SHORT_LAST_VERSION)
# pipeline: one pipeline (hetero-PP); replicas: a pipeline per island (hetero-DP); hybrid: several
# pipelines, each over one island or several, the batch split between them (hetero-DP of hetero-PP).
KINDS = ("pipeline", "replicas", "hybrid")


MAX_COUNT = 1 << 20      # chips, ranks, stages, layers, heads: far beyond any fleet or model
MAX_BATCH = 10 ** 9


class PlanError(ValueError):
    """A plan that breaks the format or its invariants. `field` names the offending
    field ("stages[1].tp") when there is one; `reason` is the message without it."""

    def __init__(self, reason: str, field: str = ""):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


MISSING: Any = object()       # a default that says "the field is required"


def read_pair(pair: Any, name: str) -> tuple[int, int]:
    """A [start, end] range (of layers, or of half-layer blocks), `name` the field it is read from."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise PlanError(f"expected [start, end], got {show(pair)}", name)
    start, end = (read_int({name: pair}, name, index=i) for i in (0, 1))
    return start, end


def get_field(data: Any, key: str, where: str, default: Any = MISSING) -> Any:
    """data[key], or `default` when it is missing (a PlanError naming the field when there is none)."""
    if not isinstance(data, Mapping):
        raise PlanError(f"expected an object, got {show(data)}", where)
    if key not in data:
        if default is MISSING:
            raise PlanError("missing", join_field(where, key))
        return default
    return data[key]


def read_int(data: Any, key: str, where: str = "", low: int = 0, high: int = MAX_COUNT, index: int | None = None,
             default: Any = MISSING) -> int:
    value = get_field(data, key, where, default)
    name = join_field(where, key)
    if index is not None:
        value, name = value[index], f"{name}[{index}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"expected a whole number, got {show(value)}", name)
    if not low <= value <= high:
        raise PlanError(f"expected a whole number from {low} to {high}, got {value}", name)
    return value


def read_number(data: Any, key: str, where: str = "", low: float | None = 0.0) -> float:
    value = get_field(data, key, where)
    name = join_field(where, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"expected a number, got {show(value)}", name)
    if not math.isfinite(value):
        raise PlanError(f"expected a finite number, got {value}", name)
    if low is not None and value < low:
        raise PlanError(f"expected a number >= {low:g}, got {value}", name)
    return float(value)


def read_text(data: Any, key: str, where: str = "", choices: tuple[str, ...] | None = None, default: Any = MISSING) -> str:
    value = get_field(data, key, where, default)
    name = join_field(where, key)
    if not isinstance(value, str) or not value:
        raise PlanError(f"expected a non-empty string, got {show(value)}", name)
    if choices is not None and value not in choices:
        raise PlanError(f"expected one of {', '.join(choices)}, got {show(value)}", name)
    return value


def read_flag(data: Any, key: str, where: str = "", default: Any = MISSING) -> bool:
    value = get_field(data, key, where, default)
    if not isinstance(value, bool):
        raise PlanError(f"expected true or false, got {show(value)}", join_field(where, key))
    return value


def read_items(data: Any, key: str, where: str = "") -> list[Any]:
    value = get_field(data, key, where)
    if not isinstance(value, list):
        raise PlanError(f"expected a list, got {show(value)}", join_field(where, key))
    return value


def read_mapping(data: Any, key: str, where: str = "", default: Any = MISSING) -> Mapping[str, Any]:
    value = get_field(data, key, where, default)
    if not isinstance(value, Mapping):
        raise PlanError(f"expected an object, got {show(value)}", join_field(where, key))
    return value


def read_table(data: Any, key: str, read: Callable[..., Any], default: Any = MISSING, **limits: Any) -> dict:
    """{name: value} with every value read by `read` (read_int or read_number) under `limits`."""
    table = read_mapping(data, key, default=default)
    return {name: read(table, name, key, **limits) for name in table}


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a hand-edited plan naming a field twice is ambiguous."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"not valid JSON: the key {show(key)} appears twice in one object")
        out[key] = value
    return out


def join_field(where: str, key: str) -> str:
    """The field's full name: "stages[1]" and "tp" make "stages[1].tp"."""
    return f"{where}.{key}" if where else key


def show(value: Any) -> str:
    """A value as a refusal quotes it: its JSON, cut to 40 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
