"""The worker leaves without the interpreter's teardown (torch 2.13 + gloo may abort there): its exit
code and everything it printed still come out."""

import subprocess
import sys

from tests.conftest import ROOT


def test_exit_without_teardown_keeps_the_code_and_the_output():
    script = ("import sys; from hetero.engine.worker import exit_without_teardown; "
              "print('stepped', flush=False); sys.stderr.write('said'); exit_without_teardown(3)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, "stepped\n", "said")
