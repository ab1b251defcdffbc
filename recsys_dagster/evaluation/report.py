"""An evaluation result as a Markdown report with PNG charts, written atomically to one directory.

`write_report` writes `report.md` and its charts:
- `metric-<metric>.png`: one bar chart per metric, a bar per model (all users);
- `segment-<segment>.png`: one chart per segment with users, every metric grouped by model;
- `long-tail.png`: the share of recommended slots on the items up to each popularity rank (log scale),
  one line per model, next to the share of training interactions; a dotted line marks the head.

Charts are drawn with matplotlib's Agg renderer on figures that never touch pyplot (no display, no global
figure state), with matplotlib's default style whatever the local matplotlibrc, a fixed size and
resolution, and no software or date metadata in the PNG: the same result and the same matplotlib version
give byte-identical files.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_core.storage import fsync_file, replace_dir
from recsys_dagster.evaluation.evaluate import METRICS, EvaluationResult
from recsys_dagster.evaluation.holdout import SEGMENT_ALL

if TYPE_CHECKING:  # matplotlib is imported when a report is drawn: half a second off every CLI start-up
    from matplotlib.figure import Figure

REPORT_FILE = "report.md"
FIGURE_SIZE = (7.0, 4.0)  # inches
DPI = 100
# The PNG writer adds a "Software" text chunk with the matplotlib version unless told not to.
_PNG_METADATA: dict[str, Any] = {"Software": None}
_METRIC_LABELS = {
    "precision": "precision",
    "recall": "recall",
    "ndcg": "nDCG",
    "map": "MAP",
    "hit_rate": "hit rate",
    "coverage": "catalog coverage",
    "long_tail_share": "long-tail share",
}


def write_report(result: EvaluationResult, out_dir: Path, title: str, context: Mapping[str, Any]) -> Path:
    """Replace `out_dir` with the report of `result`; returns the path of its `report.md`.

    `context` is listed at the top of the report as given (as-of day, tenant, window, versions...). The
    files are written to a staging directory beside `out_dir`, which then takes its place in one rename:
    readers see the previous report or the new one, never a mix.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    import matplotlib.style

    try:
        with matplotlib.style.context("default"):
            charts = _write_charts(result, staging)
        (staging / REPORT_FILE).write_text(_markdown(result, title, context, charts), encoding="utf-8")
        for path in staging.iterdir():
            fsync_file(path)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / REPORT_FILE


def _write_charts(result: EvaluationResult, folder: Path) -> dict[str, str]:
    """Draw every chart into `folder`: chart key -> file name."""
    charts: dict[str, str] = {}
    models = list(result.models)
    for metric in METRICS:
        values = [result.value(model, SEGMENT_ALL, metric) or 0.0 for model in models]
        figure = _figure(f"{_label(metric, result.k)}, all users ({result.users[SEGMENT_ALL]})")
        axes = figure.axes[0]
        bars = axes.bar(models, values, color=_colors(len(models)))
        axes.bar_label(bars, fmt="%.3f")
        axes.tick_params(axis="x", labelrotation=20)
        axes.set_ylabel(_label(metric, result.k))
        axes.margins(y=0.15)
        charts[metric] = _save(figure, folder, f"metric-{metric}.png")
    for segment, users in result.users.items():
        if users:
            charts[segment] = _save(_segment_chart(result, segment, models), folder, f"segment-{segment}.png")
    charts["long_tail"] = _save(_long_tail_chart(result), folder, "long-tail.png")
    return charts


def _segment_chart(result: EvaluationResult, segment: str, models: Sequence[str]) -> Figure:
    figure = _figure(f"{segment} ({result.users[segment]} users), at k={result.k}")
    axes = figure.axes[0]
    width = 0.8 / max(len(models), 1)
    for i, (model, color) in enumerate(zip(models, _colors(len(models)), strict=True)):
        values = [result.value(model, segment, metric) or 0.0 for metric in METRICS]
        positions = [m + (i - (len(models) - 1) / 2) * width for m in range(len(METRICS))]
        axes.bar(positions, values, width, label=model, color=color)
    axes.set_xticks(range(len(METRICS)), [_METRIC_LABELS[m] for m in METRICS], rotation=20)
    axes.legend(fontsize="small")
    return figure


def _long_tail_chart(result: EvaluationResult) -> Figure:
    curve = result.long_tail
    figure = _figure(f"Recommendations by item popularity rank, at k={result.k}")
    axes = figure.axes[0]
    axes.plot(curve.ranks, curve.training, color="black", linestyle="--", label="training interactions")
    for (model, shares), color in zip(curve.models.items(), _colors(len(curve.models)), strict=True):
        axes.plot(curve.ranks, shares, color=color, label=model)
    if result.head_size:
        axes.axvline(result.head_size, color="grey", linestyle=":", label=f"head ({result.head_size} items)")
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("item popularity rank in training (1 = most popular)")
    axes.set_ylabel("cumulative share")
    axes.legend(fontsize="small")
    return figure


def _figure(title: str) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="tight")
    figure.add_subplot().set_title(title)
    return figure


def _save(figure: Figure, folder: Path, name: str) -> str:
    figure.savefig(folder / name, format="png", dpi=DPI, metadata=_PNG_METADATA)
    return name


def _colors(n: int) -> list[str]:
    """The default color cycle, so a model keeps its color from chart to chart."""
    return [f"C{i}" for i in range(n)]


def _label(metric: str, k: int) -> str:
    return f"{_METRIC_LABELS[metric]}@{k}"


def _markdown(
    result: EvaluationResult, title: str, context: Mapping[str, Any], charts: Mapping[str, str]
) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in context.items()]
    lines += [
        f"| k | {result.k} |",
        f"| catalog (training items) | {result.catalog_size} |",
        f"| head (most popular items with {result.head_share:.0%} of training interactions) | "
        f"{result.head_size} |",
        *(f"| users: {segment} | {users} |" for segment, users in result.users.items()),
        "",
        "Metrics are means over the users of a segment who have held-out items; coverage and long-tail "
        "share are measured over all their recommendation lists.",
    ]
    for segment, users in result.users.items():
        lines += ["", f"## {segment} ({users} users)", ""]
        if not users:
            lines.append("No evaluated user in this segment.")
            continue
        lines += [
            "| model | " + " | ".join(_label(m, result.k) for m in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for model in result.models:
            cells = [_number(result.value(model, segment, metric)) for metric in METRICS]
            lines.append(f"| {_cell(model)} | " + " | ".join(cells) + " |")
        lines += ["", f"![{segment}]({charts[segment]})"]
    lines += ["", "## Each metric, all users", ""]
    lines += [f"![{_label(metric, result.k)}]({charts[metric]})" for metric in METRICS]
    lines += ["", "## Long tail", "", f"![long tail]({charts['long_tail']})", ""]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _cell(value: Any) -> str:
    """A value as a Markdown table cell (a `|` would end the cell)."""
    return str(value).replace("|", "\\|").replace("\n", " ")
