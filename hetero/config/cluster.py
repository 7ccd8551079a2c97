"""The cluster section: islands of identical chips, their nodes, and the network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import accelerators
from hetero.config.catalog import ChipSpec, load_catalog, read_chip
from hetero.config.fields import Invalid, Section, boolean, choice, host, integer, name, number, port

MAX_CHIPS_PER_NODE = 64
MAX_CHIPS = 1 << 17
TRANSPORTS = ("zmq", "shm", "auto")
GRAD_WIRE_DTYPES = ("fp32", "bf16")   # the hetero-DP gradient sum on the bridge; fp32 accumulation either way
AUTO = "auto"            # `host: auto`: the cluster engine (Ray) picks the node's host at launch
AUTO_PREFIX = "auto:"    # an auto node's host reads auto:<island>:<node index>, no real host's form


@dataclass(frozen=True)
class Node:
    host: str    # as written; an auto node's is AUTO_PREFIX + island + ":" + its index in the island
    chips: int

    @property
    def auto(self) -> bool:
        """True for `host: auto`: a distinct node whose host only `--on ray` learns (from Ray's placement)."""
        return self.host.startswith(AUTO_PREFIX)


@dataclass(frozen=True)
class Island:
    name: str
    accelerator: str
    chip: str
    backend: str
    nodes: tuple[Node, ...]

    @property
    def size(self) -> int:
        return sum(node.chips for node in self.nodes)


@dataclass(frozen=True)
class BridgeConfig:
    transport: str = "auto"
    gbps: float = 1.0          # GB/s
    latency_us: float = 50.0
    grad_dtype: str = "fp32"   # hetero-DP gradient sum on the wire: fp32, or bf16 (accumulated in fp32)


@dataclass(frozen=True)
class NetworkConfig:
    intra_node_gbps: float | None = None   # GB/s; None: each chip's catalog figure
    inter_node_gbps: float = 12.5          # GB/s (100 Gb Ethernet)
    intra_node_latency_us: float = 5.0     # per hop of a collective between chips of one node
    inter_node_latency_us: float = 10.0    # per hop between nodes
    bridge: BridgeConfig = BridgeConfig()


@dataclass(frozen=True)
class Coordinator:
    host: str
    port: int
    bind_all: bool = False    # listen on every interface (only when asked)


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    coordinator: Coordinator
    islands: tuple[Island, ...]
    network: NetworkConfig = NetworkConfig()
    custom_chips: Mapping[str, ChipSpec] = field(default_factory=dict)

    def chip(self, chip_name: str) -> ChipSpec:
        return self.custom_chips.get(chip_name) or load_catalog()[chip_name]

    @property
    def total_chips(self) -> int:
        return sum(island.size for island in self.islands)

    def island(self, island_name: str) -> Island:
        return next(i for i in self.islands if i.name == island_name)


def read_cluster(section: Section) -> ClusterConfig:
    cluster_name = section.get("name", name)
    custom_chips = _read_custom_chips(section)
    coordinator = _read_coordinator(section.section("coordinator"))
    islands = tuple(_read_island(item, custom_chips) for item in section.items("islands", max_items=1024))
    network = _read_network(section.section("network", None))
    section.finish()

    seen: dict = {}
    for index, island in enumerate(islands):
        if island.name in seen:
            section.fail(f"islands[{index}].name", f"duplicate island name '{island.name}' (also islands[{seen[island.name]}])")
        seen[island.name] = index
    cluster = ClusterConfig(cluster_name, coordinator, islands, network, custom_chips)
    if cluster.total_chips > MAX_CHIPS:
        section.fail("islands", f"{cluster.total_chips} chips in all; hetero plans at most {MAX_CHIPS}")
    return cluster


def _read_coordinator(section: Section) -> Coordinator:
    coordinator = Coordinator(
        host=section.get("host", host),
        port=section.get("port", port),
        bind_all=section.get("bind_all", boolean, False),
    )
    section.finish()
    return coordinator


def _read_island(section: Section, custom_chips: Mapping[str, ChipSpec]) -> Island:
    island_name = section.get("name", name)
    accelerator = section.get("accelerator", choice(*accelerators.names()))
    chip = section.get("chip", name)
    backends = accelerators.backends(accelerator)
    backend = section.get("backend", choice(*backends), backends[0])
    nodes = tuple(_read_node(item, island_name, index)
                  for index, item in enumerate(section.items("nodes", max_items=1 << 14)))
    section.finish()

    spec = custom_chips.get(chip) or load_catalog().get(chip)
    if spec is None:
        known = ", ".join(sorted({*load_catalog(), *custom_chips}))
        section.fail("chip", f"unknown chip '{chip}'; known chips: {known} (or describe it under chips:)")
    if spec.accelerator != accelerator:
        section.fail("chip", f"chip '{chip}' is driven by the '{spec.accelerator}' accelerator, "
                             f"but the island says accelerator: {accelerator}")
    hosts: dict = {}
    for index, node in enumerate(nodes):
        if node.host in hosts:
            section.fail(f"nodes[{index}].host", f"host {node.host} appears twice in this island "
                                                 f"(also nodes[{hosts[node.host]}]); list its chips once")
        hosts[node.host] = index
    return Island(island_name, accelerator, chip, backend, nodes)


def _read_node(section: Section, island_name: str, index: int) -> Node:
    """One node; `host: auto` names a node of its own (auto:<island>:<index>) that Ray places."""
    written = section.get("host", _node_host)
    where = f"{AUTO_PREFIX}{island_name}:{index}" if written == AUTO else written
    node = Node(host=where, chips=section.get("chips", integer(1, MAX_CHIPS_PER_NODE)))
    section.finish()
    return node


def _node_host(value) -> str:
    return AUTO if value == AUTO else host(value)


def _read_network(section: Section | None) -> NetworkConfig:
    if section is None:
        return NetworkConfig()
    defaults = NetworkConfig()
    inter = section.get("inter_node_gbps", number(0.0, 1e5), defaults.inter_node_gbps)
    network = NetworkConfig(
        intra_node_gbps=section.get("intra_node_gbps", number(0.0, 1e6), None),
        inter_node_gbps=inter,
        intra_node_latency_us=section.get("intra_node_latency_us", number(0.0, 1e7, low_inclusive=True),
                                          defaults.intra_node_latency_us),
        inter_node_latency_us=section.get("inter_node_latency_us", number(0.0, 1e7, low_inclusive=True),
                                          defaults.inter_node_latency_us),
        bridge=_read_bridge(section.section("bridge", None), inter),
    )
    section.finish()
    return network


def _read_bridge(section: Section | None, inter_node_gbps: float) -> BridgeConfig:
    if section is None:
        return BridgeConfig(gbps=inter_node_gbps)
    bridge = BridgeConfig(
        transport=section.get("transport", choice(*TRANSPORTS), "auto"),
        gbps=section.get("gbps", number(0.0, 1e5), inter_node_gbps),
        latency_us=section.get("latency_us", number(0.0, 1e7, low_inclusive=True), 50.0),
        grad_dtype=section.get("grad_dtype", choice(*GRAD_WIRE_DTYPES), "fp32"),
    )
    section.finish()
    return bridge


def _read_custom_chips(section: Section) -> dict:
    chips = section.section("chips", None)
    if chips is None:
        return {}
    custom = {}
    for chip_name in chips.data:
        chips.used.add(chip_name)
        try:
            valid_name = name(chip_name)
        except Invalid:
            chips.fail("", f"chip name {chip_name!r} must be letters, digits, '_', '.' or '-'")
        if valid_name in load_catalog():
            chips.fail(chip_name, f"'{chip_name}' is already in the catalog; give your chip another name")
        spec = read_chip(Section(chips.doc, chips.field_path(chip_name), chips.data[chip_name]),
                         valid_name, require_sources=False)
        if spec.accelerator not in accelerators.names():
            chips.fail(f"{chip_name}.accelerator",
                       f"unknown accelerator '{spec.accelerator}'; known: {', '.join(accelerators.names())}")
        custom[valid_name] = spec
    return custom
