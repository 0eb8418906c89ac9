"""``nan_policy="raise"``: stop at the first bad step, before the optimizer applies it."""

from __future__ import annotations

from typing import ClassVar

from lightning_clip.remedies.base import NOTHING, Remedy, Request, StepRead, StepRecord, diagnose, optional_int, stop
from lightning_clip.validation import check_count


class RaiseError(Remedy):
    """Raise :class:`~lightning_clip.NonFiniteGradientError` with a diagnosis; weights stay finite.

    Example::

        >>> from lightning_clip.remedies import RaiseError
        >>> RaiseError().policy
        'raise'
    """

    policy: ClassVar[str] = "raise"
    options: ClassVar[tuple[str, ...]] = ("max_consecutive_nonfinite",)

    def __init__(self, max_consecutive_nonfinite: int | None = None) -> None:
        # Accepted for symmetry with skip/halve_lr: raise stops at the first bad step anyway.
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)

    def needs_read(self, step: StepRecord) -> bool:
        return True  # the decision to stop is a Python exception: it needs the flag on the host

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        if read.bad:
            return stop(diagnose(step, read, "raised NonFiniteGradientError", 1.0, stopping=True))
        return NOTHING
