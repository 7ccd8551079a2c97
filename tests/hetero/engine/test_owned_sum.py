"""The hetero-DP sum by ownership (hetero.engine.owned_sum): its geometry against brute force, and a
fleet of two equal islands laid out differently (TP2 against two TP1 stages) against one process."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch
from tests.hetero.engine.test_engine_fleet import CONFIG, EMULATED, last_attempt, make_replicas_plan, run_fleet, solo_losses
from tests.conftest import free_port

from hetero.config import load_job
from hetero.engine.buckets import GradBuckets, GradShard, Rect, rect_of
from hetero.engine.owned_sum import cut, shard_bounds


def positions(rect: Rect) -> list[int]:
    return [rect.offset + r * rect.stride + c for r in range(rect.rows) for c in range(rect.cols)]


def test_a_cut_keeps_exactly_the_positions_in_range_in_order():
    rng = random.Random(5)
    for _ in range(3000):
        cols = rng.randint(1, 9)
        stride = cols + rng.randint(0, 6)
        rect = Rect(rng.randint(0, 20), rng.randint(1, 7), cols, stride)
        end = rect.offset + (rect.rows - 1) * stride + cols
        lo = rng.randint(0, end + 2)
        hi = rng.randint(lo, end + 4)
        parts = cut(rect, lo, hi)
        assert len(parts) <= 3
        got = [rect.offset + (r0 + r) * stride + c0 + c
               for r0, nr, c0, nc in parts for r in range(nr) for c in range(nc)]
        assert got == [p for p in positions(rect) if lo <= p < hi], (rect, lo, hi, parts)


def test_shards_cover_the_bucket_once():
    for length in (1, 7, 64, 65):
        for n in (1, 2, 3, 4):
            spans = [shard_bounds(length, n, owner) for owner in range(n)]
            assert spans[0][0] == 0 and spans[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("part", [None, (0, 16, 48), (1, 32, 64)])
def test_a_holding_lies_and_fills_where_plain_slicing_puts_it(part):
    """The bucket fill (GradBuckets._pair: rect_of and held_view) puts a whole parameter, the rows
    of a dim-0 TP shard and the columns of a dim-1 one where slicing the full tensor says, and
    rect_of names exactly those positions."""
    job = load_job(cluster=CONFIG, model=CONFIG, train=CONFIG)
    buckets = GradBuckets(job.model, 3000)      # pieces cut through the parameter's rows
    name = "model.layers.1.mlp.up_proj.weight" if part is not None and part[0] == 0 else "model.layers.1.mlp.down_proj.weight"
    shape = buckets.shapes[name]
    full = torch.arange(1, shape[0] * shape[1] + 1, dtype=torch.float32).view(shape)   # no zeros
    held = torch.zeros(shape, dtype=torch.bool)
    if part is None:
        grad, held[:] = full, True
    elif part[0] == 0:
        grad, held[part[1]:part[2]] = full[part[1]:part[2]].clone(), True
    else:
        grad, held[:, part[1]:part[2]] = full[:, part[1]:part[2]].clone(), True
    shard = GradShard(grad, part, True)
    seen = 0
    for index, bucket in enumerate(buckets.buckets):
        filled = buckets._fill(torch.empty(buckets.widest), index, {name: [shard]}, contextlib.nullcontext)  # pylint: disable=protected-access
        for piece in bucket:
            if piece.hf != name:
                continue
            rows = slice(piece.start, piece.stop)
            region = filled[piece.offset:piece.offset + (piece.stop - piece.start) * piece.cols].view(-1, piece.cols)
            assert torch.equal(region, torch.where(held[rows], full[rows], 0.0))
            rect = rect_of(piece, part, shape)
            expected = (piece.offset + held[rows].reshape(-1).nonzero().flatten()).tolist()
            assert (positions(rect) if rect is not None else []) == expected
            seen += bool(expected)
    assert seen > 1


def test_equal_islands_laid_out_differently_sum_by_ownership_and_match_one_process(tmp_path, monkeypatch):
    with open(EMULATED) as handle:
        text = handle.read().replace("port: 29731", f"port: {free_port()}")
    cluster = tmp_path / "equal-islands.yaml"
    cluster.write_text(text.replace("nodes: [{host: 127.0.0.1, chips: 1}]", "nodes: [{host: 127.0.0.1, chips: 2}]"))
    job = load_job(cluster=str(cluster), model=CONFIG, train=CONFIG)
    monkeypatch.setenv("HETERO_GRAD_BUCKET_MB", "0.02")   # ~26 buckets: shards cut through rows and pieces
    plan = make_replicas_plan(job, [("wide", [(2, (0, 3))], 6), ("narrow", [(1, (0, 2)), (1, (2, 3))], 2)])
    records, run_dir, _ = run_fleet(tmp_path, plan, steps=3, cluster_path=str(cluster))
    fleet = [r["loss"] for r in last_attempt(records)]
    reference = solo_losses(tmp_path, job, steps=3)
    assert all(abs(got - want) <= 1e-5 * abs(want) for got, want in zip(fleet, reference)), (fleet, reference)
    logs = "".join(path.read_text() for path in (run_dir / "logs").rglob("*") if path.is_file())
    assert "hetero-DP sum by ownership" in logs
