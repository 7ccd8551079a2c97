"""Where worker output goes: a file per rank under the run dir, teed to the console with a prefix.

torch elastic redirects each worker's stdout/stderr to files and tails them to
the agent's own stdout/stderr, prefixing every line (LocalElasticAgent's
log_line_prefix_template). We only choose readable paths:

    <run_dir>/logs/attempt_<k>/<island>.<rank>/stdout.log   (and stderr.log, error.json)

where <rank> is the island-local rank, as in the console prefix "[island:rank] ".
Beside them, each island agent that saw workers fail leaves

    <run_dir>/logs/attempt_<k>/<island>.agent<node>.json   {"failures": [{"rank", "island_rank", "exitcode", "time"}]}

(global and island-local rank; <node> is the agent's rendezvous member number), and a
worker that stops on a failure every restart would repeat leaves its one line in

    <run_dir>/fatal/rank<global rank, 5 digits>.txt
"""

from __future__ import annotations

import os
import shutil

from torch.distributed.elastic.multiprocessing import LogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import LogsDest

# ${role_name} is the island name; ${rank} the island-local rank (torchrun's RANK).
LINE_PREFIX = "[${role_name}:${rank}] "


def attempt_log_dir(run_dir: str, attempt: int) -> str:
    return os.path.join(run_dir, "logs", f"attempt_{attempt}")


def agent_outcome_path(log_dir: str, island: str, group_rank: int) -> str:
    """Where the agent of `island`'s rendezvous member `group_rank` records its workers' failures."""
    return os.path.join(log_dir, f"{island}.agent{group_rank}.json")


def fatal_path(run_dir: str, rank: int) -> str:
    """Where global rank `rank` keeps the line of a failure every restart would repeat."""
    return os.path.join(run_dir, "fatal", f"rank{rank:05d}.txt")


class IslandLogs(LogsSpecs):
    def __init__(self, log_dir: str, island: str):
        super().__init__(log_dir=log_dir, redirects=Std.ALL, tee=Std.ALL)
        self.island = island

    @property
    def root_log_dir(self) -> str:
        return str(self._root_log_dir)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        dest = LogsDest()
        for local_rank, env in envs.items():
            folder = os.path.join(self.root_log_dir, f"{self.island}.{env['RANK']}")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            dest.stdouts[local_rank] = dest.tee_stdouts[local_rank] = os.path.join(folder, "stdout.log")
            dest.stderrs[local_rank] = dest.tee_stderrs[local_rank] = os.path.join(folder, "stderr.log")
            dest.error_files[local_rank] = os.path.join(folder, "error.json")
            env["TORCHELASTIC_ERROR_FILE"] = dest.error_files[local_rank]
        dest.filtered_stdout = os.path.join(self.root_log_dir, f"{self.island}.filtered_stdout.log")
        dest.filtered_stderr = os.path.join(self.root_log_dir, f"{self.island}.filtered_stderr.log")
        return dest
