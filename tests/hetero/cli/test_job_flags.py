"""--cluster/--model/--train come from one helper (hetero.commands.flags.add_job_files) in every job
command, with the flag names and help each command had (issue 21 item 3)."""

import argparse
import glob
import os

import pytest

from hetero.commands import compare
from tests.conftest import ROOT


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetero")
    compare.register(parser.add_subparsers())
    return parser


def test_no_command_declares_the_job_files_by_hand():
    by_hand = [path for path in glob.glob(os.path.join(ROOT, "hetero", "commands", "*.py"))
               for kind in ("cluster", "model", "train") if f'add_argument("--{kind}"' in open(path, encoding="utf-8").read()]
    assert by_hand == []


def test_compare_keeps_its_model_directory_and_optional_cluster(capsys):
    args = compare_parser().parse_args(["compare", "--model", "hf"])
    assert args.model == "hf" and args.cluster is None
    with pytest.raises(SystemExit) as exited:
        compare_parser().parse_args(["compare"])
    assert exited.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_parser().parse_args(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model HF_DIR Hugging Face Llama directory (config.json + *.safetensors)" in text
    assert "--cluster FILE cluster YAML (default configs/emulated-mixed.yaml)" in text
