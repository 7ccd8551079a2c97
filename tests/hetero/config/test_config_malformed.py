"""Every malformed file in tests/fixtures/malformed gets exit 2 and a short error naming the problem."""

import os

import pytest

from tests.conftest import FIXTURES, hetero_subprocess

CORPUS = os.path.join(FIXTURES, "malformed")


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


@pytest.mark.timeout(20)   # guards against a hang; the old cycle check walked every expanded path
def test_alias_bombs_far_deeper_than_the_corpus_are_refused_without_expanding(tmp_path, hetero_cli):
    """200 levels, each referring twice to the level below: 2**200 nodes expanded,
    a few hundred distinct ones. The checks visit each distinct node once."""
    rows = ["l0: &l0 [x, x]"] + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 200)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\n")
    code, _, err = hetero_cli("validate", str(bomb))
    assert code == 2 and "aliases repeated too often" in err and "Traceback" not in err


@pytest.mark.timeout(20)
def test_a_cycle_behind_a_long_shared_chain_is_found(tmp_path):
    from hetero.config.yaml_io import read_yaml
    from hetero.errors import ConfigError

    rows = ["l0: &l0 [x, x]"] + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 100)]
    rows.append("loop: &loop [*l99, *l99, [*loop]]")
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        read_yaml(str(cyclic))


def test_shared_aliases_within_bounds_still_load(tmp_path):
    from hetero.config.yaml_io import read_yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {chips: 2, host: 127.0.0.1}\nnodes: [*b, *b, *b]\n")
    assert read_yaml(str(ok)).data["nodes"] == [{"chips": 2, "host": "127.0.0.1"}] * 3
