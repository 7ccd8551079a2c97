"""Tensor parallelism across real processes (gloo on 127.0.0.1): tp=2 and tp=4
give the tp=1 logits, loss and full gradients; vocab-parallel cross-entropy
equals F.cross_entropy on the full logits."""

import datetime
import multiprocessing as mp
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hetero.config.model import ModelConfig
from hetero.model import LlamaStage, TensorParallel, full_state_dict, vocab_parallel_cross_entropy
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(180)

WORLD = 4
SEED = 1234
UNTIED = ModelConfig(layers=2, hidden=64, heads=8, kv_heads=4, ffn_hidden=128, vocab=128, seq_len=16)
TIED = ModelConfig(**{**UNTIED.__dict__, "tie_embeddings": True})


def batch():
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, UNTIED.vocab, (2, 9), generator=generator)
    labels = torch.randint(0, UNTIED.vocab, (2, 9), generator=generator)
    labels[0, :2] = -100  # ignored positions count for nothing
    return tokens, labels


def wild_logits():
    # Large values: the loss must shift by the GLOBAL max across vocab shards.
    return 30 * torch.randn(3, 5, UNTIED.vocab, generator=torch.Generator().manual_seed(4))


def run_stage(config, tp, gather_logits=False):
    """Forward + loss + backward; everything as full tensors (collective)."""
    tokens, labels = batch()
    stage = LlamaStage(config, tp=tp, seed=SEED)
    logits = stage(tokens, gather_logits=gather_logits)
    if gather_logits:  # the gather's backward is exercised through F.cross_entropy
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        full_logits = logits.detach()
    else:
        loss = stage.loss(logits, labels)
        full_logits = tp.all_gather(logits.detach(), dim=-1)
    loss.backward()
    grads = full_state_dict(stage, grads=True)
    return {"logits": full_logits, "loss": loss.detach().reshape(1),
            **{f"grad/{name}": g for name, g in grads.items()}}


def run_loss(tp):
    logits = tp.shard(wild_logits(), -1).clone().requires_grad_()
    labels = batch()[1][:, :5].repeat(2, 1)[:3]
    loss = vocab_parallel_cross_entropy(logits, labels, tp, reduction="sum")
    loss.backward()
    return {"loss": loss.detach().reshape(1), "grad": tp.all_gather(logits.grad, dim=-1)}


def _worker(rank, port, outdir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        pair = TensorParallel.from_group(pairs[rank // 2])
        quad = TensorParallel.from_group(None)
        # Ranks 0-1: untied model at tp=2; ranks 2-3: tied model at tp=2, logits gathered.
        results = {
            "tp2": run_stage(UNTIED, pair) if rank < 2 else run_stage(TIED, pair, gather_logits=True),
            "tp4": run_stage(UNTIED, quad),
            "loss4": run_loss(quad),
        }
        for key, tensors in results.items():
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      os.path.join(outdir, f"{key}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("tp"))
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, outdir), daemon=True) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(120)
        codes = [proc.exitcode for proc in procs]
        assert codes == [0] * WORLD, f"TP workers exited with {codes}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)

    def read(key, rank):
        return load_file(os.path.join(outdir, f"{key}-rank{rank}.safetensors"))

    return read


def assert_same(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)


def test_tp2_and_tp4_match_tp1(tp_results):
    expected = run_stage(UNTIED, TensorParallel())
    assert expected["grad/model.layers.1.self_attn.k_proj.weight"].abs().sum() > 0
    for rank in (0, 1):
        assert_same(tp_results("tp2", rank), expected)
    for rank in range(WORLD):
        assert_same(tp_results("tp4", rank), expected)


def test_tied_tp2_with_gathered_logits_matches_tp1(tp_results):
    expected = run_stage(TIED, TensorParallel(), gather_logits=True)
    assert "grad/lm_head.weight" not in expected  # the head's gradient lands on the embedding
    for rank in (2, 3):
        assert_same(tp_results("tp2", rank), expected)


def test_stage_loss_is_cross_entropy_of_the_full_logits(tp_results):
    tokens, labels = batch()
    logits = tp_results("tp4", 1)["logits"]
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(tp_results("tp4", 1)["loss"][0], expected, atol=1e-5, rtol=1e-5)


def test_vocab_parallel_cross_entropy_across_4_ranks(tp_results):
    logits = wild_logits().requires_grad_()
    labels = batch()[1][:, :5].repeat(2, 1)[:3]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    for rank in range(WORLD):
        got = tp_results("loss4", rank)
        torch.testing.assert_close(got["loss"][0], loss.detach(), atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(got["grad"], logits.grad, atol=1e-6, rtol=1e-5)


# -- single process (tp=1): the loss's own math -------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    logits = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    labels = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(1))
    labels[1, 3] = labels[2, 0] = -100
    ours = vocab_parallel_cross_entropy(logits, labels, reduction=reduction)
    (ours.sum() if reduction == "none" else ours).backward()
    ours_grad, logits.grad = logits.grad, None
    theirs = F.cross_entropy(logits.transpose(1, 2), labels, reduction=reduction)
    (theirs.sum() if reduction == "none" else theirs).backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, logits.grad)


def test_cross_entropy_of_bf16_logits_is_computed_in_fp32():
    logits = (10 * torch.randn(8, 64)).to(torch.bfloat16).requires_grad_()
    labels = torch.arange(8)
    loss = vocab_parallel_cross_entropy(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), labels))
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
