"""Records its pid in argv[1]/<global rank>.pid, then sleeps until stopped (tests/hetero/launch/test_launch.py).

With argv[2] == "--exit-with-launcher" it exits with 43 the moment its agent's parent (the
launcher) is gone, as a worker of `hetero run` does when the coordinator inside the launcher
vanishes: the agent then sees a worker fail just as the launcher's death signals it.
"""

import os
import sys
import time


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


path = os.path.join(sys.argv[1], f"{os.environ['HETERO_GLOBAL_RANK']}.pid")
with open(path + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.replace(path + ".tmp", path)
if sys.argv[2:] == ["--exit-with-launcher"]:
    agent = os.getppid()
    launcher = parent_of(agent)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if parent_of(agent) != launcher:
                os._exit(43)
        except (OSError, IndexError):
            os._exit(43)
        time.sleep(0.01)
time.sleep(300)
