"""Read a plan file and check it against the job it runs with, before any worker starts.

A plan is only right for the cluster, model and train files it was made from: one
made for a global batch of 16 and run with a train file that says 8 would train 16
samples, divide by 8 and report the loss doubled. So wherever a plan file is read
(`hetero run --plan`, `hetero launch --plan`, the worker), it is checked first:

- the file: readable, UTF-8, JSON, a `hetero-plan` of a supported version, every
  field of the right type and range (partitioner.plan.Plan.from_json), and the
  plan's own invariants (Plan.problems);
- against the job: the cluster's name, islands, chips, node sizes and memory; the
  model's name, layers, heads and kv_heads (and that a Hugging Face directory the
  plan recorded has not changed since); the train file's global batch and
  dtype. The train file's micro_batch is only where the planner starts searching;
  the plan's own micro_batch is what runs, and its pipelines must add up to the
  train file's global batch;
- against this engine, where the engine will run it (`engine=True`: `hetero run`, the
  worker): every field's value is one the engine honours and every field is one it
  knows (hetero.engine.support). `hetero launch` of another script skips this part.

Every problem is one ConfigError: the plan file, the field and what was expected.
"""

from __future__ import annotations

import json
import os

from hetero.engine import support
from hetero.errors import ConfigError
from hetero.planning import fleet_spec
from partitioner.plan import Plan, PlanError

MAX_PLAN_BYTES = 64 << 20        # a plan for 100,000 chips is about 30 MB
REMAKE = "make the plan again with 'hetero plan ... --out'"


def read_plan(path: str) -> Plan:
    """The Plan in `path`, its format, fields and invariants checked; else a ConfigError."""
    path = os.fspath(path)
    return _parse(path, _read_text(path))


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a plan file") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise ConfigError(path, "", f"larger than {MAX_PLAN_BYTES >> 20} MiB: not a plan")
    if not raw.strip():
        raise ConfigError(path, "", "is empty, not a plan")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not a plan: not UTF-8 text (byte {exc.start})") from None
    return text


def _parse(path: str, text: str) -> Plan:
    try:
        plan = Plan.from_json(text)
    except PlanError as exc:
        raise ConfigError(path, exc.field, exc.reason) from None
    _refuse(path, [("", problem) for problem in plan.problems()])
    return plan


def mismatches(plan: Plan, job) -> list[tuple[str, str]]:
    """(field, what is wrong) for each way `plan` disagrees with the job's loaded parts
    (a hetero.config.Job; parts that are None are not checked)."""
    files = dict(job.sources)
    out: list[tuple[str, str]] = []

    def expect(field: str, planned, wanted, kind: str) -> None:
        if planned != wanted:
            where = f"the {kind} file {files[kind]}" if kind in files else f"the {kind} file"
            out.append((field, f"the plan says {planned!r}, {where} says {wanted!r}; {REMAKE}"))

    if job.cluster is not None:
        if plan.cluster != job.cluster.name:
            out.append(("cluster", f"made for cluster '{plan.cluster}', not '{job.cluster.name}'; {REMAKE}"))
        else:
            out += [("", f"does not match cluster '{job.cluster.name}': {problem}")
                    for problem in plan.problems(fleet_spec(job.cluster))]
    if job.model is not None:
        for field in ("name", "layers", "heads", "kv_heads"):
            expect("model" if field == "name" else field, getattr(plan, "model" if field == "name" else field),
                   getattr(job.model, field), "model")
        out += _pretrained_changed(plan, getattr(job, "pretrained", None))
    if job.train is not None:
        expect("global_batch", plan.global_batch, job.train.global_batch, "train")
        expect("dtype", plan.dtype, job.train.dtype, "train")
    return out


def _pretrained_changed(plan: Plan, pretrained) -> list[tuple[str, str]]:
    """The Hugging Face directory the plan was made from, changed since (same path, another
    fingerprint): the workers, and a restart before the first checkpoint, would load other weights
    than the run was planned and recorded with."""
    recorded = plan.provenance.get("pretrained")
    if pretrained is None or not isinstance(recorded, dict) or recorded.get("hf") != pretrained.hf:
        return []
    if recorded.get("fingerprint") == pretrained.fingerprint:
        return []
    return [("provenance.pretrained", f"{pretrained.hf} has changed since the plan was made "
                                      f"({recorded.get('fingerprint')}, now {pretrained.fingerprint}); {REMAKE}")]


def check_plan(plan: Plan, job, source: str) -> Plan:
    """`plan` if it fits the job, else a ConfigError naming `source` (the plan file) and the first field."""
    _refuse(source, mismatches(plan, job))
    return plan


def check_supported(plan: Plan, source: str, raw: dict | None = None) -> Plan:
    """`plan` if this engine runs every field of it as asked (hetero.engine.support), else a
    ConfigError naming `source`, the first field, its value and what is supported. With `raw`
    (the plan file's JSON object), a field the engine does not know is refused too."""
    _refuse(source, support.refusals(plan, raw))
    return plan


def load_checked_plan(path: str, job, *, engine: bool = False) -> Plan:
    """Read the plan file at `path` and check it against `job`: what the launcher does before
    starting workers, and what a worker repeats before it builds its stage. With `engine`
    (`hetero run`, the worker), also against what this engine runs. Raises ConfigError (a
    UserError: one line naming the file and field)."""
    path = os.fspath(path)
    text = _read_text(path)
    plan = check_plan(_parse(path, text), job, path)
    return check_supported(plan, path, json.loads(text)) if engine else plan


def _refuse(source: str, problems: list[tuple[str, str]]) -> None:
    if problems:
        field, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(source, field, message + more)
