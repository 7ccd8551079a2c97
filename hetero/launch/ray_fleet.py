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
A lost Ray node (Ray says it is dead, or its raylet refuses a connection) is named as
the attempt's failure. Elastic (the default, given a planner: `hetero run --on ray`, or
`hetero launch --on ray --model --train`): the driver waits up to --rejoin-timeout for the
node to be back, re-plans on the chips that remain exactly as the loopback launcher does
(hetero.launch.fleet's regroup, hetero.launch.elastic's planner, the `replan` event),
reserves placement groups for the new layout and resumes from the last checkpoint; a Ray
node of the job that comes back is taken back at the next checkpoint (`rejoin`) and the plan
grows again (hetero.launch.ray_elastic says which hosts are there). Not elastic (--no-elastic,
or no planner): a restart onto a lost node is refused at once (LaunchAbort), since its
bundles would wait for it for ever. Ctrl-C stops every actor. At the end the actors and
placement groups are removed.

A `host: auto` node gets a STRICT_PACK placement group of its own; once reserved, the
Ray node it landed on becomes its host (hetero.launch.ray_placement.placed_cluster),
and the workers read a cluster file naming it (<run_dir>/cluster-placed.yaml).
While Ray runs in the driver, its own lines go to stderr: stdout is the job's.

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
from typing import Any

from hetero.errors import UserError
from hetero.launch import inputs, watchdog
from hetero.launch.agents import CRASHED, AgentProcess, LocalIslands, LocalStatus, remove_rings
from hetero.launch.protocol import LaunchAbort
from hetero.launch.fleet import ElasticState, FleetJob, Interrupts, check_timeout, read_text
from hetero.launch.layout import FleetLayout, build_layout
from hetero.launch.logs import fatal_path
from hetero.launch.ray_elastic import RayHeadControl
from hetero.launch.ray_placement import (IslandPlacement, crowded, is_auto, missing_hosts, placed_cluster,
                                         placed_yaml, plan_placement, rebind, short_of, with_node_ids)

