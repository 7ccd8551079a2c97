"""`--on ray`, elastic: Ray, not member launchers, says which hosts of the job are there.

The loopback and host-by-host launcher (hetero.launch.fleet) learns that a node is lost or back
from that node's launcher: it stops reporting, or joins again. With Ray there is one launcher
(the driver), so the same decisions read Ray's node table instead: a host is there while a live
Ray node has its address and that node's raylet accepts a connection (Ray's own verdict on a
killed node takes its health checks, seconds to minutes; a closed port does not). Everything
else is the loopback path's, unchanged: hetero.launch.fleet's regroup re-plans on the hosts that
remain with hetero.launch.elastic's planner, says the old and new plan and records `replan`;
HeadControl takes a host that came back at the next checkpoint (`rejoin`), and the next attempt
re-plans up. hetero.launch.ray_fleet then reserves placement groups for the new layout.
"""

from __future__ import annotations

import time

from hetero.launch.control import HeadControl

GATHER_POLL_S = 0.5   # how often the driver looks at Ray's node table while it waits for lost hosts


def live_hosts(ips: dict) -> set:
    """The hosts of `ips` (host -> its Ray node address) that a live, answering Ray node has."""
    import ray

    from hetero.launch.ray_fleet import answers

    wanted = set(ips.values())
    alive = {n["NodeManagerAddress"] for n in ray.nodes()
             if n["Alive"] and n["NodeManagerAddress"] in wanted and answers(n["NodeManagerAddress"],
                                                                                  n["NodeManagerPort"])}
    return {host for host, ip in ips.items() if ip in alive}


class RayHeadControl(HeadControl):
    """HeadControl for the Ray driver: hosts are there when Ray has them (there are no member launchers
    to call in or to hear from). `ips`: every host of the job -> its Ray node address."""

    def __init__(self, *args, ips: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.ips = dict(ips)

    def gather(self, attempt: int, wanted, timeout: float) -> set:
        """The hosts of `wanted` on a live Ray node, waiting up to `timeout` seconds for the others."""
        self.attempt = attempt
        wanted = set(wanted)
        deadline = time.monotonic() + timeout
        while True:
            present = live_hosts({host: self.ips[host] for host in wanted})
            if present >= wanted or time.monotonic() > deadline:
                return present
            time.sleep(GATHER_POLL_S)

    def runs_without(self, lost: set, hosts) -> None:
        """No member launchers to hear from: only watch the lost hosts for their Ray node's return."""
        self.standby = set(lost)

    def came_back(self, host_name: str) -> bool:
        return bool(live_hosts({host_name: self.ips[host_name]}))
