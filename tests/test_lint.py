"""The static checks of scripts/lint.sh catch the class of bug they are there for."""

import os
import subprocess
import sys

from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
SHADOWED = '''
def alone(job, island):
    return job


def predicted(job):
    alone = {}
    for island in job:
        alone[island] = alone(job, island)
    return alone
'''


def _lint(tool: list, tmp_path, source: str) -> subprocess.CompletedProcess:
    path = tmp_path / "snippet.py"
    path.write_text(source)
    return subprocess.run([*tool, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_pylint_with_the_project_settings_flags_a_call_of_a_shadowed_name(tmp_path):
    done = _lint([os.path.join(BIN, "pylint"), "--rcfile", os.path.join(ROOT, "pyproject.toml")], tmp_path, SHADOWED)
    assert done.returncode != 0
    assert "alone is not callable" in done.stdout


def test_ruff_with_the_project_settings_flags_unused_imports_and_late_binding(tmp_path):
    source = "import math\n\nfns = []\nfor i in range(3):\n    fns.append(lambda: i)\n"
    done = _lint([os.path.join(BIN, "ruff"), "check", "--config", os.path.join(ROOT, "pyproject.toml"),
                  "--output-format", "concise"], tmp_path, source)
    assert done.returncode == 1
    assert "F401" in done.stdout and "B023" in done.stdout


def test_mypy_with_the_project_settings_flags_a_shadowed_call_and_a_maybe_none(tmp_path):
    """check_untyped_defs: the shadowed name is called inside a function without annotations
    (the bug that broke `hetero bench efficiency`); strict Optional: a value that may be None is used."""
    source = SHADOWED + "\n\ndef first_word(text: str | None) -> str:\n    return text.split()[0]\n"
    done = _lint([os.path.join(BIN, "mypy"), "--config-file", os.path.join(ROOT, "pyproject.toml"),
                  "--cache-dir", os.devnull], tmp_path, source)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not callable  [operator]" in done.stdout
    assert 'Item "None" of "str | None" has no attribute "split"  [union-attr]' in done.stdout
