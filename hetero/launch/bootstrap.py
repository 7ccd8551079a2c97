"""Worker bootstrap: `python -m hetero.launch.bootstrap [-m module | script] args...`.

torch elastic gives every worker of an island the same command and sets only
torchrun's per-worker variables; this small step adds the per-worker
HETERO_GLOBAL_RANK (from the island's rank table and RANK), arranges for the
worker to get SIGTERM if its agent dies (hetero.launch.lifeline), routes torch's
env:// rendezvous through the job coordinator's token-checked store
(hetero.launch.store: no TCPStore on MASTER_PORT listening on every interface),
starts reporting the training loop's progress to the head and arms the stack dump
for its hang watchdog (hetero.launch.progress_report), then runs the real entrypoint in this process as `python script.py` /
`python -m module` would.
"""

from __future__ import annotations

import os
import sys

from hetero.launch.lifeline import AGENT_PID_ENV, die_with_parent

RANK_TABLE_ENV = "HETERO_RANK_TABLE"   # same as hetero.launch.environment.RANK_TABLE_ENV


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m hetero.launch.bootstrap [-m module | script] args...")
    parent = int(os.environ.get(AGENT_PID_ENV) or os.getppid())
    die_with_parent()
    if os.getppid() != parent:   # the agent died before prctl took effect
        sys.exit(1)
    table = os.environ.get(RANK_TABLE_ENV, "")
    rank = int(os.environ.get("RANK", "0"))
    if table:
        os.environ["HETERO_GLOBAL_RANK"] = table.split(",")[rank]
    from hetero.launch.store import install_env_rendezvous

    install_env_rendezvous()
    from hetero.launch import progress_report

    progress_report.start()
    run_entrypoint(argv)


def run_entrypoint(argv: list[str]) -> None:
    """Run `-m module args...` or `script args...` in this process, as `python` itself would:
    the same sys.argv, and sys.path[0] the current directory (-m) or the script's own."""
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
