"""`--on ray`: the same job on a Ray cluster, from one command.

The driver (this process) connects to Ray (`ray.init(address)`: ADDRESS, else
RAY_ADDRESS, else a local Ray), checks that every host of the cluster file is a live
Ray node, reserves one placement group per island (hetero.launch.ray_placement) and
runs the job as the local launcher does (hetero.launch.fleet's job loop, its
HeadControl and coordinator, here in the driver, on the driver's node address): per
attempt, each island's share of each node gets an AgentHost actor on its bundles,
which starts that island's torch elastic agent there with today's environment
(hetero.launch.environment) and the visible devices Ray assigned
(hetero.launch.ray_actors). A failed agent, a killed actor or a lost node fails the
attempt; every actor of the attempt is stopped, and the whole job restarts from its
last checkpoint (up to max_restarts) in fresh actors on the same placement groups.
Ctrl-C stops every actor. At the end the actors and placement groups are removed.

The run directory must be reachable at the same path on every Ray node (a shared
filesystem, or one machine): the agents write per-rank logs and checkpoints there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import sys
import tempfile
import time

from hetero.errors import UserError
from hetero.launch import inputs
from hetero.launch.agents import AgentProcess, LocalIslands, remove_rings
from hetero.launch.control import HeadControl
from hetero.launch.fleet import _FleetJob, _Interrupts
from hetero.launch.layout import build_layout
from hetero.launch.logs import fatal_path
from hetero.launch.ray_placement import IslandPlacement, missing_hosts, plan_placement, short_of

INSTALL = "pip install -e '.[ray]' (or pip install 'ray>=2.10')"
PLACEMENT_TIMEOUT_S = 60.0   # how long the placement groups may take to be reserved
FORWARDED_PREFIXES = ("HETERO_",)   # the driver's variables every worker gets (HETERO_EMULATED_TIME_DILATION, ...)


def require_ray():
    """The ray module, or a UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--on ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def ray_launcher(address: str | None):
    """launch_fleet's signature, on the Ray cluster at `address` (checked to answer, before any planning)."""
    require_ray()
    _check_reachable(address)
    return functools.partial(launch_on_ray, address=address)


def launch_on_ray(cluster, plan_path: str | None, entrypoint: str, args=(), node: str | None = None,
                  max_restarts: int = 0, run_dir: str | None = None, env: dict | None = None, *,
                  address: str | None = None, token_file: str | None = None, rdzv_timeout: float = 300.0,
                  shutdown_timeout: float = 15.0, heartbeat_timeout: float = 5.0, stdout=None, stderr=None,
                  checkpoint_dir: str | None = None, placement_timeout: float = PLACEMENT_TIMEOUT_S) -> int:
    """launch_fleet (see hetero.launch.fleet) with every island on the Ray cluster at `address`.
    Returns as launch_fleet does; raises UserError for bad input, a host that is no Ray node, or
    bundles the Ray cluster cannot hold."""
    ray = require_ray()
    if node is not None:
        raise UserError("--node and --on ray exclude each other: with Ray, one command launches every host")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    base_env = dict(os.environ if env is None else env)
    config, cluster_path = inputs.load_cluster(cluster)
    plan = inputs.load_plan(plan_path, config) if plan_path else None
    entry = inputs.entry_command(entrypoint, args)
    token, _ = inputs.job_token(token_file, base_env, needed=False)
    run_dir = os.path.abspath(run_dir) if run_dir else tempfile.mkdtemp(prefix="hetero-run-")
    os.makedirs(run_dir, exist_ok=True)
    started = time.monotonic()
    _connect(ray, address)
    connected = time.monotonic()
    try:
        driver_ip = ray.util.get_node_ip_address()
        # The coordinator stays with the driver: the workers reach it at the driver's address.
        config = dataclasses.replace(config, coordinator=dataclasses.replace(config.coordinator, host=driver_ip))
        layout = build_layout(config, plan, node=driver_ip)
        placements = _reserve(ray, layout, placement_timeout)
        reserved = time.monotonic()
        forwarded = {k: v for k, v in base_env.items() if k.startswith(FORWARDED_PREFIXES)}
        job = _RayJob(layout, None, entry, token, run_dir, os.path.abspath(plan_path) if plan_path else None,
                      cluster_path, forwarded, rdzv_timeout, shutdown_timeout, stdout, stderr,
                      os.path.abspath(checkpoint_dir) if checkpoint_dir else os.path.join(run_dir, "checkpoints"))
        job.placements = placements
        job.say(f"on Ray: connected in {connected - started:.1f} s, {len(placements)} placement group(s) reserved in "
                f"{reserved - connected:.1f} s, coordinator at {layout.coordinator_address}", console=True)
        remove_rings(token)
        control = HeadControl(layout, token, [], max_restarts, heartbeat_timeout,
                              ack_timeout=shutdown_timeout + 30.0, join_timeout=rdzv_timeout,
                              lost_timeout=max(10.0, 2 * heartbeat_timeout), run_dir=run_dir)
        with _Interrupts() as interrupts:
            return job.run(control, interrupts, max_restarts)
    finally:
        remove_rings(token)
        _release(ray)


