"""Every malformed file in tests/malformed gets exit 2 and a short error naming the problem."""

import os

import pytest

from conftest import ROOT, hetero_subprocess

CORPUS = os.path.join(ROOT, "tests", "malformed")


def _cases():
    with open(os.path.join(CORPUS, "EXPECTED.tsv"), encoding="utf-8") as manifest:
        rows = [line.rstrip("\n").split("\t") for line in manifest if not line.startswith("#")]
    return [(name, expected) for name, expected in rows]


CASES = _cases()


def test_corpus_is_large_and_complete():
    listed = {name for name, _ in CASES}
    on_disk = {name for name in os.listdir(CORPUS) if name.endswith(".yaml")}
    assert listed == on_disk
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,expected", CASES, ids=[name for name, _ in CASES])
def test_malformed_file_is_refused_clearly(hetero_cli, name, expected):
    path = os.path.join(CORPUS, name)
    code, out, err = hetero_cli("validate", path)
    assert code == 2
    assert expected in err
    assert path in err                         # names the file
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) <= 3  # a few lines at most


def test_python_tag_does_not_execute(tmp_path, hetero_cli):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"layers: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = hetero_cli("validate", str(bad))
    assert code == 2 and "not allowed" in err
    assert not marker.exists()


def test_missing_path_and_directory(tmp_path, hetero_cli):
    code, _, err = hetero_cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such file" in err
    code, _, err = hetero_cli("validate", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_every_file_is_reported_not_just_the_first(hetero_cli):
    first, second = (os.path.join(CORPUS, n) for n in ("kv-heads.yaml", "zero-chips.yaml"))
    code, _, err = hetero_cli("validate", first, second)
    assert code == 2
    assert first in err and second in err


@pytest.mark.parametrize("name", ["alias-bomb.yaml", "python-tag.yaml", "binary.yaml", "bool-chips.yaml"])
def test_real_command_exits_2_without_traceback(name):
    result = hetero_subprocess("validate", os.path.join(CORPUS, name))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error ")
