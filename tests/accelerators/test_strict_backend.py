"""The `hetero-strict` backend: NCCL/HCCL's contract over gloo, two ranks on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tests.conftest import ROOT, WORKERS, free_port

WORKER = os.path.join(WORKERS, "strict_pair.py")
STRICT = "hetero-strict"
pytestmark = pytest.mark.timeout(150)
# Far longer than the crossing takes to be seen: a report naming the crossing
# ("neither can match the other") proves it was recognised, not waited out.
DEADLOCK_TIMEOUT_S = "60"


def run_pair(scenario: str, backend: str = STRICT, deadlock_timeout: str = DEADLOCK_TIMEOUT_S) -> list[dict]:
    """Both ranks' JSON results; each process is bounded by a timeout (the host is a shared 2-core box)."""
    port = free_port()
    env = dict(os.environ, HETERO_STRICT_TIMEOUT=deadlock_timeout, PYTHONPATH=ROOT,
               GLOO_SOCKET_IFNAME="lo")  # gloo's pairs on loopback only
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(rank), str(port), backend],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for rank in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=50)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def contract() -> list[dict]:
    return run_pair("contract")


def test_host_tensors_are_refused_with_a_clear_error(contract):
    for seen in contract:
        for op in ("all_reduce", "send"):
            message = seen["host_refused"][op]
            assert message != "accepted"
            assert message.startswith(f"hetero-strict: {op} was given a host tensor (float32[4] on cpu)")
            assert "device memory" in message


def test_a_send_completes_only_after_its_receive_is_posted(contract):
    assert contract[0]["receive_posted_before_send_finished"] is True


def test_p2p_matches_in_issue_order_whatever_the_tags(contract):
    assert contract[1]["ordered"] == [10.0, 11.0]  # sent with tags 9, 8; received asking 5, 0


def test_batch_isend_irecv_exchanges_both_ways(contract):
    assert contract[0]["batched"] == [1.0, 1.0]
    assert contract[1]["batched"] == [0.0, 0.0]
    assert contract[0]["exchanged"] == [[100.0 + step] for step in range(10)]
    assert contract[1]["exchanged"] == [[float(step)] for step in range(10)]


def test_collectives_equal_gloo(contract):
    gloo = run_pair("collectives", backend="gloo")
    assert [seen["collectives"] for seen in contract] == gloo
    expected = [torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + r)) for r in range(2)]
    reduced = torch.tensor(gloo[0]["all_reduce"], dtype=torch.float64)
    assert torch.allclose(reduced, expected[0] + expected[1])
    assert contract[0]["collectives"]["subgroup_all_reduce"] == [3.0, 3.0]


def test_a_blocking_collective_is_charged_to_the_device_clock_an_async_one_is_not():
    """NCCL runs a collective on the compute stream: a blocking one (TP's all-reduce) adds its time,
    the peer's lateness included; the DP reduction's async_op=True runs beside compute."""
    seen = run_pair("stream_time")
    for result in seen:
        assert [op for op, _ in result["charges"]] == ["all_reduce", "all_gather", "broadcast",
                                                       "all_gather_into_tensor", "reduce_scatter_tensor"]
        assert result["issued_after_call"] and result["value"] == [4.0] * 4   # summed twice
        # gloo's own host copies (made as each work completes) are not device work: no mode sees them
        assert result["device_ops_of_the_collectives"] == []
    waited = seen[0]["charges"][0][1]
    assert waited >= 0.25   # rank 0 waited for rank 1, 0.3 s late: its chip could not run on meanwhile
    assert seen[1]["charges"][0][1] < waited


