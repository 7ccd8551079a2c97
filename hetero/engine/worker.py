"""Worker entry point: `python -m hetero.engine.worker --plan P --cluster C --model M --train T`.

`hetero run` starts one per rank through the launcher, which provides the
island-local torchrun environment and HETERO_* (global rank, coordinator, token).

A failure that every restart would repeat (a hetero.errors.UserError such as
JobFatalError: a corrupt checkpoint with no good one left, a plan for another
model; or a full disk: ENOSPC, EDQUOT, EROFS) stops the worker with one line on
stderr, `hetero: rank R on HOST: <what, naming the file>`, the same line in
<run dir>/fatal/rankNNNNN.txt, and exit code FATAL_EXIT_CODE, on which the
launcher stops the job instead of restarting it. Running out of device memory
(torch.OutOfMemoryError, the emulated chip's, or a vendor's class of that
name) is such a failure too: its line names the rank, island, stage, chip, the
allocation, what was in use and the capacity, and what to try. Anything else is
a traceback and exit 1: the launcher restarts the job from its last checkpoint.

Every worker selects its device (`set_device(LOCAL_RANK % device_count)`)
before any device work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import re
import sys

import torch

import accelerators
from accelerators.strict_backend import BACKEND_NAME as STRICT_BACKEND
from accelerators.strict_backend import StrictBackendError
from hetero.config import load_job
from hetero.engine.comms import Comms
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from hetero.errors import FATAL_EXIT_CODE, UserError
from hetero.launch.logs import fatal_path
from hetero.plan_check import load_checked_plan

# A disk that is full, over quota or read-only fails the same way on every attempt.
FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetero.engine.worker", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan JSON written by hetero plan --out")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--run-dir", default=os.environ.get("HETERO_RUN_DIR"))
    parser.add_argument("--checkpoint-dir", help="override train.checkpoint.dir (hetero run: <run dir>/checkpoints)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    comms = accelerator = topology = None
    try:
        job = load_job(cluster=args.cluster, model=args.model, train=args.train).require("cluster", "model", "train")
        train = job.train
        if args.checkpoint_dir and train.checkpoint:
            train = dataclasses.replace(train, checkpoint=dataclasses.replace(train.checkpoint,
                                                                              dir=args.checkpoint_dir))
        plan = load_checked_plan(args.plan, job, engine=True)   # the launcher checked it too; this copy may differ
        topology = Topology(plan)
        accelerator = accelerators.get_accelerator()
        device = select_device(accelerator)
        if accelerator.device_type == "cpu":
            _share_host_cores(topology, job.cluster)
        comms = Comms.start(topology, accelerator, device, job.cluster)

        def log(message: str) -> None:
            print(message, flush=True)

        trainer = Trainer(comms, accelerator, job.model, train, args.run_dir, steps=args.steps, log=log,
                          pretrained=job.pretrained)
        trainer.run()
        comms.finish()
    except Exception as exc:  # anything fatal_message does not know is re-raised as it was
        message = fatal_message(exc, accelerator, topology)
        if message is None:
            raise
        report_fatal(message, args.run_dir)
        return FATAL_EXIT_CODE
    finally:
        if comms is not None:
            with contextlib.suppress(OSError):   # what it carried and refused, however the worker ends
                comms.record_bridge_stats(args.run_dir)
            comms.close()
    return 0


def select_device(accelerator) -> torch.device:
    """Make this worker's device current (LOCAL_RANK picks one of the node's visible devices)
    before any device work, so that no two ranks of a node share device 0; returns it."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    index = local % max(1, accelerator.device_count())
    accelerator.set_device(index)
    return accelerator.device(index)


def fatal_message(exc: BaseException, accelerator=None, topology: Topology | None = None) -> str | None:
    """What to say about a failure every restart would repeat, or None for one a restart may cure."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or os.strerror(exc.errno)}"
    if is_out_of_memory(exc):
        return out_of_memory_message(exc, accelerator, topology)
    if isinstance(exc, StrictBackendError):   # a host tensor or a deadlocking schedule: the same every time
        return f"the island's collective backend ({STRICT_BACKEND}) refused this: {exc}"
    return None


# Vendor out-of-memory classes by name, for plug-ins whose class cannot be imported here
# (torch_npu's and torch_xmlir's, where they are not torch.OutOfMemoryError itself).
_OOM_CLASS_NAMES = ("OutOfMemoryError", "NPUOutOfMemoryError", "XPUOutOfMemoryError", "EmulatedOutOfMemory")


def is_out_of_memory(exc: BaseException) -> bool:
    """A device out-of-memory error: torch.OutOfMemoryError or a vendor's class of that kind."""
    return isinstance(exc, torch.OutOfMemoryError) or any(
        cls.__name__ in _OOM_CLASS_NAMES for cls in type(exc).__mro__)


