"""Where a job's workers go on a Ray cluster: one placement group per island, one bundle per chip.

Pure data (no Ray calls), so it is tested without a cluster. A bundle asks for the
island's accelerator as Ray names it (the accelerator class's `ray_resource`: GPU for
cuda, NPU for ascend, a custom resource for kunlun) plus WORKER_CPUS CPUs, or only CPUs
for a cpu or emulated island (its chips are the host's cores); and for its node's Ray
node resource `node:<ip>` (a sliver of it), which pins the bundle to the host the
cluster file names, the way vLLM pins its driver's bundle. Bundles follow the layout:
island by island, node by node, chip by chip, so the bundles of one node are
consecutive and a node's workers (a TP group) never leave it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetero.launch.layout import FleetLayout, IslandLayout, NodeWorkers

WORKER_CPUS = 1.0     # CPUs a worker reserves beside its chip
NODE_SLIVER = 0.001   # of `node:<ip>`: enough to pin a bundle, never to exhaust the node


@dataclass(frozen=True)
class NodeShare:
    """One island's workers on one node: bundles first .. first + nproc - 1 of the island's group."""

    island: IslandLayout
    node: NodeWorkers
    ip: str            # the node's address as Ray knows it
    first: int         # index of its first bundle in the island's placement group
    resource: str | None   # the accelerator's Ray resource (None: CPUs only)

    @property
    def bundles(self) -> range:
        return range(self.first, self.first + self.node.nproc)


@dataclass
class IslandPlacement:
    island: IslandLayout
    bundles: tuple[dict, ...]
    shares: tuple[NodeShare, ...]
    group: object = None   # its Ray placement group, once reserved


def ray_resource(accelerator: str) -> str | None:
    from accelerators.registry import accelerator_class

    return getattr(accelerator_class(accelerator), "ray_resource", None)


def chip_bundle(resource: str | None, ip: str) -> dict:
    """One chip's bundle: its accelerator (or one CPU for a CPU chip), a worker's CPU, its node."""
    bundle = {"CPU": WORKER_CPUS, f"node:{ip}": NODE_SLIVER}
    if resource:
        bundle[resource] = 1.0
    return bundle


def plan_placement(layout: FleetLayout, ips: dict) -> list[IslandPlacement]:
    """The placement group of every island of `layout`; `ips` maps each cluster host to its Ray node IP."""
    placements = []
    for island in layout.islands:
        resource = ray_resource(island.accelerator)
        bundles, shares = [], []
        for node in island.nodes:
            shares.append(NodeShare(island, node, ips[node.host], len(bundles), resource))
            bundles += [chip_bundle(resource, ips[node.host]) for _ in range(node.nproc)]
        placements.append(IslandPlacement(island, tuple(bundles), tuple(shares)))
    return placements


def missing_hosts(hosts, ray_nodes: dict) -> list[str]:
    """The hosts (resolved to IPs in `hosts`: host -> ip) that are no live node of the Ray cluster
    (`ray_nodes`: ip -> resources)."""
    return [f"{host} ({ip})" if ip != host else host for host, ip in hosts.items() if ip not in ray_nodes]


def short_of(placements: list[IslandPlacement], ray_nodes: dict) -> list[str]:
    """What the cluster's nodes lack for the bundles pinned to them: 'ip: needs 4 GPU, has 2'."""
    need: dict = {}
    for placement in placements:
        for bundle in placement.bundles:
            ip = next(k[len("node:"):] for k in bundle if k.startswith("node:"))
            for name, amount in bundle.items():
                if not name.startswith("node:"):
                    need[(ip, name)] = need.get((ip, name), 0.0) + amount
    return [f"{ip}: needs {amount:g} {name}, has {ray_nodes.get(ip, {}).get(name, 0.0):g}"
            for (ip, name), amount in need.items() if ray_nodes.get(ip, {}).get(name, 0.0) < amount]
