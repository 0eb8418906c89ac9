"""The report's loading: TensorBoard event files and the skipped-windows JSON beside them, read into one
:class:`RunReport` per run and optimizer (see :mod:`lightning_clip.app.report`)."""

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
from lightning_clip.record import undone_steps

__all__ = ["ReportError", "RunReport", "LayerHealth", "PathLike", "find_run_dirs", "load_runs", "percentile"]

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
        return rollbacks, undone_steps(windows)
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
