"""The report's figures: matplotlib (Agg) -> PNG bytes, one function per figure."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")   # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hetero.report import timeline  # noqa: E402
from hetero.report.units import flops_text  # noqa: E402

COLORS = {timeline.FORWARD: "#4C72B0", timeline.BACKWARD: "#55A868", timeline.BRIDGE: "#C44E52",
          timeline.WAIT: "#D9D9D9", timeline.TAIL: "#A6A6A6"}
LABELS = {timeline.FORWARD: "forward compute", timeline.BACKWARD: "backward compute",
          timeline.BRIDGE: "bridge transfer (exposed)", timeline.WAIT: "idle: waiting for a neighbour",
          timeline.TAIL: "idle: step tail (reduce, optimizer)"}
PREDICTED = "#DD8452"
DPI = 100
EVENT_COLORS = {"hang": "#8B0000", "failure": "#C44E52", "restart": "#8172B3", "resume": "#2CA02C",
                "replan": "#CCB974", "rejoin": "#64B5CD"}


def rank_label(row: dict) -> str:
    emu = " EMULATED" if row["emulated"] else ""
    return f"rank {row['rank']} · {row['island']} ({row['chip']}{emu}) · stage {row['stage']}"


def where_time_went(report: dict) -> bytes:
    """Per rank, mean seconds per steady step in each kind, stacked; the predicted step as a line."""
    rows = report["ranks"]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.55 * len(rows)), dpi=DPI)
    for y, row in enumerate(rows):
        left = 0.0
        for kind in timeline.KINDS:
            width = row["seconds"][kind]
            ax.barh(y, width, left=left, color=COLORS[kind], edgecolor="white", linewidth=0.5,
                    label=LABELS[kind] if y == 0 else None)
            if width / report["measured_step_s"] > 0.07:
                ax.text(left + width / 2, y, f"{width / sum(row['seconds'].values()):.0%}", ha="center",
                        va="center", fontsize=8, color="white" if kind in (timeline.FORWARD, timeline.BACKWARD,
                                                                             timeline.BRIDGE) else "black")
            left += width
    ax.axvline(report["predicted_step_s"], color=PREDICTED, linestyle="--", linewidth=1.5,
               label=f"predicted step {report['predicted_step_s']:.3f} s")
    # The plan's compute per step for each rank: shows at once whether compute itself ran slow.
    ax.scatter([row["predicted_compute_s"] for row in rows], range(len(rows)), marker="|", s=500, color="black",
               linewidths=2, zorder=3, label="predicted compute (plan)")
    _rank_axis(ax, rows)
    ax.set_xlabel("seconds per step (mean of the steady steps)")
    _top_legend(ax)
    return _png(fig)


def step_timeline(report: dict, parts: dict, step: int) -> bytes:
    """Gantt chart of one step: what every rank did when."""
    rows = report["ranks"]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.55 * len(rows)), dpi=DPI)
    for y, row in enumerate(rows):
        for kind, start, width in parts[row["rank"]]:
            ax.broken_barh([(start, width)], (y - 0.38, 0.76), facecolors=COLORS[kind],
                           edgecolor="white" if kind in (timeline.FORWARD, timeline.BACKWARD) else "none",
                           linewidth=0.4)
    for kind in timeline.KINDS:
        ax.barh([0], [0], color=COLORS[kind], label=LABELS[kind])
    _rank_axis(ax, rows)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"seconds since the start of step {step}")
    _top_legend(ax)
    return _png(fig)


def step_times(report: dict) -> bytes:
    steps = [s for s, _ in report["step_times"]]
    values = [v for _, v in report["step_times"]]
    steady = set(report["steady_steps"])
    fig, ax = plt.subplots(figsize=(5.4, 3.2), dpi=DPI)
    ax.bar(steps, values, color=["#4C72B0" if s in steady else "#B8C7E0" for s in steps], label="measured")
    ax.axhline(report["predicted_step_s"], color=PREDICTED, linestyle="--", label="predicted (plan)")
    ax.axhline(report["measured_step_s"], color="#4C72B0", linestyle=":", label="measured median (steady)")
    ax.set_xlabel("step (light bar: warm-up, not counted)")
    ax.set_ylabel("seconds")
    ax.set_xticks(steps)
    ax.set_ylim(0, max(values + [report["predicted_step_s"]]) * 1.35)
    mark_events(ax, report.get("events", []))
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    ax.set_title("step time: measured vs predicted", fontsize=10)
    return _png(fig)


def mfu(report: dict) -> bytes:
    chips = list(report["mfu"])
    fig, ax = plt.subplots(figsize=(5.4, 3.2), dpi=DPI)
    xs = range(len(chips))
    measured = [report["mfu"][c]["mfu"] * 100 for c in chips]
    predicted = [(report["mfu"][c]["predicted_mfu"] or 0) * 100 for c in chips]
    ax.bar([x - 0.2 for x in xs], measured, width=0.4, color="#4C72B0", label="measured")
    ax.bar([x + 0.2 for x in xs], predicted, width=0.4, color=PREDICTED, label="predicted (plan)")
    for x, c in zip(xs, chips):
        ax.text(x - 0.2, measured[x], flops_text(report["mfu"][c]["achieved_tflops"] * 1e12).replace(" ", "\n", 1),
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [c + ("\nEMULATED" if report["mfu"][c]["emulated"] else "") for c in chips], fontsize=8)
    ax.set_ylabel("MFU %")
    ax.set_ylim(0, max(measured + predicted + [1]) * 1.3)
    ax.legend(fontsize=8)
    ax.set_title("MFU per chip type (label: achieved per chip)", fontsize=10)
    return _png(fig)


def memory(report: dict) -> bytes:
    """Per stage: chip memory (outline), the plan's predicted peak and the measured peak per chip."""
    rows = report["memory"]
    unit, scale = ("MB", 1e3) if max(r["capacity_gb"] for r in rows) < 1 else ("GB", 1.0)
    fig, ax = plt.subplots(figsize=(5.4, 1.6 + 0.8 * len(rows)), dpi=DPI)
    for y, row in enumerate(rows):
        first = y == 0
        ax.barh(y, row["capacity_gb"] * scale, height=0.8, color="none", edgecolor="#555555",
                label="chip memory" if first else None)
        ax.barh(y - 0.18, row["predicted_gb"] * scale, height=0.34, color=PREDICTED,
                label="predicted (plan)" if first else None)
        ax.text(row["predicted_gb"] * scale, y - 0.18, f" {row['predicted_gb'] / row['capacity_gb']:.0%} of memory",
                va="center", fontsize=7)
        measured = row["measured_gb"]
        if measured is None:
            ax.text(0, y + 0.18, " not measured", va="center", fontsize=7, color="#666666")
            continue
        ax.barh(y + 0.18, measured * scale, height=0.34, color="#4C72B0", label="measured" if first else None)
        ratio = row["measured_over_predicted"]
        ax.text(measured * scale, y + 0.18, f" {measured * scale:.3g} {unit}" + (f" (x{ratio:.2f})" if ratio else ""),
                va="center", fontsize=7)
    ax.set_yticks(range(len(rows)),
                  [f"stage {r['stage']} {r['island']}\n{r['chip']}{' EMULATED' if r['emulated'] else ''}" for r in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} per chip")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    ax.set_title("peak memory per stage: measured vs predicted", fontsize=10, pad=22)
    return _png(fig)


def loss(report: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(5.4, 3.2), dpi=DPI)
    ax.plot([s for s, _ in report["loss"]], [v for _, v in report["loss"]], marker="o", color="#4C72B0")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss", fontsize=10)
    ax.grid(alpha=0.3)
    if mark_events(ax, report.get("events", [])):
        ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def mark_events(ax, events: list[dict]) -> int:
    """A dashed vertical line per event worth marking (hang, failure, restart, resume, ...), at its
    place on the step axis, labelled by kind once; returns how many it drew."""
    labelled, drawn = set(), 0
    for event in events:
        color = EVENT_COLORS.get(event["event"])
        if color is None:
            continue
        ax.axvline(event["at_step"], color=color, linestyle="--", linewidth=1.2,
                   label=event["event"] if event["event"] not in labelled else None)
        labelled.add(event["event"])
        drawn += 1
    return drawn


def efficiency(eff: dict) -> bytes:
    subs = eff["subfleet_tokens_per_s"]
    fig, ax = plt.subplots(figsize=(5.4, 3.2), dpi=DPI)
    bottom = 0.0
    palette = ["#64B5CD", "#8C8C8C", "#CCB974", "#937860"]
    for i, (name, value) in enumerate(subs.items()):
        ax.bar(0, value, bottom=bottom, color=palette[i % len(palette)], label=f"{name} alone")
        bottom += value
    ax.bar(1, eff["mixed_tokens_per_s"], color="#4C72B0", label="mixed fleet")
    ax.set_xticks([0, 1], ["sum of sub-fleets", "mixed fleet"])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"E = mixed / sum = {eff['efficiency']:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def _top_legend(ax) -> None:
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)


def _rank_axis(ax, rows) -> None:
    ax.set_yticks(range(len(rows)), [rank_label(r) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
