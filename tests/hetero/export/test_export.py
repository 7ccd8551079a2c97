"""`hetero export CHECKPOINT --hf OUT_DIR` on checkpoints written here through the real writer and
seal (a TP 2 x DP 2 ZeRO-1 layout and an uneven TP 2 -> TP 1 pipeline): the exported directory holds
every weight bit for bit under its HF name, transformers loads it with no missing or unexpected keys
and its logits equal hetero's own forward of the checkpoint; shards, bf16, tied embeddings, the run's
tokenizer, and bad input as one line with exit 2. Nothing is downloaded."""

import json
import os
import weakref

import pytest
import torch
import transformers  # test-only dependency (pyproject: dev)
from safetensors import safe_open

from hetero.bench.checkpoint import random_state, rank_optimizer
from hetero.config import load_job
from hetero.data.prepare import prepare
from hetero.engine import checkpoint as ckpt
from hetero.export.shards import parse_size, plan_shards
from hetero.export.source import open_source
from hetero.errors import UserError
from hetero.model import LlamaStage, TensorParallel, layout, load_full_state_dict, read_hf_config
from hetero.model.hf import ARCHITECTURE_FIELDS
from tests.hetero.data.test_data_prepare import LINES, train_tokenizer
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")
STEP = 4


def small_weights(model, seed=5):
    """{name: full fp32 tensor} of weights (small, norms near one: activations stay tame) and moments."""
    full = random_state(model, seed)
    for name in layout.model_names(model):
        full[name] = 1 + 0.1 * full[name] if name.endswith("norm.weight") else 0.05 * full[name]
    return full


def save(root, model, full, ranks):
    """Seal a checkpoint of step STEP from {rank: (tp, dp, dp_rank, zero, names)} through the real writer."""
    ckpt.prepare(str(root), STEP)
    for rank, (tp, dp, dp_rank, zero, names) in ranks.items():
        made = rank_optimizer(model, full, names, tp, dp, dp_rank, zero=zero)
        chunks = made.own_chunks(lambda t: t.detach().clone(), list(made.params))
        assert ckpt.AsyncWrite(ckpt.partial_dir(str(root), STEP), rank, STEP, chunks).start().wait() is None
    ckpt.seal(str(root), STEP, model, {"optimizer_steps": STEP}, sorted(ranks))
    return str(root)


def tp2_zero_ranks(model):
    names = layout.model_names(model)
    return {2 * d + t: (TensorParallel(2, t), 2, d, True, names) for d in range(2) for t in range(2)}


def pipeline_ranks(model):
    """Stage 0: embedding and layers 0-1 over TP 2 (ranks 0, 1); stage 1: the rest on one rank."""
    names = layout.model_names(model)
    first = [n for n in names if n == layout.EMBED or (layout.split_layer_name(n) or (9,))[0] < 2]
    rest = [n for n in names if n not in first]
    return {0: (TensorParallel(2, 0), 1, 0, False, first), 1: (TensorParallel(2, 1), 1, 0, False, first),
            2: (TensorParallel(), 1, 0, False, rest)}


@pytest.fixture(scope="module")
def model():
    return load_job(model=CONFIG, train=CONFIG).model


@pytest.fixture(scope="module")
def full(model):
    return small_weights(model)


@pytest.fixture(scope="module", params=["tp2-zero1", "pipeline"])
def saved(request, tmp_path_factory, model, full):
    """A checkpoint directory (`latest` inside) written under one of two layouts."""
    ranks = tp2_zero_ranks(model) if request.param == "tp2-zero1" else pipeline_ranks(model)
    return save(tmp_path_factory.mktemp(request.param), model, full, ranks)