INSTALL = "pip install -e '.[ray]' (or pip install 'ray>=2.10')"
PLACEMENT_TIMEOUT_S = 60.0   # how long the placement groups may take to be reserved
RAYLET_PROBE_S = 2.0   # a live raylet answers a connection long before this
PLACED_CLUSTER = "cluster-placed.yaml"   # in the run directory: the cluster file with the auto nodes' hosts
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
                  checkpoint_dir: str | None = None, placement_timeout: float = PLACEMENT_TIMEOUT_S,
                  hang_timeout: float | None = None, rejoin_timeout: float | None = None,
                  elastic: bool = True, replan=None) -> int:
    """launch_fleet (see hetero.launch.fleet) with every island on the Ray cluster at `address`.
    `elastic`, `replan`, `rejoin_timeout`: as launch_fleet's, a host being there when a live Ray node has it.
    Returns as launch_fleet does; raises UserError for bad input, a host that is no Ray node, or
    bundles the Ray cluster cannot hold. The hang watchdog runs as with launch_fleet; a hung rank
    on another machine than the driver is not signalled for its stacks (no launcher runs there):
    its attempt fails and Ray's actors are stopped."""
    ray = require_ray()
    if node is not None:
        raise UserError("--node and --on ray exclude each other: with Ray, one command launches every host")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    for flag, value in (("--hang-timeout", hang_timeout), ("--rejoin-timeout", rejoin_timeout)):
        check_timeout(flag, value)
    base_env = dict(os.environ if env is None else env)
    config, cluster_path = inputs.load_cluster(cluster)
    plan = inputs.load_plan(plan_path, config) if plan_path else None
    entry = inputs.entry_command(entrypoint, args)
    token, _ = inputs.job_token(token_file, base_env, needed=False)
    run_dir = os.path.abspath(run_dir) if run_dir else tempfile.mkdtemp(prefix="hetero-run-")
    os.makedirs(run_dir, exist_ok=True)
    started = time.monotonic()
    with _stdout_for_the_job(stdout) as stdout:
        _connect(ray, address)
        connected = time.monotonic()
        try:
            driver_ip = ray.util.get_node_ip_address()
            # The coordinator stays with the driver: the workers reach it at the driver's address.
            config = dataclasses.replace(config, coordinator=dataclasses.replace(config.coordinator, host=driver_ip))
            layout = build_layout(config, plan, node=driver_ip, auto=True)
            placements = _reserve(ray, layout, placement_timeout)
            where = ""
            if any(p.auto for p in placements):
                layout, placements, cluster_path, entry = _place_auto(ray, placements, config, plan, driver_ip,
                                                                      run_dir, cluster_path, entry)
                where = ", " + ", ".join(f"auto node {p.label} on {p.shares[0].ip}" for p in placements if p.auto)
            reserved = time.monotonic()
            forwarded = {k: v for k, v in base_env.items() if k.startswith(FORWARDED_PREFIXES)}
            job = _RayJob(layout, None, entry, token, run_dir, os.path.abspath(plan_path) if plan_path else None,
                          cluster_path, forwarded, rdzv_timeout, shutdown_timeout, stdout, stderr,
                          os.path.abspath(checkpoint_dir) if checkpoint_dir else os.path.join(run_dir, "checkpoints"))
            job.placements, job.placed, job.driver_ip, job.placement_timeout = (placements, layout, driver_ip,
                                                                               placement_timeout)
            job.plan, job.plan_text = plan, read_text(plan_path)
            job.first = (plan, job.plan_text)
            rejoin = watchdog.rejoin_or_default(rejoin_timeout)
            if elastic and len(layout.hosts) > 1:
                job.elastic = ElasticState(layout.cluster, replan, rejoin, layout.hosts)
            job.say(f"on Ray: connected in {connected - started:.1f} s, {len(placements)} placement group(s) reserved "
                    f"in {reserved - connected:.1f} s{where}, coordinator at {layout.coordinator_address}",
                    console=True)
            remove_rings(token)
            predicted = plan.predicted_step_s if plan is not None else None
            hang = hang_timeout or watchdog.default_timeout(predicted)
            control = RayHeadControl(layout, token, [], max_restarts, heartbeat_timeout,
                                     ack_timeout=shutdown_timeout + 30.0, join_timeout=rdzv_timeout,
                                     lost_timeout=max(10.0, 2 * heartbeat_timeout), run_dir=run_dir,
                                     hang_timeout=hang, rejoin_timeout=rejoin,
                                     say=lambda line: job.say(line, console=True),
                                     announce=watchdog.describe_timeout(hang, hang_timeout is not None, predicted),
                                     ips={host: _ip(host) for host in layout.hosts})
            control.plan_text, control.checkpoint_step = job.plan_text, job.resume_step
            with Interrupts() as interrupts:
                return job.run(control, interrupts, max_restarts)
        finally:
            remove_rings(token)
            _release(ray)


@contextlib.contextmanager
def _stdout_for_the_job(stdout):
    """While Ray runs in this process, its own lines ('(raylet) A worker died ...', printed on
    sys.stdout by the driver's error listener) go to stderr: stdout stays the job's, where
    `hetero run --json` prints its summary. Yields where the agents' lines go: `stdout`, else
    this process's stdout as it was."""
    sys.stdout.flush()
    original = sys.stdout
    real = _fileno(original) == 1
    saved = os.dup(1)
    job_out = stdout or (os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
                         if real else original)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield job_out
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = original
        if job_out is not stdout and job_out is not original:
            job_out.close()


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


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


