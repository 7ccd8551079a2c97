"""`hetero profile`: measure layer times (and the bridge) on this host for `hetero plan --profile`."""

from __future__ import annotations

import json
import os
import socket
import time

from hetero.commands.flags import add_job_files
from hetero.config import load_job
from hetero.errors import UserError
from hetero.planning import Progress, fleet_spec, model_spec
from partitioner.costs import tp_choices
from partitioner.profile import SHAPE_FIELDS, ProfileDB, ProfileError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure one transformer layer per chip, TP degree and micro-batch on this host",
        description=(
            "Time the forward and backward of one transformer layer (one TP shard) for every "
            "candidate TP degree and micro-batch size, on each island's accelerator that is present "
            "on this host (cpu and emulated always are; cuda, ascend, kunlun on their hosts), and the "
            "bridge over loopback when every island is on this host. Writes a JSON profile that "
            "'hetero plan --profile FILE' reads; an existing FILE is extended, not replaced."
        ),
    )
    add_job_files(parser, optional=("train",), notes={"train": " (dtype and batch sizes; default fp32, 1..4)"})
    parser.add_argument("--out", default="profile.json", metavar="FILE", help="profile to write (default profile.json)")
    parser.add_argument("--micro-batches", metavar="LIST", help="comma-separated micro-batch sizes to measure")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per entry (median; default 3)")
    parser.add_argument("--no-bridge", action="store_true", help="do not measure the bridge")
    parser.add_argument("--no-host-costs", action="store_true",
                        help="do not measure each chip's fixed host costs per micro-batch and step (launch, "
                             "synchronize, bridge hand-off, optimizer step); the planner then counts them as 0")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero import profiling

    job = load_job(cluster=args.cluster, model=args.model, train=args.train)
    cluster, model = job.require_cluster(), job.require_model()
    fleet = fleet_spec(cluster)
    mspec = model_spec(model)
    dtype = job.train.dtype if job.train else "fp32"
    batches = _micro_batches(args, job)
    db = _existing(args.out, mspec, dtype)

    plan = []
    skipped = []
    seen_chips = set()
    for island, spec in zip(cluster.islands, fleet.islands):
        if island.chip in seen_chips:
            continue
        ok, why = profiling.island_available(island.accelerator)
        if not ok:
            skipped.append(f"{island.name} ({island.accelerator}: {why})")
            continue
        seen_chips.add(island.chip)
        for t in tp_choices(mspec, spec):
            for b in batches:
                plan.append((island, t, b))
    if not plan:
        raise UserError(f"no island of {cluster.name} can be measured on this host "
                        f"({'; '.join(skipped) or 'no islands'})")

    progress = None if args.json else Progress("profiling")
    log = Progress("profiling", min_interval=0.0) if args.json else progress
    for index, (island, t, b) in enumerate(plan):
        chip = cluster.chip(island.chip)
        accel = profiling.make_accelerator(island.accelerator, chip)
        try:
            result = profiling.measure_layer(accel, model, t, b, dtype, reps=max(1, args.reps))
        except Exception as exc:  # out of memory on a small chip: record nothing, say so
            note = f"{island.chip} tp{t} b{b}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        else:
            db.add_layer(island.chip, t, b, result["forward_s"], result["backward_s"], result["memory_bytes"],
                         accelerator=island.accelerator)
            note = f"{island.chip} tp{t} b{b}: fwd {result['forward_s'] * 1e3:.2f} ms, bwd {result['backward_s'] * 1e3:.2f} ms"
        if log:
            log(index + 1, len(plan), note)

    host_notes = _host_costs(args, cluster, model, db, seen_chips, min(batches), dtype)
    bridge_note = "bridge: not measured (islands on other hosts; the cluster file's figures stand)"
    if not args.no_bridge and len(cluster.islands) > 1 and profiling.islands_all_local(cluster):
        bandwidth, latency = profiling.measure_loopback_bridge()
        db.bridge = (bandwidth, latency)
        bridge_note = f"bridge (loopback TCP): {bandwidth / 1e9:.2f} GB/s, {latency * 1e6:.1f} us"
    elif args.no_bridge:
        bridge_note = "bridge: not measured (--no-bridge)"
    db.meta.update({"host": socket.gethostname(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "notes": f"cluster {cluster.name}, model {model.name}"})
    try:
        db.save(args.out)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(db.to_dict(), indent=2))
    else:
        print(bridge_note)
        for note in host_notes:
            print(note)
        for item in skipped:
            print(f"skipped island {item}")
        print(f"wrote {len(db.layers)} layer entries to {os.path.abspath(args.out)}")
    return 0


def _host_costs(args, cluster, model, db, chips, micro_batch: int, dtype: str) -> list[str]:
    """Measure each measured chip's fixed host costs (hetero.profiling.measure_host_costs) into `db`."""
    from hetero import profiling

    if args.no_host_costs:
        return ["host costs: not measured (--no-host-costs; the planner counts them as 0 s)"]
    notes, done = [], set()
    for island in cluster.islands:
        if island.chip not in chips or island.chip in done:
            continue
        done.add(island.chip)
        accel = profiling.make_accelerator(island.accelerator, cluster.chip(island.chip))
        cost = profiling.measure_host_costs(accel, model, micro_batch, dtype, reps=max(3, args.reps))
        db.add_host_cost(island.chip, cost, island.accelerator, micro_batch)
        notes.append(f"host costs {island.chip}: launch {cost.launch_s * 1e3:.2f} ms + synchronize "
                     f"{cost.sync_s * 1e3:.3f} ms per micro-batch, bridge hand-off {cost.handoff_s * 1e3:.3f} ms, "
                     f"optimizer step {cost.optimizer_step_s * 1e3:.2f} ms")
    return notes


def _micro_batches(args, job) -> list[int]:
    if args.micro_batches:
        try:
            values = sorted({int(v) for v in args.micro_batches.split(",") if v.strip()})
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise UserError(f"--micro-batches: expected positive integers separated by commas, got {args.micro_batches!r}")
        return values
    if job.train:
        from hetero.planning import train_spec
        return [b for b in train_spec(job.train).micro_batch_choices() if b <= max(4, job.train.micro_batch)]
    return [1, 2, 4]


def _existing(path: str, model, dtype: str) -> ProfileDB:
    shape = {k: getattr(model, k) for k in SHAPE_FIELDS}
    if os.path.exists(path):
        try:
            db = ProfileDB.load(path)
        except ProfileError as exc:
            raise UserError(f"{exc} (remove it or pass another --out)") from None
        if db.model == shape and db.dtype == dtype:
            return db
    return ProfileDB(model=shape, dtype=dtype)
