"""`hetero run --model TINY_HF_DIR` on the default emulated mixed fleet (issue 16 item 1's
user path): it trains from the HF weights (step 1's loss is transformers' within 1e-5),
the run directory records the source (plan.json, model.yaml, the checkpoint's state.json)
without copying the weights, and `hetero run --resume` goes on from the run's own
checkpoint after the HF weights are gone."""

import json
import os
import shutil

import pytest

from hetero.config import load_job
from hetero.engine import checkpoint as ckpt
from tests.hetero.engine.test_hf_start import transformers_loss
from tests.hetero.launch.test_launch import free_port_block
from tests.hetero.model.test_model_hf import save_tiny_llama
from tests.conftest import ROOT

TRAIN = os.path.join(ROOT, "configs", "train-tiny.yaml")


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics", "steps.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_hetero_run_from_an_hf_directory_trains_records_it_and_resumes_without_it(tmp_path, hetero_cli, capsys):
    hf_dir = str(tmp_path / "tiny-llama")
    save_tiny_llama(hf_dir)
    config = open(os.path.join(ROOT, "configs", "emulated-mixed.yaml"), encoding="utf-8").read()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(config.replace("port: 29400", f"port: {free_port_block(8)}"))
    run_dir = str(tmp_path / "run")
    code, _, err = hetero_cli("run", "--cluster", str(cluster), "--model", hf_dir, "--train", TRAIN,
                              "--steps", "3", "--out", run_dir)
    assert code == 0, err
    losses = [r["loss"] for r in _records(run_dir)]
    job = load_job(model=hf_dir, train=TRAIN)
    theirs = transformers_loss(hf_dir, job.train, job.model.seq_len)
    with capsys.disabled():
        print(f"\nfleet step 1 loss: hetero {losses[0]:.8f}, transformers {theirs:.8f}, "
              f"diff {abs(losses[0] - theirs):.2e}; losses {losses}")
    assert len(losses) == 3 and abs(losses[0] - theirs) <= 1e-5 and losses[-1] < losses[0]

    source = job.pretrained.to_dict()
    with open(os.path.join(run_dir, "plan.json"), encoding="utf-8") as handle:
        assert json.load(handle)["provenance"]["pretrained"] == source
    kept = load_job(model=os.path.join(run_dir, "model.yaml"))
    assert (kept.model, kept.pretrained) == (job.model, job.pretrained)
    root = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt.step_dir(root, ckpt.pointed_step(root)), "state.json"), encoding="utf-8") as handle:
        assert json.load(handle)["pretrained"] == source
    weights = [f for _, _, files in os.walk(run_dir) for f in files if f.startswith("model") and
               f.endswith(".safetensors")]
    assert weights == []                                  # the HF weights are never copied

    shutil.rmtree(hf_dir)                                 # a resume must not need them
    code, _, err = hetero_cli("run", "--resume", run_dir, "--steps", "4")
    assert code == 0, err
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
