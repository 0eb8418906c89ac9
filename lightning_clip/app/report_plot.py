"""The report's plots (matplotlib, imported when a plot is drawn: the table needs none): the total norm over
steps, and the per-layer norms and ratios against depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_clip.app.report_data import PathLike, ReportError, RunReport, _finite
from lightning_clip.app.report_table import _fmt, _fmt_fraction

__all__ = ["plot", "plot_depth", "depth_path", "check_matplotlib"]


def check_matplotlib() -> None:
    """Raise :class:`~lightning_clip.app.report_data.ReportError`, naming the extra to install, when matplotlib
    cannot be imported (it comes with ``pip install 'lightning-clip[report]'``; the table needs none)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ReportError(
            f"plots need matplotlib, which could not be imported ({err}): pip install 'lightning-clip[report]'"
        ) from None


def _nonfinite_spans(series: Sequence[tuple[int, float]]) -> list[tuple[int, int]]:
    """First and last step of each run of consecutive logged points whose value is NaN/Inf."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    prev = 0  # read only while `start` is set, and then it has been set too
    for step, value in series:
        if not math.isfinite(value):
            if start is None:
                start = step
            prev = step
        elif start is not None:
            spans.append((start, prev))
            start = None
    if start is not None:
        spans.append((start, prev))
    return spans


def depth_path(path: PathLike) -> Path:
    """Where :func:`plot` writes the depth plot: ``<stem>_depth<suffix>`` next to ``path``.

    Example::

        >>> depth_path("plots/grad_norms.png").as_posix()
        'plots/grad_norms_depth.png'
    """
    p = Path(path)
    return p.with_name(f"{p.stem}_depth{p.suffix}")


def plot(reports: Sequence[RunReport], path: PathLike, depth: bool = True) -> Path:
    """Write a PNG: per run, the total gradient norm over steps (log scale), the clip threshold,
    the norm after clipping, and markers for non-finite norms and skipped steps.

    With ``depth`` (the default), when a run has per-layer tags, also write :func:`plot_depth` to
    :func:`depth_path` of ``path`` (``grad_norms.png`` -> ``grad_norms_depth.png``).

    Uses matplotlib's Agg canvas directly (no GUI, no global backend change). Returns ``path``.
    """
    check_matplotlib()
    from matplotlib.figure import Figure

    out = Path(path)
    n = len(reports)
    fig = Figure(figsize=(9, 1.2 + 2.6 * n), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, r in zip(axes, reports):
        total = r.series.get("total", [])
        good = [(s, v) for s, v in total if math.isfinite(v) and v > 0]
        if good:
            ax.plot(*zip(*good), lw=1.0, color="tab:blue", label="grad_norm/total (before clipping)")
        clipped = [(s, v) for s, v in r.series.get("total_clipped", []) if math.isfinite(v) and v > 0]
        if clipped and clipped != good:
            ax.plot(*zip(*clipped), lw=1.0, color="tab:green", alpha=0.8, label="after clipping")
        thresh = r.series.get("max_norm", [])
        if thresh:
            ax.plot(*zip(*thresh), ls="--", lw=1.2, color="tab:red", label="clip threshold (max_norm)")
        # Non-finite norms and skipped steps cannot sit on a log axis: shade the first, mark the second
        # along the top edge.
        for i, (lo, hi) in enumerate(_nonfinite_spans(total)):
            ax.axvspan(
                lo - 0.5,
                hi + 0.5,
                color="tab:red",
                alpha=0.18,
                lw=0,
                label=f"NaN/Inf norm ({r.nonfinite_logged} logged steps)" if i == 0 else None,
            )
        skipped = r.skipped_at
        if skipped:
            ax.plot(
                skipped,
                [0.95] * len(skipped),
                "x",
                ms=7,
                mew=1.8,
                color="tab:orange",
                transform=ax.get_xaxis_transform(),
                label=f"skipped step ({r.skipped_steps} in all)",
            )
        if good or clipped or thresh:
            ax.set_yscale("log")
        ax.set_title(
            f"{r.name}: median {_fmt(r.median, '.3g')}, max {_fmt(r.max, '.3g')}, clipped {_fmt_fraction(r)}, "
            f"non-finite {_fmt(r.nonfinite_steps, 'd')}, skipped {_fmt(r.skipped_steps, 'd')}"
            + ("" if r.rollbacks is None else f", rollbacks {r.rollbacks}"),
            fontsize=10,
            loc="left",
        )
        ax.set_ylabel("gradient norm")
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, framealpha=0.9)
    axes[-1].set_xlabel("step (Lightning logging step)")
    fig.suptitle("Total gradient norm per run (lightning-clip report)", fontsize=11)
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
    fig.savefig(out, dpi=110)
    if depth and any(r.layers for r in reports):
        plot_depth(reports, depth_path(out))
    return out


# (LayerHealth field, legend label, colour, marker) of the depth plot's curves
_DEPTH_CURVES = (
    ("grad_norm", r"gradient norm $\|\nabla W\|$ (grad_norm_layer)", "tab:blue", "o"),
    ("grad_ratio", r"$\|\nabla W\| \,/\, \|W\|$ (grad_health/grad_ratio)", "tab:orange", "s"),
    ("update_ratio", r"$\|\Delta W\| \,/\, \|W\|$ of the last update (grad_health/update_ratio)", "tab:green", "^"),
)
_MAX_TICK_LABELS = 32  # more layers than this: every k-th layer's name on the x-axis


def _depth_panel(ax: Any, r: RunReport) -> None:
    """One run's panel of :func:`plot_depth`: its curves, shading, ticks and title."""
    drawn = False
    for attr, label, color, marker in _DEPTH_CURVES:
        values = [(i, getattr(layer, attr)) for i, layer in enumerate(r.layers)]
        points = [(i, v) for i, v in values if _finite(v) and v > 0]
        if points:
            ax.plot(*zip(*points), marker=marker, ms=4, lw=1.2, color=color, label=label)
            drawn = True
        zeros = [i for i, v in values if v == 0]
        if zeros and attr != "grad_ratio":  # a zero gradient is a zero ratio too: one marker for both
            # No gradient (a saturated or cut-off layer) or no update: on the bottom edge, not left out.
            ax.plot(
                zeros,
                [0.0] * len(zeros),
                marker="v",
                ls="none",
                ms=7,
                color="black" if attr == "grad_norm" else color,
                clip_on=False,
                zorder=3,
                transform=ax.get_xaxis_transform(),
                label=f"{'gradient' if attr == 'grad_norm' else 'update'} exactly 0 (on the bottom edge)",
            )
    flagged = {name for name, _ in r.vanishing_layers}
    for i, layer in enumerate(r.layers):
        if layer.name in flagged:
            ax.axvspan(i - 0.5, i + 0.5, color="tab:red", alpha=0.13, lw=0, label="vanishing layers (see the table)")
    if drawn:
        ax.set_yscale("log")
    every = max(1, math.ceil(len(r.layers) / _MAX_TICK_LABELS))
    ticks = list(range(0, len(r.layers), every))
    ax.set_xticks(ticks, [r.layers[i].name for i in ticks], rotation=60, ha="right", rotation_mode="anchor")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlim(-0.6, len(r.layers) - 0.4)
    ax.set_xlabel("layer by depth, input on the left" + (f" (one name every {every} layers)" if every > 1 else ""))
    ax.grid(True, which="major", alpha=0.3)
    vanishing = "-" if r.vanishing is None else str(r.vanishing)
    ax.set_title(
        f"{r.name}: {len(r.layers)} layers at logging step {r.depth_step}, vanishing {vanishing}",
        fontsize=10,
        loc="left",
    )


