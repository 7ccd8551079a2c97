"""scripts/gpu-check.sh and hetero.bench.gpu_check where there is no GPU: the
script stops at once with one line and its exit code; the Python half parses
its arguments, refuses bad ones, and (on the host, --device cpu) reports the
JSON it would report on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hetero.bench import gpu_check
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu-check.sh")
TINY = os.path.join(ROOT, "configs", "llama-tiny.yaml")


def run_script(tmp_path, nvidia_smi: str | None):
    """The script with PATH holding only bash's basics and, optionally, a fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "grep"):
        os.symlink(subprocess.check_output(["bash", "-c", f"command -v {tool}"], text=True).strip(),
                   bin_dir / tool)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(["/bin/bash", SCRIPT, "--json"], capture_output=True, text=True, env=env,
                          timeout=30, check=False)


@pytest.mark.parametrize("nvidia_smi, reason", [(None, "nvidia-smi not found"),
                                                ("exit 9", "nvidia-smi lists none")])
def test_script_without_a_gpu_says_one_line_and_exits_4(tmp_path, nvidia_smi, reason):
    result = run_script(tmp_path, nvidia_smi)
    assert result.returncode == gpu_check.NO_GPU_EXIT_CODE == 4
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no NVIDIA GPU") and reason in lines[0]
    assert not (tmp_path / ".venv").exists()  # it stopped before any set-up


@pytest.mark.parametrize("argv, start", [
    (["--accelerator", "cuda"], "gpu-check: no cuda device: "),
    ([], "gpu-check: no accelerator device found ("),  # the probe picks the host: no device
])
def test_preflight_without_a_device_is_one_line_and_exit_code(monkeypatch, capsys, argv, start):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("HETERO_ACCELERATOR", raising=False)
    code = gpu_check.main(argv + ["--stages", "preflight"])
    captured = capsys.readouterr()
    assert code == gpu_check.NO_GPU_EXIT_CODE
    assert captured.out == ""
    line, = captured.err.strip().splitlines()
    assert line.startswith(start) and "cuda" in line


@pytest.mark.parametrize("argv, message", [
    (["--stages", "ops,warp"], "unknown stage"),
    (["--stages", ""], "unknown stage"),
    (["--mfu-steps", "0"], "--mfu-steps must be >= 1"),
    (["--accelerator", "cpu", "--stages", "mixed"], "mixed run needs a GPU"),
])
def test_bad_arguments_are_one_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_json_report_shape_on_the_host():
    result = subprocess.run(
        [sys.executable, "-m", "hetero.bench.gpu_check", "--accelerator", "cpu", "--stages", "ops,mfu",
         "--mfu-model", TINY, "--mfu-batch", "1", "--mfu-steps", "1", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["accelerator"] == "cpu" and report["stages"] == ["ops", "mfu"]
    assert report["preflight"]["torch"] == torch.__version__
    assert set(report["ops"]["kernel_sources"]) == {"rms_norm", "rotary", "attention", "swiglu", "adamw_step"}
    cases = report["ops"]["cases"]
    assert {"attention/fp32", "attention_blocked/bf16", "adamw_step/fp32"} <= set(cases)
    assert all(row["max_rel_error"] <= row["tolerance"] for row in cases.values())
    assert "max_rel_error_grad" in cases["attention/fp32"]
    mfu = report["mfu"]
    assert mfu["chip"] == "cpu" and mfu["peak_tflops_bf16"] == pytest.approx(0.08)
    assert mfu["mfu"] == pytest.approx(mfu["achieved_tflops"] / mfu["peak_tflops_bf16"])
    assert mfu["model"] == "llama-tiny" and mfu["parameters"] > 1_000_000
    assert mfu["step_s"] > 0 and mfu["final_loss"] > 0


def test_catalog_chip_from_device_names():
    for device_name, chip in [("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100-SXM"),
                              ("NVIDIA A100-SXM4-80GB", "A100-80G"), ("Ascend910B2", "Ascend-910B"),
                              ("NVIDIA GeForce RTX 4090", None)]:
        accelerator = SimpleNamespace(vendor="cuda", device_name=lambda index=0, name=device_name: name)
        assert gpu_check.catalog_chip(accelerator) == chip
    assert gpu_check.catalog_chip(SimpleNamespace(vendor="cpu")) == "cpu"


def test_two_island_plan_is_a_valid_two_stage_pipeline():
    from hetero.config import load_job

    job = load_job(cluster=gpu_check.MIXED_CONFIG, model=gpu_check.MIXED_CONFIG, train=gpu_check.MIXED_CONFIG)
    assert [(i.name, i.accelerator) for i in job.cluster.islands] == [("gpu", "cuda"), ("host", "cpu")]
    plan = gpu_check.two_island_plan(job, ("gpu", (0, 2)), ("host", (2, 4)))
    data = json.loads(plan.to_json())
    assert [s["island"] for s in data["stages"]] == ["gpu", "host"]
    assert [tuple(s["layers"]) for s in data["stages"]] == [(0, 2), (2, 4)]
    assert data["num_micro_batches"] * data["micro_batch"] == job.train.global_batch


@pytest.mark.slow
def test_mixed_stage_on_two_cpu_islands_matches_one_process(tmp_path):
    """The mixed stage's own machinery (plan, launch, losses vs solo), with the GPU
    island swapped for a CPU one: on a GPU machine only the device differs."""
    with open(gpu_check.MIXED_CONFIG, encoding="utf-8") as handle:
        text = handle.read()
    assert "accelerator: cuda" in text
    config = tmp_path / "cpu-only.yaml"
    config.write_text(text.replace("accelerator: cuda", "accelerator: cpu").replace("chip: H100-SXM", "chip: cpu")
                      .replace("port: 29741", "port: 29747"))
    report = gpu_check.mixed_run(2, config=str(config))
    assert report["ok"] is True, report
    assert len(report["fleet_losses"]) == 2
    assert report["max_rel_difference"] <= 1e-5  # both sides on the host: fp32 parity as in the fleet tests
