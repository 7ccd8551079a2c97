"""Where `hetero run` starts workers: this machine only for a cluster of this machine's
addresses (loopback aliases included); other hosts need --on ray|slurm or hetero launch --node."""

from __future__ import annotations

import argparse
import os
import socket

import pytest

from tests.conftest import FIXTURES, ROOT
from hetero.config import load_job
from hetero.launch.targets import Target, foreign_hosts, is_this_machine, parse_target

CONFIGS = os.path.join(ROOT, "configs")
JOB = ["--model", os.path.join(CONFIGS, "llama-tiny.yaml"), "--train", os.path.join(CONFIGS, "train-tiny.yaml")]


def cluster(path: str):
    return load_job(cluster=path).cluster


def test_run_refuses_a_cluster_of_other_hosts_in_one_line(hetero_cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = hetero_cli("run", "--cluster", os.path.join(CONFIGS, "a800-910b-32.yaml"), *JOB,
                                      "--out", str(out))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("hetero run: error: cluster 'a800-910b-32' names hosts that are not this machine")
    # Every host of the file but this machine's own (a CI machine may well be 192.0.2.x).
    expected = [h for h in ("192.0.2.1", "192.0.2.2", "198.51.100.1", "198.51.100.2") if not is_this_machine(h)]
    assert "198.51.100.1" in expected and f"({', '.join(expected)})" in line
    assert "--on ray|slurm" in line and "hetero launch --node HOST" in line
    assert not out.exists()   # refused before the run directory was made


def test_refusal_names_a_few_hosts_and_counts_the_rest(hetero_cli, tmp_path):
    code, _, stderr = hetero_cli("run", "--cluster", os.path.join(CONFIGS, "a800-910b-kunlun-1024.yaml"), *JOB,
                                 "--out", str(tmp_path / "run"))
    assert code == 2
    foreign = foreign_hosts(cluster(os.path.join(CONFIGS, "a800-910b-kunlun-1024.yaml")))
    assert len(foreign) >= 127
    assert f"({', '.join(foreign[:5])} and {len(foreign) - 5} more)" in stderr


def test_loopback_aliases_and_this_hosts_names_are_this_machine():
    assert foreign_hosts(cluster(os.path.join(FIXTURES, "launch", "two-node.yaml"))) == []   # 127.0.0.2, .3
    assert foreign_hosts(cluster(os.path.join(CONFIGS, "emulated-mixed.yaml"))) == []
    for host in ("localhost", "127.9.8.7", "::1", socket.gethostname()):
        assert is_this_machine(host), host


def test_other_addresses_are_not_this_machine():
    # Documentation ranges (RFC 5737) and a name that resolves nowhere.
    for host in ("198.51.100.1", "203.0.113.7", "no-such-host.invalid"):
        assert not is_this_machine(host), host


def test_a_mix_lists_only_the_other_hosts(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("name: mixed\ncoordinator: {host: 127.0.0.1, port: 29400}\nislands:\n"
                    "  - {name: here, accelerator: cpu, chip: cpu, nodes: [{host: 127.0.0.1, chips: 1}]}\n"
                    "  - {name: there, accelerator: cpu, chip: cpu, nodes: [{host: 192.0.2.9, chips: 1}]}\n")
    assert foreign_hosts(cluster(str(path))) == ["192.0.2.9"]


@pytest.mark.parametrize("text, expected", [
    ("ray", Target("ray")), ("RAY", Target("ray")), ("ray=10.0.0.1:6379", Target("ray", "10.0.0.1:6379")),
    ("ray=ray://head:10001", Target("ray", "ray://head:10001")), ("slurm", Target("slurm")),
])
def test_on_parses_engines_and_addresses(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["k8s", "", "ray=", "slurm=node1"])
def test_on_refuses_other_values(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_target(text)
