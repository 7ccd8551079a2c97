"""A fleet of "nodes" on this machine's loopback addresses (127.0.0.1, 127.0.0.2, ...), one emulated
island of one chip per node: what `hetero bench recovery` and the multi-node launch tests run, since
it lets one machine play several hosts (a launcher per host, `--node 127.0.0.K`) without a network.

The chip is fast and roomy on purpose (1000 TFLOPS, no memory or link limit worth the name): the
runs measure the launcher (detection, re-plan, restart), not the emulated hardware.
"""

from __future__ import annotations

import random
import socket

import yaml

from hetero.errors import UserError

CHIP = "fleet-chip"
CHIP_SPEC = {"accelerator": "emulated", "emulated": True, "tflops": {"fp32": 1000}, "memory_gb": 1,
             "memory_bandwidth_gbps": 100000, "intra_node_gbps": 1000, "host_link_gbps": 100000}


def hosts(count: int) -> tuple[str, ...]:
    """The first `count` loopback "hosts": 127.0.0.1, 127.0.0.2, ..."""
    return tuple(f"127.0.0.{k}" for k in range(1, count + 1))


def loopback_cluster(name: str, count: int, port: int) -> dict:
    """The cluster section (as its YAML reads) of `count` loopback nodes, islands a, b, c, ... one per node,
    coordinator on the first at `port` (the islands take port + 1 .. port + count: hetero.launch.layout)."""
    return {"name": name, "coordinator": {"host": "127.0.0.1", "port": port}, "chips": {CHIP: dict(CHIP_SPEC)},
            "islands": [{"name": chr(ord("a") + index), "accelerator": "emulated", "chip": CHIP,
                         "nodes": [{"host": host, "chips": 1}]} for index, host in enumerate(hosts(count))]}


def loopback_cluster_yaml(name: str, count: int, port: int) -> str:
    """loopback_cluster as the text of a cluster file."""
    return yaml.safe_dump(loopback_cluster(name, count, port), sort_keys=False)


def free_port_block(count: int) -> int:
    """A port p with p .. p+count-1 all free on every interface (a loopback fleet's coordinator, then its
    islands' rendezvous ports); a UserError when 200 tries find none."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("", port))
        except OSError:
            continue
        return base
    raise UserError(f"no block of {count} free ports on this machine")
