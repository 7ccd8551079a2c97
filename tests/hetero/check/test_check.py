"""`hetero check`: verdicts, the simulated estimate for the 1,024-chip example, a real check
of a tiny emulated cluster on loopback, and the JSON shape."""

import json
import os
import socket

import pytest

from hetero.check import items as check_items
from hetero.check import simulate, verdict
from hetero.config import load_job

TINY = """
name: check-tiny
coordinator: {host: 127.0.0.1, port: 29400}
chips:
  check-fast: {accelerator: emulated, emulated: true, tflops: {fp32: 0.002}, memory_gb: 0.02,
               memory_bandwidth_gbps: 1, intra_node_gbps: 0.5}
  check-slow: {accelerator: emulated, emulated: true, tflops: {fp32: 0.0008}, memory_gb: 0.012,
               memory_bandwidth_gbps: 0.4, intra_node_gbps: 0.25}
islands:
  - {name: fast, accelerator: emulated, chip: check-fast, nodes: [{host: 127.0.0.1, chips: 2}]}
  - {name: slow, accelerator: emulated, chip: check-slow, nodes: [{host: %s, chips: 1}]}
network: {intra_node_gbps: 2, bridge: {gbps: 1, latency_us: 50}}
"""


def _cluster_file(tmp_path, slow_host="127.0.0.1") -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(TINY % slow_host)
    return str(path)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or process pool is a failure: the simulated check must contact nothing."""
    def refuse(*args, **kwargs):
        raise AssertionError("hetero check --simulate tried to contact a host or start probes")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from hetero.check import local
    monkeypatch.setattr(local, "_pool", refuse)


def test_1024_chip_example_is_simulated_within_two_minutes(hetero_cli, configs_dir, no_network):
    code, stdout, stderr = hetero_cli("check", "--cluster", os.path.join(configs_dir, "a800-910b-kunlun-1024.yaml"),
                                      "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["simulated"] and "documentation" in result["why_simulated"]
    assert result["chips"] == 1024 and result["items"] == []
    est = result["estimate"]
    assert est["total_s"] == pytest.approx(sum(est["phases"].values()))
    assert 0 < est["total_s"] <= 120 and est["within_goal"]
    assert est["bridge_rounds"] == 3                                    # 3 islands: round-robin in 3 rounds


def test_simulate_text_says_the_estimate(hetero_cli, configs_dir, no_network):
    code, stdout, _ = hetero_cli("check", "--cluster", os.path.join(configs_dir, "a800-910b-kunlun-1024.yaml"))
    assert code == 0
    assert "would take about" in stdout and "120 s goal" in stdout


def test_estimate_model_adds_up(tmp_path):
    cluster = load_job(cluster=_cluster_file(tmp_path)).cluster
    est = simulate.estimate(cluster, check_items.build(cluster), 16 << 20, 64 << 20)
    from accelerators.registry import accelerator_class

    assert est["phases"]["start-up"] == accelerator_class("emulated").startup_seconds
    assert est["phases"]["inter-node links"] == 0                        # one node per island
    # one bridge pair, 64 MiB at 1 GB/s four times, plus pings at 50 us and the set-up
    assert est["phases"]["bridge links"] == pytest.approx(simulate.link_s({"bandwidth": 1e9, "latency_s": 50e-6}, 64 << 20))
    assert est["phases"]["bridge links"] > 4 * (64 << 20) / 1e9


def test_items_and_locality(tmp_path):
    cluster = load_job(cluster=_cluster_file(tmp_path, slow_host="10.255.255.1")).cluster
    built = {item.name: item for item in check_items.build(cluster)}
    assert set(built) == {"fast/127.0.0.1/chip0", "fast/127.0.0.1/chip1", "slow/10.255.255.1/chip0",
                          "fast/127.0.0.1", "fast~slow"}
    assert built["fast/127.0.0.1/chip0"].local and not built["slow/10.255.255.1/chip0"].local
    assert not built["fast~slow"].local                                 # one end is remote: not contacted
    assert built["fast/127.0.0.1/chip0"].expected["flops_per_s"] == pytest.approx(2e9)   # emulated: exactly the spec
    assert built["fast/127.0.0.1"].expected["bandwidth"] == pytest.approx(2e9)             # the network override
    again = {i.name: i for i in check_items.build(cluster, this_node="10.255.255.1")}
    assert again["slow/10.255.255.1/chip0"].local
    assert check_items.is_documentation("198.51.100.7") and not check_items.is_documentation("10.0.0.1")


def test_verdicts():
    chip = check_items.Item("chip", "c", ("h",), {"flops_per_s": 100.0}, {"accelerator": "cuda"})
    assert verdict.judge(chip, {"flops_per_s": 85.0})["verdict"] == "ok"
    assert verdict.judge(chip, {"flops_per_s": 70.0})["verdict"] == "slow"
    assert verdict.judge(chip, None, "RuntimeError: no device")["verdict"] == "failed"
    assert verdict.judge(chip, None)["verdict"] == "not checked"
    link = check_items.Item("bridge", "a~b", ("h", "h"), {"bandwidth": 1e9, "latency_s": 50e-6}, {})
    assert verdict.judge(link, {"bandwidth": 0.6e9, "latency_s": 300e-6})["verdict"] == "ok"   # under the floor
    assert verdict.judge(link, {"bandwidth": 0.4e9, "latency_s": 50e-6})["verdict"] == "slow"
    assert verdict.judge(link, {"bandwidth": 1e9, "latency_s": 2e-3})["verdict"] == "slow"
    assert verdict.exit_code([{"verdict": "ok"}, {"verdict": "not checked"}]) == 0
    assert verdict.exit_code([{"verdict": "ok"}, {"verdict": "slow"}]) == 1


def test_real_check_of_a_tiny_emulated_cluster(hetero_cli, tmp_path):
    code, stdout, stderr = hetero_cli("check", "--cluster", _cluster_file(tmp_path), "--json")
    result = json.loads(stdout)
    assert code == result["exit_code"] and code in (0, 1), stderr
    assert not result["simulated"]
    by_name = {item["name"]: item for item in result["items"]}
    assert set(by_name) == {"fast/127.0.0.1/chip0", "fast/127.0.0.1/chip1", "slow/127.0.0.1/chip0",
                            "fast/127.0.0.1", "fast~slow"}
    for item in result["items"]:
        assert item["verdict"] in ("ok", "slow"), item
        assert set(item) >= {"kind", "name", "hosts", "expected", "measured", "verdict", "why"}
    for name in ("fast/127.0.0.1/chip0", "slow/127.0.0.1/chip0"):
        chip = by_name[name]
        assert chip["emulated"] and chip["measured"]["dtype"] == "fp32"
        # The virtual clock never lets an emulated chip beat its spec.
        assert 0 < chip["measured"]["flops_per_s"] <= 1.02 * chip["expected"]["flops_per_s"]
    for name in ("fast/127.0.0.1", "fast~slow"):
        assert by_name[name]["measured"]["bandwidth"] > 0 and by_name[name]["measured"]["latency_s"] > 0
    assert result["counts"]["ok"] + result["counts"]["slow"] == 5


def test_bad_cluster_file_exits_2(hetero_cli, tmp_path):
    code, _, stderr = hetero_cli("check", "--cluster", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in stderr
