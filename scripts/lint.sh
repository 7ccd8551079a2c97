#!/usr/bin/env bash
# Static checks over the four packages and the tests (settings in pyproject.toml):
# ruff for pyflakes/bugbear-class bugs, pylint for the few inference checks ruff
# lacks (e.g. calling a name that a local variable shadows), mypy for types (a value
# that may be None used as present, a wrong argument). Run by scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
packages=(accelerators comm_bridge partitioner hetero)
echo "lint: ruff check ${packages[*]} tests"
.venv/bin/ruff check --quiet "${packages[@]}" tests
echo "lint: pylint (inference checks) ${packages[*]}"
.venv/bin/pylint "${packages[@]}"
echo "lint: mypy (types) ${packages[*]}"
.venv/bin/mypy "${packages[@]/#/--package=}"
