"""Checkpoint costs per rank (issue 15): shard bytes, peak extra host memory during a save, time
training is blocked by a save against the background write (the trainer's way: the device->host copy of
the rank's own shard into its staging buffers runs beside the next step, a stand-in one here; the
synchronous copy measured in the same run as the anchor), and the load time under another plan.

`measure()` runs in one process on synthetic state (random weights and moments, the real
AdamW layouts and the real staging, writer, seal and reader), rank after rank: TP x DP with ZeRO-1
saves (three times: a run's first save faults in its staging buffers, every later one reuses them;
the second copies synchronously, the anchor; the third snapshots in the background beside a
stand-in step and gives the contract's blocked_s / write_s), then every
rank of a TP 1 plan without ZeRO-1 loads its part. Peak extra host memory is the
process's resident set sampled every millisecond during the rank's saves, less its size before
(freed heap handed back to the system first, with glibc's malloc_trim; the page cache of the
written file is not counted). `hetero bench checkpoint [--json]` runs it on llama-tiny and
llama-100m and prints each rank's numbers against the issue's goals (peak extra host memory
<= 1.25 x the rank's shard bytes; training blocked <= 10 % of the write time).

Each model runs twice: on plain `cpu` (the shard is host memory; the copy is a host memcpy competing
with the step for the same cores, no copy engine) and on emulated ranks of a catalog chip (`--chip`,
default A100-80G): the shard is the chip's device memory, the background snapshot copies on a side
stream, which the emulated chip runs on its copy engine beside the compute queue at the chip's host
link speed (accelerators.emulated_streams), the stand-in step is compute charged to the chip, and the
synchronous anchor copies on the compute queue. Those runs are time-dilated (`--time-dilation`, as the
other benches: the host's memcpy behind each emulated copy then weighs 1/k in chip time) and their
blocked and copy times are chip seconds; the file writes are the host's, in wall seconds, in both.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

from hetero.checkpoint import format as fmt
from hetero.config import load_job
from hetero.config.catalog import load_catalog
from hetero.errors import UserError
from hetero.engine import checkpoint as ckpt
from hetero.engine.checkpointing import background_snapshots
from hetero.engine.optimizer import AdamW
from hetero.engine.zero import FlatShard
from hetero.model import TensorParallel, layout
from hetero.runner import ROOT

DEFAULT_MODEL = os.path.join(ROOT, "configs", "llama-tiny.yaml")
LARGER_MODEL = os.path.join(ROOT, "configs", "llama-100m.yaml")
STEP = 1
PEAK_GOAL = 1.25          # peak extra host memory during a save, over the rank's shard bytes
BLOCKED_GOAL = 0.10       # time training is blocked, over the background write's time
STANDIN_STEP_S = 0.5      # the stand-in training step a background snapshot runs beside (seconds, alone)
CHIP_STEP_S = 0.2         # the emulated ranks' stand-in step: compute charged to the chip (chip seconds)
REPEATS = 3               # background saves per rank; the median's numbers are reported
DEFAULT_CHIP = "A100-80G"  # the emulated ranks' chip (32 GB/s per direction on its host link)
DEFAULT_DILATION = 10.0
STAND_IN = (f"blocked_s, write_s: a save made the trainer's way on that device (synchronous on cpu, which has no copy "
            "engine; background where the chip has one); background_blocked_s: a save as the trainer makes it "
            "in the background, its snapshot (the device->host copy) beside a stand-in "
            f"training step (cpu: fp32 matmuls on the same process, ~{STANDIN_STEP_S} s alone; emulated: "
            f"{CHIP_STEP_S} chip seconds of compute charged to the chip; the bench trains no model): issue + wait "
            f"for the snapshot + the step's slowdown, the median of {REPEATS} saves; sync_blocked_s: the "
            "synchronous copy, same run (the anchor); emulated runs are time-dilated, their blocked and copy "
            "times in chip seconds, every write_s in wall seconds")

HELP = ("checkpoint costs per rank: shard bytes, peak extra host memory and time blocked during a "
        "save, and the load time under another plan")


def add_arguments(parser) -> None:
    parser.add_argument("--model", metavar="FILE", action="append", default=[],
                        help="model YAML; repeatable (default: configs/llama-tiny.yaml and "
                             "configs/llama-100m.yaml, about 100M parameters)")
    parser.add_argument("--tp", type=int, default=2, help="TP degree of the saving plan (default 2)")
    parser.add_argument("--dp", type=int, default=2,
                        help="DP degree of the saving plan, ZeRO-1 when above 1 (default 2); "
                             "the load is by TP 1 without ZeRO-1, two stages")
    parser.add_argument("--dir", metavar="DIR", help="where the checkpoints are written (default: a temporary "
                                                     "folder; put it on the storage you mean to use)")
    parser.add_argument("--chip", metavar="NAME", default=DEFAULT_CHIP,
                        help=f"catalog chip of the emulated ranks each model also runs on (default {DEFAULT_CHIP}; "
                             "'none': the cpu runs only)")
    parser.add_argument("--time-dilation", metavar="K", type=float, default=DEFAULT_DILATION,
                        help=f"wall seconds per chip second on the emulated ranks (default {DEFAULT_DILATION:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    if args.tp < 1 or args.dp < 1:
        raise UserError(f"--tp and --dp must be at least 1, got {args.tp} and {args.dp}")
    if args.dir and not os.path.isdir(args.dir):
        raise UserError(f"--dir {args.dir}: no such directory")
    chip = None if args.chip == "none" else args.chip
    if chip is not None and chip not in load_catalog():
        raise UserError(f"--chip {chip}: not a catalog chip (hetero/config/chips.yaml), or 'none'")
    if not 1.0 <= args.time_dilation < float("inf"):
        raise UserError(f"--time-dilation must be a number >= 1, got {args.time_dilation:g}")
    models = args.model or [DEFAULT_MODEL, LARGER_MODEL]
    for path in models:
        on = f"cpu and emulated {chip} (time-dilated x{args.time_dilation:g})" if chip else "cpu"
        print(f"bench checkpoint: {os.path.basename(path)}: saving on TP {args.tp} x DP {args.dp} ({on}), "
              f"loading on TP 1", file=sys.stderr, flush=True)
    report = judge(measure(models, args.tp, args.dp, args.dir, chip=chip, dilation=args.time_dilation))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def judge(report: dict) -> dict:
    """Each rank's two ratios against the goals, and whether every rank met them (fields added
    beside the contract's; none renamed)."""
    for entry in report["runs"]:
        for rank in entry["ranks"]:
            rank["peak_over_shard"] = rank["peak_extra_host_bytes"] / max(rank["shard_bytes"], 1)
            rank["blocked_over_write"] = rank["blocked_s"] / max(rank["write_s"], 1e-9)
            rank["first_blocked_over_write"] = rank["first_blocked_s"] / max(rank["first_write_s"], 1e-9)
            rank["sync_blocked_over_write"] = rank["sync_blocked_s"] / max(rank["sync_write_s"], 1e-9)
            rank["background_blocked_over_write"] = rank["background_blocked_s"] / max(rank["background_write_s"], 1e-9)
    ranks = [r for entry in report["runs"] for r in entry["ranks"]]
    report["goals"] = {"peak_over_shard": PEAK_GOAL, "blocked_over_write": BLOCKED_GOAL}
    report["peak_ok"] = all(r["peak_over_shard"] <= PEAK_GOAL for r in ranks)
    report["blocked_ok"] = all(r["blocked_over_write"] <= BLOCKED_GOAL for r in ranks)
    report["stand_in"] = STAND_IN
    return report