def plot_depth(reports: Sequence[RunReport], path: PathLike) -> Path:
    """Write a PNG of each run's depth profile (:attr:`RunReport.layers`): x is the layer's depth (input on the
    left), y (log scale) its gradient norm, gradient-to-weight ratio and, when logged, update-to-weight ratio at
    :attr:`RunReport.depth_step`. Vanishing gradients show as a slope down towards the input; the layers named
    in :attr:`RunReport.vanishing_layers` are shaded. Runs without per-layer tags are left out.

    Raises ValueError when no run has per-layer tags. Returns the path.
    """
    check_matplotlib()
    from matplotlib.figure import Figure

    runs = [r for r in reports if r.layers]
    if not runs:
        raise ValueError("no run has per-layer tags (grad_norm_layer/, grad_health/grad_ratio/) to plot by depth")
    out = Path(path)
    widest = max(len(r.layers) for r in runs)
    longest = max(len(layer.name) for r in runs for layer in r.layers)
    fig = Figure(
        figsize=(min(16.0, max(9.0, 3.0 + 0.3 * min(widest, _MAX_TICK_LABELS))), (3.0 + 0.06 * longest) * len(runs)),
        layout="constrained",
    )
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    legend: dict[str, Any] = {}  # label -> handle, over every panel: one legend for the figure
    for ax, r in zip(axes, runs):
        _depth_panel(ax, r)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.suptitle("Per-layer gradient health against depth (lightning-clip report)", fontsize=11)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=2, fontsize=8)
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
    fig.savefig(out, dpi=110)
    return out
