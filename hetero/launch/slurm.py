"""`--on slurm`: one launcher per node of a Slurm allocation (salloc / sbatch), under srun.

Outside a job step (the batch script, an salloc shell) the command starts itself again
under `srun --ntasks-per-node=1` on every node of the allocation, with a fresh job token
in HETERO_JOB_TOKEN (srun passes the environment on). Inside the step, each task maps its
Slurm node to a host of the cluster file and runs hetero.launch.fleet.launch_fleet for
that host (`--node`), the torchrun way: the coordinator's host is the head.

Mapping (`by`): "name" (default) matches the node's name (SLURMD_NODENAME, else entry
SLURM_NODEID of the expanded SLURM_JOB_NODELIST) to a cluster host by full name, short
name or address; "order" takes the cluster file's hosts in their order of appearance,
node i of the allocation being host i (for files written with addresses Slurm does not
know). Not elastic: srun ends the whole job step when one node's task fails or its node is
lost (--kill-on-bad-exit), so a lost node cannot be re-planned around from inside the step; the
launchers run with --no-elastic, and --rejoin-timeout / the elastic default are said to be unused
(NOT_ELASTIC, one line). Not run under a real Slurm yet: tested against recorded Slurm environments and a
stand-in srun (tests/hetero/launch/test_slurm_launch.py).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys

from hetero.errors import UserError
from hetero.launch.targets import cluster_hosts

BY = ("name", "order")
NOT_ELASTIC = ("--on slurm is not elastic: srun ends the job step when a node is lost, so no re-plan on the "
               "survivors (--rejoin-timeout unused); --max-restarts restarts the job on the same nodes")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-03,7],cpu-a[1-2]-ib') as names, in order."""
    names = []
    for item in _top_level_split(text.strip()):
        names += _expand_item(item)
    return names


