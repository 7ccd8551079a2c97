"""`--on ray`, elastic, without a Ray cluster: the driver's control asks Ray (here a stand-in for its node
table) which hosts are there, waits up to the rejoin timeout for lost ones, hears from no member launchers,
and takes a host whose Ray node came back at the next checkpoint. The real run (a Ray node killed, the job
re-planned on the survivors, the node taken back) is tests/hetero/launch/test_ray_launch.py's."""

from __future__ import annotations

import os

import pytest

import hetero.launch.ray_elastic as ray_elastic
from hetero.config import load_job
from hetero.launch.layout import build_layout
from hetero.launch.ray_elastic import RayHeadControl
from tests.conftest import FIXTURES

HEAD, SECOND = "127.0.0.2", "127.0.0.3"


@pytest.fixture
def live(monkeypatch):
    """The hosts Ray has on a live node (a set the test changes)."""
    hosts = {HEAD}
    monkeypatch.setattr(ray_elastic, "live_hosts", lambda ips: {h for h in ips if h in hosts})
    return hosts


def control() -> RayHeadControl:
    cluster = load_job(cluster=os.path.join(FIXTURES, "launch", "ray-two-node.yaml")).cluster
    layout = build_layout(cluster, None, node=HEAD)
    return RayHeadControl(layout, "token", [], 1, 5.0, ack_timeout=1.0, join_timeout=1.0, lost_timeout=1.0,
                          ips={HEAD: HEAD, SECOND: SECOND})


def test_gathering_waits_for_a_lost_host_then_goes_on_without_it(live):
    ray_control = control()
    assert ray_control.gather(1, [HEAD, SECOND], timeout=0.3) == {HEAD}
    ray_control.runs_without({SECOND}, [HEAD, SECOND])
    assert ray_control.members == [] and ray_control.standby == {SECOND}   # no launcher of its own to hear from
    live.add(SECOND)
    assert ray_control.gather(2, [HEAD, SECOND], timeout=60.0) == {HEAD, SECOND}   # at once, once it is there


def test_a_host_back_on_ray_is_taken_back_at_the_next_checkpoint(live):
    ray_control = control()
    ray_control.runs_without({SECOND}, [HEAD, SECOND])
    step = [2]
    ray_control.checkpoint_step = lambda: step[0]
    assert ray_control._take_back() is None
    live.add(SECOND)
    ray_control._back_read_at = 0.0
    assert ray_control._take_back() is None            # back after the checkpoint of step 2: wait for the next
    step[0] = 4
    ray_control._back_read_at = 0.0
    verdict = ray_control._take_back()
    assert verdict is not None and verdict.regrow and verdict.restart and "127.0.0.3 back" in verdict.reason
