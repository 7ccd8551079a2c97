"""Where a job's workers start: this machine (the default), a Ray cluster, or a Slurm allocation.

`--on TARGET` names it: `ray`, `ray=ADDRESS` (as ray.init takes it) or `slurm`.
Without `--on`, `hetero run` starts every island on this machine, and so refuses a
cluster file whose hosts are not this machine's addresses (loopback aliases 127.x are
this machine): those need a cluster engine, or one `hetero launch --node HOST` per host.
A node with `host: auto` needs `--on ray` (Ray picks its host); elsewhere it is refused.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import dataclass
from functools import lru_cache

from hetero.config.cluster import AUTO_PREFIX
from hetero.errors import UserError
from hetero.launch.layout import refuse_auto

ENGINES = ("ray", "slurm")
SHOWN_HOSTS = 5   # a refusal names at most this many hosts


@dataclass(frozen=True)
class Target:
    engine: str                  # ray | slurm
    address: str | None = None   # ray: what ray.init connects to (None: RAY_ADDRESS or a local cluster)

    def __str__(self) -> str:
        return self.engine + (f"={self.address}" if self.address else "")


def parse_target(text: str) -> Target:
    """argparse type of --on: `ray`, `ray=ADDRESS` or `slurm`."""
    engine, _, address = text.partition("=")
    engine = engine.strip().lower()
    if engine not in ENGINES:
        raise argparse.ArgumentTypeError(f"expected ray, ray=ADDRESS or slurm, got {text!r}")
    if engine == "slurm" and address:
        raise argparse.ArgumentTypeError(f"slurm takes no address (the allocation names the nodes), got {text!r}")
    if "=" in text and not address.strip():
        raise argparse.ArgumentTypeError(f"ray=ADDRESS needs an address (host:port or ray://host:port), got {text!r}")
    return Target(engine, address.strip() or None)


parse_target.__name__ = "launch target"   # argparse names the type by it in its messages


def cluster_hosts(cluster) -> list[str]:
    """Every host the cluster file names (coordinator first, then nodes), each once."""
    hosts = [cluster.coordinator.host] + [node.host for island in cluster.islands for node in island.nodes]
    return list(dict.fromkeys(hosts))


def foreign_hosts(cluster) -> list[str]:
    """The cluster file's hosts that are not this machine (`host: auto` nodes aside: refuse_auto's)."""
    return [host for host in cluster_hosts(cluster) if not (host.startswith(AUTO_PREFIX) or is_this_machine(host))]


def refuse_foreign_hosts(cluster, command: str = "hetero run") -> None:
    """A UserError naming the hosts of `cluster` that are not this machine, if there are any."""
    foreign = foreign_hosts(cluster)
    if not foreign:
        return
    shown = ", ".join(foreign[:SHOWN_HOSTS]) + (f" and {len(foreign) - SHOWN_HOSTS} more"
                                               if len(foreign) > SHOWN_HOSTS else "")
    raise UserError(f"cluster '{cluster.name}' names hosts that are not this machine ({shown}); {command} "
                    f"starts every island here, so launch it with --on ray|slurm, or run "
                    f"`hetero launch --node HOST` on each host")


@lru_cache(maxsize=256)
def is_this_machine(host: str) -> bool:
    """True when `host` is a loopback address or name, or resolves to an address of this machine
    (one a socket can bind to here)."""
    if host == "localhost" or host in _own_names():
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return False   # unresolvable here: not an address of this machine
    return any(_is_own_address(info[0], str(info[4][0])) for info in infos)


def _own_names() -> set[str]:
    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    return names


def _is_own_address(family: int, address: str) -> bool:
    try:
        if ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return True
    except ValueError:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))   # only an address of one of this machine's interfaces binds
        return True
    except OSError:
        return False


def launcher_for(target: Target | None, cluster):
    """The launch function (launch_fleet's signature) for `target`; None: this machine, after
    refusing a cluster that names other hosts. Raises UserError when the target's engine is missing."""
    if target is None:
        from hetero.launch.fleet import launch_fleet

        refuse_auto(cluster, "hetero run without --on")
        refuse_foreign_hosts(cluster)
        return launch_fleet
    if target.engine == "ray":
        from hetero.launch.ray_fleet import ray_launcher

        return ray_launcher(target.address)
    from hetero.launch.slurm import slurm_run_launcher

    refuse_auto(cluster, "--on slurm")
    return slurm_run_launcher()
