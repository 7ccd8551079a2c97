"""Fails on the job's first attempt, succeeds after a restart (tests/hetero/launch/test_launch.py).

On attempt 0 (HETERO_RESTART_COUNT) global rank argv[2] (default 0) exits
with code 7 (an ordinary failure: 3 is hetero.errors.FATAL_EXIT_CODE) once its
island's world is up; every other rank would sleep far longer than the test allows,
so it finishes only if the launcher stops it. Every worker records "<attempt> <pid>"
in argv[1]/<global rank>.<attempt> before acting.
"""

import os
import sys
import time

attempt = int(os.environ["HETERO_RESTART_COUNT"])
global_rank = int(os.environ["HETERO_GLOBAL_RANK"])
failing_rank = int(sys.argv[2]) if len(sys.argv) > 2 else 0
# The mark first, before the seconds torch takes to import: a rank that failed meanwhile
# would otherwise tear attempt 0 down before a slow starter had recorded that it ran.
with open(os.path.join(sys.argv[1], f"{global_rank}.{attempt}"), "w") as fh:
    fh.write(f"{attempt} {os.getpid()}\n")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
value = torch.ones(1)
dist.all_reduce(value)
if attempt == 0:
    if global_rank == failing_rank:
        # Fail only once every rank of the job has started (its mark is written): another
        # island's agent may still be spawning its worker, and the test asserts that
        # the launcher stopped a running rank, not that one never started.
        world = int(os.environ["HETERO_WORLD_SIZE"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(
                name.endswith(".0") for name in os.listdir(sys.argv[1])) < world:
            time.sleep(0.05)
        print("failing on purpose", flush=True)
        os._exit(7)
    time.sleep(300)
print(f"attempt {attempt} done, island sum {int(value.item())}", flush=True)
dist.destroy_process_group()
