"""Errors a user can fix. The CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input: a file, a flag or a combination the user must change."""

    exit_code = 2


class ConfigError(UserError):
    """A problem in one field of one configuration file."""

    def __init__(self, source: str, path: str, message: str):
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")


class JobFatalError(UserError):
    """A failure every restart would repeat: a plan for another model, a corrupt
    checkpoint with no good one left, a full disk. The job stops at once instead
    of burning its restarts; the message names the file and what is wrong."""


# A worker that stops on a JobFatalError exits with this code, after printing one
# line and writing it to <run dir>/fatal/rankNNNNN.txt; launchers do not restart on it.
FATAL_EXIT_CODE = 3

# A worker that stops because the coordinator reported a peer failed exits with this
# code: the launcher names the peer's failure, not this follower's.
PEER_STOPPED_EXIT_CODE = 43
