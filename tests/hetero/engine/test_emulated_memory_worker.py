"""The worker selects its device before any device work, and turns running out of device
memory into one line naming where, how much, and what to try: a fatal failure (exit
FATAL_EXIT_CODE, no restart, no traceback), whatever vendor raised it."""

from __future__ import annotations

import os

import pytest
import torch

import accelerators
from accelerators.emulated import STRICT_ENV, VISIBLE_ENV, EmulatedAccelerator
from accelerators.errors import DeviceContractError
from tests.conftest import ROOT
from hetero.config import load_job
from hetero.engine import worker
from hetero.engine.topology import Topology
from hetero.errors import FATAL_EXIT_CODE
from hetero.plan_check import load_checked_plan

pytestmark = pytest.mark.timeout(120)

CONFIGS = {kind: os.path.join(ROOT, "configs", name) for kind, name in
           (("cluster", "emulated-mixed.yaml"), ("model", "llama-tiny.yaml"), ("train", "train-tiny.yaml"))}
TINY = {"name": "tiny-chip", "tflops": {"fp32": 0.01}, "memory_gb": 0.002, "memory_bandwidth_gbps": 1.0,
        "host_link_gbps": 0.5, "memory_reserve_gb": 0.001}          # 1 MB usable


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> str:
    from hetero.cli import main

    path = str(tmp_path_factory.mktemp("plan") / "plan.json")
    assert main(["plan", *[a for k, p in CONFIGS.items() for a in (f"--{k}", p)], "--out", path]) == 0
    return path


@pytest.fixture
def env(monkeypatch):
    for var in (STRICT_ENV, VISIBLE_ENV, accelerators.SELECT_ENV, "HETERO_ISLAND", "HETERO_CHIP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HETERO_GLOBAL_RANK", "2")
    monkeypatch.setenv("HETERO_NODE", "test-host")
    yield monkeypatch
    accelerators.reset_accelerator()


def out_of_memory(accel) -> torch.OutOfMemoryError:
    """A real OOM from the ledger: 2 MB asked of a chip with 1 MB usable and 0.4 MB in use."""
    kept = accel.to_device(torch.zeros(100_000))
    try:
        with accel.device_scope():
            torch.zeros(500_000)
    except torch.OutOfMemoryError as exc:
        del kept
        return exc
    raise AssertionError("the ledger did not refuse 2 MB on a 1 MB chip")


def test_select_device_uses_the_local_rank(env):
    env.setenv(VISIBLE_ENV, "4,5")
    env.setenv("LOCAL_RANK", "3")
    accel = EmulatedAccelerator(TINY, strict=True)
    with pytest.raises(DeviceContractError, match="before set_device"):
        accel.synchronize()
    assert worker.select_device(accel) == torch.device("cpu")
    assert accel.current_device() == 1                                  # 3 % 2 devices
    accel.synchronize()                                                 # selected: device work is fine


def test_out_of_memory_is_one_line_naming_where_how_much_and_what_to_try(env, plan_path, tmp_path):
    plan = load_checked_plan(plan_path, load_job(**CONFIGS))
    topology = Topology(plan)
    entry = topology.by_rank[2]
    stage = plan.stages[entry.stage]
    accel = EmulatedAccelerator(TINY)
    message = worker.fatal_message(out_of_memory(accel), accel, topology)
    assert message.startswith(f"out of device memory on rank 2 (island {entry.island}, stage {entry.stage}, "
                              f"chip {stage.chip}): tried to allocate 2 MB, 0.4 MB in use, capacity 1 MB")
    assert f"the plan predicted {stage.memory_gb:.3g} GB" in message
    assert f"try activation recompute (this stage: recompute {stage.recompute}), more chips, or a smaller " \
           "micro-batch" in message
    line = worker.report_fatal(message, str(tmp_path))
    assert line == f"hetero: rank 2 on test-host: {message}" and "\n" not in line
    assert (tmp_path / "fatal" / "rank00002.txt").read_text() == line + "\n"


def test_the_worker_stops_on_out_of_memory_with_the_fatal_code_and_no_traceback(env, plan_path, tmp_path,
                                                                                 capfd):
    env.setenv(VISIBLE_ENV, "0,1")
    env.setenv("LOCAL_RANK", "1")
    accel = EmulatedAccelerator(TINY, strict=True)   # strict: device work before set_device would fail
    accelerators.set_accelerator(accel)
    closed = []

    class Comms:
        @staticmethod
        def start(topology, accelerator, device, cluster):
            return Comms()

        def record_bridge_stats(self, run_dir):
            closed.append("stats")

        def close(self):
            closed.append("close")

    def trainer(comms, accelerator, *args, **kwargs):
        with accelerator.device_scope():
            accelerator.to_device(torch.zeros(100_000))
            torch.zeros(500_000)                       # over capacity: the ledger raises

    env.setattr(worker, "Comms", Comms)
    env.setattr(worker, "Trainer", trainer)
    env.setattr(worker, "_share_host_cores", lambda topology, cluster: None)
    code = worker.main(["--plan", plan_path, *[a for k, p in CONFIGS.items() for a in (f"--{k}", p)],
                        "--run-dir", str(tmp_path)])
    out, err = capfd.readouterr()
    assert code == FATAL_EXIT_CODE and closed == ["stats", "close"]
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert err.startswith("hetero: rank 2 on test-host: out of device memory on rank 2 (island ")
    assert "tried to allocate 2 MB" in err and "capacity 1 MB" in err
    assert accel.current_device() == 1                  # the worker selected LOCAL_RANK's device
    assert (tmp_path / "fatal" / "rank00002.txt").read_text() == err


def test_a_vendor_out_of_memory_class_is_matched_by_name():
    class NPUOutOfMemoryError(RuntimeError):
        pass

    class Counters:
        def memory_allocated(self):
            return 60 * 10**9

        def total_memory(self):
            return 64 * 10**9

    exc = NPUOutOfMemoryError("NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 64.00 GiB total)")
    message = worker.fatal_message(exc, Counters(), None)
    assert "tried to allocate 2.15 GB, 60 GB in use, capacity 64 GB" in message
    assert worker.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert worker.fatal_message(RuntimeError("out of patience"), Counters(), None) is None


def test_the_launcher_shows_each_emulated_worker_its_node_s_devices(env):
    from hetero.launch.environment import island_env
    from hetero.launch.layout import build_layout

    layout = build_layout(load_job(**CONFIGS).cluster, node="127.0.0.1")
    for island, node in layout.on_host("127.0.0.1"):
        shown = island_env(layout, island, node, attempt=0, token="t", run_dir="/r", plan_path=None,
                           cluster_path=None, base={})[VISIBLE_ENV]
        assert shown == ",".join(map(str, node.devices)) and len(node.devices) == 2
        env.setenv(VISIBLE_ENV, shown)
        assert EmulatedAccelerator(TINY).device_count() == 2     # so set_device(LOCAL_RANK) matters


def test_a_schedule_the_strict_backend_refuses_is_one_fatal_line():
    """A deadlocking exchange or a host tensor fails the same way on every attempt: no restart."""
    from accelerators.strict_backend import HostTensorRefused, P2PDeadlock
    from hetero.engine.worker import fatal_message

    line = fatal_message(P2PDeadlock("rank 0 is running [send #0 to rank 1], rank 1 is running [send #0 to rank 0]"))
    assert line.startswith("the island's collective backend (hetero-strict) refused this: rank 0 is running")
    assert "hetero-strict" in fatal_message(HostTensorRefused("all_reduce was given a host tensor"))
    assert fatal_message(RuntimeError("connection reset")) is None
