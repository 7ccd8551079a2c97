"""`hetero compare`: hetero's model against transformers on a tiny random Llama made
here (nothing is downloaded): every row agrees in fp32, and a layer corrupted on
hetero's side is the first one flagged."""

import json
import os
import sys
import tempfile

import pytest
import torch
import transformers  # test-only dependency (pyproject: dev)

from hetero.cli import main
from hetero.compare import local
from hetero.compare.diff import compare_traces
from hetero.model.hf import load_hf_stage, read_hf_config
from tests.conftest import FIXTURES, ROOT

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    with torch.no_grad():   # HF inits norms to ones: perturb them so a mix-up would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def run_cli(capsys, *argv):
    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_row_agrees_in_fp32(tiny, capsys):
    code, out, _ = run_cli(capsys, "--model", tiny, "--json", "--seq-len", "16", "--local")
    result = json.loads(out)
    assert code == 0 and result["first_flagged"] is None and result["rtol"] == 1e-5
    names = [row["name"] for row in result["rows"]]
    assert names[:6] == ["embed", "layer 0", "layer 1", "layer 2", "final norm", "logits"]
    assert names[6:] == ["loss", "embed", "layer 0", "layer 1", "layer 2", "final norm", "lm_head"]
    assert all(row["max_rel"] <= 1e-5 for row in result["rows"]) and result["worst_rel_diff"] <= 1e-5
    loss = next(row for row in result["rows"] if row["kind"] == "loss")
    assert abs(loss["ours"] - loss["transformers"]) <= 1e-5 * loss["transformers"]


def test_a_corrupted_layer_is_the_first_flagged(tiny):
    config = read_hf_config(tiny)
    tokens, labels = local.first_batch(config, batch=2, seq_len=16, seed=0)
    theirs = local.transformers_trace(tiny, "fp32", tokens, labels)
    stage = corrupted(tiny)
    result = compare_traces(local.hetero_trace(stage, tokens, labels), theirs, rtol=1e-5)
    assert result["first_flagged"] == "layer 1" and result["first_flagged_kind"] == "forward"
    rows = {(row["kind"], row["name"]): row for row in result["rows"]}
    assert rows[("forward", "layer 0")]["ok"] and not rows[("forward", "layer 2")]["ok"]


def corrupted(directory):
    stage = load_hf_stage(directory)
    with torch.no_grad():
        stage.model.layers["1"].mlp.down_proj.weight.mul_(1.01)
    return stage


def test_cli_flags_it_and_exits_1(tiny, capsys, monkeypatch):
    monkeypatch.setattr(local, "load_hf_stage", lambda directory, dtype: corrupted(directory))
    code, out, _ = run_cli(capsys, "--model", tiny, "--seq-len", "8", "--local")
    assert code == 1
    layer1 = next(line for line in out.splitlines() if line.strip().startswith("layer 1"))
    assert layer1.endswith("<-- beyond rtol")
    assert "first beyond rtol: layer 1 (forward)" in out and "rtol 1e-05 (the default for fp32)" in out


def test_bf16_uses_its_looser_default(tiny, capsys):
    code, out, _ = run_cli(capsys, "--model", tiny, "--json", "--dtype", "bf16", "--seq-len", "8", "--local")
    result = json.loads(out)
    assert code == 0 and result["rtol"] == 5e-2 and 0 < result["worst_rel_diff"] <= 5e-2


def test_missing_transformers_and_bad_model_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "absent"))
    assert code == 2 and err.count("\n") == 1 and "no such directory" in err
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err = run_cli(capsys, "--model", tiny)
    assert code == 2 and err.count("\n") == 1 and "pip install transformers" in err


def test_local_refuses_fleet_flags(tiny, capsys):
    code, _, err = run_cli(capsys, "--model", tiny, "--local", "--plan", "p.json")
    assert code == 2 and "--local runs in one process" in err
    code, _, err = run_cli(capsys, "--model", tiny, "--local", "--kind", "hybrid")
    assert code == 2 and "--kind" in err and err.count("\n") == 1


def test_kind_offers_every_kind_run_trains():
    """`hetero compare --kind` and `hetero run --kind` take the same choices (runner.KINDS)."""
    from hetero.cli import build_parser
    from hetero.runner import KINDS

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices  # pylint: disable=protected-access
    kinds = {name: next(a for a in commands[name]._actions if a.dest == "kind").choices  # pylint: disable=protected-access
             for name in ("compare", "run")}
    assert sorted(kinds["compare"]) == sorted(kinds["run"]) == sorted(KINDS) and "hybrid" in KINDS