def print_report(report: dict) -> None:
    for entry in report["runs"]:
        dilated = f", time-dilated x{entry['time_dilation']:g}: blocked in chip seconds" \
            if entry["time_dilation"] != 1.0 else ""
        print(f"{entry['model']} on {entry['device']}{dilated}")
        print("model        rank  shard MB  peak extra MB  (x shard)  mode        blocked s  write s  (/write)"
              "  synchronous: blocked s (/write)  background: blocked s (/write)  first save: blocked s (/write)")
        for r in entry["ranks"]:
            print(f"{entry['model']:<12} {r['rank']:>4} {r['shard_bytes'] / 1e6:9.2f} "
                  f"{r['peak_extra_host_bytes'] / 1e6:14.2f} {r['peak_over_shard']:10.2f}  {r['snapshot_mode']:<10} "
                  f"{r['blocked_s']:10.4f} {r['write_s']:8.3f} {r['blocked_over_write']:9.3f}"
                  f"  {r['sync_blocked_s']:22.4f} ({r['sync_blocked_over_write']:.3f})"
                  f"  {r['background_blocked_s']:21.4f} ({r['background_blocked_over_write']:.3f})"
                  f"  {r['first_blocked_s']:21.4f} ({r['first_blocked_over_write']:.3f})")
        print(f"{entry['model']:<12} load under TP 1: {entry['load_s']:.2f} s")
    print(f"goals: peak extra host memory <= {PEAK_GOAL} x shard: {'met' if report['peak_ok'] else 'missed'}; "
          f"blocked <= {BLOCKED_GOAL:.0%} of the write: {'met' if report['blocked_ok'] else 'missed'} "
          f"(every save but a run's first, which also faults in its staging buffers; on a CPU device the "
          f"copy is a host memcpy: the trainer copies synchronously there)")
    by_device = {entry["device"]: True for entry in report["runs"]}
    for device in by_device:
        ranks = [r for entry in report["runs"] if entry["device"] == device for r in entry["ranks"]]
        met = all(r["blocked_over_write"] <= BLOCKED_GOAL for r in ranks)
        print(f"  on {device}: blocked <= {BLOCKED_GOAL:.0%} of the write {'met' if met else 'missed'}")
    print(report["stand_in"])


