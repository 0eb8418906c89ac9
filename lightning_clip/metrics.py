"""The names of everything the engine logs, in one place: the callback writes them, the report reads them.

Tags per optimizer ``i`` (optimizer 0 has no suffix, optimizer ``i > 0`` the suffix ``_opt<i>``) and, for a
callback given a ``name``, the further suffix ``/<name>`` (two instances in one Trainer never share a tag):

* ``grad_norm/total``, ``grad_norm/total_clipped`` -- the total gradient norm before and after clipping;
* ``grad_norm_layer/<layer>`` or ``grad_norm_param/<parameter>`` -- per-layer or per-parameter norms;
* ``grad_clip/<counter>`` -- the cumulative counters (:data:`COUNTER_TAGS`), ``lr_scale``, ``clipped`` (1 or 0
  for the logged step: its mean over a run is the clipped fraction) and the active ``threshold`` (``max_norm``
  too, for the fixed norm rule).

Beside the event files (in ``trainer.log_dir``), under ``nan_policy="rollback"``: the JSON list of the data windows
the rollbacks skipped, :func:`windows_file`.

Example::

    >>> tag(TOTAL, 0), tag(TOTAL, 2), tag(TOTAL, 1, "monitor")
    ('grad_norm/total', 'grad_norm/total_opt2', 'grad_norm/total_opt1/monitor')
    >>> parse_total("grad_norm/total_opt3"), parse_total("grad_norm/total"), parse_total("grad_clip/steps")
    (3, 0, None)
    >>> parse_total_tag("grad_norm/total/monitor"), parse_total_tag("grad_norm/total_opt1")
    ((0, 'monitor'), (1, None))
    >>> windows_file(), windows_file("monitor")
    ('lightning_clip_skipped_windows.json', 'lightning_clip_skipped_windows_monitor.json')
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TOTAL = "grad_norm/total"
TOTAL_CLIPPED = "grad_norm/total_clipped"
LAYER_GROUP = "grad_norm_layer"
PARAM_GROUP = "grad_norm_param"

STEPS = "grad_clip/steps"
CLIPPED_STEPS = "grad_clip/clipped_steps"
NONFINITE_STEPS = "grad_clip/nonfinite_steps"
SKIPPED_STEPS = "grad_clip/skipped_steps"
AMP_OVERFLOWS = "grad_clip/amp_overflows"
SPIKE_SKIPS = "grad_clip/spike_skips"
REQUESTED_SKIPS = "grad_clip/requested_skips"  # steps of a data window a remedy asked to skip
ROLLBACKS = "grad_clip/rollbacks"  # nan_policy="rollback" only
ROLLBACK = "grad_clip/rollback"  # a marker at each rollback's step: the LR scale it left (nan_policy="rollback")
LR_SCALE = "grad_clip/lr_scale"
MAX_NORM = "grad_clip/max_norm"
THRESHOLD = "grad_clip/threshold"
CLIPPED = "grad_clip/clipped"
VANISHING_LAYERS = "grad_health/vanishing_layers"  # layers flagged by vanishing_ratio (logging steps)
GRAD_RATIO_GROUP = "grad_health/grad_ratio"  # per layer: ||grad W|| / ||W||, with vanishing_ratio and log_norms="layer"
UPDATE_RATIO_GROUP = "grad_health/update_ratio"  # per layer: ||dW|| / ||W|| of the last applied update
UPDATE_RATIO_SUMMARY = (
    "grad_health/update_ratio_min",
    "grad_health/update_ratio_median",
    "grad_health/update_ratio_max",
)
TOP_LAYER_SHARE = "grad_clip/top_layer_share"  # logged on spike steps: the largest layer's share of the norm^2

# counter name (as in ``GradientClipping.counters``) -> tag
COUNTER_TAGS = {
    "steps": STEPS,
    "clipped_steps": CLIPPED_STEPS,
    "nonfinite_steps": NONFINITE_STEPS,
    "skipped_steps": SKIPPED_STEPS,
    "amp_overflows": AMP_OVERFLOWS,
    "spike_skips": SPIKE_SKIPS,
    "requested_skips": REQUESTED_SKIPS,
    "rollbacks": ROLLBACKS,
}

_TOTAL_RE = re.compile(rf"^{re.escape(TOTAL)}(?:_opt(\d+))?(?:/([^/]+))?$")


def suffix(optimizer_idx: int, instance: str | None = None) -> str:
    """``""`` for optimizer 0, ``"_opt<i>"`` for optimizer ``i > 0``; then ``"/<instance>"`` for a named callback."""
    return (f"_opt{optimizer_idx}" if optimizer_idx > 0 else "") + (f"/{instance}" if instance else "")


def tag(name: str, optimizer_idx: int, instance: str | None = None) -> str:
    """The tag ``name`` of optimizer ``optimizer_idx`` (of the callback named ``instance``)."""
    return f"{name}{suffix(optimizer_idx, instance)}"


def norm_tag(group: str, name: str, optimizer_idx: int, instance: str | None = None) -> str:
    """The tag of one layer's or parameter's norm (``group``: :data:`LAYER_GROUP` or :data:`PARAM_GROUP`)."""
    return f"{group}/{name}{suffix(optimizer_idx, instance)}"


def windows_file(instance: str | None = None) -> str:
    """The name of the JSON file of skipped data windows (one object per rollback: ``optimizer``, ``global_step``,
    ``epoch``, ``batch_idx``, ``snapshot_step``, ``skipped``, ``lr_scale``: the scale the rollback left) that the
    callback named ``instance`` writes beside its event files."""
    return f"lightning_clip_skipped_windows{f'_{instance}' if instance else ''}.json"


def check_instance_name(name: object) -> None:
    """A callback ``name`` becomes a tag segment: None, or a non-empty string without ``/`` or white space."""
    if name is None:
        return
    if not isinstance(name, str) or not name or "/" in name or name != name.strip():
        raise ValueError(
            f"`name` must be None or a non-empty string without '/' or surrounding spaces (it becomes the tag "
            f"suffix /<name>), got {name!r}."
        )


def parse_total_tag(name: str) -> tuple[int, str | None] | None:
    """The optimizer index and callback name of a ``grad_norm/total[_opt<i>][/<name>]`` tag; None for another."""
    match = _TOTAL_RE.match(name)
    if not match:
        return None
    return int(match.group(1) or 0), match.group(2)


def parse_total(name: str) -> int | None:
    """The optimizer index of a ``grad_norm/total[_opt<i>][/<name>]`` tag, or None for any other tag."""
    parsed = parse_total_tag(name)
    return None if parsed is None else parsed[0]


def step_metrics(
    optimizer_idx: int,
    values: dict[str, float],
    counts: dict[str, int],
    norm_group: str | None = None,
    norm_names: Sequence[str] = (),
    norm_values: Sequence[float] = (),
    instance: str | None = None,
) -> dict[str, float]:
    """Everything one logging step writes, tagged for optimizer ``optimizer_idx``.

    ``values`` holds ``total``, ``total_clipped``, ``clipped`` (this step: 1.0 or 0.0), ``lr_scale`` and, when
    the rule has one, ``threshold`` and ``max_norm``; ``counts`` the cumulative counters (:data:`COUNTER_TAGS`).
    ``instance``: the callback's ``name`` (tags get ``/<name>``).
    """
    end = suffix(optimizer_idx, instance)
    out = {
        TOTAL + end: values["total"],
        TOTAL_CLIPPED + end: values["total_clipped"],
        CLIPPED + end: values["clipped"],
        LR_SCALE + end: values["lr_scale"],
    }
    out.update({name + end: float(counts[key]) for key, name in COUNTER_TAGS.items() if key in counts})
    for key, name in (("threshold", THRESHOLD), ("max_norm", MAX_NORM)):
        if values.get(key) is not None:
            out[name + end] = values[key]
    if norm_group is not None:
        out.update({f"{norm_group}/{n}{end}": v for n, v in zip(norm_names, norm_values)})
    return out
