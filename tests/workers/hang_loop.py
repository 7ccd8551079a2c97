"""A training loop in miniature for the hang watchdog (tests/hetero/launch/test_hang_multinode.py): no torch,
only progress stamps. Every rank steps every 0.1 s; on attempt 0 (HETERO_RESTART_COUNT), at
step 5 global rank argv[1] stops moving in its own work (the hook of hetero.engine.progress,
HETERO_TEST_HANG_AT, set by the test) and every other rank waits for it in "bridge receive",
as a synchronous job would. On later attempts every rank runs 10 steps and exits 0."""

import os
import sys
import time

from hetero.engine import progress

attempt = int(os.environ["HETERO_RESTART_COUNT"])
rank = int(os.environ["HETERO_GLOBAL_RANK"])
hung = int(sys.argv[1])
for step in range(10):
    progress.step(step)
    progress.stamp("forward", 0)
    if attempt == 0 and step == 5 and rank != hung:
        progress.stamp("bridge receive", 0)
        time.sleep(600)   # waiting for the hung rank: only the launcher ends it
    time.sleep(0.1)
progress.stamp(progress.DONE)
print(f"attempt {attempt} done", flush=True)