def measure(models=(DEFAULT_MODEL,), tp: int = 2, dp: int = 2, directory: str | None = None,
            chip: str | None = DEFAULT_CHIP, dilation: float = DEFAULT_DILATION,
            chip_step_s: float = CHIP_STEP_S) -> dict:
    """{"runs": [{"model", "device", "time_dilation", "ranks": [{"rank", "shard_bytes",
    "peak_extra_host_bytes", "blocked_s", "write_s" (the trainer's way on that device: "snapshot_mode"),
    "background_blocked_s", "background_write_s", "first_blocked_s", "first_write_s", "sync_blocked_s",
    "sync_write_s", "snapshot_s", "issue_s", "snapshot_wait_s", "standin_step_s", "standin_slowdown_s"}],
    "load_s"}]}: each model saved by TP `tp` x DP `dp` ranks with ZeRO-1, loaded by TP 1 ranks without
    it (load_s: the slowest rank's); on cpu, then (unless `chip` is None) on emulated ranks of catalog
    chip `chip`, time-dilated `dilation` times, beside a stand-in step of `chip_step_s` chip seconds
    (their ranks also carry "chip_copy_s": the snapshot's copy time on the chip's host link)."""
    runs = []
    for model_path in models:
        model = load_job(model=model_path).model
        for device in [_Host()] + ([_Chip(chip, dilation, chip_step_s)] if chip else []):
            with tempfile.TemporaryDirectory(dir=directory) as root:
                runs.append(_run(model, tp, dp, root, device))
    return {"runs": runs}


