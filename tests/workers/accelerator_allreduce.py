"""A user's script under `hetero launch` that asks the accelerator for its backend:
init_process_group(get_accelerator().dist_backend), then an all-reduce of rank + 1 made in the
device's memory, then one of a host tensor. Prints the backend, the sum, and whether the host
tensor was refused (the strict backend refuses it, as NCCL/HCCL would; plain gloo takes it)."""

import os
import sys

import torch
import torch.distributed as dist

import accelerators

accel = accelerators.get_accelerator()
accel.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(accel.dist_backend)
rank = dist.get_rank()
with accel.device_scope():
    value = torch.full((1,), float(rank + 1))
    dist.all_reduce(value)
try:
    dist.all_reduce(torch.ones(1))
    host = "taken"
except RuntimeError as exc:
    host = "refused" if "host tensor" in str(exc) else f"failed: {exc}"
print(f"rank {rank}: {dist.get_backend()} sum {int(value.item())}, host tensor {host}")
dist.destroy_process_group()
# The group is torn down and the result printed: skip the interpreter's own teardown, where torch 2.13
# + gloo sometimes aborts ("terminate called without an active exception", exit -6), failing a run
# that has already passed (as tests/workers/strict_pair.py and hetero.engine.worker do).
sys.stdout.flush()
os._exit(0)