def export(hetero_cli, *argv):
    code, out, err = hetero_cli("export", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def hetero_logits(checkpoint_path, tokens):
    """hetero's own forward (one stage, the whole model) of the checkpoint `checkpoint_path` names."""
    source = open_source(checkpoint_path)
    stage = LlamaStage(source.config, seed=None)
    load_full_state_dict(stage, {name: source.checkpoint.tensor(name) for name in layout.model_names(source.config)})
    with torch.no_grad():
        return stage(tokens)


def assert_transformers_matches(checkpoint_path, out_dir, vocab, dtype=torch.float32):
    """transformers loads out_dir with no key warnings; its logits equal hetero's within 1e-5 relative."""
    model, info = transformers.LlamaForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == dtype
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = hetero_logits(checkpoint_path, tokens)
    with torch.no_grad():
        theirs = model.float()(tokens).logits
    worst = float((ours - theirs).abs().max() / theirs.abs().max())
    assert worst <= 1e-5, worst
    return worst


def read_exported(out_dir):
    """{name: tensor} of every shard the index names, checking each tensor is where the index says."""
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as handle:
        weight_map = json.load(handle)["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(os.path.join(out_dir, file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():
                assert weight_map[name] == file and name not in tensors
                tensors[name] = handle.get_tensor(name)
    assert sorted(tensors) == sorted(weight_map)
    return tensors


def test_export_holds_every_weight_in_shards_and_transformers_agrees(saved, model, full, tmp_path, hetero_cli):
    out = tmp_path / "hf"
    summary = export(hetero_cli, saved, "--hf", str(out), "--shard-size", "60KB")
    names = layout.model_names(model)
    assert summary["step"] == STEP and summary["tensors"] == len(names) and summary["dtype"] == "fp32"
    assert summary["shards"] > 2 and summary["tokenizer"] is None
    on_disk = sorted(os.listdir(out))
    assert sorted(f["name"] for f in summary["files"]) == on_disk        # no optimizer state, nothing else
    assert summary["bytes"] == sum(os.path.getsize(out / name) for name in on_disk)
    shard_files = [f"model-{i:05d}-of-{summary['shards']:05d}.safetensors" for i in range(1, summary["shards"] + 1)]
    assert on_disk == sorted(["config.json", "generation_config.json", "model.safetensors.index.json", *shard_files])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(4 * full[n].numel() for n in names)
    for file in shard_files:           # each shard at most the limit, unless one tensor alone is larger
        with safe_open(str(out / file), framework="pt") as handle:
            sizes = [handle.get_tensor(k).numel() * 4 for k in handle.keys()]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    exported = read_exported(out)
    assert sorted(exported) == sorted(names)
    for name in names:
        assert torch.equal(exported[name], full[name]), name
    assert_transformers_matches(saved, str(out), model.vocab)
    read_back = read_hf_config(str(out))          # hetero's own HF loader reads the same model back
    assert all(getattr(read_back, f) == getattr(model, f) for f in (*ARCHITECTURE_FIELDS, "seq_len"))


def test_bf16_export_casts_every_weight(saved, model, full, tmp_path, hetero_cli):
    out = tmp_path / "hf"
    summary = export(hetero_cli, saved, "--hf", str(out), "--dtype", "bf16")
    assert summary["dtype"] == "bf16" and summary["shards"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    exported = read_exported(out)
    for name in layout.model_names(model):
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], full[name].bfloat16()), name
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype="auto", output_loading_info=True)
    assert loaded.dtype == torch.bfloat16 and not info["missing_keys"] and not info["unexpected_keys"]


def test_tied_embeddings_export_without_an_lm_head(model, tmp_path, hetero_cli):
    import dataclasses

    tied = dataclasses.replace(model, tie_embeddings=True)
    weights = small_weights(tied, seed=8)
    saved = save(tmp_path / "ckpt", tied, weights, pipeline_ranks(tied))
    out = tmp_path / "hf"
    export(hetero_cli, saved, "--hf", str(out))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert layout.LM_HEAD not in read_exported(out)
    assert_transformers_matches(saved, str(out), tied.vocab)
    assert read_hf_config(str(out)).tie_embeddings


