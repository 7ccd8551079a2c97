"""`hetero report`: a recorded run directory -> one self-contained HTML page with PNG figures.

load (files -> Run, or a UserError naming the bad file) -> analysis (the numbers)
-> timeline (per-rank segments) -> figures (PNGs) -> page (HTML) and summary (terminal).
"""

from __future__ import annotations

import os

from hetero.errors import UserError
from hetero.report import analysis, figures, page, timeline
from hetero.report.load import load_run
from hetero.report.units import flops_text

FIGURES = ("where_time_went", "timeline", "step_times", "mfu", "memory", "loss", "efficiency")


def build(path: str, out: str | None = None) -> tuple[dict, str]:
    """Analyse the run at `path`, write the HTML (default RUN_DIR/report.html) and its PNGs beside it."""
    run = load_run(path)
    report = analysis.analyse(run)
    step = timeline_step(run)
    start = step_start(run, step)
    parts = timeline.segments(run.plan, run.ranks, step["step"], start, step["step_s"])
    images = {
        "where_time_went": figures.where_time_went(report),
        "timeline": figures.step_timeline(report, parts, step["step"]),
        "step_times": figures.step_times(report),
        "mfu": figures.mfu(report),
        "memory": figures.memory(report),
        "loss": figures.loss(report),
    }
    if report["efficiency"]:
        images["efficiency"] = figures.efficiency(report["efficiency"])
    out = os.path.abspath(out or os.path.join(run.run_dir, "report.html"))
    write(out, page.render(report, images, step["step"]), images)
    report["html"] = out
    report["figures"] = {name: figure_path(out, name) for name in images}
    return report, out


def timeline_step(run) -> dict:
    """The steady step with the median step time: a typical one to draw."""
    steady = sorted(analysis.steady_steps(run.steps), key=lambda s: s["step_s"])
    return steady[(len(steady) - 1) // 2]


def step_start(run, step: dict) -> float:
    """Wall-clock start of a step: its end stamp less its duration, else its earliest action."""
    if "time" in step:
        return step["time"] - step["step_s"]
    posted = [r["posted_at"] for records in run.ranks.values() for r in records if r["step"] == step["step"]]
    return min(posted) if posted else 0.0


def figure_path(html_path: str, name: str) -> str:
    stem = os.path.splitext(html_path)[0]
    return f"{stem}-{name}.png"


def write(html_path: str, text: str, images: dict) -> None:
    try:
        os.makedirs(os.path.dirname(html_path), exist_ok=True)
        with open(html_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        for name, png in images.items():
            with open(figure_path(html_path, name), "wb") as handle:
                handle.write(png)
    except OSError as exc:
        raise UserError(f"--out {html_path}: cannot write ({exc.strerror or exc})") from None


def summary_lines(report: dict) -> list[str]:
    """The 5-8 line terminal summary."""
    emulated = " (EMULATED chips)" if report["emulated"] else ""
    mfu = ", ".join(f"{chip}{' EMU' if v['emulated'] else ''} {v['mfu']:.1%} "
                    f"({flops_text(v['achieved_tflops'] * 1e12)} per chip)" for chip, v in report["mfu"].items())
    split = report["time_split"]
    lines = [
        f"report: {report['model']} on {report['cluster']}{emulated}, {report['steps']} steps",
        f"  step time   {report['measured_step_s']:.3f} s measured (median, steady) vs {report['predicted_step_s']:.3f} s "
        f"predicted (x{report['ratio']:.2f})",
        f"  tokens/s    {report['tokens_per_s']:,.0f} (predicted {report['predicted_tokens_per_s']:,.0f})",
        f"  MFU         {mfu}",
        f"  bubble      {report['bubble_share']:.1%} of rank time idle (predicted {report['predicted_bubble_share']:.1%}); "
        f"compute {split['forward'] + split['backward']:.0%}",
        f"  comm        {comm_text(report['exposed_comm'])}; bridge alone {report['exposed_bridge_share']:.1%} "
        f"({report['exposed_bridge_s'] * 1e3:.1f} ms)",
    ]
    if report["efficiency"]:
        e = report["efficiency"]
        subs = " + ".join(f"{n} {v:,.0f}" for n, v in e["subfleet_tokens_per_s"].items())
        lines.append(f"  E           {e['efficiency']:.3f} = {e['mixed_tokens_per_s']:,.0f} / ({subs}) tokens/s")
    lines.append(f"  refused     {analysis.refusal_text(report['refusals'])}")
    if any(e["event"] in analysis.MARKED_EVENTS for e in report["events"]):   # something happened to the job
        lines.append(f"  events      {analysis.event_counts(report['events'])}")
        lines += [f"    hang      {event['text']}" for event in report["events"] if event["event"] == "hang"]
    lines += [f"  note        {note}" for note in report["notes"]]
    lines.append(f"  page        {report['html']}")
    return lines


def comm_text(comm: dict) -> str:
    """One line: exposed communication's share of the step (worst rank), and its parts."""
    parts = ", ".join(f"{COMM_NAMES[kind]} {share:.1%}" for kind, share in comm["parts"].items())
    reduce = "" if comm["reduce_share"] is None else f"; gradient reductions {comm['reduce_share']:.1%} (rank 0)"
    return (f"{comm['share']:.1%} of the step exposed, worst rank ({comm['s'] * 1e3:.1f} ms: {parts}; "
            f"mean over ranks {comm['mean_share']:.1%}){reduce}")


COMM_NAMES = {"bridge_recv": "bridge receive", "p2p_recv": "p2p receive", "send": "send"}


__all__ = ["build", "summary_lines", "load_run"]