def _connect(ray, address: str | None) -> None:
    import logging

    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="hetero",
                 configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
        raise UserError(f"--on ray: cannot connect to {where}: {str(exc).splitlines()[0]}") from None


def _check_reachable(address: str | None) -> None:
    where = address or os.environ.get("RAY_ADDRESS")
    if where and _unreachable(where):   # ray.init retries a wrong address for minutes
        raise UserError(f"--on ray: nothing answers at {where} (is the Ray head running? `ray start --head`)")


def _unreachable(address: str) -> bool:
    """True when `address` is host:port (a GCS address, not auto or ray://) and nothing accepts there."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return False
    try:
        socket.create_connection((host, int(port)), timeout=5.0).close()
        return False
    except OSError:
        return True


_GROUPS: list = []   # this driver's placement groups, removed by _release


def _reserve(ray, layout, timeout: float) -> list[IslandPlacement]:
    """One placement group per island, reserved (or a UserError naming what is missing)."""
    from ray.util.placement_group import placement_group

    nodes = {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    hosts = {host: _ip(host) for host in layout.hosts}
    missing = missing_hosts(hosts, nodes)
    if missing:
        raise UserError(f"--on ray: host(s) {', '.join(missing)} of the cluster file are no live node of the Ray "
                        f"cluster (its nodes: {', '.join(sorted(nodes)) or 'none'})")
    placements = plan_placement(layout, hosts)
    lacking = short_of(placements, nodes)
    if lacking:
        raise UserError(f"--on ray: the Ray nodes cannot hold the job's bundles ({'; '.join(lacking)})")
    for placement in placements:
        group = placement_group(list(placement.bundles), strategy="PACK",
                                name=f"hetero-{os.getpid()}-{placement.island.name}")
        _GROUPS.append(group)
        placement.group = group
    ready, _ = ray.wait([p.group.ready() for p in placements], num_returns=len(placements), timeout=timeout)
    if len(ready) < len(placements):
        raise UserError(f"--on ray: Ray could not reserve the islands' bundles within {timeout:.0f} s "
                        f"(other jobs hold the resources?)")
    return placements


def _ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _release(ray) -> None:
    from ray.util.placement_group import remove_placement_group

    while _GROUPS:
        with contextlib.suppress(Exception):
            remove_placement_group(_GROUPS.pop())
    with contextlib.suppress(Exception):
        ray.shutdown()


class _RayJob(_FleetJob):
    placements: list[IslandPlacement] = []

    def start_islands(self, attempt: int):
        work = {(island.name, node.host): (spec, env) for island, node, spec, env in self.agent_work(attempt)}
        return RayIslands.start(self.placements, work, attempt, self.shutdown_timeout, self.stdout, self.run_dir)


class RayIslands(LocalIslands):
    """LocalIslands whose agents run in AgentHost actors on the island's bundles."""

    holders: list = []

    @classmethod
    def start(cls, placements, work: dict, attempt: int, shutdown_timeout: float, stdout=None,
              run_dir: str | None = None) -> "RayIslands":
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from hetero.launch.ray_actors import AgentHost, AgentProc, ChipHolder

        agents, holders = [], []
        for placement in placements:
            for share in placement.shares:
                spec, env = work[(share.island.name, share.node.host)]
                for rank in share.node.global_ranks:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(fatal_path(run_dir, rank))

                def on(bundle: int, group=placement.group):
                    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)

                options = {"num_cpus": 1.0}
                if share.resource == "GPU":
                    options["num_gpus"] = 1.0
                elif share.resource:
                    options["resources"] = {share.resource: 1.0}
                host = AgentHost.options(scheduling_strategy=on(share.first), **options).remote()
                mates = [ChipHolder.options(scheduling_strategy=on(b), **options).remote()
                         for b in share.bundles[1:]] if share.resource else []
                holders += mates
                visible = _visible(share, env, [host, *mates])
                started = host.start.remote(spec, env, visible)
                label = f"island {share.island.name} on {share.node.host}"
                agents.append(AgentProcess(share.island, share.node, AgentProc(host, started, label, stdout),
                                           spec["log_dir"]))
        islands = cls(agents, shutdown_timeout, run_dir)
        islands.holders = holders
        return islands

    def stop(self) -> None:
        import ray

        super().stop()
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.proc.kill()
        for holder in self.holders:
            with contextlib.suppress(Exception):
                ray.kill(holder, no_restart=True)


def _visible(share, env: dict, actors: list) -> tuple[str, str] | None:
    """(visible-devices variable, the ids Ray gave the share's chips), when Ray assigns ids to its resource."""
    import ray

    from accelerators.registry import accelerator_class

    var = accelerator_class(share.island.accelerator).visible_devices_env
    if not (var and share.resource):
        return None
    try:
        ids = [i for ids in ray.get([a.accelerator_ids.remote(share.resource) for a in actors], timeout=120.0)
               for i in ids]
    except Exception as exc:   # noqa: BLE001 - an actor that cannot start: the attempt fails on its poll
        print(f"hetero launch: island {share.island.name} on {share.node.host}: no device ids from Ray ({exc})",
              file=sys.stderr, flush=True)
        return None
    return (var, ",".join(ids)) if len(ids) == share.node.nproc else (var, env.get(var, ""))
