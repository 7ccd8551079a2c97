import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.fixture
def configs_dir() -> str:
    return CONFIGS


@pytest.fixture
def hetero_cli(capsys):
    """Run `hetero ARGS...` in this process; return (exit code, stdout, stderr)."""
    from hetero.cli import main

    def run(*argv: str):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse exits for --help and usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def free_port() -> int:
    """A port free on 127.0.0.1 now (a test's own store or group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hetero_subprocess(*argv: str, timeout: float = 60, **kwargs):
    import subprocess

    return subprocess.run([sys.executable, "-m", "hetero", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)
