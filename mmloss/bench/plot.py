"""``--plot``: time and peak memory against batch size (log–log), one line per implementation,
one pair of panels per loss."""
from __future__ import annotations

from typing import Optional

from .results import Row


def _series_key(row: Row, vary_dtype: bool, vary_dim: bool) -> str:
    label = row.impl
    if vary_dtype:
        label += f" {row.dtype}"
    if vary_dim:
        label += f" D={row.dim}"
    return label


def _series(subset, vary_dtype: bool, vary_dim: bool) -> dict:
    """Line label -> that implementation's rows in ``subset`` (the floor's rows as "floor")."""
    series = {}
    for r in subset:
        key = "floor" if r.kind == "floor" else _series_key(r, vary_dtype, vary_dim)
        if r.kind == "floor" and (vary_dtype or vary_dim):
            key = _series_key(r, vary_dtype, vary_dim).replace(r.impl, "floor")
        series.setdefault(key, []).append(r)
    return series


def _plot_lines(ax_time, ax_mem, series: dict, colors: dict, markers: dict) -> None:
    """Time (every line) and peak memory (every line but the floor's) against B."""
    for key, points in series.items():
        points.sort(key=lambda r: r.batch)
        xs = [r.batch for r in points]
        is_floor = key.startswith("floor")
        style = dict(color="0.45", linestyle="--", marker="", linewidth=1.5) if is_floor else \
            dict(color=colors[key], marker=markers[key], linewidth=2, markersize=6, alpha=0.9)
        is_mmloss = points[0].kind == "mmloss"
        if is_mmloss:
            style["linewidth"] = 2.8
        ax_time.plot(xs, [r.total.median * 1e3 for r in points], label=key, **style)
        mem = [(r.batch, r.peak_bytes / 2**20) for r in points if r.peak_bytes]
        if mem and not is_floor:
            ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], label=key, **style)


def _style_axes(ax, title: str, unit: str, sizes: list) -> None:
    """Log–log axes, B on x (ticks at the measured sizes), a readable log y scale."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("batch size B")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def plot(rows, path: str, title: str, case_titles: Optional[dict] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.ok and r.total is not None]
    if not rows:
        raise ValueError("nothing was measured, so there is nothing to plot")
    losses = list(dict.fromkeys(r.loss for r in rows))
    vary_dtype = len({r.dtype for r in rows}) > 1
    vary_dim = len({r.dim for r in rows}) > 1
    labels = list(dict.fromkeys(_series_key(r, vary_dtype, vary_dim) for r in rows if r.kind != "floor"))
    cmap = plt.get_cmap("tab10")
    colors = {label: cmap(i % 10) for i, label in enumerate(labels)}
    markers = {label: "osD^vP*Xph"[i % 10] for i, label in enumerate(labels)}  # overlapping lines stay visible

    fig, axes = plt.subplots(len(losses), 2, figsize=(12, 4.2 * len(losses)), squeeze=False)
    for (ax_time, ax_mem), loss in zip(axes, losses):
        subset = [r for r in rows if r.loss == loss]
        sizes = sorted({r.batch for r in subset})
        _plot_lines(ax_time, ax_mem, _series(subset, vary_dtype, vary_dim), colors, markers)
        matrix = sorted({(r.batch, r.rows * r.cols * 4 / 2**20) for r in subset})
        ax_mem.plot([m[0] for m in matrix], [m[1] for m in matrix], color="black", linestyle=":",
                    linewidth=1.2, label="one N×M fp32 matrix")
        name = (case_titles or {}).get(loss, loss)
        for ax, what, unit in ((ax_time, "time, forward + backward", "ms (median)"),
                               (ax_mem, "peak memory above inputs", "MiB")):
            _style_axes(ax, f"{name}: {what}", unit, sizes)
        ax_time.legend(fontsize=8, loc="upper left")
        ax_mem.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
