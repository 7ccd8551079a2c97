"""The report as one self-contained HTML page (figures inlined as base64 PNG data URIs)."""

from __future__ import annotations

import base64
import html
import time

from hetero.report import analysis, timeline
from hetero.report.units import flops_text

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
     color:#222}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:13px;margin-bottom:12px}
.emu{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;border-radius:4px;font-size:13px;margin:10px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px;flex:1}
.card .k{font-size:12px;color:#666} .card .v{font-size:22px;font-weight:600;margin:2px 0}
.card .v.small{font-size:15px} .card .d{font-size:12px;color:#444}
.bad{color:#b03030} .good{color:#2c7a2c}
.lead{font-size:15px;background:#f5f7fb;border-left:4px solid #4C72B0;padding:8px 12px;margin:10px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px} img{max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.defs{font-size:13px;color:#444} .defs dt{font-weight:600;margin-top:6px}
"""


def render(report: dict, images: dict, timeline_step: int) -> str:
    r = report
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>hetero report: {_e(r['cluster'])}</title>"
           f"<style>{CSS}</style></head><body>"]
    out.append(f"<h1>Run report: {_e(r['model'])} on {_e(r['cluster'])}</h1>")
    out.append(f"<div class='sub'>{_e(r['plan_label'])}<br>run directory {_e(r['run_dir'])} · "
               f"{r['steps']} steps, steady steps {_steps(r['steady_steps'])}</div>")
    if r["emulated"]:
        out.append("<div class='emu'><b>EMULATED chips.</b> Chips marked EMULATED run the real math on the host CPU "
                   "on a virtual clock paced by their catalog spec; their speeds and MFU describe the emulation, "
                   "not real hardware.</div>")
    if r["notes"]:
        out.append("<div class='emu'>" + "<br>".join(f"Note: {_e(n)}." for n in r["notes"]) + "</div>")
    out.append(_cards(r))
    out.append(f"<div class='lead'>{_e(where_sentence(r))}</div>")
    out.append("<h2>Where the time went, per rank</h2>")
    out.append(_img(images["where_time_went"], "mean seconds per steady step per rank"))
    out.append(f"<h2>Pipeline timeline of step {timeline_step}</h2>"
               "<div class='sub'>The steady step with the median step time. Grey: idle; red: waiting for data "
               "already handed to the bridge.</div>")
    out.append(_img(images["timeline"], f"timeline of step {timeline_step}"))
    out.append("<h2>Speed, memory and loss</h2><div class='grid'>")
    for key in ("step_times", "mfu", "memory", "loss"):
        out.append(f"<div>{_img(images[key], key)}</div>")
    out.append("</div>")
    if r["efficiency"]:
        out.append(_efficiency(r["efficiency"], images["efficiency"]))
    out.append("<h2>Numbers</h2>")
    out.append(_mfu_table(r) + _memory_table(r) + _rank_table(r))
    out.append(_refusals(r["refusals"]))
    out.append(_events(r.get("events", [])))
    out.append(DEFINITIONS)
    out.append("</body></html>")
    return "\n".join(out)


def where_sentence(r: dict) -> str:
    split = r["time_split"]
    compute = split[timeline.FORWARD] + split[timeline.BACKWARD]
    idle = split[timeline.WAIT] + split[timeline.TAIL]
    worst = max(r["ranks"], key=lambda row: row["seconds"][timeline.WAIT] + row["seconds"][timeline.TAIL])
    busiest = max(r["ranks"], key=lambda row: row["seconds"][timeline.FORWARD] + row["seconds"][timeline.BACKWARD])
    busy = busiest["seconds"][timeline.FORWARD] + busiest["seconds"][timeline.BACKWARD]
    return (f"Of all ranks' time: {compute:.0%} compute (forward {split[timeline.FORWARD]:.0%}, backward "
            f"{split[timeline.BACKWARD]:.0%}), {split[timeline.BRIDGE]:.0%} exposed bridge transfer, {idle:.0%} idle "
            f"(waiting for a neighbour {split[timeline.WAIT]:.0%}, step tail {split[timeline.TAIL]:.0%}). "
            f"Most idle: rank {worst['rank']} ({worst['island']}, stage {worst['stage']}). Busiest: rank "
            f"{busiest['rank']} ({busiest['island']}) computed {busy:.3g} s per step against {busiest['predicted_compute_s']:.3g} s "
            f"planned (×{busy / busiest['predicted_compute_s']:.2f}).")


def _cards(r: dict) -> str:
    ratio_cls = "bad" if r["ratio"] > 1.10 else "good"
    mfu = "\n".join(f"{chip}{' (EMU)' if v['emulated'] else ''} {v['mfu']:.0%}" for chip, v in r["mfu"].items())
    pred_mfu = " · ".join(f"{v['predicted_mfu']:.0%}" for chip, v in r["mfu"].items()
                          if v["predicted_mfu"] is not None)
    cards = [
        ("step time (median)", f"{r['measured_step_s']:.3f} s",
         f"predicted {r['predicted_step_s']:.3f} s · <span class='{ratio_cls}'>×{r['ratio']:.2f}</span>"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}", f"predicted {r['predicted_tokens_per_s']:,.0f}"),
        ("MFU per chip type", mfu, f"predicted {pred_mfu}"),
        ("bubble (idle) share", f"{r['bubble_share']:.1%}", f"predicted {r['predicted_bubble_share']:.1%}"),
        ("exposed bridge (worst rank)", f"{r['exposed_bridge_share']:.1%}",
         f"of the step · {r['exposed_bridge_s'] * 1e3:.1f} ms per step"),
        _comm_card(r["exposed_comm"]),
    ]
    if r["efficiency"]:
        e = r["efficiency"]
        pred = f"predicted {e['predicted_efficiency']:.2f}" if e["predicted_efficiency"] is not None else ""
        cards.append(("efficiency E", f"{e['efficiency']:.2f}", pred))
    body = "".join(f"<div class='card'><div class='k'>{k}</div>"
                   f"<div class='v{' small' if chr(10) in v else ''}'>{_e(v).replace(chr(10), '<br>')}</div>"
                   f"<div class='d'>{d}</div></div>" for k, v, d in cards)
    return f"<div class='cards'>{body}</div>"


def _comm_card(comm: dict) -> tuple[str, str, str]:
    """Exposed communication (bridge and p2p receives after the hand-over, sends), worst rank."""
    parts = " · ".join(f"{name} {comm['parts'][kind]:.1%}" for kind, name in
                       (("bridge_recv", "bridge recv"), ("p2p_recv", "p2p recv"), ("send", "send")))
    reduce = "" if comm["reduce_share"] is None else f" · gradient reductions {comm['reduce_share']:.1%} (rank 0)"
    return ("exposed communication (worst rank)", f"{comm['share']:.1%}",
            f"{comm['s'] * 1e3:.1f} ms per step: {parts} · mean over ranks {comm['mean_share']:.1%}{reduce}")


def _efficiency(e: dict, image: bytes) -> str:
    def row(label, tps, predicted, plan, bold=False):
        cells = [label, f"{tps:,.0f}", "" if predicted is None else f"{predicted:,.0f}", plan]
        cells = [f"<b>{c}</b>" if bold else c for c in cells]
        return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    rows = "".join(row(f"{_e(name)} alone", tps, e["subfleet_predicted_tokens_per_s"].get(name),
                       _e(e["subfleet_plans"].get(name, ""))) for name, tps in e["subfleet_tokens_per_s"].items())
    rows += row("sum of sub-fleets", e["subfleet_sum_tokens_per_s"], None, "")
    rows += row("mixed fleet", e["mixed_tokens_per_s"], e["mixed_predicted_tokens_per_s"], _e(e["mixed_plan"]), True)
    recorded = "" if e["recorded_efficiency"] is None else f" (efficiency.json says {e['recorded_efficiency']:.3f})"
    return (f"<h2>Efficiency E = {e['efficiency']:.3f}{recorded}</h2>"
            "<div class='sub'>E = tokens/s of the mixed fleet / sum of the tokens/s each island's chips reach "
            "alone (from <code>hetero bench efficiency</code>).</div><div class='grid'><div>"
            "<table><tr><th>fleet</th><th>tokens/s</th><th>predicted</th><th>plan</th></tr>"
            f"{rows}</table></div><div>{_img(image, 'efficiency')}</div></div>")


def _mfu_table(r: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(chip)}{' <b>EMULATED</b>' if v['emulated'] else ''}</td><td>{v['chips']}</td>"
        f"<td>{v['flops_per_step'] / 1e9:,.2f}</td><td>{flops_text(v['achieved_tflops'] * 1e12)}</td>"
        f"<td>{flops_text(v['peak_tflops'] * 1e12)}</td><td>{v['mfu']:.1%}</td>"
        f"<td>{'' if v['predicted_mfu'] is None else format(v['predicted_mfu'], '.1%')}</td></tr>"
        for chip, v in r["mfu"].items())
    return ("<table><tr><th>chip type</th><th>chips</th><th>model GFLOP/step</th><th>achieved per chip</th>"
            f"<th>peak per chip</th><th>MFU</th><th>predicted MFU</th></tr>{rows}</table>")


def _memory_table(r: dict) -> str:
    def measured(m: dict) -> str:
        return "not measured" if m["measured_gb"] is None else f"{m['measured_gb']:.4g}"

    def ratio(m: dict) -> str:
        return "" if m["measured_over_predicted"] is None else f"×{m['measured_over_predicted']:.2f}"

    rows = "".join(
        f"<tr><td>stage {m['stage']} {_e(m['island'])}</td><td>{_e(m['chip'])}{' <b>EMULATED</b>' if m['emulated'] else ''}</td>"
        f"<td>{m['predicted_gb']:.4g}</td><td>{measured(m)}</td><td>{ratio(m)}</td>"
        f"<td>{m['capacity_gb']:.4g}</td><td>{m['usable_gb']:.4g}</td></tr>"
        for m in r["memory"])
    return ("<table><tr><th>stage</th><th>chip</th><th>predicted peak GB per chip</th><th>measured peak GB per chip</th>"
            "<th>measured / predicted</th><th>capacity GB</th>"
            f"<th>usable GB (less vendor reserve)</th></tr>{rows}</table>"
            "<div class='sub'>Predicted: plan.json memory_gb. Measured: the largest peak_memory_gb of the recorded "
            "steps (see Definitions).</div>")


def _rank_table(r: dict) -> str:
    head = "".join(f"<th>{k}</th>" for k in ("forward", "backward", "bridge", "idle: wait", "idle: tail"))
    rows = "".join(
        f"<tr><td>rank {row['rank']} · {_e(row['island'])} ({_e(row['chip'])}{' EMULATED' if row['emulated'] else ''})"
        f" · stage {row['stage']} tp{row['tp_rank']} dp{row['dp_rank']}</td>"
        + "".join(f"<td>{row['seconds'][k] * 1e3:,.1f}</td>" for k in timeline.KINDS) + "</tr>"
        for row in r["ranks"])
    return f"<table><tr><th>rank (ms per steady step, mean)</th>{head}</tr>{rows}</table>"


def _refusals(refused: dict) -> str:
    """Who knocked and was turned away: the coordinator's and the bridge endpoints' refusals."""
    head = f"<h2>Refused connections / calls: {refused['total']}</h2>"
    rows = "".join(f"<tr><td>{who}</td><td>{_e(reason)}</td><td>{n:,}</td></tr>"
                   for who in ("coordinator", "bridge") for reason, n in sorted(refused[who].items()))
    if not rows:
        return head + "<div class='sub'>None: no call or connection was refused during the run.</div>"
    return (head + "<div class='sub'>" + _e(analysis.refusal_text(refused)) + "</div>"
            f"<table><tr><th>refused by</th><th>reason</th><th>count</th></tr>{rows}</table>")


DEFINITIONS = """<h2>Definitions</h2><dl class='defs'>
<dt>Measured step time</dt><dd>Median of metrics/steps.jsonl step_s over the steady steps (every step but the first,
which pays for allocation). Predicted: plan.json predicted_step_s, the partitioner's cost model for this plan.</dd>
<dt>Forward / backward compute</dt><dd>compute_s of each micro-batch action in metrics/rank*.jsonl (includes handing
the output to the next stage).</dd>
<dt>Exposed bridge transfer</dt><dd>For a receive over the bridge: arrival time minus when the sender handed the data
over (or when the receiver started waiting, if later) — transfer time nothing overlapped. The headline share is the
worst receiving rank's sum per step over the step time (as in <code>hetero bench runtime</code>).</dd>
<dt>Exposed communication</dt><dd>Per rank and step: every receive's wait after its sender handed the data over
(over the bridge, or the island's native p2p; interleaved runs pair each chunk with the chunk before it, round the
pipeline) plus the time each action spent handing its output over (from sent_at to the action's end: the send and the
receives posted with it, inside compute_s). The headline is the worst rank's sum over the step time, median over steady
steps; the parts are each kind's median share on that rank. Gradient reductions have no timing lines: beside it, rank
0's step record gives the part of its reductions after its compute (dp_reduce_exposed_s + cross_island_reduce_s) as a
share of the step.</dd>
<dt>Idle (bubble)</dt><dd>Step time − compute − exposed bridge time, per rank: waiting for a neighbour's activation or
gradient (pipeline fill, drain and imbalance) plus the step tail after the rank's last action (gradient reduction,
optimizer and waiting for the slowest rank, which the timing lines do not separate). Bubble share = Σ idle over ranks /
(ranks × step time), median over steady steps; predicted: 1 − mean over ranks of micro-batches × stage time_s / predicted
step.</dd>
<dt>Refused connections / calls</dt><dd>Calls the coordinator turned away (a wrong or missing job token:
metrics/coordinator.json) and connections or frames the ranks' bridge endpoints rejected (metrics/bridge-rank*.json),
summed by reason; 0 when nothing knocked.</dd>
<dt>Peak memory</dt><dd>Predicted: the plan's memory_gb per stage (per chip; GB = 10<sup>9</sup> bytes).
Measured: metrics/steps.jsonl peak_memory_gb, per stage the largest peak device memory of its ranks in a step (the
device's allocator counters: max_memory_allocated after a reset at the step's start; an emulated chip's memory ledger),
covering the step's forward, backward and reductions and the previous step's optimizer update, not checkpoint writes;
the page shows the largest over the recorded steps. Chips that keep no counters (the plain host CPU) are not
measured.</dd>
<dt>MFU</dt><dd>Model FLOPs the chip type's stages do per step (forward + backward, no recompute, the partitioner's
count) / (measured step time × its chips × their peak FLOP/s at the training dtype from the catalog).</dd>
</dl>"""


def _events(events: list[dict]) -> str:
    """What happened to the job (events.jsonl), in order; the charts mark them by kind."""
    head = f"<h2>Events: {len(events)}</h2>"
    if not events:
        return head + "<div class='sub'>None recorded (no events.jsonl, or an empty one).</div>"
    rows = "".join(f"<tr><td>{_e(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e['time'])))} UTC</td>"
                   f"<td>{_e(e['event'])}</td><td>{e['at_step']:g}</td><td>{_e(e['text'])}</td></tr>" for e in events)
    return (head + "<div class='sub'>From events.jsonl; the step-time and loss charts mark hangs, failures, "
            "restarts and resumes with dashed lines between the steps they fell between.</div>"
            f"<table><tr><th>time</th><th>event</th><th>at step</th><th>what</th></tr>{rows}</table>")


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _steps(steps: list[int]) -> str:
    return f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else str(steps[0])


def _e(text) -> str:
    return html.escape(str(text), quote=True)
