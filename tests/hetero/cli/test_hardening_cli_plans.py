"""Plans and flags that used to give a silent wrong answer or a traceback: every one is now
refused with one line and exit 2 before any worker starts, leaving no run directory behind.

The corpus tests/fixtures/malformed-plans/ holds the default job's plan (`hetero plan --out`) broken
one way per file (make_corpus.py wrote it); EXPECTED.tsv gives the fragment each error holds.
No test here trains: where a plan must get through, the launcher is replaced by a fake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES, ROOT, WORKERS, hetero_subprocess
from hetero.config import load_job
from hetero.errors import ConfigError, UserError
from hetero.plan_check import load_checked_plan

pytestmark = pytest.mark.timeout(120)

CORPUS = os.path.join(FIXTURES, "malformed-plans")
CONFIGS = {kind: os.path.join(ROOT, "configs", name) for kind, name in
           (("cluster", "emulated-mixed.yaml"), ("model", "llama-tiny.yaml"), ("train", "train-tiny.yaml"))}
JOB_FLAGS = [arg for kind, path in CONFIGS.items() for arg in (f"--{kind}", path)]
WORKER = os.path.join(WORKERS, "torchrun_allreduce.py")


def _rows():
    with open(os.path.join(CORPUS, "EXPECTED.tsv"), encoding="utf-8") as manifest:
        return [tuple(line.rstrip("\n").split("\t")) for line in manifest if not line.startswith("#")]


ROWS = _rows()
LAUNCH_ROWS = [(name, fragment) for name, _, fragment in ROWS if fragment != "-"]


def one_line(code, out, err, command: str, *fragments: str) -> str:
    """The refusal contract: exit 2, one line on stderr that starts 'hetero COMMAND: error:', no traceback."""
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hetero {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def fake_launcher(monkeypatch):
    """Replace the fleet launcher: record its call, write one step record, return `code`
    (or raise `raises`), so a run that gets through every check starts no process."""
    calls = []
    behaviour = {"code": 0, "raises": None}

    def launch_fleet(cluster, plan_path, entrypoint, args=(), **kwargs):
        calls.append({"plan_path": plan_path, "entrypoint": entrypoint, "args": list(args), **kwargs})
        if behaviour["raises"]:
            raise behaviour["raises"]
        with open(os.path.join(kwargs["run_dir"], "metrics", "steps.jsonl"), "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": 1, "loss": 6.9, "tokens_per_s": 100.0, "step_s": 1.0}) + "\n")
        return behaviour["code"]

    monkeypatch.setattr("hetero.launch.fleet.launch_fleet", launch_fleet)
    launch_fleet.calls = calls
    launch_fleet.behaviour = behaviour
    return launch_fleet


@pytest.fixture(scope="module")
def good_plan(tmp_path_factory) -> str:
    from hetero.cli import main

    path = str(tmp_path_factory.mktemp("plan") / "plan.json")
    assert main(["plan", *JOB_FLAGS, "--json", "--out", path]) == 0
    return path


# -- the corpus ----------------------------------------------------------------------------------

def test_corpus_is_large_and_complete():
    listed = {name for name, _, _ in ROWS}
    on_disk = {name for name in os.listdir(CORPUS) if name.endswith(".json")}
    assert listed == on_disk
    assert len(ROWS) >= 40
    assert len(LAUNCH_ROWS) < len(ROWS)       # some (model/train) mismatches only run can see


@pytest.mark.parametrize("name,fragment", [(n, f) for n, f, _ in ROWS], ids=[n for n, _, _ in ROWS])
def test_run_refuses_broken_plan_with_one_line_and_no_run_dir(hetero_cli, fake_launcher, tmp_path, name, fragment):
    path = os.path.join(CORPUS, name)
    out = tmp_path / "runs" / "run"
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", path, "--out", str(out)), "run", path, fragment)
    assert not fake_launcher.calls
    assert list(tmp_path.iterdir()) == []             # not even the parent folder


@pytest.mark.parametrize("name,fragment", LAUNCH_ROWS, ids=[n for n, _ in LAUNCH_ROWS])
def test_launch_refuses_broken_plan_with_one_line(hetero_cli, tmp_path, name, fragment):
    path = os.path.join(CORPUS, name)
    run_dir = tmp_path / "launch-run"
    one_line(*hetero_cli("launch", "--cluster", CONFIGS["cluster"], "--plan", path, "--run-dir", str(run_dir), WORKER),
             "launch", path, fragment)
    assert not run_dir.exists()


@pytest.mark.parametrize("name", ["binary.json", "truncated.json", "empty.json", "global-batch-16.json"])
def test_real_entry_point_refuses_without_traceback(tmp_path, name):
    """The installed `hetero` script (a fresh process), not only the in-process main."""
    path = os.path.join(CORPUS, name)
    out = tmp_path / "run"
    script = os.path.join(os.path.dirname(sys.executable), "hetero")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "hetero"]
    result = subprocess.run([*command, "run", *JOB_FLAGS, "--plan", path, "--out", str(out)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    one_line(result.returncode, result.stdout, result.stderr, "run", path)
    assert not out.exists()


def test_launch_binary_plan_in_a_fresh_process(tmp_path):
    path = os.path.join(CORPUS, "binary.json")
    result = hetero_subprocess("launch", "--cluster", CONFIGS["cluster"], "--plan", path, WORKER)
    one_line(result.returncode, result.stdout, result.stderr, "launch", path, "not UTF-8 text")


# -- the plan the job asked for gets through, and the worker's re-check ----------------------------

def test_good_plan_reaches_the_launcher_and_is_what_the_run_dir_holds(hetero_cli, fake_launcher, tmp_path, good_plan):
    out = tmp_path / "run"
    code, stdout, err = hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--out", str(out), "--steps", "3", "--json")
    assert code == 0, err
    (call,) = fake_launcher.calls
    assert call["entrypoint"] == "-m hetero.engine.worker"
    assert call["args"][call["args"].index("--steps") + 1] == "3"
    written = json.loads((out / "plan.json").read_text())
    original = json.loads(open(good_plan).read())
    assert {k: written[k] for k in ("stages", "ranks", "global_batch")} == \
        {k: original[k] for k in ("stages", "ranks", "global_batch")}
    assert json.loads(stdout)["requested_steps"] == 3


def test_worker_recheck_refuses_a_plan_for_another_train_file(good_plan):
    job = load_job(**CONFIGS)
    assert load_checked_plan(good_plan, job).global_batch == job.train.global_batch
    with pytest.raises(ConfigError) as refused:
        load_checked_plan(os.path.join(CORPUS, "global-batch-16.json"), job)
    assert refused.value.path == "global_batch"
    assert "the plan says 16" in str(refused.value) and "says 8" in str(refused.value)


# -- --out and the run directory -----------------------------------------------------------------

def test_out_is_an_existing_file(hetero_cli, fake_launcher, tmp_path, good_plan):
    target = tmp_path / "taken"
    target.write_text("keep me")
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--out", str(target)), "run",
             "is a file, not a directory")
    assert target.read_text() == "keep me" and not fake_launcher.calls


def test_out_below_an_existing_file(hetero_cli, fake_launcher, tmp_path, good_plan):
    target = tmp_path / "taken"
    target.write_text("keep me")
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--out", str(target / "run")), "run",
             "is a file, not a directory")
    assert target.read_text() == "keep me"


def test_missing_plan_file(hetero_cli, tmp_path):
    missing = tmp_path / "nope.json"
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", str(missing), "--out", str(tmp_path / "run")), "run",
             f"{missing}: no such file")
    assert not (tmp_path / "run").exists()


def test_plan_path_is_a_directory(hetero_cli, tmp_path):
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", str(tmp_path), "--out", str(tmp_path / "run")), "run",
             "is a directory")


def test_launcher_refusal_takes_back_only_what_the_run_made(hetero_cli, fake_launcher, tmp_path, good_plan):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    fake_launcher.behaviour["raises"] = UserError("coordinator port 29400 is taken")
    code, _, err = hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--out", str(out))
    assert code == 2 and err.strip().splitlines()[-1] == "hetero run: error: coordinator port 29400 is taken"
    assert sorted(os.listdir(out)) == ["notes.txt"]
    fresh = tmp_path / "fresh" / "run"
    code, _, err = hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--out", str(fresh))
    assert code == 2 and "Traceback" not in err
    assert not (tmp_path / "fresh").exists()


# -- numeric flags -------------------------------------------------------------------------------

def flag_refused(code, out, err, command: str, flag: str) -> None:
    """argparse's refusal: exit 2, the flag named on the error line, no traceback."""
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hetero {command}: error: argument {flag}: "), err