def _top_level_split(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str) -> list[str]:
    opening = item.find("[")
    if opening < 0:
        return [item]
    closing = item.find("]", opening)
    if closing < 0:
        raise UserError(f"SLURM_JOB_NODELIST: unbalanced '[' in {item!r}")
    head, body, tail = item[:opening], item[opening + 1:closing], item[closing + 1:]
    numbers = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise UserError(f"SLURM_JOB_NODELIST: cannot read the range {part!r} in {item!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        width = len(low) if low.startswith("0") else 0
        numbers += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return [f"{head}{n}{rest}" for n in numbers for rest in _expand_item(tail)]


def allocation(env: dict) -> tuple[list[str], int | None]:
    """(the allocation's node names, this task's node index or None outside a job step)."""
    if not env.get("SLURM_JOB_ID"):
        raise UserError("--on slurm runs inside a Slurm allocation (sbatch or salloc): SLURM_JOB_ID is not set")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("--on slurm: SLURM_JOB_NODELIST is not set")
    nodes = expand_nodelist(nodelist)
    in_step = env.get("SLURM_STEP_ID") not in (None, "") and env.get("SLURM_NODEID") not in (None, "")
    return nodes, int(env["SLURM_NODEID"]) if in_step else None


def map_hosts(cluster, nodes: list[str], by: str = "name") -> dict:
    """Slurm node name -> cluster host, for every host of the cluster file (each must be in the allocation)."""
    hosts = cluster_hosts(cluster)
    if by == "order":
        if len(nodes) < len(hosts):
            raise UserError(f"--on slurm: the allocation has {len(nodes)} node(s) ({', '.join(nodes)}) but cluster "
                            f"'{cluster.name}' names {len(hosts)} hosts; allocate --nodes={len(hosts)}")
        return dict(zip(nodes, hosts))
    mapping = {}
    for host in hosts:
        node = next((n for n in nodes if _same_host(n, host)), None)
        if node is None:
            raise UserError(f"--on slurm: host {host} of cluster '{cluster.name}' is not a node of this allocation "
                            f"({', '.join(nodes)}); name the hosts as Slurm does, or map them by order "
                            f"(--slurm-by order)")
        mapping[node] = host
    return mapping


def _same_host(node: str, host: str) -> bool:
    if node == host or node.split(".")[0] == host.split(".")[0]:
        return True
    try:
        return socket.gethostbyname(node) == socket.gethostbyname(host)
    except OSError:
        return False


def this_host(cluster, env: dict, by: str = "name") -> str | None:
    """The cluster host this task runs (None: this Slurm node runs none of the job)."""
    nodes, index = allocation(env)
    mapping = map_hosts(cluster, nodes, by)
    name = env.get("SLURMD_NODENAME") or (nodes[index] if index is not None else None)
    if name is None:
        raise UserError("--on slurm: neither SLURMD_NODENAME nor SLURM_NODEID says which node this is "
                        "(run it inside a job step: srun)")
    if name not in mapping and index is not None and index < len(nodes):
        name = nodes[index]
    return mapping.get(name)


def srun_command(argv: list[str], nodes: int, srun: str = "srun") -> list[str]:
    """The command that runs `hetero ARGV` once per node of the allocation."""
    return [srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "--export=ALL", sys.executable, "-m", "hetero", *argv]


def run_under_srun(argv: list[str], env: dict, stdout=None, stderr=None) -> int:
    """Outside a job step: start `hetero ARGV` on every node of the allocation, sharing a fresh job token."""
    nodes, _ = allocation(env)
    srun = env.get("HETERO_SRUN") or shutil.which("srun", path=env.get("PATH"))
    if not srun:
        raise UserError("--on slurm: srun is not on PATH (run inside sbatch or salloc on a Slurm cluster)")
    child_env = dict(env)
    child_env.setdefault("HETERO_JOB_TOKEN", secrets.token_hex(16))
    return subprocess.run(srun_command(argv, len(nodes), srun), env=child_env, stdout=stdout, stderr=stderr).returncode


def slurm_launcher(by: str = "name"):
    """launch_fleet's signature, for the node this Slurm task runs on (inside a job step)."""
    def launch(cluster, plan_path, entrypoint, args=(), node=None, **options):
        from hetero.launch.fleet import launch_fleet
        from hetero.launch.inputs import load_cluster
        from hetero.launch.layout import refuse_auto

        if node is not None:
            raise UserError("--node and --on slurm exclude each other: Slurm tells each launcher its node")
        env = dict(os.environ if options.get("env") is None else options["env"])
        config, _ = load_cluster(cluster)
        refuse_auto(config, "--on slurm")
        host = this_host(config, env, by)
        if options.get("elastic", True) and (options.get("replan") is not None or options.get("rejoin_timeout")) \
                and host == config.coordinator.host:
            print(f"hetero launch: {NOT_ELASTIC}", file=sys.stderr, flush=True)
        options = {**options, "elastic": False}
        if host is None:
            print(f"hetero launch: Slurm node {env.get('SLURMD_NODENAME', '?')} runs no host of cluster "
                  f"'{config.name}'; nothing to do here", file=sys.stderr, flush=True)
            return 0
        return launch_fleet(cluster, plan_path, entrypoint, args, node=host, **options)

    return launch


def slurm_run_launcher(by: str = "name"):
    """launch_fleet's signature for `hetero run --on slurm`, called in the batch script (or an salloc
    shell): every node's `hetero launch --on slurm` under srun, writing into the (shared) run directory."""
    def launch(cluster, plan_path, entrypoint, args=(), node=None, max_restarts=0, run_dir=None, stdout=None,
               stderr=None, hang_timeout=None, elastic=True, **_):
        from hetero.launch.inputs import load_cluster

        env = dict(os.environ)
        nodes, index = allocation(env)
        if index is not None:
            raise UserError("hetero run --on slurm starts the job step itself: run it in the batch script or "
                            "salloc shell, not under srun")
        config, path = load_cluster(cluster)
        path = path or os.path.join(run_dir, "cluster.yaml")   # hetero run keeps a copy in its run directory
        map_hosts(config, nodes, by)   # every host in the allocation, before anything starts
        if elastic:
            print(f"hetero run: {NOT_ELASTIC}", file=sys.stderr, flush=True)
        argv = ["launch", "--on", "slurm", "--slurm-by", by, "--cluster", path, "--max-restarts", str(max_restarts),
                "--run-dir", run_dir, *(["--plan", plan_path] if plan_path else []),
                *(["--hang-timeout", repr(hang_timeout)] if hang_timeout else []), *entrypoint.split(), *args]
        return run_under_srun(argv, env, stdout, stderr)

    return launch
