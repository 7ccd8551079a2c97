"""`hetero env` and `hetero bench accelerators` (a tiny run: structure and anchors, no timings)."""

from __future__ import annotations

import json

import pytest

import accelerators

CHIP_JSON = '{"name": "envchip", "tflops": {"fp32": 1}, "memory_gb": 1, "memory_bandwidth_gbps": 10}'


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HETERO_ACCELERATOR", "HETERO_EMULATED_CHIP", "HETERO_REFERENCE_OPS"):
        monkeypatch.delenv(var, raising=False)
    accelerators.reset_accelerator()
    yield
    accelerators.reset_accelerator()


def test_env_text_says_what_and_why(hetero_cli):
    code, out, _err = hetero_cli("env")
    assert code == 0
    assert out.startswith("accelerator  cpu: first available in probe order")
    assert "probe order  ascend, kunlun, cuda, cpu" in out
    assert "torch_npu is not installed" in out
    assert "fused ops    rms_norm=reference" in out


def test_env_json(hetero_cli):
    code, out, _err = hetero_cli("env", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"]
    assert report["selected"]["name"] == "cpu"
    assert [p["name"] for p in report["probes"]][:4] == ["ascend", "kunlun", "cuda", "cpu"]
    assert report["versions"]["torch"]
    assert report["accelerator"]["dist_backend"] == "gloo"


def test_env_reports_unavailable_choice_and_exits_2(hetero_cli, monkeypatch):
    monkeypatch.setenv("HETERO_ACCELERATOR", "ascend")
    code, out, err = hetero_cli("env")
    assert code == 2
    assert "ascend" in err and "torch_npu is not installed" in err
    assert "probe order" in out  # the probes are still shown


def test_env_labels_emulated(hetero_cli, monkeypatch):
    monkeypatch.setenv("HETERO_ACCELERATOR", "emulated")
    monkeypatch.setenv("HETERO_EMULATED_CHIP", CHIP_JSON)
    code, out, _err = hetero_cli("env")
    assert code == 0
    assert "EMULATED" in out and "emulated envchip" in out


def test_bench_accelerators_tiny_json(hetero_cli):
    code, out, _err = hetero_cli("bench", "accelerators", "--json", "--seconds", "0.05",
                                 "--repeats", "1", "--load", "1", "--calls", "5", "--size", "64")
    report = json.loads(out)
    assert code == (0 if report["within_tolerance"] else 1)
    assert report["emulated"] is True
    from hetero.config.catalog import load_catalog

    fast_peak, slow_peak = (load_catalog()[chip].peak_flops("fp32") for chip in ("emu-fast", "emu-slow"))
    assert report["anchor_ratio"] == pytest.approx(fast_peak / slow_peak)
    fast, slow = report["chips"]["emu-fast"], report["chips"]["emu-slow"]
    flops = report["workload"]["matmuls"] * 2 * 64 ** 3
    assert fast["virtual_s"] == pytest.approx(flops / fast_peak)
    assert slow["virtual_s"] == pytest.approx(flops / slow_peak)
    assert fast["wall_s"] >= fast["virtual_s"] * 0.99  # waiting is a lower bound
    assert set(report["dispatch_overhead"]) == {"rms_norm", "rotary", "attention", "swiglu", "adamw_step"}
