"""`hetero bench TARGET`: benchmarks that print the anchor they compare against.

Each target is a module hetero/bench/<target>.py exposing HELP (one line),
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import importlib

TARGETS = ["accelerators", "planner", "bridge", "runtime", "efficiency", "memory", "checkpoint", "recovery"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its comparison anchor",
        description="Benchmarks. Each prints the anchor it compares against, measured in the same run.",
    )
    targets = parser.add_subparsers(dest="target", metavar="TARGET")
    for name in TARGETS:           # every one is built: a module that fails to import is a bug to see
        module = importlib.import_module(f"hetero.bench.{name}")
        sub = targets.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    parser.set_defaults(func=lambda args: _no_target(parser))


def _no_target(parser) -> int:
    parser.print_help()
    return 2
