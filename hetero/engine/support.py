"""What this engine runs, declared once: every plan field, and the values it honours.

The planner costs more than one engine version may run (it costed ZeRO-1 and fp32
master weights before either existed). So at start-up, in `hetero run` before any
worker starts and in every worker again (hetero.plan_check, `engine=True`), the plan
is held against this module: a field whose value is not supported here, or a field
it does not know, is refused in one line naming the plan file, the field, the value
and what is supported (exit 2). Nothing is quietly run as something else.

Whoever teaches the engine a feature says so here, and only here:

- ZERO1: optimizer state sharded over each stage's DP group;
- MIXED_PRECISION: bf16/fp16 parameters and activations with fp32 master weights
  and moments (fp16 with loss scaling);
- RECOMPUTE_MODES: the activation recompute modes hetero.model.recompute implements;
- INTERLEAVED: interleaved (virtual-stage) 1F1B, pipelines[].virtual_stages > 1
  (hetero.engine.schedule, stages holding several layer chunks);
- SUBLAYER: stages that begin or end inside a layer, at the seam between its attention and
  MLP halves (stages[].blocks; hetero.model.llama builds the halves a stage holds);
- SHORT_LAST: a pipeline whose last micro-batch is smaller (pipelines[].last_micro_batch;
  hetero.engine.trainer sizes each micro-batch and each boundary's receive by its index);
- KINDS: the plan kinds it trains. "hybrid" (several pipelines, some over several islands)
  needs nothing of its own: every rank sits in one pipeline (hetero.engine.topology), a
  pipeline's stages talk over the bridge where they cross islands, and the hetero-DP bucket
  sum adds every rank's counted shards fleet-wide (hetero.engine.gradients), so a pipeline cut
  over two islands contributes its layers from both.

Every field of the plan format is in exactly one of CHOICES (the engine acts on
its value), STRUCTURE (the layout the engine builds, checked against the job and
the cluster by hetero.plan_check and Plan.problems) or INFORMATIONAL (predictions
and provenance for people; the engine reads no decision from them). A field added
to the format without a place here is refused until someone gives it one.
"""

from __future__ import annotations

from dataclasses import dataclass

# Plain data, no torch: `hetero run` and `hetero launch` read this before any worker starts.
RECOMPUTE_MODES = ("none", "selective", "full")
ZERO1 = True               # hetero.engine.zero + optimizer: state sharded over each stage's DP group
MIXED_PRECISION = True     # hetero.engine.precision: fp32 master weights and moments, fp16 loss scaling
INTERLEAVED = True         # hetero.engine.schedule: virtual stages (several layer chunks per stage)
SUBLAYER = True            # hetero.model.llama: stage boundaries between a layer's attention and MLP halves
SHORT_LAST = True          # hetero.engine.trainer: a smaller last micro-batch (pipelines[].last_micro_batch)
KINDS = ("pipeline", "replicas", "hybrid")   # hetero-PP, hetero-DP, hetero-DP of hetero-PP pipelines


@dataclass(frozen=True)
class Choice:
    values: tuple            # what the engine runs
    missing: str = ""        # why the other values are refused, and what to do instead


HOW_TO_REPLAN = "'hetero run' without --plan plans only what this engine runs"

CHOICES = {
    "kind": Choice(KINDS),
    "dtype": Choice(("fp32", "bf16", "fp16") if MIXED_PRECISION else ("fp32",),
                    "bf16/fp16 training with fp32 master weights is not implemented yet"),
    "zero1": Choice((False, True) if ZERO1 else (False,),
                    f"the optimizer state is replicated: ZeRO-1 is not implemented yet; {HOW_TO_REPLAN}"),
    "recompute": Choice(RECOMPUTE_MODES + ("mixed",)),
    "stages[].recompute": Choice(RECOMPUTE_MODES),
    **({} if INTERLEAVED else {"pipelines[].virtual_stages": Choice(
        (1,), "interleaved 1F1B (virtual stages) is not implemented yet: plan with virtual_stages 1")}),
}

FORMAT = ("format", "version")
STRUCTURE = (
    "cluster", "model", "layers", "heads", "kv_heads", "global_batch", "micro_batch", "num_micro_batches",
    "stages", "pipelines", "ranks",
    "stages[].index", "stages[].pipeline", "stages[].island", "stages[].chip", "stages[].tp", "stages[].dp",
    "stages[].layers", "stages[].offset",
    "pipelines[].index", "pipelines[].stages", "pipelines[].dp", "pipelines[].micro_batch",
    "pipelines[].num_micro_batches", *(("pipelines[].virtual_stages",) if INTERLEAVED else ()), "stages[].chunks",
    *(("stages[].blocks",) if SUBLAYER else ()), *(("pipelines[].last_micro_batch",) if SHORT_LAST else ()),
    "ranks[].rank", "ranks[].island", "ranks[].local_rank", "ranks[].node", "ranks[].pipeline", "ranks[].stage",
    "ranks[].tp_rank", "ranks[].dp_rank",
)
INFORMATIONAL = (
    "predicted_step_s", "tokens_per_s", "mfu", "breakdown", "measured", "provenance", "idle", "memory_gb",
    "stages[].time_s", "stages[].memory_gb", "stages[].source", "pipelines[].samples",
)
KNOWN = frozenset(FORMAT + STRUCTURE + INFORMATIONAL + tuple(CHOICES))
VERSION_2_ONLY = ("pipelines[].virtual_stages", "stages[].chunks")   # written only by interleaved plans
VERSION_4_ONLY = ("stages[].blocks",)      # written only for stages that begin or end inside a layer
VERSION_5_ONLY = ("pipelines[].last_micro_batch",)   # written only for pipelines whose last micro-batch is smaller
LISTS = ("stages", "pipelines", "ranks")


def refusals(plan, raw: dict | None = None) -> list[tuple[str, str]]:
    """(field, why) for everything in `plan` (a partitioner Plan) this engine cannot honour;
    with `raw`, the plan's JSON object, also every field it does not know."""
    out = [] if raw is None else _unknown_fields(raw)
    for field, choice in CHOICES.items():
        if "[]." in field:
            items, name = field.split("[].")
            out += [(f"{items}[{i}].{name}", why) for i, item in enumerate(getattr(plan, items))
                    if (why := _refused(getattr(item, name), choice))]
        elif why := _refused(getattr(plan, field), choice):
            out.append((field, why))
    modes = {s.recompute for s in plan.stages}
    summary = modes.pop() if len(modes) == 1 else "mixed"
    if plan.recompute != summary:
        out.append(("recompute", f"the plan says {plan.recompute!r} but its stages say {summary!r}; "
                                  "the engine runs each stage's own mode: make the plan again"))
    return out


def _refused(value, choice: Choice) -> str:
    if value in choice.values:
        return ""
    supported = ", ".join(_show(v) for v in choice.values)
    why = f"; {choice.missing}" if choice.missing else ""
    return f"{_show(value)} is not supported by this engine (it runs {supported}){why}"


def _unknown_fields(raw: dict) -> list[tuple[str, str]]:
    out = []
    for key in raw:
        if key not in KNOWN:
            out.append((key, "this engine does not know this field and will not ignore it"))
    for name in LISTS:
        items = raw.get(name)
        for index, item in enumerate(items if isinstance(items, list) else ()):
            for key in item if isinstance(item, dict) else ():
                if f"{name}[].{key}" not in KNOWN:
                    out.append((f"{name}[{index}].{key}", "this engine does not know this field and will "
                                                          "not ignore it"))
    return out


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)
