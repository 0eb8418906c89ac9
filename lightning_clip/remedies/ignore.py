"""``nan_policy="ignore"``: let the step through as it is (the user chose it); still counted and logged."""

from __future__ import annotations

from typing import ClassVar

from lightning_clip.remedies.base import Remedy


class Ignore(Remedy):
    """Do nothing about bad steps. Never reads the device outside logging steps.

    Example::

        >>> from lightning_clip.remedies import Ignore
        >>> Ignore().policy
        'ignore'
    """

    policy: ClassVar[str] = "ignore"
    checks_loss: ClassVar[bool] = False  # the user chose to let bad steps through: only the gradient is counted
