"""hetero compare on a fleet: the batch runs through hetero as a run would (the plan's
stages, TP, micro-batches, bridge and gradient reductions; hetero.compare.worker on
every planned chip, started by the launcher), and the hidden states each rank saw
are put back together per global sample and compared with transformers' on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import yaml

from hetero.compare.diff import DEFAULT_RTOL, compare_traces
from hetero.compare.local import first_batch, transformers_trace
from hetero.compare.trace import Trace
from hetero.config import load_job
from hetero.errors import UserError
from hetero.model.hf import read_hf_config

LAUNCHER_LOG = "launcher.log"     # there once the fleet was started: the scratch folder is kept for it on failure


def compare_fleet(hf_dir: str, *, cluster: str | None = None, plan_file: str | None = None, dtype: str = "fp32",
                  batch: int = 2, seq_len: int | None = None, seed: int = 0, rtol: float | None = None,
                  out: str | None = None, kind: str = "auto") -> dict:
    """Everything `hetero compare --json` prints, for the fleet comparison."""
    from hetero import runner
    from hetero.launch import launch_fleet

    config = read_hf_config(hf_dir)
    seq_len = min(config.seq_len, seq_len or 64)
    if out is None:      # a scratch folder, kept only when the fleet's run fails (its logs say why)
        scratch = tempfile.mkdtemp(prefix="hetero-compare-")
        try:
            result = compare_fleet(hf_dir, cluster=cluster, plan_file=plan_file, dtype=dtype, batch=batch,
                                   seq_len=seq_len, seed=seed, rtol=rtol, out=scratch, kind=kind)
        except BaseException:
            if not os.path.exists(os.path.join(scratch, LAUNCHER_LOG)):    # refused before any worker started
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        shutil.rmtree(scratch, ignore_errors=True)
        return {**result, "run_dir": None}
    work = out
    fresh = not os.path.exists(work)
    os.makedirs(work, exist_ok=True)
    try:
        paths = _job_files(work, config, dtype, batch, seq_len, seed)
        paths["cluster"] = cluster or runner.default_paths()["cluster"]
        job = load_job(**paths).require("cluster", "model", "train")
        # The run's own choice: a plan file checked against the job and --kind, else the planner's best
        # of --kind (any kind the engine trains; --kind hybrid on fewer than three islands is one line).
        plan = runner.choose_plan(job, plan_file, kind, say=lambda message: None)
    except BaseException:
        if fresh:        # refused before anything ran: leave no folder of ours behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    plan_path = os.path.join(work, "plan.json")
    with open(plan_path, "w", encoding="utf-8") as handle:
        handle.write(plan.to_json())
    tokens, labels = first_batch(config, batch, seq_len, seed)
    theirs = transformers_trace(hf_dir, dtype, tokens, labels)   # first: a missing transformers stops it early
    args = ["--plan", plan_path, "--hf", os.path.abspath(hf_dir), "--out", work]
    args += [arg for kind in ("cluster", "model", "train") for arg in (f"--{kind}", os.path.abspath(paths[kind]))]
    log = os.path.join(work, LAUNCHER_LOG)
    with open(log, "a", encoding="utf-8") as handle:
        code = launch_fleet(job.cluster, plan_path, "-m hetero.compare.worker", args, run_dir=work,
                            stdout=handle, stderr=handle)
    if code:
        raise UserError(f"the fleet's compare run failed (exit {code}); its logs: {log} and {work}/logs")
    ours = gather(work, batch)
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    return {"model": hf_dir, "where": f"fleet {job.cluster.name}: {plan.summary()}", "run_dir": work,
            "dtype": dtype, "batch": batch, "seq_len": seq_len, "seed": seed, "layers": config.layers,
            "rtol_default": rtol == DEFAULT_RTOL[dtype], **compare_traces(ours, theirs, rtol)}


def gather(work: str, batch: int) -> Trace:
    """The fleet's trace from the ranks' files: each row's samples stacked in order, the
    logits' vocab slices joined in TP-rank order."""
    folder = os.path.join(work, "compare")
    with open(os.path.join(folder, "totals.json"), encoding="utf-8") as handle:
        totals = json.load(handle)
    pieces: dict = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pt"):
            saved = torch.load(os.path.join(folder, name))
            for row, samples in saved["rows"].items():
                for sample, tensor in samples.items():
                    pieces.setdefault(row, {}).setdefault(sample, {})[saved["tp_rank"]] = tensor
    trace = Trace(loss=totals["loss"],
                  grad_norms={g: s ** 0.5 for g, s in zip(totals["groups"], totals["squares"]) if s > 0})
    for row, samples in pieces.items():
        if sorted(samples) != list(range(batch)):
            raise UserError(f"{folder}: row {row} has samples {sorted(samples)}, expected 0..{batch - 1}")
        trace.hidden[row] = torch.stack([torch.cat([parts[r] for r in sorted(parts)], dim=-1)
                                         for _, parts in sorted(samples.items())])
    return trace


def _job_files(work: str, config, dtype: str, batch: int, seq_len: int, seed: int) -> dict:
    """model.yaml (the HF config's architecture at seq_len) and train.yaml (one step of
    `batch` samples, micro-batches of one, synthetic data from `seed`) in `work`."""
    model = {"name": "hf-model", "layers": config.layers, "hidden": config.hidden, "heads": config.heads,
             "kv_heads": config.kv_heads, "ffn_hidden": config.ffn_hidden, "vocab": config.vocab,
             "seq_len": seq_len, "tie_embeddings": config.tie_embeddings, "norm_eps": config.norm_eps,
             "rope_theta": config.rope_theta}
    train = {"global_batch": batch, "micro_batch": 1, "dtype": dtype, "steps": 1, "lr": 1e-9, "seed": seed,
             "grad_clip": 0.0, "data": "synthetic"}
    paths = {}
    for kind, body in (("model", model), ("train", train)):
        paths[kind] = os.path.join(work, f"{kind}.yaml")
        with open(paths[kind], "w", encoding="utf-8") as handle:
            yaml.safe_dump(body, handle, sort_keys=False)
    return paths
