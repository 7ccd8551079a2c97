"""Issue 16's round trip through the user path: `hetero run --model TINY_HF_DIR` on the default
emulated mixed fleet, `hetero export` of the run, `from_pretrained` in transformers. The exported
model's logits equal hetero's own forward of the same checkpoint, and, with a learning rate so small
that no weight moves, the original HF model's (fp32, within 1e-5)."""

import os

import pytest
import torch
import transformers

from tests.hetero.export.test_export import assert_transformers_matches
from tests.hetero.launch.test_launch import free_port_block
from tests.hetero.model.test_model_hf import save_tiny_llama
from tests.conftest import ROOT



@pytest.mark.slow
def test_an_hf_start_exports_back_to_transformers_unchanged(tmp_path, hetero_cli):
    hf_dir = str(tmp_path / "tiny-llama")
    original = save_tiny_llama(hf_dir)
    config = open(os.path.join(ROOT, "configs", "emulated-mixed.yaml"), encoding="utf-8").read()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(config.replace("port: 29400", f"port: {free_port_block(8)}"))
    train = open(os.path.join(ROOT, "configs", "train-tiny.yaml"), encoding="utf-8").read()
    still = tmp_path / "train.yaml"           # AdamW moves a weight by about lr: 1e-20 is below fp32's step
    still.write_text(train.replace("lr: 3.0e-4", "lr: 1.0e-20"))
    run_dir, out_dir = str(tmp_path / "run"), str(tmp_path / "exported")
    code, _, err = hetero_cli("run", "--cluster", str(cluster), "--model", hf_dir, "--train", str(still),
                              "--steps", "2", "--out", run_dir)
    assert code == 0, err
    code, _, err = hetero_cli("export", run_dir, "--hf", out_dir)
    assert code == 0, err

    vocab = original.config.vocab_size
    assert_transformers_matches(os.path.join(run_dir, "checkpoints"), out_dir, vocab)
    exported = transformers.LlamaForCausalLM.from_pretrained(out_dir).eval()
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = original(tokens).logits, exported(tokens).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5