@pytest.mark.parametrize("scenario", ["crossing_sends", "crossing_isend_recv"])
def test_a_schedule_that_deadlocks_under_nccl_is_reported_naming_both_ranks(scenario):
    for rank, seen in enumerate(run_pair(scenario)):
        error = seen["error"]
        assert error is not None and f"deadlock between rank {rank} and rank {1 - rank}" in error
        assert "neither can match the other" in error  # recognised, not waited out
        assert f"rank {rank} is running [send #0 to rank {1 - rank}" in error
        assert f"rank {1 - rank} is running [send #0 to rank {rank}" in error
        assert "batch_isend_irecv" in error
        if scenario == "crossing_isend_recv":  # the receive each rank queued behind its send is named
            assert f"with [recv #0 from rank {1 - rank} (tag 0, float32[262144] on cpu)] queued behind" in error


def test_a_receive_nobody_sends_to_is_reported_after_the_timeout():
    error = run_pair("silent_peer", deadlock_timeout="2")[0]["error"]
    assert error is not None and "deadlock between rank 0 and rank 1 (no progress in 2 s (HETERO_STRICT_TIMEOUT))" in error
    assert "rank 0 is running [recv #0 from rank 1 (tag 0, float32[4] on cpu)]" in error
    assert "rank 1 is running [nothing toward it]" in error


def test_importing_accelerators_after_torch_registers_the_backend():
    code = ("import torch.distributed as dist, accelerators; "
            "print('HETERO-STRICT' in dist.Backend._plugins, dist.Backend.default_device_backend_map['cpu'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.split() == ["True", "gloo"], out.stderr[-2000:]  # registered, not made the default


def test_bad_timeout_is_one_clear_line(monkeypatch):
    from accelerators import strict_backend

    monkeypatch.setenv("HETERO_STRICT_TIMEOUT", "soon")
    with pytest.raises(strict_backend.StrictBackendError, match="HETERO_STRICT_TIMEOUT must be a positive"):
        strict_backend.deadlock_timeout()


def test_default_predicate_asks_the_emulated_chip():
    import accelerators
    from accelerators import strict_backend

    chip = {"name": "tiny", "tflops": {"fp32": 1.0}, "memory_gb": 1, "memory_bandwidth_gbps": 100}
    accel = accelerators.get_accelerator("emulated", chip=chip)
    try:
        with accel.device_scope():
            on_device = torch.ones(8) * 2
        assert strict_backend.is_device_tensor(on_device)
        assert strict_backend.is_device_tensor(on_device[2:])  # a view shares the device storage
        assert not strict_backend.is_device_tensor(torch.ones(8))
    finally:
        accelerators.reset_accelerator()


def test_predicate_is_pluggable():
    from accelerators import strict_backend, strict_device

    strict_backend.set_device_tensor_predicate(lambda t: t.dtype == torch.float16)   # the facade's name
    try:
        assert strict_device.is_device_tensor(torch.ones(2, dtype=torch.float16))
        strict_device.check_device("all_reduce", [[torch.ones(2, dtype=torch.float16)]])
        with pytest.raises(strict_backend.HostTensorRefused, match="all_reduce was given a host tensor"):
            strict_device.check_device("all_reduce", [[torch.ones(2)]])
    finally:
        strict_backend.set_device_tensor_predicate(None)
    assert not strict_device.is_device_tensor(torch.ones(2, dtype=torch.float16))   # the default again


def test_a_send_leaves_after_the_senders_queue_has_run_the_host_does_not_wait():
    sender, receiver = run_pair("send_order")
    assert receiver["value"] == [3.0] * 4
    assert receiver["received_at"] >= sender["ready_at"]     # perf_counter is one clock for the host
    assert sender["isend_returned_at"] < sender["ready_at"] - 0.2


def test_a_waiting_entry_polls_often_at_first_then_backs_off():
    """Every missed poll is latency NCCL has not: a receive posted ahead looks every 2 ms or less for
    its first second, an idle pair backs off to 20 ms."""
    from accelerators.strict_p2p import next_poll

    pause, schedule = 0.0005, []
    for waited in (0.0, 0.01, 0.1, 0.5, 0.99):
        pause = next_poll(pause, waited)
        schedule.append(pause)
    assert schedule == [0.001, 0.002, 0.002, 0.002, 0.002]
    for _ in range(10):
        pause = next_poll(pause, 5.0)
    assert pause == 0.02
