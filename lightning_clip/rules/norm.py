"""``mode="norm"``: rescale the whole gradient so that its global norm is at most ``max_norm``."""

from __future__ import annotations

from typing import ClassVar

from lightning_clip import functional as F
from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule
from lightning_clip.validation import check_positive


class NormClip(ClipRule):
    r"""L2 (or any p-) norm clipping: :math:`g \leftarrow g \cdot \min(1, \text{max\_norm} / (\|g\|_p + \epsilon))`.

    A NaN/Inf total norm leaves the gradients alone (the coefficient is exactly 1), for the NaN policy to handle;
    torch's ``clip_grad_norm_`` would turn every gradient into NaN.

    Example::

        >>> import torch
        >>> from lightning_clip.rules import NormClip
        >>> NormClip(max_norm=1.0)
        NormClip(norm, max_norm=1)
    """

    mode: ClassVar[str] = "norm"
    options: ClassVar[tuple[str, ...]] = ("max_norm",)

    def __init__(self, max_norm: float = 1.0) -> None:
        check_positive("max_norm", max_norm)
        self.max_norm = float(max_norm)

    def clip_(self, step: ClipInput) -> ClipResult:
        coef = F.clip_by_norm_(step.grads, self.max_norm, step.total, step.eps, step.finite, step.groups)
        return ClipResult(coef < 1.0, step.total * coef if step.log else None, self.max_norm)

    def describe(self) -> str:
        return f"norm, max_norm={self.max_norm:g}"
