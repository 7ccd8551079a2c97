"""`hetero profile` measures each chip's fixed host costs (issue #19 item 2) and `hetero plan`
counts them; --no-host-costs leaves them out (the planner's 0 s)."""

from __future__ import annotations

import json

from partitioner.profile import HOST_FIELDS

CLUSTER = """
name: local-mixed
coordinator: {host: 127.0.0.1, port: 29400}
islands:
  - {name: fast, accelerator: emulated, chip: emu-fast, nodes: [{host: 127.0.0.1, chips: 2}]}
  - {name: host, accelerator: cpu, chip: cpu, nodes: [{host: 127.0.0.1, chips: 1}]}
network: {bridge: {gbps: 1, latency_us: 50}}
"""
MODEL = "name: micro\nlayers: 4\nhidden: 64\nheads: 4\nkv_heads: 2\nffn_hidden: 176\nvocab: 128\nseq_len: 32\n"
TRAIN = "global_batch: 4\nmicro_batch: 1\nsteps: 1\nlr: 0.001\n"


def _files(tmp_path):
    paths = []
    for name, text in (("cluster.yaml", CLUSTER), ("model.yaml", MODEL), ("train.yaml", TRAIN)):
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    return paths


def test_profile_writes_host_costs_per_chip_and_plan_counts_them(hetero_cli, tmp_path):
    cluster, model, train = _files(tmp_path)
    out_path = tmp_path / "profile.json"
    code, out, err = hetero_cli("profile", "--cluster", cluster, "--model", model, "--train", train,
                                "--out", str(out_path), "--micro-batches", "1", "--reps", "1", "--no-bridge")
    assert code == 0, err
    assert "host costs emu-fast: launch" in out and "host costs cpu: launch" in out
    costs = {e["chip"]: e for e in json.loads(out_path.read_text())["host_costs"]}
    assert set(costs) == {"emu-fast", "cpu"}
    for chip, accelerator in (("emu-fast", "emulated"), ("cpu", "cpu")):
        entry = costs[chip]
        assert entry["accelerator"] == accelerator and entry["micro_batch"] == 1
        assert all(entry[k] >= 0 for k in HOST_FIELDS)
        assert entry["sync_s"] > 0                     # a synchronize is never free
    code, out, err = hetero_cli("plan", "--cluster", cluster, "--model", model, "--train", train,
                                "--profile", str(out_path), "--json")
    assert code == 0, err
    with_host = json.loads(out)["predicted_step_s"]
    data = json.loads(out_path.read_text())
    del data["host_costs"]
    out_path.write_text(json.dumps(data))
    code, out, err = hetero_cli("plan", "--cluster", cluster, "--model", model, "--train", train,
                                "--profile", str(out_path), "--json")
    assert code == 0, err
    assert json.loads(out)["predicted_step_s"] < with_host


def test_no_host_costs_leaves_them_out(hetero_cli, tmp_path):
    cluster, model, train = _files(tmp_path)
    out_path = tmp_path / "profile.json"
    code, out, err = hetero_cli("profile", "--cluster", cluster, "--model", model, "--train", train,
                                "--out", str(out_path), "--micro-batches", "1", "--reps", "1", "--no-bridge",
                                "--no-host-costs")
    assert code == 0, err
    assert "host costs: not measured (--no-host-costs" in out
    assert "host_costs" not in json.loads(out_path.read_text())
