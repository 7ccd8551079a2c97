"""The Python half of scripts/gpu-check.sh: what hetero does on one real NVIDIA GPU.

    python -m hetero.bench.gpu_check [--accelerator NAME] [--stages preflight,ops,mixed,mfu] [--json]

The code names no vendor (the script passes `--accelerator cuda`), so the same
stages run on any accelerator that `accelerators` drives.

Stages (each prints what it measured beside what it compares against):

- preflight: the accelerator probes available (for cuda: a CUDA build of torch
  and a visible GPU), else one line and exit code NO_GPU_EXIT_CODE;
- ops:   every `accelerators.ops` op on the device (what the accelerator
  dispatches: on cuda torch SDPA for attention, the reference elsewhere; plus
  the blocked attention Kunlun uses) against the plain-torch reference run in
  float64 on the host, values and attention gradients;
- mixed: a 1-GPU `cuda` island and a 1-chip `cpu` island (configs/gpu-check.yaml)
  train through the bridge; the losses are compared with one process on the
  CPU (hetero.engine.solo), as tests/hetero/engine/test_engine_fleet.py does;
- mfu:   single-chip MFU of a ~1B-parameter Llama (configs/llama-1b.yaml) in
  bf16, forward + backward + AdamW, against the catalog chip's peak.

`--accelerator cpu` runs ops and mfu on the host (to test this module without
a GPU); the numbers then say nothing about a GPU. Without --accelerator, the
one the probe picks is used, and the host CPU counts as no device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time

NO_GPU_EXIT_CODE = 4
STAGES = ("preflight", "ops", "mixed", "mfu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIXED_CONFIG = os.path.join(ROOT, "configs", "gpu-check.yaml")
MFU_MODEL = os.path.join(ROOT, "configs", "llama-1b.yaml")
# Host float64 reference vs device: fp32 without TF32 agrees to ~1e-6; bf16 to its 8 mantissa bits.
OPS_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
# GPU fp32 kernels sum in another order than the CPU: per-step relative loss difference allowed.
MIXED_TOLERANCE = 1e-4
# The catalog chip for a device name (first match wins).
CHIP_BY_DEVICE_NAME = (("H200", "H200"), ("H100", "H100-SXM"), ("H800", "H100-SXM"),
                       ("A800", "A800-80G"), ("A100", "A100-80G"), ("910B", "Ascend-910B"),
                       ("P800", "Kunlun-P800"))


class NoGpu(Exception):
    """No usable CUDA GPU: the check cannot run here."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hetero.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), type=_stages,
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--accelerator", default=None, metavar="NAME",
                        help="accelerator to check (default: the one the probe picks; "
                             "cpu only exercises this module)")
    parser.add_argument("--chip", default=None,
                        help="catalog chip whose peak MFU is measured against (default: from the device name)")
    parser.add_argument("--mfu-model", default=MFU_MODEL, metavar="YAML",
                        help="model file for the MFU stage (default configs/llama-1b.yaml)")
    parser.add_argument("--mfu-batch", type=int, default=4, help="samples per MFU step (default 4)")
    parser.add_argument("--mfu-steps", type=int, default=10, help="timed MFU steps after 3 warm-up steps")
    parser.add_argument("--mixed-steps", type=int, default=5, help="training steps of the mixed run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    for flag in ("mfu_batch", "mfu_steps", "mixed_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.accelerator == "cpu" and "mixed" in args.stages:
        parser.error("--accelerator cpu runs the ops and mfu stages only (the mixed run needs a GPU island)")
    return args


def _stages(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown or value!r}; known: {', '.join(STAGES)}")
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        name, found = preflight(args.accelerator)
    except NoGpu as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return NO_GPU_EXIT_CODE
    report: dict = {"accelerator": name, "stages": list(args.stages), "preflight": found}
    runners = {"ops": lambda: ops_parity(name),
               "mixed": lambda: mixed_run(args.mixed_steps),
               "mfu": lambda: mfu(name, args.mfu_model, args.mfu_batch, args.mfu_steps, args.chip)}
    started = time.perf_counter()
    for stage in args.stages:
        if stage in runners:
            print(f"gpu-check: {stage} ...", file=sys.stderr, flush=True)
            stage_start = time.perf_counter()
            report[stage] = runners[stage]()
            report[stage]["wall_s"] = time.perf_counter() - stage_start
    report["wall_s"] = time.perf_counter() - started
    report["ok"] = all(report[s].get("ok", True) for s in args.stages if s in runners)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_text(report)
    return 0 if report["ok"] else 1


# preflight ------------------------------------------------------------------------------------

def preflight(name: str | None) -> tuple[str, dict]:
    """(accelerator name, what torch and the device are); raises NoGpu (one line) without a device."""
    import accelerators
    from accelerators import registry

    if name is None:
        name, _why = registry.select_name()
        if name == "cpu":
            missing = "; ".join(f"{r.name}: {r.reason}" for r in registry.probe_all()
                                if not r.available and r.name != "emulated")
            raise NoGpu(f"no accelerator device found ({missing})")
    found = registry.probe(name)
    if not found.available:
        raise NoGpu(f"no {name} device: {found.reason} (scripts/gpu-check.sh says how it gets a CUDA torch)")
    accelerators.reset_accelerator()
    accelerator = accelerators.get_accelerator(name)
    try:
        info = {**registry.runtime_versions(), "probe": found.reason,
                "device_name": accelerator.device_name(0), "device_count": accelerator.device_count()}
    finally:
        accelerators.reset_accelerator()
    return name, info


# ops ----------------------------------------------------------------------------------------

def ops_parity(name: str) -> dict:
    """Max relative error of each op on the device against the host float64 reference."""
    import torch

    import accelerators
    from accelerators import ops
    from accelerators.ops import blocked, reference

    accelerators.reset_accelerator()
    device = accelerators.get_accelerator(name).device(0)
    try:
        sources = ops.kernel_sources()
        torch.manual_seed(0)
        shapes = {"x": (2, 64, 256), "w": (256,), "q": (2, 8, 128, 64), "kv": (2, 4, 128, 64)}
        host = {name: torch.randn(*shape, dtype=torch.float64) for name, shape in shapes.items()}
        host["k"], host["v"] = host.pop("kv"), torch.randn(*shapes["kv"], dtype=torch.float64)
        host["cos"], host["sin"] = torch.randn(128, 64, dtype=torch.float64), torch.randn(128, 64, dtype=torch.float64)
        cases = {
            "rms_norm": (ops.rms_norm, reference.rms_norm, ("x", "w")),
            "rotary": (ops.rotary, reference.rotary, ("q", "cos", "sin")),
            "attention": (ops.attention, reference.attention, ("q", "k", "v")),
            "attention_blocked": (lambda q, k, v: blocked.attention(q, k, v, True, None, query_block=32),
                                  reference.attention, ("q", "k", "v")),
            "swiglu": (ops.swiglu, reference.swiglu, ("x", "x")),
        }
        rows = {}
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for name, (ours, theirs, keys) in cases.items():
                rows[f"{name}/{dtype_name}"] = _compare(ours, theirs, [host[k] for k in keys], device, dtype,
                                                        grad=name.startswith("attention"))
        rows["adamw_step/fp32"] = _compare_adamw(ops.adamw_step, reference.adamw_step, device)
    finally:
        accelerators.reset_accelerator()
    for key, row in rows.items():
        row["tolerance"] = OPS_TOLERANCE[key.split("/")[1]]
        row["ok"] = row["max_rel_error"] <= row["tolerance"]
    return {"kernel_sources": sources, "anchor": "accelerators.ops.reference in float64 on the host",
            "cases": rows, "ok": all(row["ok"] for row in rows.values())}


def _compare(ours, theirs, host_inputs, device, dtype, grad: bool) -> dict:
    import torch

    dev = [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in host_inputs]
    # The reference sees the same (rounded) inputs, so only the kernels' error is measured.
    ref = [t.to(dtype).to(torch.float64).requires_grad_(grad) for t in host_inputs]
    out, expected = ours(*dev), theirs(*ref)
    row = {"max_rel_error": _rel_error(out, expected)}
    if grad:
        seed = torch.randn_like(expected)
        got = torch.autograd.grad(out, dev, seed.to(device=device, dtype=dtype))
        want = torch.autograd.grad(expected, ref, seed)
        row["max_rel_error_grad"] = max(_rel_error(g, w) for g, w in zip(got, want))
        row["max_rel_error"] = max(row["max_rel_error"], row["max_rel_error_grad"])
    return row


def _compare_adamw(ours, theirs, device) -> dict:
    import torch

    torch.manual_seed(1)
    tensors = [torch.randn(4096, dtype=torch.float64) for _ in range(2)] + [torch.zeros(4096, dtype=torch.float64)] * 2
    dev = [t.to(device=device, dtype=torch.float32) for t in tensors]
    ref = [t.to(torch.float32).to(torch.float64) for t in tensors]
    for step in (1, 2, 3):
        ours(*dev, step=step, lr=1e-2, weight_decay=0.1)
        theirs(*ref, step=step, lr=1e-2, weight_decay=0.1)
    return {"max_rel_error": _rel_error(dev[0], ref[0])}


def _rel_error(got, want) -> float:
    got = got.detach().to("cpu", dtype=want.dtype)
    scale = want.detach().abs().max().clamp_min(1e-12)
    return float((got - want.detach()).abs().max() / scale)


# mixed --------------------------------------------------------------------------------------

def mixed_run(steps: int, config: str = MIXED_CONFIG) -> dict:
    """Stage 0 on the GPU island, stage 1 on the CPU island; losses vs one process on the CPU."""
    import accelerators
    from hetero.config import load_job
    from hetero.engine.solo import train_solo
    from hetero.launch.fleet import launch_fleet

    job = load_job(cluster=config, model=config, train=config).require("cluster", "model", "train")
    split = job.model.layers // 2
    plan = two_island_plan(job, ("gpu", (0, split)), ("host", (split, job.model.layers)))
    with tempfile.TemporaryDirectory(prefix="hetero-gpu-check-") as tmp:
        plan_path = os.path.join(tmp, "plan.json")
        with open(plan_path, "w", encoding="utf-8") as handle:
            handle.write(plan.to_json())
        run_dir = os.path.join(tmp, "run")
        args = ["--plan", plan_path, "--cluster", config, "--model", config, "--train", config,
                "--steps", str(steps), "--checkpoint-dir", os.path.join(tmp, "checkpoints")]
        outcome: dict = {}
        log_path = os.path.join(tmp, "fleet.log")
        started = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            thread = threading.Thread(target=lambda: outcome.update(code=launch_fleet(
                config, plan_path, "-m hetero.engine.worker", args, run_dir=run_dir, stdout=log, stderr=log)),
                daemon=True)
            thread.start()
            thread.join(timeout=240)
        fleet_s = time.perf_counter() - started
        with open(log_path, encoding="utf-8") as handle:
            log_tail = handle.read()[-2000:]
        if outcome.get("code") != 0:
            return {"ok": False, "error": f"fleet exited {outcome.get('code', 'timeout')}", "log_tail": log_tail}
        with open(os.path.join(run_dir, "metrics", "steps.jsonl"), encoding="utf-8") as handle:
            by_step = {record["step"]: record for record in map(json.loads, handle)}
        fleet = [by_step[s]["loss"] for s in sorted(by_step)]
        train = dataclasses.replace(job.train, checkpoint=None)
        solo = [r["loss"] for r in train_solo(accelerators.get_accelerator("cpu"), job.model, train,
                                              os.path.join(tmp, "solo"), steps=steps)]
        accelerators.reset_accelerator()
    worst = max(abs(a - b) / abs(b) for a, b in zip(fleet, solo)) if len(fleet) == len(solo) else float("inf")
    return {"fleet_losses": fleet, "one_process_losses": solo, "max_rel_difference": worst,
            "tolerance": MIXED_TOLERANCE, "fleet_wall_s": fleet_s, "plan": "gpu: layers [0, %d) -> bridge -> "
            "host: layers [%d, %d)" % (split, split, job.model.layers),
            "ok": len(fleet) == steps and worst <= MIXED_TOLERANCE}


def two_island_plan(job, first, second, micro_batch: int | None = None):
    """A two-stage pipeline plan, one chip per stage: first/second = (island, (start, end))."""
    from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan

    train, model = job.train, job.model
    micro = micro_batch or train.micro_batch
    chips = {island.name: island.chip for island in job.cluster.islands}
    stages = tuple(StagePlan(i, 0, island, chips[island], 1, 1, layers, "none", 0, 0.1, 0.0)
                   for i, (island, layers) in enumerate((first, second)))
    ranks = tuple(RankPlan(i, island, 0, 0, 0, i, 0, 0) for i, (island, _layers) in enumerate((first, second)))
    m = train.global_batch // micro
    return Plan(kind="pipeline", cluster=job.cluster.name, model=model.name, dtype=train.dtype,
                layers=model.layers, heads=model.heads, kv_heads=model.kv_heads,
                global_batch=train.global_batch, micro_batch=micro, num_micro_batches=m, recompute="none",
                zero1=False, stages=stages, pipelines=(PipelinePlan(0, (0, 1), 1, micro, m),), ranks=ranks,
                predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


# mfu ----------------------------------------------------------------------------------------

def mfu(name: str, model_path: str, batch: int, steps: int, chip: str | None) -> dict:
    """Model FLOPs per second of bf16 training steps on one chip over the catalog's bf16 peak."""
    import torch

    import accelerators
    from hetero.config.catalog import load_catalog
    from hetero.config.load import load_sections
    from hetero.model.llama import LlamaStage
    from hetero.planning import model_spec
    from partitioner.costs import model_flops_per_sample, total_params

    model = load_sections(model_path, want="model")["model"]
    accelerators.reset_accelerator()
    accelerator = accelerators.get_accelerator(name)
    chip = chip or catalog_chip(accelerator)
    catalog = load_catalog()
    peak = catalog[chip].peak_flops("bf16") if chip is not None and chip in catalog else None
    try:
        stage = LlamaStage(model, dtype=torch.bfloat16, device=accelerator.device(0), seed=0)
        optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-5)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.vocab, (batch, model.seq_len + 1), generator=generator)
        tokens = tokens.to(accelerator.device(0))
        inputs, labels = tokens[:, :-1], tokens[:, 1:]

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = stage.loss(stage(inputs), labels)
            loss.backward()
            optimizer.step()
            return loss

        for _ in range(3):
            step()
        accelerator.synchronize()
        accelerator.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        accelerator.synchronize()
        step_s = (time.perf_counter() - started) / steps
        peak_memory = accelerator.max_memory_allocated() / 1e9  # 0 on the host, which keeps no ledger
        final_loss = float(loss.detach())
    finally:
        accelerators.reset_accelerator()
    spec = model_spec(model)
    flops_per_step = model_flops_per_sample(spec) * batch
    achieved = flops_per_step / step_s
    return {"model": model.name, "parameters": total_params(spec), "dtype": "bf16", "batch": batch,
            "seq_len": model.seq_len, "timed_steps": steps, "step_s": step_s,
            "tokens_per_s": batch * model.seq_len / step_s, "model_tflops_per_step": flops_per_step / 1e12,
            "achieved_tflops": achieved / 1e12, "chip": chip,
            "peak_tflops_bf16": peak / 1e12 if peak else None, "mfu": achieved / peak if peak else None,
            "peak_memory_gb": peak_memory, "final_loss": final_loss,
            "ok": final_loss == final_loss}  # a NaN loss fails the stage


