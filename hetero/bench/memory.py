"""`hetero bench memory`: each stage's measured peak device memory against the plan's `memory_gb`.

The matrix: dtype fp32/bf16 x recompute none/selective/full x ZeRO-1 off/on x TP 1/2,
every cell a two-stage pipeline over the emulated mixed fleet (fast -> slow). Each
cell's plan is built here with the partitioner's own pieces (`CostModel`,
`evaluate_pipeline`, `to_plan`), so the shape is the one asked (TP, DP 2 inside each
island wherever ZeRO-1 is on, the recompute mode) and each stage's `memory_gb` is the
cost model's prediction. The engine then trains a few steps of the plan and records
every stage's peak (`metrics/steps.jsonl`, `peak_memory_gb`); the ratio is measured
over predicted, goal within +-10%.

The default fleet has two chips per island: enough for TP 1 x DP 2 and TP 2 x DP 1,
not for TP 2 x DP 2, so the TP 2 x ZeRO-1 cells run on the same fleet with four chips
per island. Memory is deterministic: the load of the machine does not change it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import sys
import tempfile

import yaml

from hetero.commands.flags import add_job_files
from hetero.config import load_catalog, load_job
from hetero.errors import UserError
from hetero.planning import fleet_spec, model_spec, train_spec
from hetero.runner import ROOT, train_fleet
from partitioner.costs import CostModel
from partitioner.search import Candidate, Slot, evaluate_pipeline, to_plan

HELP = "predicted vs measured peak memory per stage: fp32/bf16 x recompute x ZeRO-1 x TP on the emulated fleet"
RATIO_GOAL = 0.10
RETRIES = 1                # a cell whose run fails (a loaded machine can miss a heartbeat) runs once more
CONFIGS = os.path.join(ROOT, "configs")
DEFAULT_FILES = {"cluster": "emulated-mixed.yaml", "model": "llama-tiny.yaml", "train": "train-tiny.yaml"}
DTYPES = ("fp32", "bf16")
RECOMPUTE = ("none", "selective", "full")
ZERO = (False, True)
TPS = (1, 2)
BENCH_MEMORY_GB = 0.2      # per chip: every cell fits
SPEED_UP = 100             # the chips' catalog speeds x this: seconds per cell, not minutes


@dataclasses.dataclass(frozen=True)
class Cell:
    dtype: str
    recompute: str
    zero1: bool
    tp: int

    @property
    def dp(self) -> int:
        return 2 if self.zero1 or self.tp == 1 else 1

    @property
    def chips_per_island(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        return f"{self.dtype}/{self.recompute}/zero1-{'on' if self.zero1 else 'off'}/tp{self.tp}"


def add_arguments(parser) -> None:
    add_job_files(parser, defaults=DEFAULT_FILES, notes={"train": ", its dtype replaced by each cell's"})
    parser.add_argument("--steps", type=int, default=3, help="steps per cell (default 3)")
    parser.add_argument("--only", metavar="TEXT", action="append", default=[],
                        help="run only the cells whose name (e.g. bf16/full/zero1-on/tp2) contains TEXT; repeatable "
                             "(a cell matching any of them runs)")
    parser.add_argument("--out", metavar="DIR", help="where the cells' run directories go (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cells(only=()) -> list[Cell]:
    """The matrix, in the order it runs; `only`: keep the cells whose name contains any of these."""
    every = [Cell(d, r, z, t) for d, r, z, t in itertools.product(DTYPES, RECOMPUTE, ZERO, TPS)]
    return [c for c in every if not only or any(text in c.name for text in only)]


def run(args) -> int:
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    chosen = cells(args.only)
    if not chosen:
        raise UserError(f"--only {' '.join(args.only)}: no cell matches; cells look like "
                        f"{cells()[0].name}")
    paths = {kind: getattr(args, kind) or os.path.join(CONFIGS, name) for kind, name in DEFAULT_FILES.items()}
    out = args.out or tempfile.mkdtemp(prefix="hetero-bench-memory-")
    rows = []
    for index, cell in enumerate(chosen, 1):
        _say(f"[{index}/{len(chosen)}] {cell.name}: training {args.steps} steps")
        rows += run_cell(cell, paths, os.path.join(out, cell.name.replace("/", "-")), args.steps)
        _say("   " + "; ".join(f"stage {r['stage']} {r['measured_mb']:.2f}/{r['predicted_mb']:.2f} MB "
                               f"= {r['ratio']:.3f}" for r in rows if r["cell"] == cell.name and r["ratio"]))
    report = summarise(rows, out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


def _say(text: str) -> None:
    print(f"bench memory: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one cell

def run_cell(cell: Cell, paths: dict, run_dir: str, steps: int) -> list[dict]:
    """Train `steps` steps of the cell's plan; one row per stage: predicted, measured, ratio."""
    os.makedirs(run_dir, exist_ok=True)
    cell_paths = {"cluster": _cell_cluster(paths["cluster"], cell, run_dir),
                  "model": paths["model"], "train": _cell_train(paths["train"], cell, run_dir)}
    job = load_job(**cell_paths).require("cluster", "model", "train")
    plan = cell_plan(job, cell)
    plan_file = os.path.join(run_dir, "cell-plan.json")
    with open(plan_file, "w", encoding="utf-8") as handle:
        handle.write(plan.to_json())
    for attempt in range(1 + RETRIES):
        result = train_fleet(job, cell_paths, os.path.join(run_dir, f"run{attempt or ''}"), steps,
                             plan_file=plan_file, progress=False, say=lambda message: None)
        if result.code == 0 and result.records:
            return stage_rows(cell, plan, result.records)
        _say(f"   cell {cell.name} failed (exit {result.code}; see {result.run_dir}/launcher.log)"
             + ("; once more" if attempt < RETRIES else ""))
    return [dict(_row(cell, stage), measured_mb=None, ratio=None) for stage in plan.stages]