def test_kind_hybrid_on_two_islands_is_one_line_and_leaves_no_folder(tiny, tmp_path, capsys, monkeypatch):
    """The default fleet has two islands: no hybrid plan exists, so one line and exit 2, as `hetero
    run --kind hybrid` says it; neither the scratch folder nor a fresh --out is left behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, out, err = run_cli(capsys, "--model", tiny, "--kind", "hybrid")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--kind hybrid: a hybrid plan needs at least three islands" in err and "has 2 (fast, slow)" in err
    assert os.listdir(scratch) == []
    code, _, err = run_cli(capsys, "--model", tiny, "--kind", "hybrid", "--out", str(tmp_path / "run"))
    assert code == 2 and "at least three islands" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fleet_hetero_dp_with_pipeline_and_tp_agrees(tiny, tmp_path, capsys):
    """The default emulated fleet under a hetero-DP plan (a two-stage pipeline on one island,
    TP 2 on the other): the hidden states the ranks saw, put back together, the fleet-wide
    loss and per-layer gradient norms all equal transformers' within 1e-5."""
    from tests.hetero.launch.test_launch import free_port_block

    config = open(os.path.join(ROOT, "configs", "emulated-mixed.yaml"), encoding="utf-8").read()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(config.replace("port: 29400", f"port: {free_port_block(8)}"))
    code, out, _ = run_cli(capsys, "--model", tiny, "--cluster", str(cluster), "--kind", "replicas",
                           "--batch", "4", "--seq-len", "32", "--out", str(tmp_path / "run"), "--json")
    result = json.loads(out)
    assert code == 0 and result["first_flagged"] is None and result["worst_rel_diff"] <= 1e-5
    assert "->" in result["where"] and "tp2" in result["where"]
    assert [row["name"] for row in result["rows"]][:6] == ["embed", "layer 0", "layer 1", "layer 2",
                                                            "final norm", "logits"]
    assert len(os.listdir(tmp_path / "run" / "compare")) > 2      # each rank's file and the totals


def three_islands(tmp_path) -> str:
    """tests/fixtures/engine/emulated-three-islands.yaml (a: 2 chips, b: 1, c: 1) on a free port."""
    from tests.hetero.launch.test_launch import free_port_block

    text = open(os.path.join(FIXTURES, "engine", "emulated-three-islands.yaml"), encoding="utf-8").read()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(text.replace("port: 29731", f"port: {free_port_block(8)}"))
    return str(cluster)


def assert_every_row_agrees(result: dict) -> None:
    assert result["first_flagged"] is None and result["worst_rel_diff"] <= 1e-5
    assert [row["name"] for row in result["rows"]][:6] == ["embed", "layer 0", "layer 1", "layer 2",
                                                            "final norm", "logits"]
    assert [row["name"] for row in result["rows"] if row["kind"] == "grad_norm"] == [
        "embed", "layer 0", "layer 1", "layer 2", "final norm", "lm_head"]


@pytest.mark.slow
def test_fleet_hybrid_plan_of_the_planner_agrees(tiny, tmp_path, capsys):
    """--kind hybrid on three islands: the planner's hybrid plan (a pipeline over two islands beside
    one on the third, the batch split unevenly) gives transformers' numbers within 1e-5."""
    code, out, _ = run_cli(capsys, "--model", tiny, "--cluster", three_islands(tmp_path), "--kind", "hybrid",
                           "--batch", "3", "--seq-len", "32", "--out", str(tmp_path / "run"), "--json")
    result = json.loads(out)
    assert code == 0
    assert_every_row_agrees(result)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["kind"] == "hybrid" and len(plan["pipelines"]) == 2
    assert " + " in result["where"] and "->" in result["where"]


@pytest.mark.slow
def test_fleet_hybrid_plan_with_tp_agrees(tiny, tmp_path, capsys):
    """A hybrid plan file: a (TP 2, layers 0-1) -> b (layer 2) on 3 samples, c alone on 1. The
    logits of the first pipeline's samples come in two vocab slices, the other's in one; the
    gradients are summed over the two pipelines as the run sums them. All within 1e-5."""
    from tests.hetero.engine.test_hybrid_fleet import make_hybrid_plan

    from hetero.compare.fleet import _job_files
    from hetero.config import load_job

    cluster = three_islands(tmp_path)
    files = _job_files(str(tmp_path), read_hf_config(tiny), "fp32", 4, 32, 0)
    job = load_job(cluster=cluster, model=files["model"], train=files["train"])
    plan = make_hybrid_plan(job, [([("a", 2, 1, (0, 2), 0), ("b", 1, 1, (2, 3), 0)], 3),
                                  ([("c", 1, 1, (0, 3), 0)], 1)], micro_batch=1)
    (tmp_path / "plan.json").write_text(plan.to_json())
    code, out, _ = run_cli(capsys, "--model", tiny, "--cluster", cluster, "--plan", str(tmp_path / "plan.json"),
                           "--kind", "hybrid", "--batch", "4", "--seq-len", "32", "--out", str(tmp_path / "run"),
                           "--json")
    result = json.loads(out)
    assert code == 0
    assert_every_row_agrees(result)
    assert "tp2" in result["where"] and " + " in result["where"]
    tp = {torch.load(tmp_path / "run" / "compare" / name)["tp"]
          for name in os.listdir(tmp_path / "run" / "compare") if name.endswith(".pt")}
    assert tp == {1, 2}
