"""`hetero --help` and every subcommand's --help explain themselves."""

import pytest

from hetero.cli import build_parser


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help(hetero_cli):
    code, out, _ = hetero_cli("--help")
    assert code == 0
    assert "mixed fleet" in out
    for name in subcommands():
        assert name in out


@pytest.mark.parametrize("name", subcommands())
def test_subcommand_help(hetero_cli, name):
    code, out, _ = hetero_cli(name, "--help")
    assert code == 0
    assert out.startswith("usage: hetero " + name)
    assert len(out.splitlines()) >= 4


def test_no_command_prints_help_and_exits_2(hetero_cli):
    code, out, _ = hetero_cli()
    assert code == 2 and "usage" in out


def test_unknown_flag_exits_2(hetero_cli):
    code, _, err = hetero_cli("validate", "--frobnicate", "x.yaml")
    assert code == 2 and "unrecognized arguments" in err


@pytest.mark.parametrize("argv, expected", [
    (["run", "--steps", "0"], "hetero run: error: argument --steps"),
    (["plan", "--top", "many"], "hetero plan: error: argument --top"),
    (["validate", "--frobnicate", "x.yaml"], "unrecognized arguments: --frobnicate"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_a_bad_flag_is_one_line_naming_it(hetero_cli, argv, expected):
    code, out, err = hetero_cli(*argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "--help" in lines[0], lines



def test_every_subcommand_and_bench_target_is_registered():
    """Each name in SUBCOMMANDS and bench's TARGETS has its parser."""
    from hetero.cli import SUBCOMMANDS, build_parser
    from hetero.commands.bench import TARGETS

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices   # pylint: disable=protected-access
    assert sorted(commands) == sorted(SUBCOMMANDS)
    targets = next(a for a in commands["bench"]._actions if a.dest == "target").choices  # pylint: disable=protected-access
    assert sorted(targets) == sorted(TARGETS)


@pytest.mark.parametrize("listing", ["hetero.cli.SUBCOMMANDS", "hetero.commands.bench.TARGETS"])
def test_a_module_that_does_not_import_is_an_error_not_a_missing_command(monkeypatch, listing):
    """A command module that fails to import used to be skipped quietly (the command just vanished)."""
    import importlib

    from hetero.cli import build_parser

    owner, name = listing.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(owner), name, [*getattr(importlib.import_module(owner), name),
                                                               "no_such_module"])
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        build_parser()


def test_a_reader_that_goes_away_is_not_a_traceback():
    """`hetero env --json | head -0`: the pipe closes before hetero writes. No traceback, and the
    exit status of a process that SIGPIPE would have ended (141)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "hetero", "env", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()                     # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err
