"""The report's table: one row per run and optimizer, the vanishing layers and rollbacks under it, its legend;
and :func:`format_rows`, the aligned columns the demo's comparison tables use too."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from lightning_clip import metrics as M
from lightning_clip.app.report_data import PathLike, RunReport
from lightning_clip.record import steps_lost

__all__ = ["format_table", "format_rows"]


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns: the header, a rule under it, the rows; the first column left-aligned (names), the others
    right-aligned (numbers), two spaces apart.

    >>> print(format_rows(["", "a", "bb"], [["loss", "1", "22.5"]]))
          a    bb
    ----  -  ----
    loss  1  22.5
    """
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


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
          a: 1 rollback(s), 5 steps lost, LR scale 0.5 at the end; step 5: snapshot after 4 steps, skipped 5..8
    """
    columns = _columns(reports)
    header = [title for title, _ in columns]
    out = []
    if logdir is not None:
        out.append(f"Gradient norms under {logdir} ({_count_label(reports)})")
        out.append("")
    out.append(format_rows(header, [[cell(r) for _, cell in columns] for r in reports]))
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
    unlogged = (r.rollbacks or 0) - (r.logged_rollbacks or 0)
    shown = [_window_entry(w) for w in r.windows[:_MAX_NAMED]]
    more = len(r.windows) - len(shown)
    if r.windows:
        shown.insert(0, _summary(r, unlogged))
    if more:
        shown.append(f"... and {more} more (later)")
    if not r.windows:
        shown.append(f"{r.rollbacks} (no {M.windows_file(r.instance)} beside the event files)")
    if unlogged > 0:
        shown.append(
            f"({unlogged} after the last logging step: not in the logged LR scale, skipped and requested counts)"
        )
    return _wrapped(r.name, shown, sep=";")


def _summary(r: RunReport, unlogged: int) -> str:
    """``2 rollbacks, 37 steps lost, LR scale 0.0625 at the end``: what the fit-end line says, from the windows (and
    the logged LR scale, unless a rollback came after the last logging step)."""
    scale = r.windows[-1].get("lr_scale") if unlogged > 0 or r.lr_scale is None else r.lr_scale
    end = "" if scale is None else f", LR scale {scale:.4g} at the end"
    return f"{len(r.windows)} rollback(s), {steps_lost(r.windows)} steps lost{end}"


def _window_entry(window: dict[str, Any]) -> str:
    """``step 5: snapshot after 4 steps, skipped 5..8``: the bad step, the snapshot restored, the steps skipped."""
    skipped = window.get("skipped")
    steps = f"{skipped[0]}..{skipped[-1]}" if isinstance(skipped, list) and skipped else "?"
    at, snapshot = window.get("global_step", "?"), window.get("snapshot_step", "?")
    scale = f", LR scale {window['lr_scale']:.4g}" if isinstance(window.get("lr_scale"), (int, float)) else ""
    return f"step {at}: snapshot after {snapshot} steps, skipped {steps}{scale}"


def _wrapped(label: str, entries: Sequence[str], sep: str = ",") -> str:
    """``  <label>: entry, entry, ...``, wrapped between entries at :data:`_WRAP` characters, never inside one."""
    lines = [f"  {label}:"]
    for i, entry in enumerate(entries):
        entry += sep if i < len(entries) - 1 else ""
        if len(lines[-1]) + 1 + len(entry) > _WRAP and not lines[-1].endswith(":"):
            lines.append("   ")
        lines[-1] += " " + entry
    return "\n".join(lines)


def _count_label(reports: Sequence[RunReport]) -> str:
    """``"2 runs"``; ``"1 run, 2 series"`` when a run has several optimizers or named callbacks (one row each)."""
    runs = len({r.run for r in reports})
    label = f"{runs} run{'s' if runs != 1 else ''}"
    return label if runs == len(reports) else f"{label}, {len(reports)} series"
