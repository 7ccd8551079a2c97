"""`hetero data prepare`: text and JSONL through a BPE tokenizer trained here (nothing
is downloaded) into a token file + sidecar that training reads."""

import io
import json
import os
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hetero.cli import main
from hetero.config.train import DataConfig
from hetero.data.prepare import Progress, prepare
from hetero.engine.data import SampleSource
from hetero.errors import UserError
from tests.conftest import FIXTURES, ROOT

LINES = ["the fleet trains one model", "an island of chips keeps its own collectives",
         "stages get uneven layer counts", "the bridge carries activations between islands"]


def train_tokenizer(directory, special=("<|endoftext|>",), vocab_size=300):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(LINES * 20, trainer)
    directory.mkdir(exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return directory, train_tokenizer(directory)


@pytest.fixture
def inputs(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(f"{LINES[0]}\n{LINES[1]}\n\n\n{LINES[2]}\n")     # two documents
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": LINES[3]}) + "\n\n" + json.dumps({"text": "é ü\n" + LINES[0]}) + "\n")
    return [str(text), str(jsonl)], [f"{LINES[0]}\n{LINES[1]}", LINES[2], LINES[3], "é ü\n" + LINES[0]]


def expected_ids(tokenizer, documents):
    eos = tokenizer.token_to_id("<|endoftext|>")
    return [i for doc in documents for i in tokenizer.encode(doc).ids + [eos]]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_writes_tokens_and_sidecar(tok, inputs, tmp_path, workers):
    directory, tokenizer = tok
    paths, documents = inputs
    out = tmp_path / "data.bin"
    summary = prepare(str(directory), paths, str(out), workers=workers)
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected_ids(tokenizer, documents)
    meta = json.loads((tmp_path / "data.bin.json").read_text())
    assert meta["documents"] == summary["documents"] == 4
    assert meta["tokens"] == len(expected_ids(tokenizer, documents))
    assert meta["vocab_size"] == tokenizer.get_vocab_size() and meta["token_dtype"] == "uint16"
    assert (meta["eos_token"], meta["eos_id"], meta["eos_source"]) == ("<|endoftext|>", 0, "well-known name")
    assert len(meta["tokenizer_sha256"]) == 64 and not (tmp_path / "data.bin.partial").exists()
    assert summary["bytes"] == sum(os.path.getsize(path) for path in paths)    # progress reaches 100%


def test_eos_comes_from_tokenizer_config_then_flag(tmp_path, inputs):
    directory = tmp_path / "tok"
    tokenizer = train_tokenizer(directory, special=("<|endoftext|>", "<end>"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    summary = prepare(str(directory), inputs[0][:1], str(tmp_path / "d.bin"))
    assert (summary["eos_token"], summary["eos_source"]) == ("<end>", "tokenizer_config.json")
    summary = prepare(str(directory), inputs[0][:1], str(tmp_path / "d.bin"), eos="<|endoftext|>")
    assert summary["eos_id"] == tokenizer.token_to_id("<|endoftext|>") and summary["eos_source"] == "--eos"
    with pytest.raises(UserError, match="--eos '<nope>': not a token of"):
        prepare(str(directory), inputs[0][:1], str(tmp_path / "d.bin"), eos="<nope>")


def test_tokenizer_without_an_eos_is_refused(tmp_path, inputs):
    train_tokenizer(tmp_path / "tok", special=("<pad>",))
    with pytest.raises(UserError, match="no end-of-document token found.*--eos TOKEN"):
        prepare(str(tmp_path / "tok"), inputs[0], str(tmp_path / "d.bin"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_summary_and_training_reads_the_sidecar(tok, inputs, tmp_path, capsys):
    out = tmp_path / "data.bin"
    code, stdout, _ = run_cli(capsys, "data", "prepare", "--tokenizer", str(tok[0]), "--input", *inputs[0],
                              "--out", str(out), "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["documents"] == 4 and summary["tokens_per_s"] > 0
    source = SampleSource(DataConfig("tokens", str(out), "uint32"), vocab=summary["vocab_size"], seq_len=4,
                          seed=1, global_batch=2)   # the sidecar's dtype wins over the config's
    assert source.tokens.dtype == np.uint16 and len(source.tokens) == summary["tokens"]
    with pytest.raises(UserError, match=r"tokenizer's vocabulary \(\d+\) is larger than the model's vocab \(64\)"):
        SampleSource(DataConfig("tokens", str(out)), vocab=64, seq_len=4, seed=1, global_batch=2)
    sidecar = json.loads((tmp_path / "data.bin.json").read_text())
    (tmp_path / "data.bin.json").write_text(json.dumps({**sidecar, "tokens": 5}))
    with pytest.raises(UserError, match="its sidecar .* says 5; prepare the data again"):
        SampleSource(DataConfig("tokens", str(out)), vocab=1000, seq_len=4, seed=1, global_batch=2)


@pytest.mark.parametrize("case, match", [
    ("missing-input", r"absent\.txt: no such file"),
    ("bad-jsonl", r"bad\.jsonl:2: not a JSON line"),
    ("no-text", r"bad\.jsonl:1: expected a JSON object with a string \"text\""),
    ("no-tokenizer", r"tokenizer\.json: missing"),
    ("bad-tokenizer", r"tokenizer\.json: not a readable tokenizer\.json"),
])
def test_bad_input_is_one_line_and_exit_2(tok, tmp_path, capsys, case, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text({"bad-jsonl": '{"text": "ok"}\n{"text": \n', "no-text": '{"body": "x"}\n'}.get(case, ""))
    directory = tok[0]
    if case in ("no-tokenizer", "bad-tokenizer"):
        directory = tmp_path / "tok"
        directory.mkdir()
        if case == "bad-tokenizer":
            (directory / "tokenizer.json").write_text("{}")
    source = str(tmp_path / "absent.txt") if case == "missing-input" else str(bad)
    code, _, err = run_cli(capsys, "data", "prepare", "--tokenizer", str(directory), "--input", source,
                           "--out", str(tmp_path / "d.bin"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("hetero data: error: ") and re.search(match, err)
    assert not (tmp_path / "d.bin").exists()


def test_progress_plain_lines_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(2_000_000, stream=stream)
    progress.interval = 0.0
    progress.update(1_000_000, 5000)
    progress.finish(2_000_000, 9000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("prepare: 1.0/2.0 MB (50%), 5,000 tokens, ") and lines[1].endswith("tokens/s")


def test_a_run_on_prepared_data_trains(tok, tmp_path):
    """The user path's end: prepare, then train on it (one process, the engine's own Trainer)."""
    import dataclasses

    import accelerators
    from hetero.config import load_job
    from hetero.engine.solo import train_solo

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(LINES, 3))}) + "\n" for _ in range(60)))
    summary = prepare(str(tok[0]), [str(corpus)], str(tmp_path / "data.bin"))
    engine = os.path.join(FIXTURES, "engine", "two-islands.yaml")
    job = load_job(model=engine, train=engine)
    model = dataclasses.replace(job.model, vocab=summary["vocab_size"] + 4)
    train = dataclasses.replace(job.train, checkpoint=None, data=DataConfig("tokens", str(tmp_path / "data.bin")))
    losses = [r["loss"] for r in train_solo(accelerators.get_accelerator("cpu"), model, train,
                                            str(tmp_path / "run"), steps=5)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5


def test_inputs_without_documents_are_refused(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match="empty.txt: no documents"):
        prepare(str(tok[0]), [str(empty)], str(tmp_path / "d.bin"))
    assert not (tmp_path / "d.bin").exists()


def test_a_tokenizer_larger_than_the_model_is_refused_before_any_worker(tok, inputs, tmp_path, capsys):
    """hetero plan/run refuse it from the sidecar at load time, naming the train file's data.path."""
    prepare(str(tok[0]), inputs[0], str(tmp_path / "data.bin"))
    configs = os.path.join(ROOT, "configs")
    model = (tmp_path / "model.yaml")
    model.write_text(open(os.path.join(configs, "llama-tiny.yaml"), encoding="utf-8").read()
                     .replace("vocab: 1024", "vocab: 64"))
    train = tmp_path / "train.yaml"
    train.write_text(open(os.path.join(configs, "train-tiny.yaml"), encoding="utf-8").read()
                     .replace("data: synthetic ", "data: {kind: tokens, path: data.bin} "))
    code, _, err = run_cli(capsys, "plan", "--cluster", os.path.join(configs, "emulated-mixed.yaml"),
                           "--model", str(model), "--train", str(train))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"train\.yaml: data\.path: .*data\.bin: its tokenizer's vocabulary \(\d+\) is larger than "
                     r"model 'llama-tiny''s vocab \(64\)", err), err
