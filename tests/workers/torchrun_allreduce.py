"""A plain torchrun script: it knows only RANK and WORLD_SIZE (and MASTER_* via env://).

Each rank all-reduces rank + 1 and prints the sum. With an output folder as
argv[1], it also writes its environment there (for the test to inspect).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
print(f"rank {rank} of {world}: sum {int(value.item())}")
if len(sys.argv) > 1:
    with open(os.path.join(sys.argv[1], f"{os.getpid()}.json"), "w") as fh:
        json.dump(dict(os.environ), fh)
dist.destroy_process_group()
