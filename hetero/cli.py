"""The `hetero` command: one module per subcommand under hetero/commands.

Each subcommand module exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed arguments and returning an exit code.
Adding a subcommand means adding a module and naming it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys

from hetero import __version__
from hetero.errors import UserError

# Order is the order `hetero --help` lists them in.
SUBCOMMANDS = ["validate", "plan", "profile", "run", "launch", "bench", "report", "check", "env", "data", "compare", "export"]


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line, like every other bad input (argparse's own error prints
    the whole usage first). Subcommand parsers are made of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hetero",
        description=(
            "Train one model on a mixed fleet of chips (NVIDIA, Ascend, Kunlun, CPU, emulated). "
            "Describe the fleet, model and training in YAML; hetero validates, plans and runs it."
        ),
        epilog="Run 'hetero COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"hetero {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:       # every one is built: a module that fails to import is a bug to see
        importlib.import_module(f"hetero.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"hetero {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hetero {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`hetero plan --json | head`): not an error of ours. Point stdout at
        # /dev/null so that the interpreter's own flush at exit does not raise again, and exit as a
        # process killed by SIGPIPE would (128 + 13), without a traceback.
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass    # stdout is not a file descriptor (captured in-process): nothing will flush to a pipe


if __name__ == "__main__":
    raise SystemExit(main())