def cell_plan(job, cell: Cell):
    """The cell's two-stage pipeline (fast -> slow), layers split and memory predicted by the cost model.
    Whole layers: the bench checks the memory model, and a stage cut inside a layer is costed
    conservatively, at every layer it touches (partitioner/halves.py)."""
    fleet = fleet_spec(job.cluster)
    train = dataclasses.replace(train_spec(job.train), dtype=cell.dtype, search_micro_batch=False,
                                recompute_modes=(cell.recompute,), zero1=cell.zero1, modes=("pipeline",),
                                half_layers=False)
    cm = CostModel(fleet, model_spec(job.model), train)
    islands = {i.name: i for i in fleet.islands}
    layout = [Slot(islands["fast"], cell.tp, 0), Slot(islands["slow"], cell.tp, 0)]
    m = train.global_batch // (cell.dp * train.micro_batch)
    pe = evaluate_pipeline(cm, layout, cell.dp, train.micro_batch, m)
    if pe is None:
        raise UserError(f"bench memory: cell {cell.name} does not fit the fleet's chips")
    return to_plan(cm, fleet, Candidate("pipeline", [pe], pe.step(), label=cell.name))


def stage_rows(cell: Cell, plan, records: list) -> list[dict]:
    """Per stage, the largest peak any step recorded against the plan's memory_gb."""
    rows = []
    for stage in plan.stages:
        peaks = [r["peak_memory_gb"][stage.index] for r in records if r.get("peak_memory_gb")]
        peaks = [p for p in peaks if p is not None]
        if not peaks:
            raise UserError(f"bench memory: cell {cell.name}: stage {stage.index} recorded no peak memory")
        measured = max(peaks)
        rows.append(dict(_row(cell, stage), measured_mb=measured * 1e3, ratio=measured / stage.memory_gb))
    return rows


def _row(cell: Cell, stage) -> dict:
    return {"cell": cell.name, "dtype": cell.dtype, "recompute": cell.recompute, "zero1": cell.zero1,
            "tp": cell.tp, "dp": cell.dp, "stage": stage.index, "island": stage.island,
            "layers": list(stage.layers), **({"blocks": list(stage.blocks)} if stage.blocks else {}),
            "predicted_mb": stage.memory_gb * 1e3}


