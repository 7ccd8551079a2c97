"""`hetero plan` and `hetero profile` from the command line."""

from __future__ import annotations

import json

import pytest

from partitioner.plan import Plan
from tests.conftest import ROOT

EMU = ("--cluster", "configs/emulated-mixed.yaml", "--model", "configs/llama-tiny.yaml",
       "--train", "configs/train-tiny.yaml")


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_plan_table(hetero_cli):
    code, out, err = hetero_cli("plan", *EMU)
    assert code == 0, err
    assert "predicted step" in out and "naive baseline" in out
    assert "emulated chips" in out
    assert "fast" in out and "slow" in out


def test_plan_json_fields(hetero_cli):
    code, out, err = hetero_cli("plan", *EMU, "--json")
    assert code == 0, err
    data = json.loads(out)
    for key in ("stages", "micro_batch", "num_micro_batches", "recompute", "predicted_step_s", "tokens_per_s",
                "mfu", "memory_gb", "baseline_step_s", "search_s", "measured"):
        assert key in data, key
    assert data["measured"] is False
    assert len(data["memory_gb"]) == len(data["stages"])
    # half-layer blocks (`blocks` where a stage begins or ends inside a layer, else twice `layers`) are
    # half-open and cover the model once per pipeline
    for pipe in data["pipelines"]:
        start = 0
        for i in pipe["stages"]:
            stage = data["stages"][i]
            assert {"island", "chip", "tp", "dp", "layers"} <= set(stage)
            blocks = stage.get("blocks") or [2 * end for end in stage["layers"]]
            assert blocks[0] == start and stage["layers"] == [blocks[0] // 2, (blocks[1] + 1) // 2]
            start = blocks[1]
        assert start == 16
    assert data["predicted_step_s"] <= data["baseline_step_s"]
    assert set(data["mfu"]) <= {"emu-fast", "emu-slow"}
    assert Plan.from_dict(data).problems() == []


def test_plan_reports_islands_alone_and_lower_bounds(hetero_cli):
    code, out, err = hetero_cli("plan", "--cluster", "configs/a800-910b-32.yaml", "--model", "configs/llama2-7b.yaml",
                                "--train", "configs/train-llama2.yaml", "--json")
    assert code == 0, err
    data = json.loads(out)
    alone = data["islands_alone_tokens_per_s"]
    assert set(alone) == {"a800", "ascend", "sum"}
    assert alone["sum"] == pytest.approx(alone["a800"] + alone["ascend"])
    assert data["efficiency_vs_islands"] == pytest.approx(data["tokens_per_s"] / alone["sum"])
    bounds = data["lower_bounds"]
    assert set(bounds) == {"best_island_alone", "hetero_dp"} and data["meets_lower_bounds"] is True
    for bound in bounds.values():
        assert data["tokens_per_s"] >= bound["tokens_per_s"] * (1 - 1e-9)
    assert sum(bounds["hetero_dp"]["batch_share"].values()) == pytest.approx(1.0)
    # on its own each replica runs at least as fast as when it waits for the others and the bridge
    assert bounds["hetero_dp"]["tokens_per_s"] <= bounds["hetero_dp"]["islands_at_share_tokens_per_s"]
    assert {"pp_groups", "pp_evaluated", "dp_evaluated", "hetero_pp_s"} <= set(data["search_stats"])
    code, out, err = hetero_cli("plan", "--cluster", "configs/a800-910b-32.yaml", "--model", "configs/llama2-7b.yaml",
                                "--train", "configs/train-llama2.yaml")
    assert code == 0, err
    assert "islands alone (each on the whole batch): a800" in out and "of their sum" in out
    assert "lower bounds: best island alone" in out and ": met" in out


def test_plan_top_and_explain(hetero_cli):
    code, out, err = hetero_cli("plan", *EMU, "--top", "3", "--explain")
    assert code == 0, err
    assert "top 3:" in out and "  3. " in out
    assert "runner-up" in out and "naive" in out
    code, out, _ = hetero_cli("plan", *EMU, "--json", "--explain", "--top", "2")
    data = json.loads(out)
    assert len(data["alternatives"]) == 1 and any("runner-up" in line for line in data["explain"])


def test_plan_out_file_is_a_valid_plan(hetero_cli, tmp_path):
    path = tmp_path / "plan.json"
    code, _out, err = hetero_cli("plan", *EMU, "--out", str(path))
    assert code == 0, err
    plan = Plan.from_json(path.read_text())
    assert plan.validate() is plan
    assert plan.world_size == 4


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_plan_infeasible_says_what_to_change(hetero_cli, tmp_path):
    cluster = _write(tmp_path / "two.yaml", """
name: two-a800
coordinator: {host: 192.0.2.1, port: 29400}
islands:
  - {name: a800, accelerator: cuda, chip: A800-80G, nodes: [{host: 192.0.2.1, chips: 2}]}
""")
    code, out, err = hetero_cli("plan", "--cluster", cluster, "--model", "configs/llama2-70b.yaml",
                                "--train", "configs/train-llama2.yaml")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no plan fits" in lines[0] and "add chips" in lines[0]


def test_plan_bad_profile(hetero_cli, tmp_path):
    bad = _write(tmp_path / "bad.json", '{"format": "nope"}')
    code, _out, err = hetero_cli("plan", *EMU, "--profile", bad)
    assert code == 2 and "not a hetero profile" in err and "Traceback" not in err


def test_plan_bad_top(hetero_cli):
    code, _out, err = hetero_cli("plan", *EMU, "--top", "0")
    assert code == 2 and "argument --top: expected a whole number from 1 to 1000, got 0" in err


def test_profile_then_plan(hetero_cli, tmp_path):
    cluster = _write(tmp_path / "cluster.yaml", """
name: local-mixed
coordinator: {host: 127.0.0.1, port: 29400}
islands:
  - {name: fast, accelerator: emulated, chip: emu-fast, nodes: [{host: 127.0.0.1, chips: 2}]}
  - {name: host, accelerator: cpu, chip: cpu, nodes: [{host: 127.0.0.1, chips: 1}]}
network: {bridge: {gbps: 1, latency_us: 50}}
""")
    model = _write(tmp_path / "model.yaml", """
name: micro
layers: 4
hidden: 64
heads: 4
kv_heads: 2
ffn_hidden: 176
vocab: 128
seq_len: 32
""")
    train = _write(tmp_path / "train.yaml", "global_batch: 4\nmicro_batch: 1\nsteps: 1\nlr: 0.001\n")
    out_path = tmp_path / "profile.json"
    code, out, err = hetero_cli("profile", "--cluster", cluster, "--model", model, "--train", train,
                                "--out", str(out_path), "--micro-batches", "1,2", "--reps", "1")
    assert code == 0, err
    data = json.loads(out_path.read_text())
    assert data["format"] == "hetero-profile"
    measured = {(e["chip"], e["tp"], e["micro_batch"]) for e in data["layers"]}
    assert {("emu-fast", 1, 1), ("emu-fast", 2, 2), ("cpu", 1, 1), ("cpu", 1, 2)} <= measured
    assert all(e["forward_s"] > 0 and e["backward_s"] > 0 for e in data["layers"])
    assert data["bridge"]["gbps"] > 0
    code, out, err = hetero_cli("plan", "--cluster", cluster, "--model", model, "--train", train,
                                "--profile", str(out_path), "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["provenance"]["bridge"] == "measured"
    assert set(plan["provenance"]["layer_time"].values()) <= {"measured", "calibrated"}


HYBRID_CLUSTER = """
name: hybrid-3
coordinator: {host: 127.0.0.1, port: 29400}
islands:
  - {name: a, accelerator: emulated, chip: emu-a, nodes: [{host: 127.0.0.1, chips: 2}]}
  - {name: b, accelerator: emulated, chip: emu-b, nodes: [{host: 127.0.0.1, chips: 2}]}
  - {name: c, accelerator: emulated, chip: emu-c, nodes: [{host: 127.0.0.1, chips: 4}]}
network: {intra_node_gbps: 2, inter_node_gbps: 1, bridge: {transport: auto, gbps: 1, latency_us: 50}}
chips:
  emu-a: {accelerator: emulated, emulated: true, tflops: {fp32: 0.006}, memory_gb: 0.014, memory_bandwidth_gbps: 3,
          intra_node_gbps: 1.5, host_link_gbps: 1}
  emu-b: {accelerator: emulated, emulated: true, tflops: {fp32: 0.004}, memory_gb: 0.014, memory_bandwidth_gbps: 2,
          intra_node_gbps: 1, host_link_gbps: 1}
  emu-c: {accelerator: emulated, emulated: true, tflops: {fp32: 0.008}, memory_gb: 0.1, memory_bandwidth_gbps: 4,
          intra_node_gbps: 2, host_link_gbps: 1}
"""


def test_plan_prints_a_hybrid_plan_and_its_search(hetero_cli, tmp_path):
    """Islands a and b hold llama-tiny only together, c alone: a pipeline over a and b beside c."""
    cluster = _write(tmp_path / "hybrid.yaml", HYBRID_CLUSTER)
    files = ("--cluster", cluster, "--model", "configs/llama-tiny.yaml", "--train", "configs/train-tiny.yaml")
    code, out, err = hetero_cli("plan", *files, "--out", str(tmp_path / "plan.json"))
    assert code == 0, err
    assert "hybrid [" in out and "hybrid pipelines costed for 3 groupings of the islands" in out
    plan = Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.kind == "hybrid" and len(plan.pipelines) == 2 and plan.problems() == []
    code, out, err = hetero_cli("plan", *files, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["kind"] == "hybrid" and sum(p["samples"] for p in data["pipelines"]) == 8
    assert {"hybrid_groupings", "hybrid_configs", "hybrid_evaluated", "hybrid_s"} <= set(data["search_stats"])
    assert data["meets_lower_bounds"] and set(data["islands_alone_tokens_per_s"]) == {"c", "sum"}


def test_plan_may_cut_inside_a_layer_unless_told_whole_layers(hetero_cli):
    job = ("--cluster", "configs/emulated-mixed.yaml", "--model", "configs/llama-tiny.yaml",
           "--train", "configs/train-efficiency.yaml")
    code, out, err = hetero_cli("plan", *job, "--json")
    assert code == 0, err
    split = json.loads(out)
    assert split["version"] == 4 and any("blocks" in s for s in split["stages"])
    assert Plan.from_dict(split).problems() == []
    code, out, err = hetero_cli("plan", *job, "--json", "--whole-layers")
    assert code == 0, err
    whole = json.loads(out)
    assert whole["version"] == 1 and not any("blocks" in s for s in whole["stages"])
    assert whole["predicted_step_s"] > split["predicted_step_s"]
    code, out, err = hetero_cli("plan", *job)
    assert code == 0 and ".5 (" in out                      # the table shows a cut inside a layer as x.5