def answers(host: str, port: int) -> bool:
    """True when the raylet at host:port accepts a connection: Ray's own verdict on a killed node
    takes its health checks (seconds to minutes), a closed port does not."""
    try:
        socket.create_connection((host, int(port)), timeout=RAYLET_PROBE_S).close()
        return True
    except OSError:
        return False


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
    from ray.util import placement_group_table
    from ray.util.placement_group import placement_group

    nodes = {n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    hosts = {host: _ip(host) for host in layout.hosts if not is_auto(host)}
    missing = missing_hosts(hosts, nodes)
    if missing:
        raise UserError(f"--on ray: host(s) {', '.join(missing)} of the cluster file are no live node of the Ray "
                        f"cluster (its nodes: {', '.join(sorted(nodes)) or 'none'})")
    placements = plan_placement(layout, hosts)
    lacking = short_of(placements, nodes)
    if lacking:
        raise UserError(f"--on ray: the Ray nodes cannot hold the job's bundles ({'; '.join(lacking)})")
    for placement in placements:
        group = placement_group(list(placement.bundles), strategy=placement.strategy,
                                name=f"hetero-{os.getpid()}-{placement.label}")
        _GROUPS.append(group)
        placement.group = group
    ready, _ = ray.wait([p.group.ready() for p in placements], num_returns=len(placements), timeout=timeout)
    if len(ready) < len(placements):
        raise UserError(f"--on ray: Ray could not reserve the islands' bundles within {timeout:.0f} s "
                        f"(other jobs hold the resources?)")
    return [with_node_ids(p, placement_group_table(p.group)["bundles_to_node_id"]) for p in placements]


def _place_auto(ray, placements, config, plan, driver_ip: str, run_dir: str, cluster_path: str | None,
                entry: list[str]):
    """Where Ray put the `host: auto` nodes, made the cluster's: (layout, placements, cluster path, entry)
    as if the cluster file had named those hosts. The workers read their cluster file, so they get
    one naming the hosts (<run_dir>/cluster-placed.yaml), through --cluster and HETERO_CLUSTER."""
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    landed = {p.shares[0].node.host: ips[p.shares[0].node_id] for p in placements if p.auto}
    clash = crowded(placements, landed)
    if clash:
        raise UserError(f"--on ray: Ray put two nodes of one island on one Ray node ({'; '.join(clash)}); an "
                        f"island lists a host once: name the hosts, or give one auto node all its chips")
    config = placed_cluster(config, landed)
    layout = build_layout(config, plan, node=driver_ip)
    source = cluster_path or _argument(entry, "--cluster")
    if source:
        placed = os.path.join(run_dir, PLACED_CLUSTER)
        _write_placed(source, placed, landed)
        entry = [placed if arg == source and entry[i - 1] == "--cluster" else arg for i, arg in enumerate(entry)]
        cluster_path = placed
    return layout, rebind(placements, layout, landed), cluster_path, entry


def _argument(entry: list[str], flag: str) -> str | None:
    """The value of `flag` in the entry command (`FLAG VALUE`), if it is there."""
    return next((entry[i + 1] for i, arg in enumerate(entry[:-1]) if arg == flag), None)


def _write_placed(source: str, path: str, landed: dict) -> None:
    import yaml

    with open(source, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    section = data["cluster"] if "cluster" in data else data
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("# written by hetero --on ray: the cluster file, host: auto replaced by the Ray nodes chosen\n")
        yaml.safe_dump(placed_yaml(section, landed), handle, sort_keys=False)


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


class _RayJob(FleetJob):
    placements: list[IslandPlacement] = []
    placed: FleetLayout | None = None   # the layout `placements` were reserved for
    driver_ip = ""
    placement_timeout = PLACEMENT_TIMEOUT_S

    def layout_for(self, plan) -> FleetLayout:
        return build_layout(self.layout.cluster, plan, node=self.driver_ip)

    def start_islands(self, attempt: int):
        if self.placed is not self.layout:   # re-planned (elastic): bundles where the new plan's workers go
            self.placements = _replace(self.placements, self.layout, self.placement_timeout)
            self.placed = self.layout
        if attempt:
            _refuse_lost(self.placements)
        work = {(island.name, node.node): (spec, env) for island, node, spec, env in self.agent_work(attempt)}
        return RayIslands.on_ray(self.placements, work, attempt, self.shutdown_timeout, self.stdout, self.run_dir)


def _replace(placements, layout: FleetLayout, timeout: float) -> list[IslandPlacement]:
    """The placement groups of `layout` (a re-planned job), reserved once those of `placements` are removed
    (their bundles on a lost node would never be granted). A refusal here ends the job (LaunchAbort)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for placement in placements:
        if placement.group in _GROUPS:
            _GROUPS.remove(placement.group)
        with contextlib.suppress(Exception):
            remove_placement_group(placement.group)
    try:
        return _reserve(ray, layout, timeout)
    except UserError as exc:
        raise LaunchAbort(f"cannot place the re-planned job on Ray: {exc}") from None


def _refuse_lost(placements) -> None:
    """A restart goes back onto the nodes the job was placed on; with one of them lost it cannot
    (its bundles would wait for the node for ever): LaunchAbort, at once, in one line."""
    lost = lost_nodes(placements)
    if lost:
        raise LaunchAbort(f"cannot restart on the same Ray nodes: {'; '.join(lost)} (re-planning on the "
                          f"surviving nodes needs the job's model and train files, and no --no-elastic)")


def lost_nodes(placements) -> list[str]:
    """'Ray node 127.0.0.3 (island slow) is lost' for each node of the job that is no live Ray node."""
    import ray

    ours = {share.node_id for placement in placements for share in placement.shares}
    alive = {n["NodeID"] for n in ray.nodes()
             if n["Alive"] and n["NodeID"] in ours and answers(n["NodeManagerAddress"], n["NodeManagerPort"])}
    lost: dict = {}
    for placement in placements:
        for share in placement.shares:
            if share.node_id is not None and share.node_id not in alive:
                lost.setdefault(share.ip, []).append(share.island.name)
    return [f"Ray node {ip} (island {', '.join(dict.fromkeys(names))}) is lost" for ip, names in lost.items()]


class RayIslands(LocalIslands):
    """LocalIslands whose agents run in AgentHost actors on the island's bundles."""

    holders: list = []
    placements: list = []

    @classmethod
    def on_ray(cls, placements, work: dict, attempt: int, shutdown_timeout: float, stdout=None,
               run_dir: str | None = None) -> "RayIslands":
        """LocalIslands.start's counterpart: each (island, node) share's agent in an AgentHost actor on its bundles."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from hetero.launch.ray_actors import AgentHost, AgentProc, ChipHolder

        agents, holders = [], []
        for placement in placements:
            for share in placement.shares:
                spec, env = work[(share.island.name, share.node.node)]
                for rank in share.node.global_ranks:
                    if run_dir:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(fatal_path(run_dir, rank))

                def on(bundle: int, group=placement.group):
                    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)

                options: dict[str, Any] = {"num_cpus": 1.0}
                if share.resource == "GPU":
                    options["num_gpus"] = 1.0
                elif share.resource:
                    options["resources"] = {share.resource: 1.0}
                host: Any = AgentHost.options(scheduling_strategy=on(share.first), **options).remote()
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
        islands.placements = placements
        return islands

    def first_failure(self) -> LocalStatus:
        """A lost Ray node first: its workers' peers fail too, but the node is why."""
        status = super().first_failure()
        with contextlib.suppress(Exception):   # Ray unreachable: the agents' own failure stands
            lost = lost_nodes(self.placements)
            if lost:
                return LocalStatus("failed", "; ".join(lost), priority=CRASHED)
        return status

    def stop(self) -> None:
        import ray

        super().stop()
        for agent in self.agents:
            kill = getattr(agent.proc, "kill", None)   # AgentProc: the actor goes (Popen's kill is never reached here)
            with contextlib.suppress(Exception):
                if kill is not None:
                    kill()
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
