"""One island's workers on one node: `python -m hetero.launch.island_agent SPEC_JSON`.

A torch elastic agent (torch.distributed.launcher.api.launch_agent) with a
static rendezvous: the Plan fixes which node holds which island-local ranks, so
node order must be deterministic (node = rendezvous rank), which dynamic c10d
rendezvous does not promise. Elastic's own restarts are off (max_restarts 0):
restarts are job-wide, decided by the launcher for all islands at once.

Runs as its own process because an elastic agent owns its process's signal
handlers. Its environment (from hetero.launch.environment) is inherited by the
workers. Exit status: 0 when every worker succeeded, 1 when one failed,
128 + signal when stopped by a signal (the launcher sends SIGTERM).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback

from hetero.launch.bootstrap import die_with_parent


def launch_config(spec: dict):
    """The agent's LaunchConfig. Its rendezvous is hetero's (hetero.launch.store, registered here):
    fixed node ranks like the static one, but the agents meet in the job coordinator's
    authenticated store (HETERO_COORDINATOR, HETERO_JOB_TOKEN), so no agent opens a TCPStore.
    MASTER_ADDR:MASTER_PORT (the island's first node, rdzv_port) is left for scripts using env://."""
    from torch.distributed.launcher.api import LaunchConfig

    from hetero.launch.logs import LINE_PREFIX, IslandLogs
    from hetero.launch.store import COORDINATOR_ENV, register_rendezvous

    return LaunchConfig(
        min_nodes=spec["nnodes"], max_nodes=spec["nnodes"], nproc_per_node=spec["nproc"],
        run_id=spec["run_id"], role=spec["island"],
        rdzv_backend=register_rendezvous(), rdzv_endpoint=os.environ[COORDINATOR_ENV],
        rdzv_configs={"rank": spec["group_rank"], "timeout": int(spec["rdzv_timeout"]),
                      "master_addr": spec["master_addr"], "master_port": spec["rdzv_port"]},
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
        logs_specs=IslandLogs(spec["log_dir"], spec["island"]),
        log_line_prefix_template=LINE_PREFIX,
        shutdown_timeout=int(spec["shutdown_timeout"]),
    )


def run(spec: dict) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    where = f"island {spec['island']} on {spec['host']}"
    try:
        launch_agent(launch_config(spec), sys.executable, ["-m", "hetero.launch.bootstrap", *spec["entry"]])
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        log = os.path.join(spec["log_dir"], f"{spec['island']}.{rank}")
        print(f"hetero launch: {where}: worker rank {rank} failed with exit code {failure.exitcode} "
              f"(log: {log})", file=sys.stderr, flush=True)
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except Exception as exc:   # rendezvous timeout, port in use, ...
        if os.environ.get("HETERO_LAUNCH_VERBOSE"):
            traceback.print_exc()
        print(f"hetero launch: {where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    die_with_parent()
    if os.getppid() != spec["parent_pid"]:   # the launcher is already gone
        return 1
    # Before the workers start, a stop request just ends the agent (nothing to clean up);
    # elastic installs its own handlers once workers run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not os.environ.get("HETERO_LAUNCH_VERBOSE"):
        # Elastic logs a paragraph per event; the agent prints one line per failure instead.
        quiet = logging.getLogger("torch.distributed.elastic")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    return run(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
