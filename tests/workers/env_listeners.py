"""A torchrun script that inits its process group the default way (env://), all-reduces,
and writes to argv[1]/<rank>.json every TCP socket this process listens on (address, port).
Under a hetero launcher there must be no store server among them on a wildcard address."""

import json
import os
import sys

import torch
import torch.distributed as dist


def listening(pid: int) -> list[tuple[str, int]]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for row in handle.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:   # 0A: LISTEN
                    address, port = cols[1].split(":")
                    found.append((address, int(port, 16)))
    return found


dist.init_process_group("gloo")
value = torch.tensor([1.0])
dist.all_reduce(value)
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[1], f"{rank}.json"), "w") as fh:
    json.dump({"sum": value.item(), "listening": listening(os.getpid()),
               "master_port": int(os.environ["MASTER_PORT"])}, fh)
dist.destroy_process_group()
