"""Loading the example descriptions into frozen dataclasses, and the rules across files."""

import dataclasses
import os

import pytest

from hetero.config import load_files, load_job, load_sections
from hetero.config.catalog import load_catalog
from hetero.errors import ConfigError, UserError


def example(configs_dir, name):
    return os.path.join(configs_dir, name)


def test_examples_all_validate(configs_dir, hetero_cli):
    for name in sorted(os.listdir(configs_dir)):
        code, out, err = hetero_cli("validate", example(configs_dir, name))
        assert code == 0, err
        assert out.startswith("ok")


def test_default_fleet(configs_dir):
    job = load_job(cluster=example(configs_dir, "emulated-mixed.yaml"),
                   model=example(configs_dir, "llama-tiny.yaml"), train=example(configs_dir, "train-tiny.yaml"))
    cluster = job.cluster
    assert [i.name for i in cluster.islands] == ["fast", "slow"]
    assert cluster.islands[0].backend == "hetero-strict"  # the emulated accelerator's default
    assert cluster.total_chips == 4
    assert cluster.coordinator.host == "127.0.0.1" and not cluster.coordinator.bind_all
    assert cluster.network.bridge.transport == "auto"
    assert cluster.network.intra_node_latency_us == 1000 and cluster.network.inter_node_latency_us == 10
    assert job.model.head_dim == 32 and job.model.kv_heads == 2
    assert job.train.checkpoint.dir == os.path.join(configs_dir, "checkpoints")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cluster.name = "other"


def test_default_model_does_not_fit_one_emulated_chip(configs_dir):
    """The default fleet must force pipeline or tensor parallelism."""
    model = load_sections(example(configs_dir, "llama-tiny.yaml"))["model"]
    params = model.layers * (2 * model.hidden ** 2 + 2 * model.hidden * model.hidden // model.heads * model.kv_heads
                             + 3 * model.hidden * model.ffn_hidden) + 2 * model.vocab * model.hidden
    training_bytes = params * 16   # fp32 weights, grads, two AdamW moments
    largest = max(chip.memory_gb for chip in load_catalog().values() if chip.emulated)
    assert training_bytes > largest * 1e9


def test_big_examples(configs_dir):
    cluster = load_sections(example(configs_dir, "a800-910b-kunlun-1024.yaml"))["cluster"]
    assert cluster.total_chips == 1024
    assert {i.chip for i in cluster.islands} == {"A800-80G", "Ascend-910B", "Kunlun-P800"}
    assert {i.backend for i in cluster.islands} == {"nccl", "hccl"}
    hosts = [n.host for i in cluster.islands for n in i.nodes]
    assert all(h.startswith(("192.0.2.", "198.51.100.", "203.0.113.")) for h in hosts)
    assert load_sections(example(configs_dir, "a800-910b-32.yaml"))["cluster"].total_chips == 32


def test_one_file_with_three_sections_equals_three_files(configs_dir, tmp_path):
    combined = tmp_path / "job.yaml"
    text = ""
    for kind, name in (("cluster", "emulated-mixed.yaml"), ("model", "llama-tiny.yaml"), ("train", "train-tiny.yaml")):
        body = open(example(configs_dir, name), encoding="utf-8").read()
        text += f"{kind}:\n" + "".join(f"  {line}\n" for line in body.splitlines())
    combined.write_text(text.replace("dir: checkpoints", f"dir: {os.path.join(configs_dir, 'checkpoints')}"))
    one = load_files([str(combined)])
    three = load_files([example(configs_dir, n) for n in ("emulated-mixed.yaml", "llama-tiny.yaml", "train-tiny.yaml")])
    assert one.cluster == three.cluster and one.model == three.model
    assert dataclasses.replace(one.train, checkpoint=None) == dataclasses.replace(three.train, checkpoint=None)
    # --cluster/--model/--train may all name the same combined file.
    same = load_job(cluster=str(combined), model=str(combined), train=str(combined))
    assert same.model == three.model


def test_custom_chip_inline(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("""
name: custom
coordinator: {host: localhost, port: 1234}
islands:
  - name: mine
    accelerator: cuda
    chip: my-gpu
    backend: gloo
    nodes: [{host: 127.0.0.2, chips: 4}, {host: 127.0.0.3, chips: 4}]
chips:
  my-gpu:
    accelerator: cuda
    tflops: {bf16: 100, fp32: 20}
    memory_gb: 24
    memory_bandwidth_gbps: 900
    intra_node_gbps: 64
""")
    cluster = load_sections(str(path))["cluster"]
    chip = cluster.chip("my-gpu")
    assert chip.peak_flops("bf16") == 100e12 and chip.peak_flops("fp8") == 20e12
    assert cluster.islands[0].backend == "gloo" and cluster.islands[0].size == 8


def test_custom_chip_may_not_shadow_catalog(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ncoordinator: {host: 127.0.0.1, port: 1}\n"
                    "islands: [{name: a, accelerator: cuda, chip: H200, nodes: [{host: h, chips: 1}]}]\n"
                    "chips:\n  H200: {accelerator: cuda, tflops: {bf16: 1}, memory_gb: 1, "
                    "memory_bandwidth_gbps: 1, intra_node_gbps: 1}\n")
    with pytest.raises(ConfigError, match="already in the catalog"):
        load_sections(str(path))


def test_two_clusters_are_refused(configs_dir):
    with pytest.raises(ConfigError, match="already described"):
        load_files([example(configs_dir, "emulated-mixed.yaml"), example(configs_dir, "a800-910b-32.yaml")])


def test_cross_file_rule_model_too_big_for_chip(configs_dir):
    with pytest.raises(ConfigError, match="cannot hold even one layer"):
        load_files([example(configs_dir, "emulated-mixed.yaml"), example(configs_dir, "llama2-70b.yaml")])


def test_wrong_kind_for_flag(configs_dir):
    with pytest.raises(ConfigError, match="cannot tell|missing required"):
        load_job(cluster=example(configs_dir, "llama-tiny.yaml"))
    with pytest.raises(UserError, match="no train description"):
        load_job(model=example(configs_dir, "llama-tiny.yaml")).require("model", "train")


def test_validate_json(configs_dir, hetero_cli):
    import json

    code, out, _ = hetero_cli("validate", "--json", example(configs_dir, "emulated-mixed.yaml"),
                              example(configs_dir, "llama-tiny.yaml"))
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["combined"]["ok"]
    assert [f["describes"] for f in report["files"]] == [["cluster"], ["model"]]
