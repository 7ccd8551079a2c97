"""A user's script under `hetero launch` gets the emulated contract by default: the emulated
accelerator's dist_backend is hetero-strict (registered by `accelerators`), which refuses host
tensors; an emulated island with `backend: gloo` gets plain gloo from the same call."""

import os

import pytest

from tests.hetero.launch.test_launch import WORKERS, finish, free_port_block, launcher, prefixed_lines

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

CLUSTER = """
name: contract-launch
coordinator: {host: 127.0.0.1, port: %d}
islands:
  - {name: strict, accelerator: emulated, chip: emu-fast, nodes: [{host: 127.0.0.1, chips: 2}]}
  - {name: plain, accelerator: emulated, chip: emu-slow, backend: gloo, nodes: [{host: 127.0.0.1, chips: 2}]}
"""


def test_a_script_asking_the_accelerator_gets_the_strict_backend_unless_the_island_says_gloo(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER % free_port_block(8))
    env = {"HETERO_EMULATED_STRICT": "", "HETERO_BACKEND": ""}   # the defaults, whatever the caller set
    proc = launcher(str(cluster), "--run-dir", str(tmp_path / "run"),
                    os.path.join(WORKERS, "accelerator_allreduce.py"), env=env)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    assert sorted(prefixed_lines(stdout)) == [
        ("plain", 0, "rank 0: gloo sum 3, host tensor taken"),
        ("plain", 1, "rank 1: gloo sum 3, host tensor taken"),
        ("strict", 0, "rank 0: hetero-strict sum 3, host tensor refused"),
        ("strict", 1, "rank 1: hetero-strict sum 3, host tensor refused"),
    ], stdout