def make_run_dir(tmp_path, model, full, tok_dir):
    """A run directory as `hetero run` leaves one, trained on data prepared with the tokenizer in tok_dir."""
    run_dir = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(LINES))
    data = tmp_path / "data.bin"
    prepare(str(tok_dir), [str(text)], str(data))
    run_dir.mkdir()
    (run_dir / "train.yaml").write_text(f"global_batch: 8\nmicro_batch: 2\nsteps: 4\nlr: 0.01\n"
                                        f"data: {{kind: tokens, path: {data}}}\n")
    save(run_dir / "checkpoints", model, full, tp2_zero_ranks(model))
    return run_dir


def test_a_run_on_prepared_data_exports_its_tokenizer(model, full, tmp_path, hetero_cli):
    tok_dir = tmp_path / "tok"
    tokenizer = train_tokenizer(tok_dir)
    run_dir = make_run_dir(tmp_path, model, full, tok_dir)
    out = tmp_path / "hf"
    summary = export(hetero_cli, str(run_dir), "--hf", str(out))
    assert summary["tokenizer"] == str(tok_dir) and summary["tokenizer_files"] == ["tokenizer.json",
                                                                                   "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert loaded(LINES[1])["input_ids"] == tokenizer.encode(LINES[1]).ids and loaded.eos_token_id == eos
    # the same step whichever path names it: run directory, checkpoint directory, step folder
    step_dir = ckpt.latest(str(run_dir / "checkpoints"))
    for path in (str(run_dir / "checkpoints"), step_dir):
        assert export(hetero_cli, path, "--hf", str(tmp_path / os.path.basename(path)))["checkpoint"] == step_dir
    # a tokenizer changed since the data was prepared would re-map every id: refused, unless left out
    with open(tok_dir / "tokenizer.json", "a") as handle:
        handle.write("\n")
    code, _, err = hetero_cli("export", str(run_dir), "--hf", str(tmp_path / "changed"))
    assert code == 2 and "changed since the run's data was prepared" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "changed").exists()
    summary = export(hetero_cli, str(run_dir), "--hf", str(tmp_path / "plain"), "--no-tokenizer")
    assert summary["tokenizer"] is None and not (tmp_path / "plain" / "tokenizer.json").exists()


def corrupt_a_file(saved):
    step_dir = ckpt.latest(saved)
    path = os.path.join(step_dir, "rank-00001.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("case, match", [
    ("missing", "no such directory"),
    ("not-a-checkpoint", "not a checkpoint (no state.json)"),
    ("corrupt", "rank-00001.safetensors: checksum mismatch"),
    ("no-model", "state.json: it records no model description"),
    ("dtype", "--dtype: invalid choice: 'fp8'"),
    ("not-empty", "exists and is not empty"),
    ("shard-size", "--shard-size 'lots'"),
])
def test_bad_input_is_one_line_and_exit_2(case, match, model, full, tmp_path, hetero_cli):
    saved = save(tmp_path / "ckpt", model, full, pipeline_ranks(model))
    out, extra = tmp_path / "hf", []
    if case == "missing":
        saved = str(tmp_path / "nowhere")
    elif case == "not-a-checkpoint":
        saved = str(tmp_path)
    elif case == "corrupt":
        corrupt_a_file(saved)
    elif case == "no-model":       # found by mypy: ModelConfig(**None) was the only check
        state_path = os.path.join(ckpt.latest(saved), "state.json")
        state = json.loads(open(state_path).read())
        state["model"] = None
        open(state_path, "w").write(json.dumps(state))
    elif case == "dtype":
        extra = ["--dtype", "fp8"]
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        extra = ["--shard-size", "lots"]
    code, stdout, err = hetero_cli("export", saved, "--hf", str(out), *extra)
    assert code == 2 and not stdout and match in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] + (["hf"] if case == "not-empty" else [])   # nothing left
    if case == "not-empty":
        assert os.listdir(out) == ["keep.txt"]


