"""Sharded checkpoints, single process on synthetic shards: every rank writes only what it owns
(TP slices, ZeRO-1 flat pieces cut into boxes), the metadata says where each chunk is, and a
load under another layout (TP 2 -> 1, ZeRO-1 on -> off, other stages, fp32 master copies)
reconstructs the same tensors bit for bit, reading only the files it needs."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from hetero.bench.checkpoint import random_state, rank_optimizer
from hetero.checkpoint import format as fmt
from hetero.config import load_job
from hetero.engine import checkpoint as ckpt
from hetero.model import TensorParallel, layout
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")
STEP = 6


@pytest.fixture(scope="module")
def model():
    return load_job(model=CONFIG, train=CONFIG).model


@pytest.fixture(scope="module")
def full(model):
    """{name: full fp32 tensor} of the weights and both moments, random (the bits are the test)."""
    return random_state(model, seed=5)


optimizer = rank_optimizer    # a rank's AdamW set up without the checkpoint code (TP cut, FlatShard)


def save(root, model, ranks):
    """Write and seal a checkpoint from {rank: optimizer}: each rank's own chunks, its report, the seal."""
    ckpt.prepare(str(root), STEP)
    for rank, made in ranks.items():
        chunks = made.own_chunks(lambda t: t.detach().clone(), list(made.params))
        assert ckpt.AsyncWrite(ckpt.partial_dir(str(root), STEP), rank, STEP, chunks).start().wait() is None
    ckpt.seal(str(root), STEP, model, {"optimizer_steps": STEP}, sorted(ranks))
    return ckpt.Checkpoint(ckpt.latest(str(root)), model)


@pytest.fixture(scope="module")
def tp2_zero(tmp_path_factory, model, full):
    """Saved by TP 2 x DP 2 with ZeRO-1 (rank = 2 * dp_rank + tp_rank), one stage of the whole model."""
    names = layout.model_names(model)
    ranks = {2 * d + t: optimizer(model, full, names, TensorParallel(2, t), 2, d, zero=True)
             for d in range(2) for t in range(2)}
    return save(tmp_path_factory.mktemp("tp2-zero"), model, ranks)


def test_flat_boxes_are_contiguous_runs_that_cover_the_range():
    for start, stop in [(0, 12), (5, 6), (3, 17), (4, 8), (7, 24), (0, 1)]:
        boxes = fmt.flat_boxes((6, 4), start, stop)
        covered = []
        for at, (row, col), (rows, cols) in boxes:
            assert at == row * 4 + col and (rows == 1 or cols == 4)
            covered += [r * 4 + c for r in range(row, row + rows) for c in range(col, col + cols)]
        assert covered == list(range(start, stop)), (start, stop, boxes)


def test_each_rank_writes_only_its_pieces_and_the_metadata_lists_every_chunk(tp2_zero, model, full):
    saved = tp2_zero
    assert sorted(saved.files) == [f"rank-0000{r}.safetensors" for r in range(4)]
    total = sum(4 * t.numel() for t in full.values())      # fp32 bytes of weights and moments
    on_disk = sum(os.path.getsize(os.path.join(saved.directory, f)) for f in saved.files)
    assert total <= on_disk < total * 1.02               # each element once, plus the headers
    state = json.loads(open(os.path.join(saved.directory, "state.json")).read())
    entry = state["tensors"]["exp_avg.model.layers.1.self_attn.o_proj.weight"]
    assert entry["shape"] == [64, 64] and entry["dtype"] == "float32"
    for chunk in entry["chunks"]:                       # TP splits o_proj's columns: a chunk is inside one half
        assert chunk["offsets"][1] + chunk["lengths"][1] <= 32 or chunk["offsets"][1] >= 32
        with safe_open(os.path.join(saved.directory, chunk["file"]), framework="pt") as handle:
            assert list(handle.get_slice(chunk["key"]).get_shape()) == chunk["lengths"]
    assert state["files"]["rank-00003.safetensors"]["sha256"] == ckpt.sha256(
        os.path.join(saved.directory, "rank-00003.safetensors"))
    assert torch.equal(saved.tensor("exp_avg_sq.lm_head.weight"), full["exp_avg_sq.lm_head.weight"])


@pytest.mark.parametrize("layout_name", ["tp1-two-stages", "tp2-no-zero", "tp1-zero3-bf16-master"])
def test_another_layout_loads_the_same_tensors_bit_for_bit(tp2_zero, model, full, layout_name):
    names = layout.model_names(model)
    if layout_name == "tp1-two-stages":        # TP 2 -> 1, ZeRO-1 on -> off, the model over two stages
        readers = [optimizer(model, full, names[:10], TensorParallel()),
                   optimizer(model, full, names[10:], TensorParallel())]
    elif layout_name == "tp2-no-zero":         # same TP, ZeRO-1 off: tp rank 0 reads tp rank 0's files only
        readers = [optimizer(model, full, names, TensorParallel(2, 0))]
    else:                                      # ZeRO-1 over 3 with bf16 parameters and fp32 master shards
        readers = [optimizer(model, full, names, TensorParallel(), 3, d, zero=True, dtype=torch.bfloat16)
                   for d in range(3)]
    for reader in readers:
        wanted = _state(reader)
        for store in (reader.exp_avg, reader.exp_avg_sq, reader.master):   # forget it, then load it
            if isinstance(store, dict):
                for t in store.values():
                    t.zero_()
            elif store is not None:
                store.zero_()
        with torch.no_grad():
            for p in reader.params.values():
                p.zero_()
        saved = ckpt.Checkpoint(tp2_zero.directory, model)
        reader.load_part(reader.read_part(saved), saved.optimizer_steps, lambda t: t, _nothing)
        got = _state(reader)
        assert got.keys() == wanted.keys()
        for key in wanted:
            assert torch.equal(got[key], wanted[key]), key
        assert reader.steps == STEP
        if layout_name == "tp2-no-zero":
            assert saved._verified == {"rank-00000.safetensors", "rank-00002.safetensors"}


