"""Starting a run from a Hugging Face Llama directory (issue 16 item 1), on a tiny random
model made here with transformers (nothing is downloaded): the directory is a model
wherever a model file is, its weights load before step 1 (step 1's loss is transformers'),
bf16's master weights are the loaded fp32 ones, a resume reads the run's own checkpoint
and never the HF weights, and a bad directory is one line, exit 2."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
import transformers  # test-only dependency (pyproject: dev)

import accelerators
from hetero.config import load_job
from hetero.config.model import model_text
from hetero.engine.comms import Comms
from hetero.engine.solo import single_chip_plan
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from hetero.engine.zero import FlatShard
from hetero.errors import UserError
from hetero.model.hf import read_hf_config
from hetero.plan_check import check_plan
from hetero.planning import plan_job
from tests.hetero.model.test_model_hf import TINY, save_tiny_llama
from tests.conftest import ROOT

TRAIN = """\
global_batch: 4
micro_batch: 2
dtype: {dtype}
steps: 3
lr: 1.0e-3
seed: 5
checkpoint: {{dir: checkpoints, every: 1}}
data: synthetic
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(directory)
    return str(directory)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _job(tmp_path, hf_dir, dtype="fp32", seq_len=16):
    model = _write(tmp_path / "model.yaml", f"model:\n  hf: {os.path.relpath(hf_dir, tmp_path)}\n  seq_len: {seq_len}\n")
    train = _write(tmp_path / "train.yaml", TRAIN.format(dtype=dtype))
    return load_job(model=model, train=train)


def _solo_trainer(job, run_dir, steps, log=None):
    accel = accelerators.get_accelerator("cpu")
    comms = Comms.solo(Topology(single_chip_plan(job.model, job.train)), accel.device(0))
    train = dataclasses.replace(job.train, checkpoint=dataclasses.replace(job.train.checkpoint,
                                                                          dir=str(run_dir / "checkpoints")))
    return Trainer(comms, accel, job.model, train, str(run_dir), steps=steps, log=log or (lambda line: None),
                   pretrained=job.pretrained)


