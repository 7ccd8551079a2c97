"""Knocks on the job's coordinator with a wrong token, then exits 0 (tests/hetero/launch/test_launch_lifecycle.py).

Global rank 0 calls Register with the job token reversed and prints "refused" when the
coordinator refuses it; the launcher must count the refusal in <run dir>/metrics/coordinator.json.
"""

import os

from comm_bridge.client import CoordinatorClient
from comm_bridge.errors import AuthenticationError

if os.environ["HETERO_GLOBAL_RANK"] == "0":
    client = CoordinatorClient(os.environ["HETERO_COORDINATOR"], os.environ["HETERO_JOB_TOKEN"][::-1], 0, timeout=10)
    try:
        client.register(island=os.environ["HETERO_ISLAND"])
        print("accepted", flush=True)
    except AuthenticationError:
        print("refused", flush=True)
    finally:
        client.close()