def _state(made) -> dict:
    """Every tensor an AdamW holds, by where it lives."""
    out = {f"param.{n}": p.detach().clone() for n, p in made.params.items()}
    for kind in fmt.MOMENT_KINDS:
        store = getattr(made, kind)
        out.update({f"{kind}.{n}": t.clone() for n, t in store.items()} if isinstance(store, dict)
                   else {kind: store.clone()})
    if made.master is not None:
        out["master"] = made.master.clone()
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_checkpoint_bench_reports_its_contract_fields(model, tmp_path):
    from hetero.bench.checkpoint import measure

    # cpu, then emulated A100 ranks (time-dilated x2, a short stand-in step to keep the test quick)
    runs = measure((CONFIG,), directory=str(tmp_path), chip="A100-80G", dilation=2.0, chip_step_s=0.05)["runs"]
    assert [(r["model"], r["device"], r["time_dilation"]) for r in runs] == [
        (model.name, "cpu", 1.0), (model.name, "emulated A100-80G", 2.0)]
    fields = {"rank", "shard_bytes", "peak_extra_host_bytes", "blocked_s", "write_s", "snapshot_mode",
              "background_blocked_s", "background_write_s", "first_blocked_s", "first_write_s", "sync_blocked_s",
              "sync_write_s", "snapshot_s", "issue_s", "snapshot_wait_s", "standin_step_s", "standin_slowdown_s"}
    for run, extra, mode in zip(runs, (set(), {"chip_copy_s"}), ("sync", "background")):
        ranks = run["ranks"]
        assert run["load_s"] > 0 and [r["rank"] for r in ranks] == [0, 1, 2, 3]
        assert all(set(r) == fields | extra for r in ranks)   # the contract, the anchor, both modes' parts
        assert all(r["background_blocked_s"] == pytest.approx(r["issue_s"] + r["snapshot_wait_s"] + r["standin_slowdown_s"])
                   and r["snapshot_s"] > 0 and r["standin_step_s"] > 0 for r in ranks)
        assert all(r["snapshot_mode"] == mode and r["blocked_s"] == r[f"{mode}_blocked_s"] for r in ranks)
    # on the chip the snapshot's copies were charged on its copy engine at the host link's 32 GB/s
    assert all(r["chip_copy_s"] == pytest.approx(r["shard_bytes"] / 32e9, rel=0.05) for r in runs[1]["ranks"])
    assert all(r["standin_step_s"] >= 0.05 for r in runs[1]["ranks"])           # chip seconds, not wall
    params = sum(layout.full_shape(model, n)[0] * (layout.full_shape(model, n) + (1,))[1]
                 for n in layout.model_names(model))
    assert params * 12 <= sum(r["shard_bytes"] for r in runs[0]["ranks"]) < params * 12 * 1.05   # fp32 weights + 2 moments


def test_hetero_bench_checkpoint_prints_the_contract_and_judges_each_rank(hetero_cli, tmp_path):
    code, out, err = hetero_cli("bench", "checkpoint", "--model", CONFIG, "--dir", str(tmp_path), "--chip", "none",
                                "--json")
    assert code == 0, err
    report = json.loads(out)
    ranks = report["runs"][0]["ranks"]
    assert {"rank", "shard_bytes", "peak_extra_host_bytes", "blocked_s", "write_s"} <= set(ranks[0])
    assert all(r["peak_over_shard"] == r["peak_extra_host_bytes"] / r["shard_bytes"] for r in ranks)
    assert report["goals"] == {"peak_over_shard": 1.25, "blocked_over_write": 0.10}
    assert report["peak_ok"] == all(r["peak_over_shard"] <= 1.25 for r in ranks)
    assert os.listdir(tmp_path) == []                      # its checkpoints go in a folder it removes
    code, _, err = hetero_cli("bench", "checkpoint", "--tp", "0")
    assert code == 2 and "--tp and --dp must be at least 1" in err
    code, _, err = hetero_cli("bench", "checkpoint", "--chip", "no-such-chip")
    assert code == 2 and "--chip no-such-chip: not a catalog chip" in err
    code, _, err = hetero_cli("bench", "checkpoint", "--time-dilation", "0.5")
    assert code == 2 and "--time-dilation must be a number >= 1" in err
