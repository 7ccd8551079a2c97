"""Records its pid in argv[1]/<global rank>.pid, then sleeps until stopped (tests/test_launch.py)."""

import os
import sys
import time

path = os.path.join(sys.argv[1], f"{os.environ['HETERO_GLOBAL_RANK']}.pid")
with open(path + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(300)
