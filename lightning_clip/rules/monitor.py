"""``mode="none"``: clip nothing; the engine still measures, logs and applies the NaN policy."""

from __future__ import annotations

from typing import ClassVar

from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule


class NoClip(ClipRule):
    """Monitoring only: gradients are never changed.

    Example::

        >>> from lightning_clip.rules import NoClip
        >>> NoClip()
        NoClip(none)
    """

    mode: ClassVar[str] = "none"

    def clip_(self, step: ClipInput) -> ClipResult:
        return ClipResult(step.bad & False, step.total, None)
