#!/usr/bin/env bash
# Make .venv beside the repository and install hetero into it. Idempotent:
# a second run only checks that everything is present.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    runtime + test tools (and Ray, for the --on ray tests)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev,ray]"

python="${PYTHON:-python3}"
"$python" - <<'PY' || { echo "hetero needs Python 3.10 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# Keep the CPU build of torch where none is installed: an open range would pull
# a multi-GB CUDA build. Users who bring their own torch keep it.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    "${pip[@]}" install "torch==2.13.0"
fi

stamp="$venv/.hetero-installed$extra"
if [[ ! -f "$stamp" || "$root/pyproject.toml" -nt "$stamp" ]]; then
    echo "setup: installing hetero$extra (editable)"
    "${pip[@]}" install -e "$root$extra"
    touch "$stamp"
fi
