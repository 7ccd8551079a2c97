"""What `hetero check` measures for a cluster, and what each item should reach.

Items: every chip (a short matmul), a link inside each node (chip pair), a link
between the nodes of each island (node pair), and a bridge link for each pair of
islands. Expectations come from the catalog and the cluster file's network
figures, the same numbers the planner uses.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from dataclasses import dataclass, field

from hetero.planning import chip_model

LOCAL_NAMES = {"localhost", "::1"}
# RFC 5737 documentation networks: example clusters use them; never contact them.
DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
# A cpu "chip" is a process sharing the host; the catalog's cpu entry is an estimate for the whole host.
CPU_EFFICIENCY = 1.0
PROBE_DTYPE = {"cpu": "fp32", "emulated": "fp32"}     # vendor chips: bf16, what they train in


@dataclass
class Item:
    kind: str                     # chip | intra-node | inter-node | bridge
    name: str                     # e.g. "fast/127.0.0.1/chip1", "fast~slow"
    hosts: tuple                  # the host(s) it runs on
    expected: dict                # flops_per_s, or bandwidth (B/s) and latency_s
    spec: dict = field(default_factory=dict)   # what the probe needs
    local: bool = True


def is_documentation(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in DOCUMENTATION_NETS)


def is_local(host: str, this_node: str | None = None) -> bool:
    """Loopback, this machine's name, or the host --node says this machine is. No DNS lookups."""
    if host == this_node or host in LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(cluster, this_node: str | None = None) -> list[Item]:
    net = cluster.network
    items = []
    for island in cluster.islands:
        spec = cluster.chip(island.chip)
        dtype = PROBE_DTYPE.get(island.accelerator, "bf16")
        model = chip_model(spec, net.intra_node_gbps)
        local_cpu = sum(n.chips for n in island.nodes if is_local(n.host, this_node))
        if island.accelerator == "cpu":
            expected = spec.peak_flops(dtype) * CPU_EFFICIENCY / max(1, local_cpu)
        else:
            expected = spec.peak_flops(dtype) * model.mm_eff
        base = 0
        for node in island.nodes:
            local = is_local(node.host, this_node)
            for index in range(node.chips):
                items.append(Item("chip", f"{island.name}/{node.host}/chip{index}", (node.host,),
                                  {"flops_per_s": expected},
                                  {"accelerator": island.accelerator, "chip": spec.to_dict(), "device_index": index,
                                   "local_rank": base + index, "dtype": dtype, "island": island.name,
                                   "peak_flops": spec.peak_flops(dtype)}, local))
            if node.chips > 1:
                items.append(Item("intra-node", f"{island.name}/{node.host}", (node.host,),
                                  {"bandwidth": model.intra_node_bandwidth,
                                   "latency_s": getattr(net, "intra_node_latency_us", 5.0) * 1e-6},
                                  {"accelerator": island.accelerator, "backend": island.backend,
                                   "chip": spec.to_dict(), "island": island.name, "chips": node.chips}, local))
            base += node.chips
        for a, b in zip(island.nodes, island.nodes[1:]):
            items.append(Item("inter-node", f"{island.name}/{a.host}~{b.host}", (a.host, b.host),
                              {"bandwidth": net.inter_node_gbps * 1e9,
                               "latency_s": getattr(net, "inter_node_latency_us", 10.0) * 1e-6},
                              {"accelerator": island.accelerator, "backend": island.backend,
                               "chip": spec.to_dict(), "island": island.name},
                              is_local(a.host, this_node) and is_local(b.host, this_node)))
    for x, y in itertools.combinations(cluster.islands, 2):
        hx, hy = x.nodes[0].host, y.nodes[0].host
        items.append(Item("bridge", f"{x.name}~{y.name}", (hx, hy),
                          {"bandwidth": net.bridge.gbps * 1e9, "latency_s": net.bridge.latency_us * 1e-6},
                          {"transport": net.bridge.transport, "islands": (x.name, y.name),
                           "node_pairs": min(len(x.nodes), len(y.nodes))},
                          is_local(hx, this_node) and is_local(hy, this_node)))
    return items
