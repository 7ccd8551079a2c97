"""Leaving the job: a finished worker is not a failure; any other leave is."""

import time

import pytest

from comm_bridge.client import CoordinatorClient
from comm_bridge.coordinator import Coordinator

pytestmark = pytest.mark.timeout(60)
TOKEN = "leave-token"


def test_finished_leave_is_not_a_failure_but_plain_leave_is():
    server = Coordinator(TOKEN, world_size=3, heartbeat_timeout=1.0)
    server.start()
    try:
        workers = [CoordinatorClient(server.address, TOKEN, rank, timeout=10) for rank in range(3)]
        for worker in workers:
            worker.register(island="a", endpoints=[], host_id="h")
        workers[1].start_heartbeats(0.2)
        workers[2].start_heartbeats(0.2)
        workers[0].leave(finished=True)
        time.sleep(2.5)          # well past the heartbeat timeout: a finished rank is not missed
        assert 0 in server.finished and 0 not in server.failed
        workers[2].leave()
        assert server.failed.get(2) == "left the job"
        for worker in workers:
            worker.close()
    finally:
        server.stop()
