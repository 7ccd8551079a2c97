"""`hetero launch`: start a job's workers over a mixed fleet, torchrun-style, on torch elastic.

Python API (what `hetero run` and tests call):

    from hetero.launch import launch_fleet
    code = launch_fleet("cluster.yaml", "plan.json", "-m hetero.engine.worker", ["--steps", "10"],
                        node=None, max_restarts=2, run_dir="runs/x")

See hetero/launch/fleet.py for every argument. On each node the launcher starts,
per island with workers there, one torch elastic agent (hetero/launch/island_agent.py),
meeting its island's other nodes in the coordinator's token-checked store
(hetero/launch/store.py; a script's env:// init goes there too): one native
world per island. The head
node (the cluster's coordinator host) also runs comm_bridge's coordinator and
decides, for every attempt, whether the job is done, failed, or restarts as a
whole (hetero/launch/control.py; the other nodes follow it: member.py, through
the keys of protocol.py). Who runs where: hetero/launch/layout.py. On Ray, one driver
runs it all and Ray says which hosts are there (ray_fleet.py, ray_elastic.py).

Each worker's environment:

    torchrun's, island-local:  RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
                               MASTER_ADDR, MASTER_PORT (+ TORCHELASTIC_*)
    HETERO_GLOBAL_RANK         rank in the whole job (the Plan's, or island by island)
    HETERO_WORLD_SIZE          workers in the whole job
    HETERO_ISLAND, HETERO_ISLAND_INDEX, HETERO_CHIP, HETERO_BACKEND
    HETERO_ACCELERATOR         the island's accelerator (accelerators.get_accelerator() picks it)
    HETERO_EMULATED_CHIP       the chip spec as JSON (emulated chips only)
    HETERO_EMULATED_TIME_DILATION  wall seconds per chip second (emulated chips; passed through when set)
    HETERO_NODE                the node's host, as in the cluster file
    HETERO_PLAN                absolute path of the Plan JSON (only with a plan)
    HETERO_CLUSTER             absolute path of the cluster YAML (when given as a path)
    HETERO_COORDINATOR         host:port of the job's coordinator (comm_bridge)
    HETERO_JOB_TOKEN           the coordinator's job token (never printed)
    HETERO_RUN_DIR             the run directory (logs under logs/attempt_<k>/)
    HETERO_RESTART_COUNT       0 on the first attempt, k after k job-wide restarts
    <visible-devices var>      e.g. CUDA_VISIBLE_DEVICES: this node's devices of the island (islands of
                               one vendor on one host take consecutive indices, in cluster order;
                               a list already set in the launcher's env restricts the host first)
    PYTHONUNBUFFERED=1         unless already set, so prefixed log lines arrive as printed
    HETERO_RANK_TABLE          internal (island rank -> global rank, for the worker bootstrap)

Console lines of every worker are prefixed "[island:rank] " (island-local rank).
"""

from __future__ import annotations

__all__ = ["launch_fleet", "build_layout"]


def __getattr__(name: str):
    # Lazy: the worker bootstrap imports this package and must stay light.
    if name == "launch_fleet":
        from hetero.launch.fleet import launch_fleet
        return launch_fleet
    if name == "build_layout":
        from hetero.launch.layout import build_layout
        return build_layout
    raise AttributeError(name)