def test_an_empty_out_dir_is_filled(model, full, tmp_path, hetero_cli):
    saved = save(tmp_path / "ckpt", model, full, pipeline_ranks(model))
    (tmp_path / "hf").mkdir()
    assert export(hetero_cli, saved, "--hf", str(tmp_path / "hf"))["shards"] == 1
    assert (tmp_path / "hf" / "config.json").is_file()


def test_fp16_overflow_is_refused_in_one_line(model, tmp_path, hetero_cli):
    weights = small_weights(model)
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1e6
    saved = save(tmp_path / "ckpt", model, weights, pipeline_ranks(model))
    code, _, err = hetero_cli("export", saved, "--hf", str(tmp_path / "hf"), "--dtype", "fp16")
    assert code == 2 and "model.norm.weight: values up to" in err and "overflow float16" in err
    assert not (tmp_path / "hf").exists()


def test_shards_fill_to_the_limit_in_order():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 200), ("e", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(sizes, 1000) == [["a", "b", "c", "d", "e"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 << 30 and parse_size("1234") == 1234
    for bad in ("", "5XB", "-1GB", "0"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_at_most_one_shard_of_tensors_is_held_at_once(model, full, tmp_path, hetero_cli, monkeypatch):
    """Every full tensor the export assembles is tracked: when the next one is read, the ones still alive
    fit in one output shard (60 KB here) plus that tensor."""
    from hetero.export import export as module

    saved = save(tmp_path / "ckpt", model, full, tp2_zero_ranks(model))
    alive, peaks, cast = [], [], module._cast

    def tracked(tensor, dtype, name):
        out = cast(tensor, dtype, name)
        held = [t for t in (ref() for ref in alive) if t is not None]
        peaks.append(sum(t.numel() * t.element_size() for t in held) + out.numel() * out.element_size())
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(module, "_cast", tracked)
    summary = export(hetero_cli, saved, "--hf", str(tmp_path / "hf"), "--shard-size", "60KB", "--dtype", "bf16")
    largest = max(2 * full[n].numel() for n in layout.model_names(model))
    assert summary["shards"] > 2 and len(peaks) == summary["tensors"]
    assert max(peaks) <= 60_000 + largest, (max(peaks), largest)
    assert sum(2 * full[n].numel() for n in layout.model_names(model)) > 3 * max(peaks)   # not the whole model


def test_progress_is_a_line_redrawn_on_a_terminal_only():
    import io

    from hetero.export.export import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(2, 8_000_000_000, stream=stream)
        progress.update("model.embed_tokens.weight", 4_000_000_000)
        progress.update("lm_head.weight", 4_000_000_000)
        progress.finish()
    assert terminal.getvalue().startswith("\rexport: 1/2 tensors, 4.00/8.00 GB (50%) model.embed_tokens.weight")
    assert "\rexport: 2/2 tensors, 8.00/8.00 GB (100%) lm_head.weight" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n") and log.getvalue() == ""


def test_an_out_dir_that_cannot_be_made_is_one_line(model, full, tmp_path, hetero_cli):
    saved = save(tmp_path / "ckpt", model, full, pipeline_ranks(model))
    (tmp_path / "file").write_text("not a folder")
    code, _, err = hetero_cli("export", saved, "--hf", str(tmp_path / "file" / "hf"))
    assert code == 2 and "cannot create it" in err and len(err.strip().splitlines()) == 1, err


def test_a_latest_pointer_that_vanishes_while_read_is_one_line(tmp_path, monkeypatch):
    """Found by mypy: resolve() passed latest()'s None (the pointer gone between the check and the read,
    a run still saving) on as the step folder, and the export died in a traceback."""
    from hetero.checkpoint import format as fmt
    from hetero.export import source

    (tmp_path / fmt.LATEST).write_text("{}")
    monkeypatch.setattr(source, "latest", lambda root: None)
    with pytest.raises(UserError, match="pointer disappeared while being read"):
        source.resolve(str(tmp_path))

