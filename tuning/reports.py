"""The evaluation report: one self-contained HTML page (inline SVG charts, no scripts, no external
files) per evaluation, stored on ``ModelEvaluation.report_html`` and shown in the dashboard.

Charts: one bar chart per metric across the four arms, and the run's training loss curve. Every
text value is escaped (answers come from the model and questions from customers).
"""

from __future__ import annotations

from django.template.loader import render_to_string
from django.utils.html import escape

ARM_COLOURS = {"base+retrieval": "#8c8c8c", "candidate": "#e0a030", "candidate+retrieval": "#2a7ab0",
               "active+retrieval": "#4a9a5a"}
METRICS = [
    ("token_f1", "token-F1 vs corrected answer (higher is better)", 1.0),
    ("citation_validity", "citation validity (higher is better)", 1.0),
    ("citation_precision", "citation precision (higher is better)", 1.0),
    ("abstention_accuracy", "abstention accuracy, unanswerable (higher is better)", 1.0),
    ("false_abstention", "declined answerable questions (lower is better)", 1.0),
    ("ttft_p50_ms", "TTFT p50, ms (lower is better)", None),
    ("tokens_per_s_p50", "decode tokens/s p50 (higher is better)", None),
]


def bar_chart_svg(title: str, values: dict[str, float | None], *, maximum: float | None = None,
                  width: int = 420, bar_height: int = 22) -> str:
    """A horizontal bar chart as an SVG string: one bar per ``values`` item (label -> value; ``None``
    is drawn as "n/a"), scaled to ``maximum`` (default the largest value)."""
    present = [v for v in values.values() if v is not None]
    top = maximum if maximum is not None else (max(present) if present else 1.0) or 1.0
    label_width, plot = 150, width - 150 - 60
    height = 28 + bar_height * len(values)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="0" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for index, (label, value) in enumerate(values.items()):
        y = 26 + index * bar_height
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{escape(label)}</text>')
        if value is None:
            parts.append(f'<text x="{label_width}" y="{y + 14}" font-size="12" fill="#888">n/a</text>')
            continue
        length = max(1.0, plot * min(value / top, 1.0)) if top else 1.0
        colour = ARM_COLOURS.get(label, "#2a7ab0")
        parts.append(f'<rect x="{label_width}" y="{y + 2}" width="{length:.1f}" height="{bar_height - 6}" fill="{colour}"/>')
        parts.append(f'<text x="{label_width + length + 4:.1f}" y="{y + 14}" font-size="12">{value:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart_svg(title: str, points: list[tuple[float, float]], *, width: int = 420, height: int = 180) -> str:
    """A line chart of ``points`` ``[(x, y)]`` as an SVG string, axes from the data's range."""
    if not points:
        return f"<p>{escape(title)}: no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, bottom, top_pad = 44, 24, 24
    w, h = width - left - 10, height - bottom - top_pad
    path = " ".join(
        f"{'M' if i == 0 else 'L'}{left + (x - x0) / (x1 - x0) * w:.1f},{top_pad + h - (y - y0) / (y1 - y0) * h:.1f}"
        for i, (x, y) in enumerate(points)
    )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}"><text x="0" y="16" font-size="13" font-weight="bold">{escape(title)}</text>'
            f'<line x1="{left}" y1="{top_pad + h}" x2="{left + w}" y2="{top_pad + h}" stroke="#999"/>'
            f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + h}" stroke="#999"/>'
            f'<text x="2" y="{top_pad + 10}" font-size="11">{y1:.3g}</text>'
            f'<text x="2" y="{top_pad + h}" font-size="11">{y0:.3g}</text>'
            f'<text x="{left + w - 40}" y="{height - 6}" font-size="11">step {x1:g}</text>'
            f'<path d="{path}" fill="none" stroke="#2a7ab0" stroke-width="1.5"/></svg>')


def evaluation_report_html(evaluation, *, run=None) -> str:
    """The report page for ``evaluation`` (a ``ModelEvaluation`` with ``arms``, ``rows`` and the gate's
    ``decision``: verdict, reason, the token-F1 gain's confidence interval and every guard against its
    tolerance) and, when given, its fine-tune ``run`` (loss curve, hyper-parameters, parity; its
    ``decision`` when it has one)."""
    from tuning.evaluation import ARMS

    # JSONB does not keep key order: show the arms in their defined order.
    arms = {arm: evaluation.arms[arm] for arm in ARMS if arm in evaluation.arms}
    charts = [bar_chart_svg(label, {arm: data.get(key) for arm, data in arms.items()}, maximum=maximum)
              for key, label, maximum in METRICS]
    loss = line_chart_svg("training loss", [(p["step"], p["loss"]) for p in (run.loss_curve if run else [])])
    examples: dict[int, dict] = {}
    for row in evaluation.rows:
        entry = examples.setdefault(row["example_id"], {"question": row["question"], "reference": row["reference"],
                                                       "answers": []})
        entry["answers"].append({"arm": row["arm"], "text": row["text"], "f1": row["f1"], "declined": row["declined"]})
    return render_to_string("tuning/report.html", {
        "evaluation": evaluation, "run": run, "arms": arms,
        "decision": (run.decision if run is not None and run.decision else None) or evaluation.decision or None,
        "metric_rows": [(key, [data.get(key) for data in arms.values()]) for key, _, _ in METRICS],
        "charts": charts, "loss_chart": loss, "examples": list(examples.values())[:30],
    })
