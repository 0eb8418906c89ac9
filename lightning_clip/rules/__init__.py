"""Clip rules: one small class per ``mode``, registered by name.

A rule decides the threshold and clips (see :class:`~lightning_clip.rules.base.ClipRule`): it gets a read-only
:class:`ClipInput` of the step (the gradients, the parameters and their names, the measured norms, the bad-step
flag, ...) and clips ``step.grads`` in place. Each optimizer gets its own copy, with its own statistics.

To add one: write ``rules/<name>.py`` with a ``ClipRule`` subclass that sets ``mode`` (and ``options`` if the
flat ``GradientClipping`` arguments should build it), then add it to :data:`RULES` below. The callback and the
engine need no edit: ``GradientClipping(mode="<name>")`` and ``GradientClipping(rule=MyRule(...))`` both work.

Example::

    >>> from lightning_clip.rules import RULES, build_rule
    >>> sorted(RULES)
    ['agc', 'none', 'norm', 'percentile', 'value', 'zscore']
    >>> build_rule("value", clip_value=0.5)
    ValueClip(value, [-0.5, 0.5])

A rule of one's own, called by hand on a :class:`ClipInput` (the engine builds one per step)::

    >>> import torch
    >>> from lightning_clip import functional as F
    >>> from lightning_clip.rules import ClipInput, ClipResult, ClipRule
    >>> class CapAtOne(ClipRule):
    ...     mode = "cap_at_one"
    ...     def clip_(self, step: ClipInput) -> ClipResult:
    ...         coef = F.clip_by_norm_(step.grads, 1.0, step.total, step.eps, step.finite, step.groups)
    ...         return ClipResult(coef < 1.0, step.total * coef if step.log else None, 1.0)
    >>> g = [torch.tensor([3.0, 4.0])]
    >>> view = ClipInput(params=[torch.zeros(2)], grads=g, total=torch.tensor(5.0), finite=torch.tensor(True))
    >>> CapAtOne().clip_(view).clipped, g[0]
    (tensor(True), tensor([0.6000, 0.8000]))
"""

from __future__ import annotations

from typing import Any

from lightning_clip.rules.agc import AdaptiveGradClip
from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule
from lightning_clip.rules.monitor import NoClip
from lightning_clip.rules.norm import NormClip
from lightning_clip.rules.percentile import PercentileClip
from lightning_clip.rules.value import ValueClip
from lightning_clip.rules.zscore import ZScoreClip
from lightning_clip.validation import check_choice, check_read

__all__ = [
    "RULES",
    "ClipInput",
    "ClipResult",
    "ClipRule",
    "NoClip",
    "NormClip",
    "ValueClip",
    "AdaptiveGradClip",
    "ZScoreClip",
    "PercentileClip",
    "build_rule",
]

RULES: dict[str, type[ClipRule]] = {
    rule.mode: rule for rule in (NormClip, ValueClip, NoClip, AdaptiveGradClip, ZScoreClip, PercentileClip)
}


def build_rule(mode: str, strict: dict[str, Any] | None = None, **options: Any) -> ClipRule:
    """The rule registered as ``mode``, built from the callback's flat arguments.

    A ``strict`` option that the rule does not read but that is set (not None) is refused: it would be silently
    ignored. The other ``options`` carry defaults (``max_norm``) and are passed where the rule reads them.
    """
    check_choice("mode", mode, RULES)
    cls = RULES[mode]
    strict = check_read("mode", mode, cls.options, strict)
    return cls.from_options(**options, **strict)
