"""Read and check what the user handed the launcher: cluster, plan, entrypoint, token.

Every problem is a UserError (one line, exit 2), raised before any process starts.
"""

from __future__ import annotations

import importlib.util
import os
import secrets

from hetero.config import ClusterConfig, load_job
from hetero.errors import UserError

TOKEN_ENV = "HETERO_JOB_TOKEN"


def load_cluster(cluster) -> tuple[ClusterConfig, str | None]:
    """(config, absolute path or None) from a path or an already loaded ClusterConfig."""
    if isinstance(cluster, ClusterConfig):
        return cluster, None
    path = os.fspath(cluster)
    config = load_job(cluster=path).cluster
    assert config is not None   # a cluster file given is loaded, or load_job raised
    return config, os.path.abspath(path)


def load_plan(path: str, cluster: ClusterConfig):
    """The Plan in `path`, checked for format, types and ranges and against `cluster` (name,
    islands, chips, node placement, memory): hetero.plan_check, one ConfigError otherwise."""
    from hetero.config import Job
    from hetero.plan_check import load_checked_plan

    return load_checked_plan(path, Job(cluster=cluster))


def entry_command(entrypoint: str, args=()) -> list[str]:
    """The python arguments that run the entrypoint: [script, *args] or ["-m", module, *args].

    `entrypoint` is a script path, or "-m module" for a module."""
    entrypoint = entrypoint.strip()
    if entrypoint.startswith("-m ") or entrypoint.startswith("-m\t"):
        module = entrypoint[2:].strip()
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise UserError(f"module {module!r} not found (the entrypoint given as '-m {module}')")
        return ["-m", module, *map(str, args)]
    if not os.path.isfile(entrypoint):
        raise UserError(f"script {entrypoint} not found")
    return [os.path.abspath(entrypoint), *map(str, args)]


def job_token(token_file: str | None, env: dict, needed: bool) -> tuple[str, bool]:
    """(token, generated). From --token-file, else HETERO_JOB_TOKEN, else a fresh one.

    `needed`: this launcher joins a job another node started, so it must be told the token."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise UserError(f"--token-file {token_file}: cannot read: {exc.strerror or exc}") from None
        if not token:
            raise UserError(f"--token-file {token_file}: is empty")
        return token, False
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token, False
    if needed:
        raise UserError(f"this node joins a job whose coordinator runs on another host: give the job's token "
                        f"in {TOKEN_ENV} or with --token-file (the head node's launcher writes it to its run dir)")
    return secrets.token_hex(16), True