@pytest.mark.parametrize("value", ["0", "-1", "1000000001", "10e3", "abc", "2.5", ""])
def test_run_steps_out_of_range(hetero_cli, fake_launcher, tmp_path, value):
    flag_refused(*hetero_cli("run", "--steps", value, "--out", str(tmp_path / "run")), "run", "--steps")
    assert not fake_launcher.calls and not (tmp_path / "run").exists()


def test_run_steps_one_is_one_step(hetero_cli, fake_launcher, tmp_path, good_plan):
    code, _, err = hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--steps", "1", "--out", str(tmp_path / "r"),
                              "--json")
    assert code == 0, err
    args = fake_launcher.calls[0]["args"]
    assert args[args.index("--steps") + 1] == "1"


@pytest.mark.parametrize("argv,flag", [
    (("run", "--max-restarts", "-1"), "--max-restarts"),
    (("run", "--max-restarts", "1001"), "--max-restarts"),
    (("launch", "--cluster", "c.yaml", "--max-restarts", "-1", "x.py"), "--max-restarts"),
    (("launch", "--cluster", "c.yaml", "--rdzv-timeout", "nan", "x.py"), "--rdzv-timeout"),
    (("launch", "--cluster", "c.yaml", "--rdzv-timeout", "0", "x.py"), "--rdzv-timeout"),
    (("launch", "--cluster", "c.yaml", "--rdzv-timeout", "inf", "x.py"), "--rdzv-timeout"),
    (("launch", "--cluster", "c.yaml", "--rdzv-timeout", "-5", "x.py"), "--rdzv-timeout"),
    (("plan", *JOB_FLAGS, "--top", "0"), "--top"),
    (("plan", *JOB_FLAGS, "--top", "1000000"), "--top"),
])
def test_numeric_flags_have_ranges(hetero_cli, argv, flag):
    flag_refused(*hetero_cli(*argv), argv[0], flag)


def test_kind_must_match_the_given_plan(hetero_cli, fake_launcher, tmp_path, good_plan):
    kind = json.loads(open(good_plan).read())["kind"]
    other = "pipeline" if kind == "replicas" else "replicas"
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--kind", other, "--out", str(tmp_path / "run")),
             "run", f"--kind {other}: the plan {good_plan} is a '{kind}' plan")
    assert not fake_launcher.calls and not (tmp_path / "run").exists()


def test_a_run_that_recorded_no_step_says_so(hetero_cli, monkeypatch, tmp_path, good_plan):
    monkeypatch.setattr("hetero.launch.fleet.launch_fleet", lambda *args, **kwargs: 0)
    code, _, err = hetero_cli("run", *JOB_FLAGS, "--plan", good_plan, "--out", str(tmp_path / "run"))
    assert code == 0 and "Traceback" not in err
    assert "no step was recorded" in err.strip().splitlines()[-1]
