"""Summarize and plot the gradient norms that :class:`~lightning_clip.GradientClipping` wrote to TensorBoard.

Reads every directory under a log directory that holds TensorBoard event files (one run per
directory, as TensorBoard itself does) and, for each run and optimizer, the scalars the callback
logs on logging steps:

* ``grad_norm/total`` -- the total gradient norm before clipping: its median, 99th percentile and
  maximum over the logged steps (finite values; non-finite ones are counted apart);
* ``grad_clip/steps``, ``grad_clip/clipped_steps``, ``grad_clip/nonfinite_steps``,
  ``grad_clip/skipped_steps`` -- cumulative counters: the last logged value is the run's total, and
  the clipped fraction is ``clipped_steps / steps``;
* ``grad_clip/lr_scale`` (last value) and ``grad_clip/max_norm`` (the clip threshold, plotted).

Counters are read at the last *logging* step, so with ``Trainer(log_every_n_steps=n)`` they can
trail the true end of the run by up to ``n - 1`` steps.

Example::

    from lightning_clip.app.report import load_runs, format_table, plot

    runs = load_runs("lightning_logs")      # ReportError if there is nothing to report
    print(format_table(runs, "lightning_logs"))
    plot(runs, "grad_norms.png")

The same from a shell: ``lightning-clip report lightning_logs --plot grad_norms.png``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # imported for real in load_runs(): only the report command needs TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_clip import metrics as M

__all__ = ["ReportError", "RunReport", "find_run_dirs", "load_runs", "format_table", "plot", "percentile"]

PathLike = Union[str, "os.PathLike[str]"]


class ReportError(Exception):
    """Nothing to report: the log directory is missing, holds no event files, or no gradient norms."""


@dataclass
class RunReport:
    """The summary of one run (one event-file directory) for one optimizer.

    ``run`` labels the directory: its path under the reported log directory, or its own name (``version_0``)
    when the log directory is the run itself.

    ``steps``, ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps`` and ``lr_scale`` are the last
    logged values of the callback's counters (None when the tag is missing). ``median``, ``p99`` and
    ``max`` are over the logged finite values of ``grad_norm/total`` (NaN when there are none).
    """

    run: str
    optimizer: int
    logged: int
    median: float
    p99: float
    max: float
    nonfinite_logged: int
    first_nonfinite_step: int | None
    steps: int | None
    clipped_steps: int | None
    nonfinite_steps: int | None
    skipped_steps: int | None
    lr_scale: float | None
    # (step, value) per tag, for plotting: total, total_clipped, max_norm, skipped_steps.
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)
    # the ``name`` of the callback that logged it (its tags end in /<name>); None for an unnamed one
    instance: str | None = None

    @property
    def name(self) -> str:
        """The run's label: its directory, plus ``[opt<i>]`` for optimizer ``i > 0`` and ``[<name>]`` for a named
        callback."""
        label = self.run if self.optimizer == 0 else f"{self.run} [opt{self.optimizer}]"
        return label if self.instance is None else f"{label} [{self.instance}]"

    @property
    def clipped_sampled(self) -> bool:
        """True when :attr:`clipped_fraction` comes from the logged steps only (no ``clipped_steps`` counter)."""
        return self.clipped_steps is None

    @property
    def clipped_fraction(self) -> float | None:
        """``clipped_steps / steps``; without that counter (the callback keeps it in ``mode="norm"`` only),
        the share of logged steps whose norm after clipping differs from the norm before. None if
        neither is known.
        """
        if self.clipped_steps is not None:
            return self.clipped_steps / self.steps if self.steps else None
        before = dict(self.series.get("total", []))
        pairs = [
            (before[s], v)
            for s, v in self.series.get("total_clipped", [])
            if s in before and math.isfinite(before[s]) and math.isfinite(v)
        ]
        if not pairs:
            return None
        return sum(1 for b, a in pairs if a != b) / len(pairs)

    @property
    def skipped_at(self) -> list[int]:
        """Logging steps at which the cumulative ``skipped_steps`` grew (a skip happened since the last log)."""
        out, last = [], 0.0
        for step, value in self.series.get("skipped_steps", []):
            if value > last:
                out.append(step)
            last = value
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics.

    The same definition as ``numpy.percentile``'s default: position ``(n - 1) * q / 100`` in the
    sorted values. NaN for no values.

    Example::

        >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
        2.5
        >>> percentile([5.0], 99)
        5.0
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def find_run_dirs(logdir: PathLike) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that directly holds a TensorBoard event file."""
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"log directory not found: {root}")
    if not root.is_dir():
        raise ReportError(f"not a directory: {root}")
    runs = {Path(dirpath) for dirpath, _, files in os.walk(root) if any("tfevents" in f for f in files)}
    return sorted(runs)


def _scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)]


def _optional_scalars(accumulator: EventAccumulator, tags: set[str], suffix: str, name: str) -> list[tuple[int, float]]:
    """The scalars of tag ``name + suffix``, or no points when the run did not log it."""
    tag = f"{name}{suffix}"
    return _scalars(accumulator, tag) if tag in tags else []


def _last(series: list[tuple[int, float]]) -> float | None:
    return series[-1][1] if series else None


