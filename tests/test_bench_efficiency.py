"""`hetero bench efficiency`'s time dilation: when the emulated fleet is stretched, and by how much."""

import dataclasses
import os

import pytest

from hetero.bench.efficiency import time_dilation
from hetero.config import load_job
from hetero.errors import UserError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(scope="module")
def emulated():
    return load_job(cluster=os.path.join(CONFIGS, "emulated-mixed.yaml")).cluster


@pytest.fixture(scope="module")
def half_real(emulated):
    fast, slow = emulated.islands
    return dataclasses.replace(emulated, islands=(fast, dataclasses.replace(slow, accelerator="cpu", chip="cpu")))


@pytest.mark.parametrize("cores, expected", [(1, 4.0), (2, 2.0), (3, 2.0), (4, 1.0), (64, 1.0)])
def test_auto_gives_each_emulated_chip_a_core(emulated, cores, expected):
    k, why = time_dilation(emulated, "auto", cores=cores)
    assert k == expected
    assert f"4 emulated chips share {cores} host core" in why


def test_a_fleet_with_real_chips_is_never_stretched(half_real):
    k, why = time_dilation(half_real, "auto", cores=1)
    assert k == 1.0 and "slow" in why and "real chips" in why
    assert time_dilation(half_real, "1", cores=1)[0] == 1.0
    with pytest.raises(UserError, match="island\\(s\\) slow are real chips"):
        time_dilation(half_real, "2")


def test_given_value_is_used_and_checked(emulated):
    assert time_dilation(emulated, "3.5", cores=64) == (3.5, "as given")
    for bad in ("0.5", "0", "fast", "inf", "nan"):
        with pytest.raises(UserError, match="--time-dilation must be a number >= 1"):
            time_dilation(emulated, bad)


def test_auto_measures_the_best_plan_of_each_kind():
    from hetero.bench.efficiency import candidate_plans

    job = load_job(cluster=os.path.join(CONFIGS, "emulated-mixed.yaml"), model=os.path.join(CONFIGS, "llama-tiny.yaml"),
                   train=os.path.join(CONFIGS, "train-efficiency.yaml"))
    assert [p.kind for p in candidate_plans(job, "auto", None)] == ["pipeline", "replicas"]
    only = candidate_plans(job, "replicas", None)
    assert [p.kind for p in only] == ["replicas"] and sum(p.samples for p in only[0].pipelines) == 64


def test_an_out_dir_that_holds_a_run_is_refused(hetero_cli, tmp_path):
    (tmp_path / "mixed").mkdir()
    code, _, stderr = hetero_cli("bench", "efficiency", "--out", str(tmp_path), "--json")
    assert code != 0 and "already holds an efficiency run" in stderr