def catalog_chip(accelerator) -> str | None:
    """The catalog chip for the accelerator's device 0 ('cpu' on the host), or None when unknown."""
    if accelerator.vendor == "cpu":
        return "cpu"
    device_name = accelerator.device_name(0)
    return next((chip for marker, chip in CHIP_BY_DEVICE_NAME if marker in device_name), None)


# text ---------------------------------------------------------------------------------------

def print_text(report: dict) -> None:
    pre = report["preflight"]
    print(f"gpu-check: {report['accelerator']} on {pre['device_name']} (torch {pre['torch']}; {pre['probe']})")
    if "ops" in report:
        ops = report["ops"]
        print(f"ops parity vs {ops['anchor']}: {'ok' if ops['ok'] else 'FAILED'}")
        print(f"  kernel sources: {ops['kernel_sources']}")
        for name, row in ops["cases"].items():
            print(f"  {name:<24} max rel error {row['max_rel_error']:.2e} (<= {row['tolerance']:.0e}) "
                  f"{'ok' if row['ok'] else 'FAILED'}")
    if "mixed" in report:
        mixed = report["mixed"]
        if "error" in mixed:
            print(f"mixed cuda+cpu fleet: FAILED ({mixed['error']})\n{mixed['log_tail']}")
        else:
            print(f"mixed cuda+cpu fleet ({mixed['plan']}): {'ok' if mixed['ok'] else 'FAILED'}")
            print(f"  fleet losses       {', '.join(f'{x:.6f}' for x in mixed['fleet_losses'])}")
            print(f"  one process (cpu)  {', '.join(f'{x:.6f}' for x in mixed['one_process_losses'])}")
            print(f"  max rel difference {mixed['max_rel_difference']:.2e} (<= {mixed['tolerance']:.0e})")
    if "mfu" in report:
        row = report["mfu"]
        against = (f"{row['mfu'] * 100:.1f}% of {row['chip']}'s catalog bf16 peak {row['peak_tflops_bf16']:g} TFLOP/s"
                   if row["mfu"] is not None else "no catalog peak for this device (pass --chip)")
        print(f"MFU {row['model']} ({row['parameters'] / 1e9:.2f}B params, bf16, batch {row['batch']} x "
              f"{row['seq_len']}): {row['step_s'] * 1e3:.1f} ms/step, {row['achieved_tflops']:.1f} TFLOP/s "
              f"model FLOPs = {against}")
    print(f"stages took {report['wall_s']:.0f} s: "
          + ", ".join(f"{s} {report[s]['wall_s']:.0f} s" for s in report["stages"] if s in report and s != "preflight"))


if __name__ == "__main__":
    sys.exit(main())
