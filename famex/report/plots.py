"""The report's PNG figures: training curves, logit-store statistics, quantization ablation, Pareto front.

Figures are built as `matplotlib.figure.Figure` objects and saved with the Agg canvas, without
pyplot: no global figure state, no GUI backend, nothing left open between figures. Each function
takes already-selected data (summary rows, log records) and a path, and writes one PNG.

What this module does not do: choose what goes in the report, compute fronts (see `pareto`), or
read run trees.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from famex.report.tables import format_order, method_label

DPI = 150
MARKERS = ("s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "8")


def _save(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------- training curves


def training_curves(runs: list[dict[str, Any]], path: Path, dpi: int = DPI) -> Path:
    """Train CE and validation CE against training tokens, one color per student, dashed for CE-only.

    CE (not the training loss) is drawn on both sides: a distilled run's loss is
    0.9·KL + 0.1·CE and cannot be compared with a CE-only run's, its CE component can.
    """
    students = sorted({str(r.get("student")) for r in runs})
    color = dict(zip(students, _colors(len(students))))
    fig = Figure(figsize=(11, 4.2))
    ax_train, ax_val = fig.subplots(1, 2)
    has_val = False
    for run in runs:
        recs = [r for r in run["records"] if _is_number(r.get("tokens"))]
        style = "--" if run.get("objective") == "ce" else "-"
        label = f"{run['name']} ({str(run.get('objective') or '?').upper()})"
        c = color[str(run.get("student"))]
        train = [(r["tokens"], r.get("ce", r.get("loss"))) for r in recs if _is_number(r.get("ce", r.get("loss")))]
        if train:
            ax_train.plot(*zip(*train), style, color=c, label=label, lw=1.5)
        val = [(r["tokens"], r["val_ce"]) for r in recs if _is_number(r.get("val_ce"))]
        if val:
            has_val = True
            ax_val.plot(*zip(*val), style, marker="o", ms=4, color=c, label=label, lw=1.5)
    ax_train.set_title("training CE (next-token, nats/token)")
    ax_val.set_title("validation CE (nats/token)")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("training tokens")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
    ax_train.legend(fontsize=8)
    if has_val:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation points in the logs", ha="center", va="center", transform=ax_val.transAxes)
    fig.suptitle("Distilled (solid) vs CE-only (dashed) students")
    return _save(fig, path, dpi)


# ---------------------------------------------------------------- logit store


def logit_stats(stores: list[tuple[str, dict[str, Any], dict[str, Any]]], path: Path, dpi: int = DPI) -> Path:
    """Bytes per token (against the paper's fp32 + int32 layout), teacher mass covered, decoding KL."""
    names = [name for name, _, _ in stores]
    x = range(len(names))
    fig = Figure(figsize=(11, 3.8))
    ax_b, ax_m, ax_k = fig.subplots(1, 3)
    bpt = [m.get("bytes_per_token") or 0 for _, _, m in stores]
    paper = [(c.get("top_k") or 0) * 8 for _, c, _ in stores]
    w = 0.3
    ax_b.bar([i - w / 2 for i in x], bpt, w, label="this store")
    ax_b.bar([i + w / 2 for i in x], paper, w, label="paper layout (fp32 + int32)", color="0.7")
    ax_b.set_ylim(0, 1.3 * max(bpt + paper + [1]))  # headroom for the legend
    ax_b.set_title("bytes per token")
    ax_b.legend(fontsize=8, loc="upper left")
    ax_m.bar(list(x), [100 * (m.get("mass_covered") or 0) for _, _, m in stores], 0.5, color="tab:green")
    ax_m.set_title("teacher probability mass in top-k (%)")
    ax_m.set_ylim(0, 100)
    kl = [m.get("kl_decoded_vs_exact") for _, _, m in stores]
    ax_k.bar(list(x), [v if v and v > 0 else 0 for v in kl], 0.5, color="tab:orange")
    if any(v and v > 0 for v in kl):
        ax_k.set_yscale("log")
    ax_k.set_title("KL(decoded ‖ exact top-k), nats")
    for ax in (ax_b, ax_m, ax_k):
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Sparse teacher-logit store", y=1.03)
    return _save(fig, path, dpi)


# ---------------------------------------------------------------- quantization ablation (Fig. 4)


def ablation_bars(formats: dict[str, dict[tuple[str, bool], dict]], value_key: str, ylabel: str, title: str,
                  path: Path, dpi: int = DPI) -> Path:
    """Grouped bars: one group per format, one bar per method (hatched = with norm fusion)."""
    names = sorted(formats, key=format_order)
    cols = sorted({k for cells in formats.values() for k in cells},
                  key=lambda k: (("rtn", "gptq", "qad").index(k[0]) if k[0] in ("rtn", "gptq", "qad") else 9, k[0], k[1]))
    methods = sorted({m for m, _ in cols}, key=lambda m: [c[0] for c in cols].index(m))
    color = dict(zip(methods, _colors(len(methods))))
    fig = Figure(figsize=(min(12.0, max(6.0, 0.35 * len(names) * max(1, len(cols)) + 2)), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(cols))
    for j, col in enumerate(cols):
        xs, ys = [], []
        for i, f in enumerate(names):
            r = formats[f].get(col)
            if r is not None and r.get(value_key) is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r[value_key])
        ax.bar(xs, ys, width, color=color[col[0]], hatch="//" if col[1] else None, edgecolor="black", lw=0.5,
               label=method_label(*col))
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("format")
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", lw=0.8)
    if value_key == "recovery":
        ax.axhline(100, color="0.4", lw=0.8, ls=":")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, len(cols)))
    ax.set_title(title)
    return _save(fig, path, dpi)


