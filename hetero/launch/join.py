"""`hetero run --node HOST` on a member host: take the job the head hands out, then run this host's share.

The head (`hetero run --node HEAD --model M --train T`, HEAD the cluster's coordinator host) plans
and publishes, through its coordinator (checked by the job token), the job under JOB_KEY: the
cluster, model and train files' text, the plan, the number of steps and the worker's settings. A
member needs only the cluster file (to find the coordinator), its host and the token: it waits for
that key, writes the files into its own run directory (its logs go there too; checkpoints go to the
head's checkpoint directory, which must be storage every host sees at the same path, as the engine
requires), and runs `hetero launch --node HOST` for the worker with them (hetero.launch.fleet.launch_fleet), which follows the head's attempts and re-plans.
"""

from __future__ import annotations

import json
import os
import time

from hetero.errors import UserError
from hetero.launch import inputs
from hetero.launch.protocol import JOB_KEY

WAIT_S = 300.0


def share_of(run_dir: str, steps: int) -> dict:
    """What the head hands its members: the run directory's cluster/model/train text and the steps."""
    files = {}
    for part in ("cluster", "model", "train"):
        with open(os.path.join(run_dir, f"{part}.yaml"), encoding="utf-8") as handle:
            files[part] = handle.read()
    # Checkpoints must be storage every host sees (the engine checks): the members write into the head's.
    return {"files": files, "steps": steps, "checkpoint_dir": os.path.join(os.path.abspath(run_dir), "checkpoints")}


def fetch_job(cluster_path: str, token: str, wait_s: float = WAIT_S) -> dict:
    """The job the head publishes (JOB_KEY), waiting up to `wait_s` for its coordinator and the key."""
    from comm_bridge.client import CoordinatorClient
    from comm_bridge.errors import AuthenticationError, CoordinatorError

    config, _ = inputs.load_cluster(cluster_path)
    address = f"{config.coordinator.host}:{config.coordinator.port}"
    deadline = time.monotonic() + wait_s
    while True:
        client = None
        try:
            client = CoordinatorClient(address, token, 0, timeout=5.0)
            return json.loads(client.kv_get(JOB_KEY, timeout=1.0))
        except AuthenticationError:
            raise UserError(f"the coordinator at {address} refused this host's job token (give every host "
                            f"the head's token with --token-file)") from None
        except (CoordinatorError, OSError, ValueError):
            if time.monotonic() > deadline:
                raise UserError(f"no job from a head at {address} after {wait_s:.0f} s (is `hetero run --node "
                                f"{config.coordinator.host}` running there?)") from None
            time.sleep(0.5)
        finally:
            if client is not None:
                client.close()


def write_job(run_dir: str, job: dict) -> dict:
    """The head's files in this host's run directory; returns {part: path} (plan: None without one)."""
    os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
    paths: dict[str, str | None] = {}
    for part in ("cluster", "model", "train"):
        path = paths[part] = os.path.join(run_dir, f"{part}.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(job["files"][part])
    paths["plan"] = None
    if job.get("plan"):
        path = paths["plan"] = os.path.join(run_dir, "plan.json")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(job["plan"])
    return paths


def run_member(cluster_path: str, node: str, token_file: str, run_dir: str, say) -> int:
    """Join the job the head runs and run this host's workers until it ends; the launcher's exit code."""
    from hetero.launch.fleet import launch_fleet

    token, _ = inputs.job_token(token_file, {}, needed=True)
    config, _ = inputs.load_cluster(cluster_path)
    if node == config.coordinator.host:
        raise UserError(f"--node {node} is the coordinator's host: the head, which needs --model and --train")
    say(f"waiting for the job from the head at {config.coordinator.host}:{config.coordinator.port}")
    job = fetch_job(cluster_path, token)
    run_dir = os.path.abspath(run_dir)
    paths = write_job(run_dir, job)
    checkpoints = job.get("checkpoint_dir") or os.path.join(run_dir, "checkpoints")
    args = ["--steps", str(int(job["steps"])), "--checkpoint-dir", checkpoints]
    if paths["plan"]:
        args = ["--plan", paths["plan"], *args]
    args += [arg for part in ("cluster", "model", "train") for arg in (f"--{part}", paths[part])]
    say(f"joined: {job['steps']} steps; run directory {run_dir}")
    with open(os.path.join(run_dir, "launcher.log"), "a", encoding="utf-8") as log:
        return launch_fleet(paths["cluster"], paths["plan"], "-m hetero.engine.worker", args, node=node,
                            run_dir=run_dir, token_file=token_file, stdout=log, stderr=log, checkpoint_dir=checkpoints)
