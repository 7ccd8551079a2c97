"""CoordinatorStore: torch Store semantics on the coordinator's KV, a gloo world through it, the rendezvous."""

import datetime
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch.distributed as dist

from comm_bridge.coordinator import Coordinator
from comm_bridge.errors import AuthenticationError
from hetero.launch.store import CoordinatorStore, create_rendezvous, register_rendezvous
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)
TOKEN = "store-token-91c2"


@pytest.fixture
def coordinator():
    server = Coordinator(TOKEN, world_size=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(coordinator):
    made = CoordinatorStore(coordinator.address, TOKEN, "test/", timeout=5)
    yield made
    made.close()


def test_store_semantics(store, coordinator):
    store.set("a", "text")
    store.set("b", b"\x00\x01\xfe\xff")
    assert store.get("a") == b"text" and store.get("b") == b"\x00\x01\xfe\xff"
    assert store.add("n", 5) == 5 and store.add("n", 2) == 7 and store.get("n") == b"7"
    assert store.compare_set("c", "", "v1") == b"v1"
    assert store.compare_set("c", "nope", "v2") == b"v1"
    assert store.compare_set("c", "v1", "v2") == b"v2" and store.get("c") == b"v2"
    assert store.check(["a", "b"]) and not store.check(["a", "missing"])
    assert store.multi_get(["a", "n"]) == [b"text", b"7"]
    store.multi_set(["m1", "m2"], ["1", b"2"])
    assert store.num_keys() == 6

    # get and wait block until a key appears, and time out as torch's stores do.
    store.set_timeout(datetime.timedelta(seconds=0.3))
    with pytest.raises(dist.DistStoreError, match="never set"):
        store.get("missing")
    with pytest.raises(dist.DistStoreError, match="never set"):
        store.wait(["a", "missing"])
    with pytest.raises(dist.DistStoreError):
        store.wait(["missing"], datetime.timedelta(seconds=0.1))
    store.set_timeout(datetime.timedelta(seconds=10))
    other = CoordinatorStore(coordinator.address, TOKEN, "test/", timeout=10)
    timer = threading.Timer(0.3, other.set, ("late", b"here"))
    timer.start()
    store.wait(["late"])
    assert store.get("late") == b"here"
    timer.join()
    other.close()

    assert store.delete_key("late") and not store.delete_key("late")
    assert store.num_keys() == 6

    # Through torch's own PrefixStore (what process groups wrap a store in): the C++ side works too.
    prefixed = dist.PrefixStore("pg", store)
    prefixed.set("k", "v")
    assert prefixed.get("k") == b"v" and prefixed.add("i", 3) == 3
    assert prefixed.check(["k"]) and prefixed.delete_key("k")
    assert prefixed.num_keys() == 7
    prefixed.set_timeout(datetime.timedelta(seconds=0.2))
    with pytest.raises(dist.DistStoreError):
        prefixed.wait(["nothing"])


def test_prefixes_keep_islands_and_attempts_apart(coordinator):
    first = CoordinatorStore(coordinator.address, TOKEN, "pg/a/0/", timeout=1)
    second = CoordinatorStore(coordinator.address, TOKEN, "pg/a/1/", timeout=1)
    first.set("rank0", "attempt 0")
    assert not second.check(["rank0"]) and second.num_keys() == 0
    second.set("rank0", "attempt 1")
    assert first.get("rank0") == b"attempt 0" and second.get("rank0") == b"attempt 1"
    first.close()
    second.close()


@pytest.mark.parametrize("token", ["wrong-token"])
def test_a_store_without_the_token_gets_nothing(coordinator, store, token):
    store.set("secret", "x")
    intruder = CoordinatorStore(coordinator.address, token, "test/", timeout=1)
    for operation in (lambda: intruder.get("secret"), lambda: intruder.set("secret", "y"),
                      lambda: intruder.add("n", 1), lambda: intruder.check(["secret"]),
                      lambda: intruder.compare_set("secret", "x", "y"), lambda: intruder.wait(["secret"]),
                      lambda: intruder.delete_key("secret"), lambda: intruder.num_keys()):
        with pytest.raises(AuthenticationError):
            operation()
    intruder.close()
    assert store.get("secret") == b"x"
    assert coordinator.refusals["wrong_token"] == 8


# The engine's own path (hetero.engine.comms): the store is handed to torch and not kept
# by the caller, so it must survive a garbage collection before the island's groups are made.
GLOO_WORKER = textwrap.dedent("""
    import gc, sys
    import torch, torch.distributed as dist
    from hetero.engine.comms import _init_island_group
    rank = int(sys.argv[1])
    _init_island_group("gloo", rank, 2)
    gc.collect()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    group = dist.new_group([0, 1])
    dist.all_reduce(value, group=group)
    print(f"rank {rank} sum {int(value.item())}", flush=True)
    dist.destroy_process_group()
""")


def test_a_gloo_world_forms_and_all_reduces_through_the_store(coordinator):
    env = {**os.environ, "HETERO_COORDINATOR": coordinator.address, "HETERO_JOB_TOKEN": TOKEN,
           "HETERO_ISLAND": "host", "HETERO_RESTART_COUNT": "0", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_WORKER, str(rank)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=50)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (code, out, err) in enumerate(outputs):
        assert code == 0, err
        assert out.strip() == f"rank {rank} sum 6"      # (1 + 2), then again over the new group
    # The world's keys went to the island's namespace in the coordinator, and nowhere else.
    check = CoordinatorStore(coordinator.address, TOKEN, "pg/host/0/", timeout=1)
    assert check.num_keys() > 0
    check.close()
    assert coordinator.refused == 0


def test_rendezvous_gives_fixed_ranks_and_reports_who_never_came(coordinator, monkeypatch):
    from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousTimeoutError
    from torch.distributed.elastic.rendezvous.registry import handler_registry

    monkeypatch.setenv("HETERO_JOB_TOKEN", TOKEN)
    backend = register_rendezvous()
    assert register_rendezvous() == backend        # idempotent

    def params(rank, run_id="job-island-0", timeout=10):
        return RendezvousParameters(backend=backend, endpoint=coordinator.address, run_id=run_id,
                                    min_nodes=2, max_nodes=2, rank=rank, timeout=timeout,
                                    master_addr="127.0.0.1", master_port=29999)

    handlers = [handler_registry.create_handler(params(rank)) for rank in (1, 0)]
    infos = [None, None]
    threads = [threading.Thread(target=lambda h=h, i=i: infos.__setitem__(i, h.next_rendezvous()))
               for i, h in enumerate(handlers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [info.rank for info in infos] == [1, 0] and {info.world_size for info in infos} == {2}
    assert not handlers[0].use_agent_store
    assert infos[0].bootstrap_store_info.master_port == 29999
    infos[0].store.set("from-1", "hello")
    assert infos[1].store.get("from-1") == b"hello"
    for handler in handlers:
        handler.shutdown()

    lonely = create_rendezvous(params(0, run_id="job-island-1", timeout=0.3))
    with pytest.raises(RendezvousTimeoutError, match="only 1 of 2 nodes joined rendezvous job-island-1"):
        lonely.next_rendezvous()
    lonely.shutdown()


def test_island_agents_use_the_hetero_rendezvous_not_a_tcp_store(monkeypatch, tmp_path):
    from hetero.launch.island_agent import launch_config

    monkeypatch.setenv("HETERO_COORDINATOR", "127.0.0.1:29400")
    monkeypatch.setenv("HETERO_JOB_TOKEN", TOKEN)
    spec = {"nnodes": 2, "nproc": 2, "run_id": "hetero-abc-fast-0", "island": "fast", "group_rank": 1,
            "master_addr": "127.0.0.1", "rdzv_port": 29401, "rdzv_timeout": 30, "log_dir": str(tmp_path),
            "shutdown_timeout": 5}
    config = launch_config(spec)
    assert config.rdzv_backend == "hetero" and config.rdzv_endpoint == "127.0.0.1:29400"
    assert config.rdzv_configs["rank"] == 1 and config.rdzv_configs["master_port"] == 29401
    assert TOKEN not in repr(config)        # elastic logs its configuration; the token stays in the environment


def test_a_plain_env_script_under_hetero_launch_opens_no_store_on_any_interface(tmp_path):
    """torch's env:// would make island rank 0 host a TCPStore on MASTER_PORT, on every
    interface, for anyone; under a hetero launcher it meets in the coordinator's store."""
    import json

    from tests.hetero.launch.test_launch import WORKERS, finish, launcher, write_cluster

    cluster = write_cluster(tmp_path, "two-island", chips=2)
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = finish(launcher(cluster, os.path.join(WORKERS, "env_listeners.py"), str(out)))
    assert code == 0, stderr
    reports = [json.loads(p.read_text()) for p in out.iterdir()]
    assert len(reports) >= 2 and all(r["sum"] >= 1 for r in reports)
    wildcard = ("00000000", "00000000000000000000000000000000")
    for report in reports:
        assert not [port for address, port in report["listening"] if address in wildcard], report
        assert report["master_port"] not in [port for _, port in report["listening"]], report
