"""One rank of `hetero compare` on a fleet: `python -m hetero.compare.worker`, started by
the launcher like hetero.engine.worker, with the same arguments plus --hf and --out.

It builds the very Trainer a run uses (its stage, TP group, 1F1B schedule, gradient
reductions) and loads its slices of the Hugging Face weights into it, then runs step 1's
compute and reductions without the update. Each rank keeps what it saw: the hidden
states of its micro-batches after each of its layers (TP rank 0; TP ranks hold the same
ones) and its vocab slice of the logits (every TP rank), per global sample index, in
<out>/compare/rankNNNNN.pt; rank 0 writes the fleet-wide loss and per-group squared
gradient norms (each value counted once, as the trainer's global norm counts it) to
<out>/compare/totals.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

import accelerators
from hetero.compare.trace import FINAL_NORM, group_of
from hetero.config import load_job
from hetero.engine.comms import Comms
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from hetero.engine.transport import to_host
from hetero.engine.worker import fatal_message, report_fatal, select_device
from hetero.errors import FATAL_EXIT_CODE
from hetero.model.hf import load_hf_checkpoint
from hetero.plan_check import load_checked_plan


def groups(layers: int) -> list[str]:
    """The gradient-norm rows, in the order totals.json lists them."""
    return ["embed", *(f"layer {i}" for i in range(layers)), FINAL_NORM, "lm_head"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetero.compare.worker", description=__doc__)
    for flag in ("--plan", "--cluster", "--model", "--train", "--hf", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    comms = accelerator = topology = None
    try:
        job = load_job(cluster=args.cluster, model=args.model, train=args.train).require("cluster", "model", "train")
        topology = Topology(load_checked_plan(args.plan, job, engine=True))
        accelerator = accelerators.get_accelerator()
        comms = Comms.start(topology, accelerator, select_device(accelerator), job.cluster)
        trainer = Trainer(comms, accelerator, job.model, job.train, args.out, steps=1, log=lambda m: None)
        load_hf_checkpoint(trainer.model, args.hf)      # on the host, like a resume; only this rank's slices
        seen = _watch(trainer)
        squares, loss_sum = _step(trainer)
        totals = comms.fleet_sum(torch.tensor([loss_sum, *squares], dtype=torch.float64))
        _save(trainer, seen, totals, args.out)
        comms.finish()
    except Exception as exc:  # pylint: disable=broad-except  # as hetero.engine.worker: fatal ones get one line
        message = fatal_message(exc, accelerator, topology)
        if message is None:
            raise
        report_fatal(message, args.out)
        return FATAL_EXIT_CODE
    finally:
        if comms is not None:
            comms.close()
    return 0


def _step(trainer) -> tuple[list[float], float]:
    """Step 1's compute and gradient reductions (no clipping, no update); this rank's share of
    each group's squared gradient norm, and its summed loss."""
    grads = trainer.grads
    grads.prepare()
    loss_sum = trainer._step_compute(0)   # pylint: disable=protected-access  # the run's own step, unchanged
    grads.collect(trainer.scaler.scale)
    grads.within_stage()
    grads.across_pipelines()
    rows = groups(trainer.model_config.layers)
    squares = [0.0] * len(rows)
    place = trainer.place
    if place.stage.pipeline != 0:       # as local_sq_norm: pipeline 0 holds the summed gradients
        return squares, loss_sum
    if grads.zero:
        mine = grads.shard.shard_of(grads.flat)
        for piece in grads.shard.pieces():
            if grads.counts_once(piece.name):
                value = mine[piece.at:piece.at + piece.stop - piece.start]
                squares[rows.index(group_of(trainer.model.hf_name(piece.name)))] += float(value.double().pow(2).sum())
    elif place.dp_rank == 0:
        for name, grad in grads.grads.items():
            if grads.counts_once(name):
                squares[rows.index(group_of(trainer.model.hf_name(name)))] += float(grad.double().pow(2).sum())
    return squares, loss_sum


def _watch(trainer) -> dict:
    """Forward hooks keeping each watched module's output per global sample, during the
    stage's forward calls only (a recomputing backward runs layers again). A layer split between
    two stages is watched where its MLP half ends it: the attention half's output is mid-layer."""
    seen: dict = {}
    calls = 0
    current: int | None = None     # the global index of this forward call's first sample; None outside one
    place, model = trainer.place, trainer.model
    inner = model.model
    watched = [("embed", getattr(inner, "embed_tokens", None)),
               *((f"layer {i}", layer) for i, layer in inner.layers.items() if layer.halves[1]),
               (FINAL_NORM, getattr(inner, "norm", None)), ("logits", getattr(model, "lm_head", None))]

    def hook_for(name):
        def hook(_module, _inputs, output):
            first = current
            if first is None or (name != "logits" and place.tp_rank != 0):
                return
            for offset, sample in enumerate(output.detach().float().clone()):
                seen.setdefault(name, {})[first + offset] = sample
        return hook

    for name, module in watched:
        if module is not None:
            module.register_forward_hook(hook_for(name))
    forward = model.forward

    def counted(*args, **kwargs):
        nonlocal calls, current
        current = place.first_sample + calls * place.micro_batch
        calls += 1
        try:
            return forward(*args, **kwargs)
        finally:
            current = None

    model.forward = counted
    return seen


def _save(trainer, seen: dict, totals: torch.Tensor, out: str) -> None:
    folder = os.path.join(out, "compare")
    os.makedirs(folder, exist_ok=True)
    place = trainer.place
    host = {name: {sample: to_host(trainer.accel, tensor) for sample, tensor in samples.items()}
            for name, samples in seen.items()}
    torch.save({"rows": host, "tp_rank": place.tp_rank, "tp": place.stage.tp},
               os.path.join(folder, f"rank{place.rank:05d}.pt"))
    if place.rank == 0:
        tokens = trainer.train.global_batch * trainer.model_config.seq_len
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "totals.json"))
        with open(os.path.join(folder, "totals.json"), "w", encoding="utf-8") as handle:
            json.dump({"loss": float(totals[0]) / tokens, "groups": groups(trainer.model_config.layers),
                       "squares": [float(v) for v in totals[1:]]}, handle)


if __name__ == "__main__":
    raise SystemExit(main())
