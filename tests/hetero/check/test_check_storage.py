"""`hetero check`'s shared-storage item: the head reads every node's probe through the checkpoint
folder. Nodes are loopback addresses of this machine (127.0.0.1 is the head, 127.0.0.2 another
node): the head is `hetero check --node 127.0.0.1`, the other node the same check in a thread (the
folder is the only channel between them); "not shared" is two different folders."""

import json
import os
import threading

from tests.conftest import ROOT

from hetero.check import storage, verdict
from hetero.config import load_job

CLUSTER = """
name: two-nodes
coordinator: {host: 127.0.0.1, port: 29400}
islands:
  - {name: a, accelerator: cpu, chip: cpu, nodes: [{host: 127.0.0.1, chips: 1}]}
  - {name: b, accelerator: cpu, chip: cpu, nodes: [{host: 127.0.0.2, chips: 1}]}
"""


def _cluster(tmp_path) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return str(path)


def _member(cluster: str, folder, wait: float, outcome: list) -> threading.Thread:
    """Node 127.0.0.2's side, in a thread of this process (the folder is the only channel)."""
    item = storage.item(load_job(cluster=cluster).cluster, str(folder), wait)
    thread = threading.Thread(target=lambda: outcome.append(storage.run(item, this_node="127.0.0.2")))
    thread.start()
    return thread


def test_nodes_sharing_the_folder_pass_twice_in_a_row(hetero_cli, tmp_path):
    cluster, shared = _cluster(tmp_path), tmp_path / "shared"
    for _ in range(2):                          # the second round must not take the first one's files
        outcome = []
        member = _member(cluster, shared, 60, outcome)
        code, out, err = hetero_cli("check", "--cluster", cluster, "--node", "127.0.0.1", "--storage-only",
                                    "--storage", str(shared), "--json")
        member.join(timeout=120)
        assert code == 0, out + err
        (head,) = json.loads(out)["items"]
        assert head["kind"] == "storage" and head["verdict"] == "ok"
        assert head["measured"]["seen"] == ["127.0.0.1", "127.0.0.2"] and head["measured"]["missing"] == []
        (measured, error), = outcome
        assert error is None and measured["seen"] == head["measured"]["seen"] and not measured["missing"]


def test_a_node_with_another_folder_fails_naming_it(tmp_path):
    cluster = _cluster(tmp_path)
    outcome = []
    member = _member(cluster, tmp_path / "theirs", 1, outcome)
    item = storage.item(load_job(cluster=cluster).cluster, str(tmp_path / "mine"), 1)
    head, error = storage.run(item, this_node="127.0.0.1")
    member.join(timeout=60)
    assert error is None and head["missing"] == ["127.0.0.2"]
    judged = verdict.judge(item, head)
    assert judged["verdict"] == "failed" and "shared with 127.0.0.2" in judged["why"]
    (theirs, error), = outcome
    assert error is None and theirs["missing"] == ["127.0.0.1"]
    assert "never saw the head's open round" in verdict.judge(item, theirs)["why"]


def test_one_process_playing_every_node(hetero_cli, tmp_path):
    folder = tmp_path / "runs"
    code, out, err = hetero_cli("check", "--cluster", _cluster(tmp_path), "--storage-only", "--storage", str(folder))
    assert code == 0, out + err
    assert "storage" in out and "2 of 2 nodes read back" in out and "OK" in out
    assert sorted(os.listdir(folder / storage.FOLDER))[:2] == ["probe-127.0.0.1.json", "probe-127.0.0.2.json"]


def test_which_clusters_get_the_item(tmp_path):
    cluster = load_job(cluster=_cluster(tmp_path)).cluster
    assert storage.participants(cluster) == ["127.0.0.1", "127.0.0.2"]
    item = storage.item(cluster, "runs")
    assert item.spec["head"] == "127.0.0.1" and item.spec["dir"] == os.path.abspath("runs")
    assert storage.run(item, this_node="10.0.0.9") == (None, "--node 10.0.0.9 is not a host of the cluster file")


def test_verdicts():
    item = storage.item(load_job(cluster=os.path.join(ROOT, "configs", "emulated-mixed.yaml")).cluster, "d")
    ok = verdict.judge(item, {"dir": "/d", "seen": ["h"], "missing": [], "seconds": 0.1})
    assert ok["verdict"] == "ok"
    bad = verdict.judge(item, {"dir": "/d", "seen": ["h"], "missing": ["x", "y"], "seconds": 5.0})
    assert bad["verdict"] == "failed" and "shared with x, y" in bad["why"] and "same path" in bad["why"]
    assert verdict.exit_code([ok, bad]) == 1
