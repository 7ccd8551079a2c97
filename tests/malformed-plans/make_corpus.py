"""Write this corpus: plans `hetero plan --out` made for the default job, each broken in one way.

    .venv/bin/python tests/malformed-plans/make_corpus.py

Rewrites every *.json here and EXPECTED.tsv (file, the fragment `hetero run --plan`'s
one-line error must hold, and the fragment of `hetero launch --plan`'s, or "-" where
launch cannot tell: it knows the cluster but not the model or train file).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIGS = os.path.join(ROOT, "configs")


def good_plan(train_edit: str | None = None) -> dict:
    """The plan `hetero plan --out` writes for the default job (train file edited by `train_edit`)."""
    sys.path.insert(0, ROOT)
    from hetero.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        train = os.path.join(CONFIGS, "train-tiny.yaml")
        if train_edit:
            edited = os.path.join(tmp, "train.yaml")
            with open(train, encoding="utf-8") as src, open(edited, "w", encoding="utf-8") as dst:
                dst.write(src.read().replace(*train_edit.split("|")))
            train = edited
        out = os.path.join(tmp, "plan.json")
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["plan", "--json", "--cluster", os.path.join(CONFIGS, "emulated-mixed.yaml"),
                         "--model", os.path.join(CONFIGS, "llama-tiny.yaml"), "--train", train, "--out", out])
        assert code == 0
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)


def edited(plan: dict, *edits) -> dict:
    """A copy of `plan` with each (path, value) set; a path is a tuple of keys and indices."""
    out = copy.deepcopy(plan)
    for path, value in edits:
        target = out
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return out


def cases(base: dict, batch16: dict) -> list[tuple[str, object, str, str]]:
    """(file, content: a dict to dump or the raw text/bytes, run fragment, launch fragment or "-")."""
    text = json.dumps(base, indent=1)
    last = len(base["stages"]) - 1
    renamed = edited(base, *[(("stages", i, "island"), "medium") for i, s in enumerate(base["stages"])
                             if s["island"] == "fast"],
                     *[(("ranks", i, "island"), "medium") for i, r in enumerate(base["ranks"]) if r["island"] == "fast"])
    deep_layers = edited(base, (("layers",), 16), *[(("stages", i, "layers"), [s["layers"][0], 16 if s["layers"][1] == 8
                                                                            else s["layers"][1]])
                                                 for i, s in enumerate(base["stages"])])
    twice = base["ranks"][1]["local_rank"]
    return [
        # the file itself
        ("binary.json", bytes(range(256)) * 4, "not UTF-8 text", "not UTF-8 text"),
        ("empty.json", b"", "is empty", "is empty"),
        ("whitespace.json", b"  \n\t\n", "is empty", "is empty"),
        ("truncated.json", text[: len(text) // 2], "not valid JSON (line", "not valid JSON (line"),
        ("yaml-not-json.json", "format: hetero-plan\nversion: 1\n", "not valid JSON", "not valid JSON"),
        ("nested-deep.json", "[" * 5_000 + "]" * 5_000, "nested too deeply", "nested too deeply"),
        ("duplicate-key.json", text.replace('"kind":', '"global_batch": 8, "kind":', 1), "appears twice",
         "appears twice"),
        ("top-list.json", [base], "not a hetero plan", "not a hetero plan"),
        ("other-format.json", edited(base, (("format",), "hetero-profile")), "not a hetero plan", "not a hetero plan"),
        ("version-2.json", edited(base, (("version",), 2)), "version: plan version 2 is not supported",
         "version: plan version 2"),
        # every number's type and range
        ("tp-fraction.json", edited(base, (("stages", 0, "tp"), 1.5)), "stages[0].tp: expected a whole number, got 1.5",
         "stages[0].tp"),
        ("tp-string.json", edited(base, (("stages", 0, "tp"), "2")), 'stages[0].tp: expected a whole number, got "2"',
         "stages[0].tp"),
        ("tp-zero.json", edited(base, (("stages", 0, "tp"), 0)), "stages[0].tp: expected a whole number from 1",
         "stages[0].tp"),
        ("dp-bool.json", edited(base, (("stages", 0, "dp"), True)), "stages[0].dp: expected a whole number, got true",
         "stages[0].dp"),
        ("layers-bool.json", edited(base, (("layers",), True)), "layers: expected a whole number, got true", "layers:"),
        ("stage-layers-short.json", edited(base, (("stages", 0, "layers"), [0])), "stages[0].layers: expected [start, end]",
         "stages[0].layers"),
        ("micro-batch-zero.json", edited(base, (("micro_batch",), 0)), "micro_batch: expected a whole number from 1",
         "micro_batch"),
        ("global-batch-huge.json", edited(base, (("global_batch",), 10 ** 12)), "global_batch: expected a whole number "
         "from 1 to 1000000000", "global_batch"),
        ("global-batch-string.json", edited(base, (("global_batch",), "8")), "global_batch: expected a whole number",
         "global_batch"),
        ("nan-time.json", text.replace('"time_s": ', '"time_s": NaN, "was": ', 1), "stages[0].time_s: expected a finite "
         "number, got nan", "stages[0].time_s"),
        ("infinite-step.json", text.replace('"predicted_step_s": ', '"predicted_step_s": Infinity, "was": ', 1),
         "predicted_step_s: expected a finite number", "predicted_step_s"),
        ("negative-step.json", edited(base, (("predicted_step_s",), -2.0)), "predicted_step_s: expected a number >= 0",
         "predicted_step_s"),
        ("negative-memory.json", edited(base, (("stages", last, "memory_gb"), -1.0)),
         f"stages[{last}].memory_gb: expected a number >= 0", "memory_gb"),
        ("mfu-string.json", edited(base, (("mfu", base["stages"][0]["chip"]), "high")), "mfu.emu-fast: expected a number",
         "mfu.emu-fast"),
        ("idle-negative.json", edited(base, (("idle", "fast"), -1)), "idle.fast: expected a whole number from 0",
         "idle.fast"),
        ("zero1-string.json", edited(base, (("zero1",), "false")), 'zero1: expected true or false, got "false"', "zero1"),
        ("kind-unknown.json", edited(base, (("kind",), "tensor")), "kind: expected one of pipeline, replicas", "kind"),
        ("recompute-unknown.json", edited(base, (("stages", 0, "recompute"), "some")),
         "stages[0].recompute: expected one of none, selective, full", "stages[0].recompute"),
        ("dtype-unknown.json", edited(base, (("dtype",), "fp64")), "dtype: expected one of", "dtype: expected one of"),
        ("island-number.json", edited(base, (("stages", 0, "island"), 5)), "stages[0].island: expected a non-empty "
         "string", "stages[0].island"),
        ("missing-stages.json", {k: v for k, v in base.items() if k != "stages"}, "stages: missing", "stages: missing"),
        ("stages-not-list.json", edited(base, (("stages",), {"0": base["stages"][0]})), "stages: expected a list",
         "stages: expected a list"),
        ("rank-not-object.json", edited(base, (("ranks", 0), 0)), "ranks[0]: expected an object", "ranks[0]"),
        ("rank-missing-field.json", edited(base, (("ranks", 2), {k: v for k, v in base["ranks"][2].items()
                                                                   if k != "tp_rank"})),
         "ranks[2].tp_rank: missing", "ranks[2].tp_rank: missing"),
        # the plan's own invariants
        ("global-batch-edited.json", edited(base, (("global_batch",), 16)),
         "pipelines process 8 samples per step, global_batch is 16", "pipelines process 8 samples"),
        ("chip-twice.json", edited(base, (("ranks", 0, "local_rank"), twice)),
         f"rank 0: local rank {twice} is not offset + dp_rank*tp + tp_rank (and 1 more)", "rank 0: local rank"),
        # against the job: cluster (launch sees these too), model and train (run only)
        ("cluster-name.json", edited(base, (("cluster",), "another-fleet")),
         "cluster: made for cluster 'another-fleet', not 'emulated-mixed'", "made for cluster 'another-fleet'"),
        ("unknown-island.json", renamed, "unknown island 'medium'", "unknown island 'medium'"),
        ("wrong-chip.json", edited(base, (("stages", 0, "chip"), "emu-slow")), "has chip emu-fast, plan says emu-slow",
         "has chip emu-fast, plan says emu-slow"),
        ("too-much-memory.json", edited(base, (("stages", 0, "memory_gb"), 1000.0)), "GB per chip", "GB per chip"),
        ("global-batch-16.json", batch16, "global_batch: the plan says 16, the train file", "-"),
        ("dtype-bf16.json", edited(base, (("dtype",), "bf16")), "dtype: the plan says 'bf16', the train file", "-"),
        ("model-name.json", edited(base, (("model",), "llama-7b")), "model: the plan says 'llama-7b', the model file",
         "-"),
        ("heads.json", edited(base, (("heads",), 8)), "heads: the plan says 8, the model file", "-"),
        ("kv-heads.json", edited(base, (("kv_heads",), 4)), "kv_heads: the plan says 4, the model file", "-"),
        ("layers-16.json", deep_layers, "layers: the plan says 16, the model file", "-"),
    ]


def main() -> None:
    base = good_plan()
    batch16 = good_plan("global_batch: 8 |global_batch: 16 ")
    for name in os.listdir(HERE):
        if name.endswith(".json"):
            os.remove(os.path.join(HERE, name))
    rows = ["# file\tfragment of hetero run --plan's one-line error\tof hetero launch --plan's (- : launch accepts it)"]
    for name, content, run_fragment, launch_fragment in cases(base, batch16):
        if isinstance(content, (dict, list)):
            content = json.dumps(content, indent=1) + "\n"
        if isinstance(content, str):
            content = content.encode("utf-8")
        with open(os.path.join(HERE, name), "wb") as handle:
            handle.write(content)
        rows.append(f"{name}\t{run_fragment}\t{launch_fragment}")
    with open(os.path.join(HERE, "EXPECTED.tsv"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    print(f"wrote {len(rows) - 1} plans to {HERE}")


if __name__ == "__main__":
    main()