# ---------------------------------------------------------------- Pareto front (Fig. 3)


def _size_unit(values: list[float]) -> tuple[float, str]:
    top = max(values)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if top >= scale:
            return scale, unit
    return 1.0, "B"


def _minor_label(v: float, _pos: Any = None) -> str:
    lead = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
    return f"{v:g}" if lead in (2, 5) else ""


def _front_labels(xs: list[float], ys: list[float]) -> dict[tuple[float, float], str]:
    """Front points numbered 1.. in cost order (the rows of the report's front table); tied points share a label.

    Numbers, not names: a front of a dozen quantized variants would print its names over each other.
    """
    groups: dict[tuple[float, float], list[int]] = {}
    for i, pos in enumerate(zip(xs, ys), 1):
        groups.setdefault(pos, []).append(i)
    return {pos: ",".join(map(str, nums)) for pos, nums in groups.items()}


#: The standard error field drawn as an error bar for each quality metric.
ERROR_KEYS = {"val_loss": "val_loss_se", "fewshot_avg": "fewshot_avg_stderr"}


def pareto_plot(rows: list[dict[str, Any]], front_rows: list[dict[str, Any]], cost_key: str, quality_key: str,
                higher_is_better: bool, title: str, path: Path, dpi: int = DPI) -> Path:
    """Every placed variant (color = family member, marker = format), the front as a highlighted staircase.

    The staircase reads "the best quality reachable at this cost": it steps at each front point.
    Front points carry their number in ``front_rows`` (1-based), which the report's table lists.
    The x axis is logarithmic when the largest cost is more than 5× the smallest. Points carry
    ± one standard error where the rows have one (`ERROR_KEYS`); the front itself uses the means.
    """
    placed = [r for r in rows if r.get(cost_key) is not None and r.get(quality_key) is not None]
    costs = [float(r[cost_key]) for r in placed]
    if cost_key == "size_bytes":
        scale, unit = _size_unit(costs)
        xlabel = f"size on disk ({unit})"
    else:
        scale, unit = 1.0, ""
        xlabel = "FLOPs per token"
    yscale = 100.0 if quality_key == "fewshot_avg" else 1.0
    ylabel = ("few-shot average accuracy (%) — higher is better" if quality_key == "fewshot_avg"
              else "validation loss (nats/token) — lower is better")

    models = sorted({str(r["model"]) for r in placed})
    color = dict(zip(models, _colors(len(models))))
    formats = sorted({str(r.get("format")) for r in placed if r.get("format") != "bf16"}, key=format_order)
    marker = {"bf16": "o", **{f: MARKERS[i % len(MARKERS)] for i, f in enumerate(formats)}}
    on_front = {id(r) for r in front_rows}

    fig = Figure(figsize=(9, 5.6))
    ax = fig.subplots()
    for r in placed:
        hit = id(r) in on_front
        x, y = float(r[cost_key]) / scale, float(r[quality_key]) * yscale
        se = r.get(ERROR_KEYS.get(quality_key, ""))
        if _is_number(se):  # ± one standard error (val loss: over chunks; accuracy: lm-eval's stderr)
            ax.errorbar(x, y, yerr=float(se) * yscale, fmt="none", ecolor=color[str(r["model"])], elinewidth=1,
                        capsize=2, alpha=0.8, zorder=1.5)
        ax.scatter(x, y, s=70 if hit else 40,
                   marker=marker[str(r.get("format"))], color=color[str(r["model"])], alpha=1.0 if hit else 0.55,
                   edgecolors="black" if hit else "none", linewidths=1.2, zorder=3 if hit else 2)
    fx = [float(r[cost_key]) / scale for r in front_rows]
    fy = [float(r[quality_key]) * yscale for r in front_rows]
    if fx:
        ax.plot(fx, fy, drawstyle="steps-post", color="black", lw=1.8, alpha=0.75, zorder=1)
        for (x, y), label in _front_labels(fx, fy).items():
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, fontweight="bold",
                        color="0.1", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                        zorder=4)
    if costs and max(costs) / max(min(costs), 1e-300) > 5:
        ax.set_xscale("log")
        # Plain numbers on a log axis read better than powers of ten for sizes in MB/GB; within
        # up to three decades, minor ticks at 2× and 5× are labelled too (all of them would overlap).
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        decades = math.log10(max(costs) / min(costs))
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label) if decades < 3 else NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.12, y=0.1)

    model_handles = [Line2D([], [], ls="", marker="o", color=color[m], label=m) for m in models]
    format_handles = [Line2D([], [], ls="", marker=marker[f], color="0.4", label=f) for f in ["bf16", *formats]
                      if any(str(r.get("format")) == f for r in placed)]
    front_handle = [Line2D([], [], color="black", lw=1.8, marker="o", mfc="white", mec="black", label="Pareto front")]
    first = ax.legend(handles=model_handles, title="model", fontsize=8, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=format_handles + front_handle, title="format", fontsize=8, title_fontsize=8, loc="lower left",
              bbox_to_anchor=(1.01, 0.0))
    ax.set_title(title)
    return _save(fig, path, dpi)