def _run(model, tp: int, dp: int, root: str, device: "_Host") -> dict:
    full = random_state(model)
    names = layout.model_names(model)
    ckpt.prepare(root, STEP)
    ranks = []
    for d in range(dp):
        for t in range(tp):
            rank = d * tp + t
            made = device.hold(rank_optimizer(model, full, names, TensorParallel(tp, t), dp, d, zero=dp > 1))
            ranks.append({"rank": rank, **_save_rank(made, root, rank, device)})
            del made
    ckpt.seal(root, STEP, model, {"optimizer_steps": STEP}, [r["rank"] for r in ranks])
    load_s = 0.0
    halves = (names[:len(names) // 2], names[len(names) // 2:])       # two stages, TP 1, no ZeRO-1
    for stage_names in halves:
        reader = rank_optimizer(model, full, stage_names, TensorParallel())
        started = time.perf_counter()
        sealed = ckpt.latest(root)
        if sealed is None:
            raise RuntimeError(f"bench checkpoint: no sealed checkpoint under {root} after the save")
        saved = ckpt.Checkpoint(sealed, model)
        reader.load_part(reader.read_part(saved), saved.optimizer_steps, lambda t: t, _NoScope)
        load_s = max(load_s, time.perf_counter() - started)
    return {"model": model.name, "device": device.label, "time_dilation": device.dilation, "ranks": ranks,
            "load_s": load_s}


class _Host:
    """The plain cpu run: the shard is host memory, its copy a host memcpy on this process, the
    stand-in step real matmuls competing with it for the cores."""

    label, dilation = "cpu", 1.0

    @property
    def background(self) -> bool:
        """Whether the trainer snapshots in the background here (the accelerator's copy_engine)."""
        from accelerators.cpu import CpuAccelerator

        return background_snapshots(CpuAccelerator)

    def hold(self, made: AdamW) -> AdamW:
        return made

    def staging(self):
        return ckpt.Staging()

    def stand_in(self) -> "_StandIn | _ChipStep":
        return _StandIn()

    def snapshot_stream(self):
        """Called where the save starts: the context the snapshot's copies run in (on its thread)."""
        return contextlib.nullcontext()

    def copy_charged(self) -> float:
        return 0.0


class _Chip(_Host):
    """Emulated ranks of a catalog chip: the shard in its device memory, copied through its
    copy_to_host (a side stream's on its copy engine), the stand-in step compute charged to it."""

    def __init__(self, name: str, dilation: float, step_s: float):
        from accelerators.emulated import EmulatedAccelerator

        self.accel = EmulatedAccelerator(load_catalog()[name].to_dict(), time_dilation=dilation, strict=True)
        self.label, self.dilation, self.step_s = f"emulated {name}", dilation, step_s

    @property
    def background(self) -> bool:
        return background_snapshots(self.accel)

    def hold(self, made: AdamW) -> AdamW:
        for tensor in [*made.params.values(), *(t for store in made.local_state().values() for t in store.values())]:
            self.accel.track(tensor)
        return made

    def staging(self):
        return ckpt.Staging(self.accel)

    def stand_in(self) -> "_ChipStep":
        return _ChipStep(self.accel, self.step_s)

    @contextlib.contextmanager
    def _on_side_stream(self, produced, stream):
        with self.accel.stream(stream):
            produced.wait(stream)          # ordered after the compute that wrote the shard, as CUDA needs
            yield

    def snapshot_stream(self):
        produced, stream = self.accel.new_event(), self.accel.new_stream()
        produced.record()
        return self._on_side_stream(produced, stream)

    def copy_charged(self) -> float:
        """Chip seconds charged on the copy engine so far (a snapshot's copies run there)."""
        return self.accel.copies.clock.busy_seconds / self.dilation


def _save_rank(made: AdamW, root: str, rank: int, device: _Host) -> dict:
    """One rank's saves as a run makes them: the first copies into new staging buffers (their pages
    faulted in), every later one into the same buffers. Three saves, RSS sampled from before the first
    (so the staging buffers count in the peak): the first and second copy synchronously (the second is
    the anchor: sync_blocked_s, sync_write_s; the first's as first_blocked_s, first_write_s), the third
    as the trainer does, its snapshot beside a stand-in training step (`_background_save`): the
    contract's blocked_s and write_s are the third's. Blocked and copy times are the device's seconds
    (chip seconds on a time-dilated emulated chip)."""
    step = device.stand_in()          # its memory is made before the sampling starts: not the save's
    sampler = _PeakRss().start()
    staging = device.staging()
    first = _save_once(made, root, rank, staging, device)
    again = _save_once(made, root, rank, staging, device)
    tries = sorted((_background_save(made, root, rank, staging, step, device) for _ in range(REPEATS)),
                   key=lambda made_once: made_once["blocked_s"])
    overlapped = tries[len(tries) // 2]   # the median: one stand-in step's timing on a busy host is noisy
    peak = sampler.stop()
    made_so = overlapped if device.background else again      # the trainer's way on this device
    return {"shard_bytes": again["bytes"], "peak_extra_host_bytes": peak, "blocked_s": made_so["blocked_s"],
            "write_s": made_so["write_s"], "snapshot_mode": "background" if device.background else "sync",
            "background_blocked_s": overlapped["blocked_s"], "background_write_s": overlapped["write_s"],
            "first_blocked_s": first["blocked_s"], "first_write_s": first["write_s"],
            "sync_blocked_s": again["blocked_s"], "sync_write_s": again["write_s"],
            **{k: v for k, v in overlapped.items() if k not in ("blocked_s", "write_s", "bytes")}}


def _background_save(made: AdamW, root: str, rank: int, staging, step: "_StandIn | _ChipStep",
                     device: _Host) -> dict:
    """A save as the trainer makes it (hetero.engine.checkpointing, background snapshots): the copy into
    `staging` runs on the writer's thread (on the device's side stream, ordered after an event recorded
    here) while a stand-in training step runs here (the bench has no model to train: on cpu real
    matmuls on this process, about STANDIN_STEP_S long alone; on an emulated chip compute charged to it;
    in place of the next step's forward and backward); then the step waits for the snapshot, as
    before_update() does. blocked_s: what training lost, the issue time + that wait + the stand-in's
    slowdown against its time alone (the copy's competition for cores and memory bandwidth). The file's
    write is held until the step is done, so the slowdown is the copy's alone: the write's own
    competition with training is charged to neither this nor the synchronous anchor. write_s: the file's
    streaming, the snapshot's copy not included (as in the synchronous saves)."""
    alone_s = step.run()
    scale = 1.0 / device.dilation
    started = time.perf_counter()
    copy, names = staging.begin().copy, list(made.params)
    stepped, copied = threading.Event(), []
    on_stream, charged = device.snapshot_stream(), device.copy_charged()

    def snapshot():
        begun = time.perf_counter()
        with on_stream:
            chunks = made.own_chunks(copy, names)
            staging.finish()
        copied.append((time.perf_counter() - begun) * scale)
        stepped.wait()        # the file's write starts after the step: its slowdown is the copy's alone
        return chunks

    write = ckpt.AsyncWrite(ckpt.partial_dir(root, STEP), rank, STEP, staging=staging, snapshot=snapshot).start()
    issue_s = (time.perf_counter() - started) * scale
    beside_s = step.run()
    stepped.set()
    wait_s = write.wait_snapshot() * scale
    if write.wait() is not None:
        raise UserError(f"{root}: no space left to write the bench's checkpoint")
    alone_s = min(alone_s, step.run())
    slowdown_s = max(0.0, beside_s - alone_s)
    chip = {"chip_copy_s": device.copy_charged() - charged} if isinstance(device, _Chip) else {}
    return {"bytes": write.bytes, "blocked_s": issue_s + wait_s + slowdown_s, "write_s": write.write_s - write.snapshot_s,
            "snapshot_s": copied[0], "issue_s": issue_s, "snapshot_wait_s": wait_s,
            "standin_step_s": alone_s, "standin_slowdown_s": slowdown_s, **chip}


class _StandIn:
    """A stand-in training step: fp32 matmuls on this process, calibrated once to about STANDIN_STEP_S."""

    def __init__(self, size: int = 512):
        generator = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(size, size, generator=generator) / size for _ in range(2))
        self.out = torch.empty(size, size)      # no allocation while it runs
        started, probe = time.perf_counter(), 8
        self._matmuls(probe)
        self.count = max(1, round(probe * STANDIN_STEP_S / max(time.perf_counter() - started, 1e-6)))

    def _matmuls(self, count: int) -> None:
        for _ in range(count):
            torch.mm(self.a, self.b, out=self.out)

    def run(self) -> float:
        started = time.perf_counter()
        self._matmuls(self.count)
        return time.perf_counter() - started


class _ChipStep:
    """An emulated chip's stand-in training step: `seconds` of compute charged to its compute queue in
    kernels the host issues at once (as a real step's), then a wait for that queue only; chip seconds."""

    KERNELS = 20

    def __init__(self, accel, seconds: float):
        self.accel = accel
        self.flops = seconds * accel.pace.flops_per_second(torch.float32) / self.KERNELS

    def run(self) -> float:
        started = time.perf_counter()
        for _ in range(self.KERNELS):
            self.accel.account(flops=self.flops)
        self.accel.current_stream().synchronize()
        return (time.perf_counter() - started) / self.accel.time_dilation


def _save_once(made: AdamW, root: str, rank: int, staging, device: _Host) -> dict:
    """The blocking copy into `staging` (timed as blocked, in the device's seconds: on an emulated chip on
    its compute queue), then the background write, waited for."""
    started = time.perf_counter()
    chunks = made.own_chunks(staging.begin().copy, list(made.params))
    staging.finish()
    blocked_s = (time.perf_counter() - started) / device.dilation
    write = ckpt.AsyncWrite(ckpt.partial_dir(root, STEP), rank, STEP, chunks, staging=staging)
    del chunks
    if write.start().wait() is not None:
        raise UserError(f"{root}: no space left to write the bench's checkpoint")
    return {"bytes": write.bytes, "blocked_s": blocked_s, "write_s": write.write_s}


def random_state(model, seed: int = 0) -> dict:
    """{name: full fp32 tensor} of the weights and both Adam moments, random."""
    generator = torch.Generator().manual_seed(seed)
    return {prefix + name: torch.randn(layout.full_shape(model, name), generator=generator)
            for name in layout.model_names(model) for prefix in ("", "exp_avg.", "exp_avg_sq.")}


def rank_optimizer(model, full: dict, names, tp: TensorParallel, dp: int = 1, dp_rank: int = 0,
                   zero: bool = False, dtype: torch.dtype = torch.float32) -> AdamW:
    """An AdamW holding rank (tp.rank, dp_rank)'s part of `full` for parameters `names`, set up without
    the checkpoint code or any communication (TP slices cut here, flat shards made by FlatShard; an fp32
    master shard when `dtype` is lower)."""
    stage = SimpleNamespace(hf_name=lambda n: n, config=model, tp=tp)
    local = {n: tp.shard(full[n], layout.split_dim(n)).clone() for n in names}
    params = {n: torch.nn.Parameter(t.to(dtype)) for n, t in local.items()}
    master = dtype != torch.float32
    shard = FlatShard(params, dp, dp_rank) if zero or master else None
    made = AdamW(stage, params, 0.01, 0.0, shard=shard, master=master)
    for kind in fmt.MOMENT_KINDS:
        moments = {n: tp.shard(full[f"{kind}.{n}"], layout.split_dim(n)) for n in names}
        store = getattr(made, kind)
        if shard is None:
            for n in names:
                store[n].copy_(moments[n])
        else:
            store.copy_(shard.shard_of(shard.flatten(moments, torch.float32, "cpu")))
    if master:
        assert shard is not None and made.master is not None        # a master copy is always sharded
        made.master.copy_(shard.shard_of(shard.flatten(local, torch.float32, "cpu")))
    return made


class _PeakRss:
    """The peak of this process's resident set over a span, less its size at the start (bytes)."""

    def __init__(self):
        _trim()                   # hand freed heap back first, or new host copies reuse it unseen
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> "_PeakRss":
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return self.peak - self.base


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: the resident set is read as it is
        pass


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _NoScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
