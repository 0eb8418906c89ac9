"""Summarize and plot the gradient norms that :class:`~lightning_clip.GradientClipping` wrote to TensorBoard.

Reads every directory under a log directory that holds TensorBoard event files (one run per
directory, as TensorBoard itself does) and, for each run and optimizer, the scalars the callback
logs on logging steps:

* ``grad_norm/total`` -- the total gradient norm before clipping: its median, 99th percentile and
  maximum over the logged steps (finite values; non-finite ones are counted apart);
* ``grad_clip/steps``, ``grad_clip/clipped_steps``, ``grad_clip/nonfinite_steps``,
  ``grad_clip/skipped_steps``, ``grad_clip/spike_skips``, ``grad_clip/requested_skips``, ``grad_clip/rollbacks``
  -- cumulative counters: the last logged value is the run's total, and the clipped fraction is
  ``clipped_steps / steps``. Skipped steps are the steps not applied: the non-finite ones (under a policy that
  skips them), the spikes, and the *requested* ones (the steps of a data window a remedy asked to skip);
* ``grad_clip/lr_scale`` (last value) and ``grad_clip/max_norm`` (the clip threshold, plotted);
* under ``nan_policy="rollback"``, the skipped data windows the callback writes beside the event files
  (:func:`lightning_clip.metrics.windows_file`): one per rollback, with the snapshot it restored, so the report
  counts rollbacks after the last logging step too, and the steps they undid (from each snapshot to its bad step);
* gradient health: ``grad_health/vanishing_layers`` (last value: the layers the callback flags as vanishing now)
  and, per layer, ``grad_norm_layer/<layer>``, ``grad_health/grad_ratio/<layer>`` (``||grad W|| / ||W||``) and
  ``grad_health/update_ratio/<layer>`` (``||dW|| / ||W||`` of the last measured update): the depth profile.

Layers are in *depth order*: the order in which the callback logs them (the model's ``named_parameters()``
order), which is the order in which their tags first appear in the event files -- TensorBoard's reader keeps it.

Counters are read at the last *logging* step, so with ``Trainer(log_every_n_steps=n)`` they can
trail the true end of the run by up to ``n - 1`` steps.

Example::

    from lightning_clip.app.report import load_runs, format_table, plot

    runs = load_runs("lightning_logs")      # ReportError if there is nothing to report
    print(format_table(runs, "lightning_logs"))
    plot(runs, "grad_norms.png")            # and grad_norms_depth.png when per-layer tags were logged

The same from a shell: ``lightning-clip report lightning_logs --plot grad_norms.png``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # imported for real in load_runs(): only the report command needs TensorBoard's reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_clip import metrics as M

__all__ = [
    "ReportError",
    "RunReport",
    "LayerHealth",
    "find_run_dirs",
    "load_runs",
    "format_table",
    "plot",
    "plot_depth",
    "depth_path",
    "percentile",
]

PathLike = Union[str, "os.PathLike[str]"]


class ReportError(Exception):
    """Nothing to report: the log directory is missing, holds no event files, or no gradient norms."""


@dataclass
class LayerHealth:
    """One layer's values at a run's depth-profile step (:attr:`RunReport.depth_step`); None: not logged then."""

    name: str
    grad_norm: float | None = None  # grad_norm_layer/<name>
    grad_ratio: float | None = None  # grad_health/grad_ratio/<name>: ||grad W|| / ||W||
    # grad_health/update_ratio/<name>: ||dW|| / ||W|| of the last update measured by then (every
    # ``update_ratio_every``-th logging step's, logged at the next logging step)
    update_ratio: float | None = None


@dataclass
class RunReport:
    """The summary of one run (one event-file directory) for one optimizer.

    ``run`` labels the directory: its path under the reported log directory, or its own name (``version_0``)
    when the log directory is the run itself.

    ``steps``, ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps``, ``spike_skips``, ``requested_skips``
    and ``lr_scale`` are the last logged values of the callback's counters (None when the tag is missing).
    ``skipped_steps`` counts the steps not applied: ``nonfinite_steps`` (under a policy that skips them),
    ``spike_skips`` and ``requested_skips`` (the steps of a data window a remedy asked to skip). ``median``,
    ``p99`` and ``max`` are over the logged finite values of ``grad_norm/total`` (NaN when there are none).

    ``rollbacks`` (None: the run did not use ``nan_policy="rollback"``) counts the rollbacks: the skipped windows
    written beside the event files (``windows``, one per rollback), or the logged ``grad_clip/rollbacks`` when
    there is no such file. ``logged_rollbacks`` is the logged counter alone: fewer means rollbacks after the last
    logging step, which the logged ``lr_scale`` and ``skipped_steps`` do not include yet. ``undone_steps`` sums
    the applied steps the rollbacks threw away, ``global_step - snapshot_step`` per window (the snapshot counts
    this optimizer's steps): None where that is not known (no windows file, or several optimizers, whose global
    step advances faster than each one's count).

    ``vanishing`` is the last logged ``grad_health/vanishing_layers`` (None when not logged) and
    ``vanishing_layers`` names that many layers, with their ratio, in depth order: those with the smallest
    ``||grad W|| / ||W||`` at that logging step. The callback flags the layers below one bound, so these are the
    flagged ones -- unless a layer crossed the bound within its last ``vanishing_patience`` logging steps (not
    flagged yet) with a smaller ratio than a flagged one. ``layers`` is the depth profile: every layer in depth
    order with its values at ``depth_step``, the last logging step whose per-layer norms and ratios are all finite
    (the last logging step when none is).
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
    vanishing: int | None = None
    vanishing_layers: list[tuple[str, float]] = field(default_factory=list)
    layers: list[LayerHealth] = field(default_factory=list, repr=False)
    depth_step: int | None = None
    spike_skips: int | None = None
    requested_skips: int | None = None
    rollbacks: int | None = None
    logged_rollbacks: int | None = None
    windows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    undone_steps: int | None = None

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


# per-layer tag group -> the LayerHealth field it fills
_LAYER_GROUPS = {M.LAYER_GROUP: "grad_norm", M.GRAD_RATIO_GROUP: "grad_ratio", M.UPDATE_RATIO_GROUP: "update_ratio"}


def _layer_tags(tags: Sequence[str], suffixes: Sequence[str]) -> dict[str, list[tuple[str, str, str]]]:
    """Per tag suffix (:func:`lightning_clip.metrics.suffix` of an optimizer and callback name found in the run),
    its per-layer tags in reading order, as ``(tag, field, layer)``.

    A per-layer tag is ``<group>/<layer><suffix>``: it belongs to the longest known suffix it ends with, so
    ``grad_norm_layer/net.0_opt1/monitor`` is optimizer 1's ``net.0`` of the callback named ``monitor`` when the run
    has ``grad_norm/total_opt1/monitor``, and never optimizer 0's layer ``net.0_opt1``.

    Example::

        >>> found = _layer_tags(["grad_norm_layer/a.0", "grad_norm_layer/a.0_opt1/m", "grad_norm/total"],
        ...                     ["", "_opt1/m"])
        >>> found[""], found["_opt1/m"]
        ([('grad_norm_layer/a.0', 'grad_norm', 'a.0')], [('grad_norm_layer/a.0_opt1/m', 'grad_norm', 'a.0')])
    """
    longest_first = sorted(set(suffixes), key=len, reverse=True)
    out: dict[str, list[tuple[str, str, str]]] = {end: [] for end in longest_first}
    for tag in tags:
        for group, kind in _LAYER_GROUPS.items():
            if not tag.startswith(group + "/"):
                continue
            rest = tag[len(group) + 1 :]
            end = next((e for e in longest_first if rest.endswith(e) and len(rest) > len(e)), None)
            if end is not None:
                out[end].append((tag, kind, rest[: len(rest) - len(end)]))
            break
    return out


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _depth_profile(
    acc: EventAccumulator, entries: Sequence[tuple[str, str, str]]
) -> tuple[dict[str, dict[str, dict[int, float]]], list[LayerHealth], int | None]:
    """The per-layer series (layer -> field -> step -> value, layers in depth order) and the depth profile: every
    layer's values at the last logging step whose logged norms and ratios are all finite (else the last step); the
    update ratio is the last one logged by then (it is measured every ``update_ratio_every``-th logging step)."""
    series: dict[str, dict[str, dict[int, float]]] = {}
    for tag, kind, layer in entries:  # reading order: the first tag of a layer places it
        series.setdefault(layer, {})[kind] = dict(_scalars(acc, tag))
    steps = sorted({s for by in series.values() for k in ("grad_norm", "grad_ratio") for s in by.get(k, {})})
    if not steps:
        return series, [], None

    def finite_at(step: int) -> bool:
        values = [by[k][step] for by in series.values() for k in ("grad_norm", "grad_ratio") if step in by.get(k, {})]
        return all(math.isfinite(v) for v in values)

    at = next((s for s in reversed(steps) if finite_at(s)), steps[-1])
    layers = [
        LayerHealth(
            layer, by.get("grad_norm", {}).get(at), by.get("grad_ratio", {}).get(at), _last_update_ratio(by, at)
        )
        for layer, by in series.items()
    ]
    return series, layers, at


def _last_update_ratio(by: dict[str, dict[int, float]], step: int) -> float | None:
    """The update ratio logged last at or before ``step``."""
    logged = [s for s in by.get("update_ratio", {}) if s <= step]
    return by["update_ratio"][max(logged)] if logged else None


def _vanishing_layers(
    count: list[tuple[int, float]], series: dict[str, dict[str, dict[int, float]]]
) -> tuple[int | None, list[tuple[str, float]]]:
    """The last logged vanishing count and as many layers, in depth order: the smallest ratios at that step."""
    n = _as_int(_last(count))
    if not n:
        return n, []
    at = count[-1][0]
    logged = [(layer, by["grad_ratio"][at]) for layer, by in series.items() if at in by.get("grad_ratio", {})]
    smallest = {layer for layer, _ in sorted((p for p in logged if math.isfinite(p[1])), key=lambda p: p[1])[:n]}
    return n, [(layer, r) for layer, r in logged if layer in smallest]


def _run_label(run_dir: Path, root: Path) -> str:
    """A run's label: its path under ``root``; for a run directly at ``root``, the directory's own name
    (``version_0``, not ``.``; the absolute path where the directory has no name, as ``/``)."""
    rel = run_dir.relative_to(root).as_posix()
    if rel != ".":
        return rel
    resolved = root.resolve()
    return resolved.name or resolved.as_posix()


def _read_windows(run_dir: Path, instance: str | None) -> list[dict[str, Any]] | None:
    """The skipped data windows the callback named ``instance`` wrote beside the event files; None if there are
    none (no rollback yet, another policy) or the file is not such a list."""
    try:
        windows = json.loads((run_dir / M.windows_file(instance)).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(windows, list) or not all(isinstance(w, dict) for w in windows):
        return None
    return windows


def _rollbacks(
    logged: int | None, windows: list[dict[str, Any]] | None, single_optimizer: bool
) -> tuple[int | None, int | None]:
    """``(rollbacks, undone_steps)`` of one optimizer from its logged counter and its windows (see
    :class:`RunReport`)."""
    if windows is None:  # no file: the counter alone, and nothing undone where it logged no rollback
        return logged, (0 if logged == 0 else None)
    rollbacks = max(len(windows), logged or 0)  # the file is written after each rollback; the counter can trail
    if not single_optimizer or rollbacks > len(windows):
        return rollbacks, None
    try:
        return rollbacks, sum(int(w["global_step"]) - int(w["snapshot_step"]) for w in windows)
    except (KeyError, TypeError, ValueError):
        return rollbacks, None


def _skips_and_rollbacks(
    run_dir: Path,
    opt: int,
    instance: str | None,
    optimizers: int,
    get: Callable[[str], list[tuple[int, float]]],
) -> dict[str, Any]:
    """The :class:`RunReport` fields of optimizer ``opt`` (of ``optimizers`` of the callback named ``instance``)
    about the parts of ``skipped_steps`` and the rollbacks; ``get`` reads one of its tags."""
    in_file = _read_windows(run_dir, instance)
    windows = None if in_file is None else [w for w in in_file if w.get("optimizer", 0) == opt]
    logged = _as_int(_last(get(M.ROLLBACKS)))
    rollbacks, undone = _rollbacks(logged, windows, optimizers == 1)
    return {
        "spike_skips": _as_int(_last(get(M.SPIKE_SKIPS))),
        "requested_skips": _as_int(_last(get(M.REQUESTED_SKIPS))),
        "rollbacks": rollbacks,
        "logged_rollbacks": logged,
        "windows": windows or [],
        "undone_steps": undone,
    }


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
        in_order = list(acc.Tags().get("scalars", []))  # as first read: the order the callback logged them in
        tags = set(in_order)
        # The tag names are the callback's (lightning_clip.metrics): grad_norm/total[_opt<i>][/<name>].
        found = {tag: parsed for tag in sorted(tags) if (parsed := M.parse_total_tag(tag)) is not None}
        per_layer = _layer_tags(in_order, [M.suffix(opt, instance) for opt, instance in found.values()])
        for tag, (opt, instance) in found.items():
            suffix = M.suffix(opt, instance)

            get = functools.partial(_optional_scalars, acc, tags, suffix)
            optimizers = sum(1 for _, other in found.values() if other == instance)
            layer_series, layers, depth_step = _depth_profile(acc, per_layer[suffix])
            vanishing, vanishing_layers = _vanishing_layers(get(M.VANISHING_LAYERS), layer_series)
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
                    vanishing=vanishing,
                    vanishing_layers=vanishing_layers,
                    layers=layers,
                    depth_step=depth_step,
                    **_skips_and_rollbacks(run_dir, opt, instance, optimizers, get),
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
        a       10       3       1  2.96    3           1    40.0%        1       0.5          -

    The ``vanishing`` column is the last logged ``grad_health/vanishing_layers``; the layers it counts are named
    under the table (see :class:`RunReport`)::

        >>> r.vanishing, r.vanishing_layers = 2, [("net.0", 3e-15), ("net.1.lin", 2e-13)]
        >>> print(format_table([r]).splitlines()[-1])
          a: net.0 (3e-15), net.1.lin (2e-13)

    Columns that only some runs fill appear when one does: ``spikes`` and ``requested`` (the parts of
    ``skipped`` besides the non-finite steps), ``rollbacks`` and ``undone`` (``nan_policy="rollback"``); each
    rollback is listed under the table::

        >>> r.vanishing, r.skipped_steps, r.requested_skips, r.rollbacks, r.logged_rollbacks = 0, 4, 3, 1, 1
        >>> r.undone_steps, r.windows = 1, [{"global_step": 5, "snapshot_step": 4, "skipped": [5, 8]}]
        >>> table = format_table([r]).splitlines()
        >>> table[0].split()[8:], table[2].split()[8:]
        (['skipped', 'requested', 'rollbacks', 'undone', 'LR', 'scale', 'vanishing'], ['4', '3', '1', '1', '0.5', '0'])
        >>> print(*table[-2:], sep="\\n")
        rollbacks (at global step: the snapshot restored, the global steps skipped):
          a: step 5: snapshot after 4 steps, skipped 5..8
    """
    columns = _columns(reports)
    header = [title for title, _ in columns]
    rows = [[cell(r) for _, cell in columns] for r in reports]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # First column left-aligned (names), numbers right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = []
    if logdir is not None:
        out.append(f"Gradient norms under {logdir} ({_count_label(reports)})")
        out.append("")
    out += [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    named = [r for r in reports if r.vanishing]
    if named:
        out += ["", "vanishing layers (smallest ||grad W|| / ||W|| at the last logging step, shallowest first):"]
        out += [_vanishing_line(r) for r in named]
    rolled = [r for r in reports if r.rollbacks]
    if rolled:
        out += ["", "rollbacks (at global step: the snapshot restored, the global steps skipped):"]
        out += [_rollback_line(r) for r in rolled]
    if logdir is not None:
        out += ["", *_legend(reports, header)]
    return "\n".join(out)


def _columns(reports: Sequence[RunReport]) -> list[tuple[str, Callable[[RunReport], str]]]:
    """The table's columns (title, cell of a run); those only some runs fill appear when one does."""
    columns: list[tuple[str, Callable[[RunReport], str]]] = [
        ("run", lambda r: r.name),
        ("steps", lambda r: _fmt(r.steps, "d")),
        ("logged", lambda r: str(r.logged)),
        ("median", lambda r: _fmt(r.median)),
        ("p99", lambda r: _fmt(r.p99)),
        ("max", lambda r: _fmt(r.max)),
        ("non-finite", lambda r: _fmt(r.nonfinite_steps, "d")),
        ("clipped", _fmt_fraction),
        ("skipped", lambda r: _fmt(r.skipped_steps, "d")),
    ]
    rollback = any(r.rollbacks is not None for r in reports)
    if any(r.spike_skips for r in reports):
        columns.append(("spikes", lambda r: _fmt(r.spike_skips, "d")))
    if rollback or any(r.requested_skips for r in reports):
        columns.append(("requested", lambda r: _fmt(r.requested_skips, "d")))
    if rollback:
        columns.append(("rollbacks", lambda r: _fmt(r.rollbacks, "d")))
        columns.append(("undone", lambda r: _fmt(r.undone_steps, "d")))
    columns.append(("LR scale", lambda r: _fmt(r.lr_scale)))
    columns.append(("vanishing", lambda r: _fmt(r.vanishing, "d")))
    return columns


def _legend(reports: Sequence[RunReport], header: Sequence[str]) -> list[str]:
    """What the columns shown mean."""
    parts = ["non-finite (under a nan_policy that skips them)"]
    parts += [name for name in ("spikes", "requested") if name in header]
    out = [
        "median/p99/max: grad_norm/total (before clipping) over the logged steps, non-finite values left out.",
        "non-finite: optimizer steps with NaN/Inf (gradient, loss or checked inputs; whole run); "
        "clipped: clipped_steps / steps.",
        f"skipped: optimizer steps not applied (whole run) = {' + '.join(parts)}.",
    ]
    if "spikes" in header:
        out.append("spikes: steps skipped as gradient-norm or loss spikes (skip_spikes, loss_spikes).")
    if "requested" in header:
        out.append(
            "requested: steps of a data window a remedy asked to skip (after a rollback: the steps after the bad one)."
        )
    if "rollbacks" in header:
        out += [
            "rollbacks: in-memory snapshots restored (nan_policy='rollback'); undone: the applied steps they threw",
            "  away, from each snapshot to its bad step (-: not known, e.g. several optimizers). Steps lost: undone",
            "  plus the skipped windows.",
        ]
    out.append("LR scale: the last logged grad_clip/lr_scale (1 unless halve_lr or rollback lowered it).")
    if any(r.vanishing is not None for r in reports):
        out.append(
            "vanishing: last grad_health/vanishing_layers, layers whose ||grad W|| / ||W|| stays below "
            "vanishing_ratio (-: not logged)."
        )
    if any(r.clipped_sampled and r.clipped_fraction is not None for r in reports):
        out.append(
            "*: no clipped_steps counter (mode 'value' or 'none'): share of logged steps where "
            "clipping changed the norm."
        )
    return out


_MAX_NAMED = 8  # vanishing layers (or rollbacks) named per row under the table; the rest are counted
_WRAP = 110  # characters per line of that list


def _vanishing_line(r: RunReport) -> str:
    """``  <run>: net.0 (3e-15), net.1.lin (2e-13)``, wrapped; the count alone when the ratios were not logged."""
    if not r.vanishing_layers:
        return f"  {r.name}: {r.vanishing} (no per-layer ratios logged: log_norms='layer' names them)"
    shown = [f"{name} ({ratio:.2g})" for name, ratio in r.vanishing_layers[:_MAX_NAMED]]
    more = len(r.vanishing_layers) - len(shown)
    if more:
        shown.append(f"... and {more} more (deeper)")
    return _wrapped(r.name, shown)


def _rollback_line(r: RunReport) -> str:
    """``  <run>: step 5: after 4 steps, skipped 5..8; ...``, wrapped; the rollbacks the counters do not include
    yet are said so."""
    shown = [_window_entry(w) for w in r.windows[:_MAX_NAMED]]
    more = len(r.windows) - len(shown)
    if more:
        shown.append(f"... and {more} more (later)")
    if not r.windows:
        shown.append(f"{r.rollbacks} (no {M.windows_file(r.instance)} beside the event files)")
    unlogged = (r.rollbacks or 0) - (r.logged_rollbacks or 0)
    if unlogged > 0:
        shown.append(
            f"({unlogged} after the last logging step: not in the logged LR scale, skipped and requested counts)"
        )
    return _wrapped(r.name, shown, sep=";")


def _window_entry(window: dict[str, Any]) -> str:
    """``step 5: snapshot after 4 steps, skipped 5..8``: the bad step, the snapshot restored, the steps skipped."""
    skipped = window.get("skipped")
    steps = f"{skipped[0]}..{skipped[-1]}" if isinstance(skipped, list) and skipped else "?"
    at, snapshot = window.get("global_step", "?"), window.get("snapshot_step", "?")
    return f"step {at}: snapshot after {snapshot} steps, skipped {steps}"


def _wrapped(label: str, entries: Sequence[str], sep: str = ",") -> str:
    """``  <label>: entry, entry, ...``, wrapped between entries at :data:`_WRAP` characters, never inside one."""
    lines = [f"  {label}:"]
    for i, entry in enumerate(entries):
        entry += sep if i < len(entries) - 1 else ""
        if len(lines[-1]) + 1 + len(entry) > _WRAP and not lines[-1].endswith(":"):
            lines.append("   ")
        lines[-1] += " " + entry
    return "\n".join(lines)


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
