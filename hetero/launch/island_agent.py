"""One island's workers on one node: `python -m hetero.launch.island_agent SPEC_JSON`.

A torch elastic agent (torch.distributed.launcher.api.launch_agent) whose
rendezvous (hetero.launch.store, backend "hetero") meets in the job
coordinator's token-checked store, with fixed node ranks: the Plan fixes which
node holds which island-local ranks, so node order must be deterministic (node =
rendezvous rank), which dynamic c10d rendezvous does not promise. No agent
listens: there is no TCPStore. Elastic's own restarts are off (max_restarts 0):
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

from hetero.launch.lifeline import die_with_parent


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
    """Run the island's workers. Returns the agent's exit status: 0, 1, 128 + signal (see the
    module docstring), or hetero.errors.FATAL_EXIT_CODE when a worker stopped on a failure every
    restart would repeat. Which workers failed, with their exit codes, goes to the outcome file
    the launcher reads (hetero.launch.logs.agent_outcome_path)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    from hetero.errors import FATAL_EXIT_CODE
    from hetero.launch.agents import write_outcome
    from hetero.launch.logs import agent_outcome_path

    where = f"island {spec['island']} on {spec['host']}"
    try:
        launch_agent(launch_config(spec), sys.executable, ["-m", "hetero.launch.bootstrap", *spec["entry"]])
    except ChildFailedError as exc:
        # The workers are stopped already: a stop request now would only cut the report short.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        table = [int(r) for r in os.environ.get("HETERO_RANK_TABLE", "").split(",") if r.strip()]
        failures = [{"rank": table[rank] if rank < len(table) else rank, "island_rank": rank,
                     "exitcode": failure.exitcode, "time": failure.timestamp}
                    for rank, failure in sorted(exc.failures.items())]
        write_outcome(agent_outcome_path(spec["log_dir"], spec["island"], spec["group_rank"]), failures)
        for failure in failures:
            log = os.path.join(spec["log_dir"], f"{spec['island']}.{failure['island_rank']}")
            print(f"hetero launch: {where}: worker rank {failure['island_rank']} (global rank {failure['rank']}) "
                  f"failed with exit code {failure['exitcode']} (log: {log})", file=sys.stderr, flush=True)
        return FATAL_EXIT_CODE if any(f["exitcode"] == FATAL_EXIT_CODE for f in failures) else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except Exception as exc:   # rendezvous timeout, port in use, ...
        if os.environ.get("HETERO_LAUNCH_VERBOSE"):
            traceback.print_exc()
        print(f"hetero launch: {where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """Start the agent; it leaves through exit_now, and on its own when the launcher is gone
    (hetero.launch.lifeline.watch_parent), whatever elastic does."""
    spec = json.loads(argv[0])
    die_with_parent()
    if os.getppid() != spec["parent_pid"]:   # the launcher is already gone
        return 1
    from hetero.launch.agents import remove_rings
    from hetero.launch.lifeline import AGENT_PID_ENV, exit_now, stop_children_and_exit, watch_parent

    # Before the workers start, a stop request just ends the agent (nothing to clean up);
    # elastic installs its own handlers once workers run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not os.environ.get("HETERO_LAUNCH_VERBOSE"):
        # Elastic logs a paragraph per event; the agent prints one line per failure instead.
        quiet = logging.getLogger("torch.distributed.elastic")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    # The launcher gone (even by SIGKILL, even if PDEATHSIG's SIGTERM got lost in elastic's
    # shutdown): stop the workers, unlink the job's shared-memory rings the launcher can no
    # longer clean up, and leave. Workers check they are this agent's children.
    os.environ[AGENT_PID_ENV] = str(os.getpid())

    def launcher_gone() -> None:
        stop_children_and_exit(float(spec["shutdown_timeout"]),
                               then=lambda: remove_rings(os.environ.get("HETERO_JOB_TOKEN", "")))

    watch_parent(spec["parent_pid"], launcher_gone)
    try:
        code = run(spec)
    except BaseException as exc:   # a stop signal that came while reporting a failure
        print(f"hetero launch: island {spec['island']} on {spec['host']}: stopped ({type(exc).__name__})",
              file=sys.stderr, flush=True)
        code = 1
    if os.getppid() != spec["parent_pid"]:   # stopped by PDEATHSIG: the launcher cannot clean up
        remove_rings(os.environ.get("HETERO_JOB_TOKEN", ""))
    exit_now(code)   # never wait for threads elastic left running (its log tails)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