def _cell_cluster(path: str, cell: Cell, run_dir: str) -> str:
    """The fleet (islands, nodes, network as given) on a free coordinator port, with as many chips
    per island as the cell needs, each island's chip replaced by a roomier, quicker copy of it
    (BENCH_MEMORY_GB, speeds x SPEED_UP): every cell must fit (llama-tiny in fp32 without
    recompute or ZeRO-1 does not fit two of the catalog's 20 MB chips), and a cell should take
    seconds. Neither changes what the engine allocates nor what the cost model predicts."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    data.setdefault("coordinator", {})["port"] = _free_port()
    catalog = load_catalog()
    chips = data.setdefault("chips", {})
    for island in data["islands"]:
        for node in island["nodes"]:
            node["chips"] = max(node["chips"], cell.chips_per_island)
        name = island["chip"]
        spec = chips.get(name) or _catalog_chip(catalog, name)
        island["chip"] = f"{name}-bench"
        chips[island["chip"]] = _roomy(spec)
    out = os.path.join(run_dir, "cluster.yaml")
    with open(out, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    return out


def _catalog_chip(catalog, name: str) -> dict:
    if name not in catalog:
        raise UserError(f"bench memory: chip {name!r} is neither in the cluster file's chips: nor in the catalog")
    chip = catalog[name]
    return {"accelerator": chip.accelerator, "emulated": chip.emulated, "tflops": dict(chip.tflops),
            "memory_gb": chip.memory_gb, "memory_bandwidth_gbps": chip.memory_bandwidth_gbps,
            "intra_node_gbps": chip.intra_node_gbps, "memory_reserve_gb": chip.memory_reserve_gb,
            "host_link_gbps": chip.host_link_gbps}


def _roomy(spec: dict) -> dict:
    spec = {k: v for k, v in spec.items() if k not in ("vendor", "sources")}
    spec["tflops"] = {k: v * SPEED_UP for k, v in spec["tflops"].items()}
    for key in ("memory_bandwidth_gbps", "intra_node_gbps", "host_link_gbps"):
        if key in spec:
            spec[key] = spec[key] * SPEED_UP
    spec["memory_gb"] = max(spec["memory_gb"], BENCH_MEMORY_GB)
    return spec


def _cell_train(path: str, cell: Cell, run_dir: str) -> str:
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    lines = [line for line in lines if not line.strip().startswith("dtype:")] + [f"dtype: {cell.dtype}"]
    out = os.path.join(run_dir, "train.yaml")
    with open(out, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- the report

def summarise(rows: list[dict], out: str) -> dict:
    """The report: every row, the worst ratio (farthest from 1) and whether all are within the goal;
    a cell that failed twice has no measurement and fails the goal."""
    measured = [r for r in rows if r["ratio"] is not None]
    worst = max(measured, key=lambda r: abs(r["ratio"] - 1.0)) if measured else None
    return {"emulated": True, "ratio_goal": [1.0 - RATIO_GOAL, 1.0 + RATIO_GOAL], "out": out, "cells": rows,
            "worst_ratio": worst["ratio"] if worst else None,
            "worst": {"cell": worst["cell"], "stage": worst["stage"]} if worst else None,
            "failed_cells": sorted({r["cell"] for r in rows if r["ratio"] is None}),
            "ok": bool(measured) and len(measured) == len(rows)
            and all(abs(r["ratio"] - 1.0) <= RATIO_GOAL for r in measured)}


def print_report(report: dict) -> None:
    print("peak device memory per stage (EMULATED chips; memory is deterministic), measured vs the plan's memory_gb")
    print(f"{'cell':<30} {'stage':>5} {'island':<6} {'predicted MB':>12} {'measured MB':>12} {'ratio':>7}")
    for r in report["cells"]:
        measured = "failed" if r["ratio"] is None else f"{r['measured_mb']:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['cell']:<30} {r['stage']:>5} {r['island']:<6} {r['predicted_mb']:>12.3f} {measured:>12} {ratio:>7}")
    low, high = report["ratio_goal"]
    verdict = "met" if report["ok"] else "MISSED"
    failed = f"; {len(report['failed_cells'])} cell(s) failed: {', '.join(report['failed_cells'])}" \
        if report["failed_cells"] else ""
    if report["worst"] is None:
        print(f"no cell measured; goal {low:.2f}-{high:.2f}: {verdict}{failed}")
        return
    print(f"worst ratio {report['worst_ratio']:.3f} ({report['worst']['cell']}, stage {report['worst']['stage']}); "
          f"goal {low:.2f}-{high:.2f}: {verdict}{failed}")
