import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TESTS = os.path.join(ROOT, "tests")
FIXTURES = os.path.join(TESTS, "fixtures")   # YAML, plans and recorded runs the tests read
WORKERS = os.path.join(TESTS, "workers")     # small scripts the launch tests start as workers


@pytest.fixture
def configs_dir() -> str:
    return CONFIGS


@pytest.fixture
def fresh_accelerator(monkeypatch):
    """No accelerator chosen by the environment or cached from an earlier test, before or after."""
    import accelerators
    from accelerators import registry

    monkeypatch.delenv(registry.SELECT_ENV, raising=False)
    monkeypatch.delenv("HETERO_EMULATED_CHIP", raising=False)
    accelerators.reset_accelerator()
    yield
    accelerators.reset_accelerator()


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


# -- the bridge tests (tests/comm_bridge/): endpoints that know each other, closed after the test --
BRIDGE_TOKEN = "test-token"


class ConnectedEndpoints:
    """Makes endpoints with each other in their address books; closes them (and anything
    else handed to `closing`, in reverse order) when the test ends, pass or fail."""

    def __init__(self):
        self._open = []

    def __call__(self, n: int = 2, token=BRIDGE_TOKEN, **options) -> list:
        from comm_bridge.channel import Endpoint     # the bridge only for the tests that use it

        endpoints = []
        for rank in range(n):
            endpoints.append(self.closing(Endpoint(rank, token, **options)))
        book = [endpoint.address() for endpoint in endpoints]
        for endpoint in endpoints:
            endpoint.add_peers(book)
        return endpoints

    def closing(self, thing):
        """Close `thing` (a socket, an endpoint, ...) at the end of the test."""
        self._open.append(thing)
        return thing

    def close_all(self) -> None:
        while self._open:
            self._open.pop().close()


@pytest.fixture
def connected_endpoints():
    """`connected_endpoints(n=2, token=BRIDGE_TOKEN, **Endpoint options)` -> ranks 0..n-1, peered."""
    made = ConnectedEndpoints()
    yield made
    made.close_all()