def _losses(run_dir):
    with open(run_dir / "metrics" / "steps.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["loss"] for line in handle]


def transformers_loss(hf_dir, train, seq_len):
    """transformers' mean next-token loss on step 1's global batch of the synthetic stream."""
    from hetero.compare.local import first_batch

    tokens, labels = first_batch(read_hf_config(hf_dir), train.global_batch, seq_len, train.seed)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


# -- the model description -------------------------------------------------------------------

def test_a_directory_is_a_model_and_its_source_is_recorded(tiny):
    job = load_job(model=tiny)
    config = read_hf_config(tiny)
    assert job.model == dataclasses.replace(config, name=os.path.basename(tiny))
    assert job.pretrained.hf == os.path.abspath(tiny)
    assert job.pretrained.fingerprint.startswith("sha256:") and len(job.pretrained.fingerprint) == 71
    assert load_job(model=tiny).pretrained == job.pretrained            # the same directory, the same print


def test_model_section_hf_takes_a_relative_path_and_a_shorter_seq_len(tiny, tmp_path):
    job = _job(tmp_path, tiny, seq_len=16)
    assert job.model.seq_len == 16 and job.model.layers == TINY["num_hidden_layers"]
    assert job.pretrained.hf == os.path.abspath(tiny)
    too_long = _write(tmp_path / "long.yaml", f"hf: {tiny}\nseq_len: {TINY['max_position_embeddings'] + 1}\n")
    with pytest.raises(UserError, match="seq_len"):
        load_job(model=too_long)


def test_the_kept_model_file_stands_without_the_directory(tiny, tmp_path):
    """What a run directory keeps (model_text): the architecture field by field and the source; it
    loads to the same job after the HF directory is gone (a resume never needs its weights)."""
    copy = shutil.copytree(tiny, tmp_path / "copy")
    job = load_job(model=str(copy))
    kept = _write(tmp_path / "kept.yaml", model_text(job.model, job.pretrained))
    shutil.rmtree(copy)
    again = load_job(model=kept)
    assert (again.model, again.pretrained) == (job.model, job.pretrained)


def test_a_changed_directory_is_refused(tiny, tmp_path):
    stale = _write(tmp_path / "stale.yaml", f"hf: {tiny}\nfingerprint: sha256:{'0' * 64}\n")
    with pytest.raises(UserError, match="has changed since it was recorded"):
        load_job(model=stale)


def test_the_plan_records_the_source_and_refuses_it_changed(tiny, tmp_path):
    copy = str(shutil.copytree(tiny, tmp_path / "copy"))
    files = {kind: os.path.join(ROOT, "configs", name) for kind, name in
             (("cluster", "emulated-mixed.yaml"), ("train", "train-tiny.yaml"))}
    job = load_job(model=copy, **files)
    plan = plan_job(job).best
    assert plan.to_dict()["provenance"]["pretrained"] == job.pretrained.to_dict()
    check_plan(plan, job, "plan.json")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    (tmp_path / "copy" / "config.json").write_text(json.dumps({**config, "bos_token_id": 7}))
    with pytest.raises(UserError, match="has changed since the plan was made"):
        check_plan(plan, load_job(model=copy, **files), "plan.json")


# -- bad directories: one line, exit 2, before anything starts ----------------------------------

def _broken(kind, tiny, tmp_path):
    target = tmp_path / kind
    if kind == "no-config":
        shutil.copytree(tiny, target)
        os.remove(target / "config.json")
    elif kind == "not-llama":
        shutil.copytree(tiny, target)
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    else:   # a sharded checkpoint whose index names a shard that is gone
        model = transformers.LlamaForCausalLM.from_pretrained(tiny)
        model.save_pretrained(str(target), safe_serialization=True, max_shard_size="100KB")
        shards = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
        assert len(shards) > 1
        os.remove(target / shards[-1])
    return str(target)


@pytest.mark.parametrize("kind, words", [("no-config", "config.json"), ("not-llama", "model_type"),
                                         ("missing-shard", "missing")])
def test_a_bad_directory_is_one_line_exit_2(kind, words, tiny, tmp_path, hetero_cli, capsys):
    bad = _broken(kind, tiny, tmp_path)
    capsys.readouterr()     # transformers' progress bars, writing the broken copy
    code, out, err = hetero_cli("plan", "--cluster", os.path.join(ROOT, "configs", "emulated-mixed.yaml"),
                                "--model", bad, "--train", os.path.join(ROOT, "configs", "train-tiny.yaml"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err


# -- the trainer: weights before step 1, and a resume that never reads them again -------------------

def test_step_one_loss_is_transformers_loss(tiny, tmp_path):
    job = _job(tmp_path, tiny)
    _solo_trainer(job, tmp_path / "run", steps=1).run()
    ours, theirs = _losses(tmp_path / "run")[0], transformers_loss(tiny, job.train, 16)
    print(f"\nstep 1 loss: hetero {ours:.8f}, transformers {theirs:.8f}, diff {abs(ours - theirs):.2e}")
    assert abs(ours - theirs) <= 1e-5


def test_bf16_master_weights_are_the_loaded_fp32_weights(tiny, tmp_path):
    job = _job(tmp_path, tiny, dtype="bf16")
    trainer = _solo_trainer(job, tmp_path / "run", steps=1)
    full = transformers.LlamaForCausalLM.from_pretrained(tiny).state_dict()
    weights = {name: full[trainer.model.hf_name(name)].float() for name in trainer.params}
    assert all(torch.equal(p.detach(), weights[n].to(torch.bfloat16)) for n, p in trainer.params.items())
    flat = FlatShard(trainer.params).flatten(weights, torch.float32, "cpu")
    assert torch.equal(trainer.optimizer.master[:flat.numel()], flat)      # not the bf16 rounding
    assert not torch.equal(flat, flat.to(torch.bfloat16).float())


def test_a_resume_reads_the_runs_checkpoint_not_the_hf_weights(tiny, tmp_path):
    copy = str(shutil.copytree(tiny, tmp_path / "copy"))
    job = _job(tmp_path, copy)
    lines = []
    _solo_trainer(job, tmp_path / "run", steps=2, log=lines.append).run()
    assert any("started from the Hugging Face model" in line for line in lines)
    for name in os.listdir(copy):        # the weights are gone: reading them now would fail
        if name.endswith(".safetensors"):
            os.remove(os.path.join(copy, name))
    kept = load_job(model=_write(tmp_path / "kept.yaml", model_text(job.model, job.pretrained)),
                    train=str(tmp_path / "train.yaml"))
    lines.clear()
    resumed = _solo_trainer(kept, tmp_path / "run", steps=3, log=lines.append)
    assert resumed.start_step == 2 and any("resumed from" in line for line in lines)
    resumed.run()
    assert len(_losses(tmp_path / "run")) == 3
