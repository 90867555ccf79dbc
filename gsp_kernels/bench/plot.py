"""PNG of a `gsp-kernels bench` report: forward+backward time per implementation, per shape and dtype.

One panel per (shape, dtype) group of rows: a horizontal bar per implementation with its
forward+backward median (log-scale ms), thinner bars for the forward and backward medians,
and the forward+backward time and speed-up over the paper's algorithm written beside it.
Rows that failed (no forward+backward time) are labelled "failed". Needs matplotlib
(``pip install matplotlib``, or the ``train`` extra); drawn with the Agg backend.
"""

from __future__ import annotations

import math

from ..testing import Shape

INSTALL_HINT = 'pip install matplotlib, or the train extra: pip install -e ".[train]" (or pip install \'gsp-kernels[train]\')'
# Bar colours: forward+backward (main bar), forward, backward.
COLORS = {"fwd_bwd": "#1f5f99", "fwd": "#8cb8dd", "bwd": "#e3a45a"}
PHASE_LABELS = {"fwd_bwd": "forward+backward", "fwd": "forward", "bwd": "backward"}


def require_matplotlib():
    """The matplotlib module, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"the benchmark plot needs matplotlib ({exc}); install it with {INSTALL_HINT}") from exc
    return matplotlib


def _groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by (shape, dtype), in report order, with a panel title each."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        shape = row.get("shape") or {}
        key = (tuple(sorted(shape.items())), row.get("dtype", "?"))
        groups.setdefault(key, []).append(row)
    titled = []
    for (shape_items, dtype), members in groups.items():
        try:
            label = Shape(**dict(shape_items)).label
        except TypeError:
            label = " ".join(f"{k}={v}" for k, v in shape_items) or "shape ?"
        titled.append((f"{label}, {dtype}", members))
    return titled


def _time(row: dict, phase: str) -> float | None:
    value = (row.get("ms") or {}).get(phase)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _ms(value: float) -> str:
    """Three significant digits, keeping trailing zeros (14.0, 1.65, 0.920)."""
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}"


def _failure(row: dict) -> str:
    """'failed: <reason>' from the row's note (time_candidates' or build_candidates' error)."""
    reasons = [part for part in (row.get("note") or "").split("; ") if "fail" in part]
    if not reasons:
        return "failed: no forward+backward time"
    reason = reasons[0] if reasons[0].startswith("failed") else f"failed ({reasons[0]})"
    return reason if len(reason) <= 70 else reason[:67] + "..."


def _subtitle(report: dict) -> str:
    params = report.get("params") or {}
    parts = [f"torch {report.get('torch', '?')}", f"timer: {report.get('timer', '?')}",
             f"μ (transport_ratio) = {params.get('transport_ratio', '?')}, γ = {params.get('gamma', '?')}"]
    if params.get("paper_iterations") is not None:
        parts.append(f"paper: {params['paper_iterations']} iterations")
    if params.get("compiled_newton_iterations") is not None:
        parts.append(f"compiled reference: {params['compiled_newton_iterations']} Newton steps")
    return " · ".join(parts) + "\nbar label: forward+backward median · speed-up over the paper's algorithm (same run)"


def plot_report(report: dict, path: str):
    """Write a PNG of `report` (the dict `gsp-kernels bench --json` writes) to `path`; returns
    the matplotlib Figure.

    One panel per (shape, dtype): forward+backward median per implementation on a log time
    axis, with forward and backward as thinner bars and "x.x ms · N.Nx" (speed-up over the
    paper's algorithm) beside each. Failed rows are labelled, never fatal.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = _groups(report.get("rows") or [])
    columns = min(2, max(1, len(groups)))
    panel_rows = max(1, math.ceil(len(groups) / columns))
    most_bars = max((len(members) for _, members in groups), default=1)
    panel_height = 0.75 * most_bars + 1.3
    figure = Figure(figsize=(7.0 * columns, panel_height * panel_rows + 1.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(panel_rows, columns, squeeze=False).flatten()

    times = [t for _, members in groups for row in members for p in COLORS if (t := _time(row, p))]
    low = 10 ** math.floor(math.log10(min(times) * 0.8)) if times else 0.1
    high = max(times) * 8.0 if times else 100.0  # room for the labels right of the bars

    for axis, (title, members) in zip(axes, groups):
        positions = list(range(len(members)))
        for offset, height, phase in ((-0.17, 0.36, "fwd_bwd"), (0.13, 0.16, "fwd"), (0.29, 0.16, "bwd")):
            bars = [(y + offset, _time(row, phase)) for y, row in zip(positions, members)]
            bars = [(y, t) for y, t in bars if t is not None]
            if bars:
                axis.barh([y for y, _ in bars], [t - low for _, t in bars], height=height, left=low,
                          color=COLORS[phase], label=PHASE_LABELS[phase])
        for y, row in zip(positions, members):
            total = _time(row, "fwd_bwd")
            if total is None:
                axis.text(low * 1.15, y - 0.17, _failure(row), va="center", fontsize=8, color="#b00020")
                continue
            speedup = (row.get("speedup_vs_paper") or {}).get("fwd_bwd")
            text = f"{_ms(total)} ms" + (f" · {speedup:.1f}x" if isinstance(speedup, (int, float)) else "")
            axis.text(total * 1.08, y - 0.17, text, va="center", fontsize=9, fontweight="bold")
        axis.set_yticks(positions)
        axis.set_yticklabels([row.get("name", "?") + (" (baseline)" if row.get("kind") == "baseline" else "")
                              for row in members], fontsize=9)
        axis.set_ylim(len(members) - 0.5, -0.5)  # first row on top, also when no bar was drawn
        axis.set_xscale("log")
        axis.set_xlim(low, high)
        axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("median time, ms (log scale)", fontsize=9)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="x", which="both", alpha=0.25)
        axis.set_axisbelow(True)
    for axis in axes[len(groups):]:
        axis.set_axis_off()
    if not groups:
        axes[0].text(0.5, 0.5, "no rows in this report", ha="center", va="center", transform=axes[0].transAxes)
    legend = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        figure.legend(list(legend.values()), list(legend), loc="upper right", bbox_to_anchor=(0.99, 0.99), ncol=3,
                      fontsize=8.5, frameon=False)
    figure.suptitle(f"GSP forward+backward on {report.get('device', '?')}", x=0.01, ha="left", fontsize=13,
                    fontweight="bold")
    figure.text(0.01, 1.0 - 0.55 / figure.get_figheight(), _subtitle(report), ha="left", va="top", fontsize=8.5,
                color="#444444")
    figure.tight_layout(rect=(0, 0, 1, 1.0 - 0.8 / figure.get_figheight()))
    figure.savefig(path, format="png")
    return figure
