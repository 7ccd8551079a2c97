"""Registers with the job's coordinator and heartbeats (tests/hetero/launch/test_launch.py).

On attempt 0, global rank 1 stops heartbeating but stays alive (a hung worker
its agent cannot see); the coordinator must declare it failed and the launcher
restart the job. Every other rank waits to be stopped. On later attempts all
ranks meet at a coordinator barrier, leave cleanly and exit 0. Every worker
records "<attempt> <pid>" in argv[1]/<global rank>.<attempt>.
"""

import os
import sys
import time

from comm_bridge.client import CoordinatorClient

attempt = int(os.environ["HETERO_RESTART_COUNT"])
rank = int(os.environ["HETERO_GLOBAL_RANK"])
with open(os.path.join(sys.argv[1], f"{rank}.{attempt}"), "w") as fh:
    fh.write(f"{attempt} {os.getpid()}\n")
client = CoordinatorClient(os.environ["HETERO_COORDINATOR"], os.environ["HETERO_JOB_TOKEN"], rank)
client.register(island=os.environ["HETERO_ISLAND"])
client.start_heartbeats()
if attempt == 0:
    if rank == 1:
        client.close()          # heartbeats stop; the process lives on, as if hung
    time.sleep(300)
client.barrier("done", timeout=60)
print(f"attempt {attempt} done", flush=True)
client.close(leave=True)
