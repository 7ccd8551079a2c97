#!/usr/bin/env bash
# Quickstart 2: set up .venv with the test tools (idempotent), run the static
# checks (scripts/lint.sh), then the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" --dev
cd "$root"
bash scripts/lint.sh
exec .venv/bin/python -m pytest --durations=30 "$@"
