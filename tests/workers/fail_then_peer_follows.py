"""One rank fails, a peer stops itself right after (tests/hetero/launch/test_launch_lifecycle.py).

argv: MARKS FAILING_RANK EXIT_CODE. On attempt 0 (HETERO_RESTART_COUNT) global rank
FAILING_RANK writes MARKS/failing, waits a second and exits with EXIT_CODE; with
hetero.errors.FATAL_EXIT_CODE it first reports a fatal line the way hetero.engine.worker
does (naming a file). Every other rank exits with 43 as soon as it sees the mark, as
hetero.engine.comms does when a peer fails: its island fails first, yet the launcher
must name FAILING_RANK. On later attempts every rank prints "attempt N done" and exits 0.
Every worker records "<attempt> <pid>" in MARKS/<global rank>.<attempt>. No torch: fast.
"""

import os
import sys
import time

marks, failing_rank, exit_code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
attempt = int(os.environ["HETERO_RESTART_COUNT"])
rank = int(os.environ["HETERO_GLOBAL_RANK"])
with open(os.path.join(marks, f"{rank}.{attempt}"), "w") as fh:
    fh.write(f"{attempt} {os.getpid()}\n")
if attempt > 0:
    print(f"attempt {attempt} done", flush=True)
    sys.exit(0)
mark = os.path.join(marks, "failing")
if rank == failing_rank:
    from hetero.errors import FATAL_EXIT_CODE

    if exit_code == FATAL_EXIT_CODE:
        from hetero.engine.worker import report_fatal

        report_fatal(f"{marks}/state.json: corrupt checkpoint (no good one left)", os.environ["HETERO_RUN_DIR"])
    open(mark, "w").close()
    time.sleep(1.0)
    sys.exit(exit_code)
deadline = time.monotonic() + 120
while not os.path.exists(mark) and time.monotonic() < deadline:
    time.sleep(0.02)
print("hetero: a peer failed; stopping this worker", file=sys.stderr, flush=True)
os._exit(43)