def _as_int(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else round(value)


def _run_label(run_dir: Path, root: Path) -> str:
    """A run's label: its path under ``root``; for a run directly at ``root``, the directory's own name
    (``version_0``, not ``.``; the absolute path where the directory has no name, as ``/``)."""
    rel = run_dir.relative_to(root).as_posix()
    if rel != ".":
        return rel
    resolved = root.resolve()
    return resolved.name or resolved.as_posix()


def load_runs(logdir: PathLike) -> list[RunReport]:
    """Read the callback's scalars from every run under ``logdir``.

    Runs without ``grad_norm/total`` (no :class:`~lightning_clip.GradientClipping`, or
    ``log_norms="none"``) are left out. Raises :class:`ReportError` (message names ``logdir``) when
    the directory is missing, holds no event files, or no run has gradient norms.
    """
    # Imported here: the TensorBoard reader is only needed by this command.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(logdir)
    run_dirs = find_run_dirs(root)
    if not run_dirs:
        raise ReportError(f"no TensorBoard event files under {root}")
    reports = []
    for run_dir in run_dirs:
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        for tag in sorted(tags):
            # The tag names are the callback's (lightning_clip.metrics): grad_norm/total[_opt<i>][/<name>].
            parsed = M.parse_total_tag(tag)
            if parsed is None:
                continue
            opt, instance = parsed
            suffix = M.suffix(opt, instance)

            get = functools.partial(_optional_scalars, acc, tags, suffix)
            total = _scalars(acc, tag)
            finite = [v for _, v in total if math.isfinite(v)]
            first_bad = next((s for s, v in total if not math.isfinite(v)), None)
            reports.append(
                RunReport(
                    run=_run_label(run_dir, root),
                    optimizer=opt,
                    logged=len(total),
                    median=percentile(finite, 50),
                    p99=percentile(finite, 99),
                    max=max(finite) if finite else math.nan,
                    nonfinite_logged=len(total) - len(finite),
                    first_nonfinite_step=first_bad,
                    steps=_as_int(_last(get(M.STEPS))),
                    clipped_steps=_as_int(_last(get(M.CLIPPED_STEPS))),
                    nonfinite_steps=_as_int(_last(get(M.NONFINITE_STEPS))),
                    skipped_steps=_as_int(_last(get(M.SKIPPED_STEPS))),
                    lr_scale=_last(get(M.LR_SCALE)),
                    series={
                        "total": total,
                        "total_clipped": get(M.TOTAL_CLIPPED),
                        # the clip threshold: max_norm in norm mode, the rule's threshold in the adaptive modes
                        "max_norm": get(M.MAX_NORM) or get(M.THRESHOLD),
                        "skipped_steps": get(M.SKIPPED_STEPS),
                    },
                    instance=instance,
                )
            )
    if not reports:
        raise ReportError(
            f"no grad_norm/total scalars in the event files under {root} "
            "(was lightning_clip.GradientClipping a Trainer callback, with log_norms other than 'none'?)"
        )
    return sorted(reports, key=lambda r: (r.run, r.optimizer, r.instance or ""))


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _fmt_fraction(r: RunReport) -> str:
    frac = r.clipped_fraction
    if frac is None:
        return "-"
    return f"{100 * frac:.1f}%" + ("*" if r.clipped_sampled else "")


def format_table(reports: Sequence[RunReport], logdir: PathLike | None = None) -> str:
    """A plain-text table, one row per run and optimizer.

    Example::

        >>> r = RunReport(run="a", optimizer=0, logged=3, median=1.0, p99=2.96, max=3.0, nonfinite_logged=0,
        ...               first_nonfinite_step=None, steps=10, clipped_steps=4, nonfinite_steps=1,
        ...               skipped_steps=1, lr_scale=0.5)
        >>> print(format_table([r]).splitlines()[-1])
        a       10       3       1  2.96    3           1    40.0%        1       0.5
    """
    header = ["run", "steps", "logged", "median", "p99", "max", "non-finite", "clipped", "skipped", "LR scale"]
    rows = [
        [
            r.name,
            _fmt(r.steps, "d"),
            str(r.logged),
            _fmt(r.median),
            _fmt(r.p99),
            _fmt(r.max),
            _fmt(r.nonfinite_steps, "d"),
            _fmt_fraction(r),
            _fmt(r.skipped_steps, "d"),
            _fmt(r.lr_scale),
        ]
        for r in reports
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # First column left-aligned (names), numbers right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = []
    if logdir is not None:
        out.append(f"Gradient norms under {logdir} ({_count_label(reports)})")
        out.append("")
    out += [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    if logdir is not None:
        out += [
            "",
            "median/p99/max: grad_norm/total (before clipping) over the logged steps, non-finite values left out.",
            "non-finite, skipped: optimizer steps with NaN/Inf (whole run); clipped: clipped_steps / steps.",
        ]
        if any(r.clipped_sampled and r.clipped_fraction is not None for r in reports):
            out.append(
                "*: no clipped_steps counter (mode 'value' or 'none'): share of logged steps where "
                "clipping changed the norm."
            )
    return "\n".join(out)


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


def _count_label(reports: Sequence[RunReport]) -> str:
    """``"2 runs"``; ``"1 run, 2 series"`` when a run has several optimizers or named callbacks (one row each)."""
    runs = len({r.run for r in reports})
    label = f"{runs} run{'s' if runs != 1 else ''}"
    return label if runs == len(reports) else f"{label}, {len(reports)} series"


def plot(reports: Sequence[RunReport], path: PathLike) -> Path:
    """Write a PNG: per run, the total gradient norm over steps (log scale), the clip threshold,
    the norm after clipping, and markers for non-finite norms and skipped steps.

    Uses matplotlib's Agg canvas directly (no GUI, no global backend change). Returns the path.
    """
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
            f"non-finite {_fmt(r.nonfinite_steps, 'd')}, skipped {_fmt(r.skipped_steps, 'd')}",
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
    return out
