"""NaN/Inf remedies: one small class per ``nan_policy``, registered by name.

A remedy decides what happens to a bad step (see :class:`~lightning_clip.remedies.base.Remedy`): it reads the step
and returns a :class:`Request` (skip, skip the next steps, scale the LR, restore or keep a snapshot, warn, stop),
which the engine carries out (:mod:`lightning_clip.control`). The engine gives each optimizer its own copy and never
asks which class it holds: it reads what the remedy declares -- ``skips_steps``, ``checks_loss``,
``skips_on_device``, ``scales_lr``, ``keeps_snapshots`` -- and calls its five methods (``needs_read``, ``decide``,
``finish``, ``state_dict``/``load_state_dict``). No remedy inherits another's behaviour.

To add one: write ``remedies/<name>.py`` with a ``Remedy`` subclass that sets ``policy`` (and ``options``, the
flat ``GradientClipping`` arguments it is built from, typed and defaulted once, in its ``__init__`` signature:
:mod:`lightning_clip.settings` derives the callback's defaults, checks and live settings from it), then add it to
:data:`REMEDIES` below. Nothing else changes: ``GradientClipping(nan_policy="<name>")`` works, and so does
``nan_policy=<object>`` (YAML: ``class_path``), which needs no registry entry.
``tests/test_remedy_units.py`` has a worked example (``SkipWindow``: ``decide`` returns
``Request(skip=True, skip_steps=window)``).

Example::

    >>> from lightning_clip.remedies import REMEDIES, build_remedy
    >>> sorted(REMEDIES)
    ['halve_lr', 'ignore', 'raise', 'rollback', 'skip']
    >>> build_remedy("halve_lr", lr_recovery_steps=100).lr_recovery_steps
    100
    >>> [(REMEDIES[name].skips_steps, REMEDIES[name].checks_loss) for name in ("skip", "raise", "ignore")]
    [(True, True), (False, True), (False, False)]
"""

from __future__ import annotations

from typing import Any

from lightning_clip.remedies.base import Remedy, Request, StepRead
from lightning_clip.remedies.halve_lr import HalveLR
from lightning_clip.remedies.ignore import Ignore
from lightning_clip.remedies.raise_error import RaiseError
from lightning_clip.remedies.rollback import Rollback
from lightning_clip.remedies.skip import Skip
from lightning_clip.validation import check_choice, check_read

__all__ = [
    "REMEDIES",
    "HalveLR",
    "Ignore",
    "RaiseError",
    "Rollback",
    "Remedy",
    "Request",
    "Skip",
    "StepRead",
    "build_remedy",
]

REMEDIES: dict[str, type[Remedy]] = {r.policy: r for r in (Skip, HalveLR, RaiseError, Ignore, Rollback)}


def build_remedy(nan_policy: str, strict: dict[str, Any] | None = None, **options: Any) -> Remedy:
    """The remedy registered as ``nan_policy``, built from the callback's flat arguments.

    ``strict`` options must be read by the policy when set (not None): otherwise they would be silently
    ignored, which is refused. The other ``options`` carry defaults and are passed where the policy reads them.
    """
    check_choice("nan_policy", nan_policy, REMEDIES)
    cls = REMEDIES[nan_policy]
    # None turns off an option whose default is on (divergence_margin): passed where the policy reads it.
    off = {k: v for k, v in (strict or {}).items() if v is None and k in cls.options}
    strict = check_read("nan_policy", nan_policy, cls.options, strict)
    return cls.from_options(**{**options, **off, **strict})