def out_of_memory_message(exc: BaseException, accelerator=None, topology: Topology | None = None) -> str:
    """One line: where (rank, island, stage, chip), the allocation against what was in use and
    the capacity, and what to try. The numbers come from the emulated chip's error, else from the
    vendor's message and the accelerator's counters."""
    rank = int(os.environ.get("HETERO_GLOBAL_RANK", "0"))
    entry = topology.by_rank.get(rank) if topology is not None else None
    stage = topology.plan.stages[entry.stage] if topology is not None and entry is not None else None
    island = entry.island if entry is not None else os.environ.get("HETERO_ISLAND", "?")
    chip = stage.chip if stage is not None else os.environ.get("HETERO_CHIP", "?")
    where = f"rank {rank} (island {island}, stage {entry.stage if entry else '?'}, chip {chip})"
    requested, in_use, capacity = _oom_numbers(exc, accelerator)
    numbers = ", ".join(part for part in (
        f"tried to allocate {_size(requested)}" if requested is not None else "an allocation failed",
        f"{_size(in_use)} in use" if in_use is not None else "",
        f"capacity {_size(capacity)}" if capacity is not None else "",
        f"the plan predicted {stage.memory_gb:.3g} GB for this stage" if stage is not None else "",
    ) if part)
    recompute = f" (this stage: recompute {stage.recompute})" if stage is not None else ""
    return (f"out of device memory on {where}: {numbers}; try activation recompute{recompute}, "
            f"more chips, or a smaller micro-batch (train.micro_batch), then re-plan")


def _oom_numbers(exc: BaseException, accelerator) -> tuple[int | None, int | None, int | None]:
    """(requested, in use, capacity) in bytes, each None where unknown."""
    reported = [getattr(exc, key, None) for key in ("requested", "in_use", "capacity")]
    if all(isinstance(value, int) for value in reported):   # the emulated chip's error carries its numbers
        return reported[0], reported[1], reported[2]
    found = re.search(r"[Tt]ried to allocate ([\d.]+) ?([KMGT]i?B|B)", str(exc))
    requested = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else None
    in_use = capacity = None
    if accelerator is not None:
        with contextlib.suppress(Exception):   # a device that just failed may refuse questions too
            in_use = int(accelerator.memory_allocated())
        with contextlib.suppress(Exception):
            capacity = int(accelerator.total_memory())
    return requested, in_use, capacity


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _size(nbytes: int) -> str:
    """Bytes in the catalog's decimal units (GB = 1e9 bytes)."""
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def report_fatal(message: str, run_dir: str | None) -> str:
    """Print `hetero: rank R on HOST: message` to stderr and keep it in <run dir>/fatal/rankNNNNN.txt
    (where the launcher reads it); returns the line. A file that cannot be written (the very disk
    that is full) is skipped: the line on stderr is in the rank's log either way."""
    rank = int(os.environ.get("HETERO_GLOBAL_RANK", "0"))
    host = os.environ.get("HETERO_NODE", "this host")
    line = f"hetero: rank {rank} on {host}: {' '.join(message.split())}"
    print(line, file=sys.stderr, flush=True)
    if run_dir:
        path = fatal_path(run_dir, rank)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError:
            pass
    return line


def _share_host_cores(topology, cluster) -> None:
    """Host-run chips (cpu, emulated) split this host's cores instead of oversubscribing them."""
    def host(entry):
        return cluster.island(entry.island).nodes[entry.node].host
    me = host(topology.by_rank[int(os.environ.get("HETERO_GLOBAL_RANK", "0"))])
    neighbours = sum(1 for entry in topology.plan.ranks if host(entry) == me)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // neighbours))


def exit_without_teardown(code: int) -> None:
    """End the worker process with `code`, skipping the interpreter's own teardown. main() has
    destroyed the process groups and closed every file; torch 2.13 + gloo sometimes aborts in that
    teardown ("terminate called without an active exception", exit -6), which would turn a rank that
    finished into a failed one and fail or restart the job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
