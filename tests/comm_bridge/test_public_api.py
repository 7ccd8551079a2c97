"""comm_bridge's public API: every exported name resolves, and the coordinator's side stays light."""

import subprocess
import sys

import comm_bridge
from comm_bridge.channel import Endpoint


def test_every_exported_name_resolves_to_the_module_that_defines_it():
    for name in comm_bridge.__all__:
        assert getattr(comm_bridge, name) is not None, name
    assert comm_bridge.Endpoint is Endpoint  # the old import path and the package's are one class
    assert comm_bridge.transport_options("zmq") == {"shm": False, "stream": False}


def test_importing_the_coordinator_client_does_not_load_torch_or_zmq():
    code = ("import sys, comm_bridge, comm_bridge.client, comm_bridge.coordinator; "
            "print(sorted(m for m in ('torch', 'zmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
