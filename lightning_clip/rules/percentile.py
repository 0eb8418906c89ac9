"""``mode="percentile"``: clip the total norm to a percentile of the recent healthy norms (AutoClip).

P. Seetharaman, G. Wichern, B. Pardo, J. Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks", IEEE MLSP 2020 (arXiv:2007.14469). Follows the ``autoclip`` package's
``QuantileClip(global_threshold=True)``: the threshold comes from the norms of the previous steps (the
current one is added after), with linear interpolation between order statistics (``torch.quantile``).
The history is a ring buffer on the device, so the step needs no host read.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_clip import functional as F
from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule
from lightning_clip.state import NormHistory
from lightning_clip.validation import check_count, check_in_range


class PercentileClip(ClipRule):
    r"""AutoClip: :math:`g \leftarrow g \cdot \min(1, \eta_t / (\|g\| + \epsilon))` with :math:`\eta_t` the
    ``percentile``-th percentile (linear interpolation) of the last ``history_size`` healthy total norms
    before this step, :math:`\epsilon` the engine's ``eps``.

    Args:
        percentile: in [0, 100]. The paper recommends 10: nine steps in ten are clipped, to about the
            size of a typical small step.
        history_size: how many recent healthy norms the percentile is taken over (the ring buffer's length).
        warmup_steps: no clipping until this many healthy norms are in the history.

    The norm recorded is the one before clipping, as in AutoClip. A step with ``step.bad`` or a NaN/Inf norm
    is not recorded and its gradients are left bit-identical. ``grad_clip/threshold`` is :math:`\eta_t`
    (none during warm-up).

    Example::

        >>> import torch
        >>> from lightning_clip.rules import PercentileClip
        >>> from lightning_clip.engine import ClipEngine
        >>> from lightning_clip.remedies import Ignore
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([w], lr=0.0)
        >>> engine = ClipEngine(PercentileClip(percentile=50.0, warmup_steps=3), Ignore())
        >>> for norm in [1.0, 3.0, 2.0, 10.0]:       # three to warm up; then 10 is cut to their median
        ...     w.grad = torch.tensor([norm])
        ...     _ = engine.step(opt)
        >>> w.grad
        tensor([2.0000])
        >>> engine.rule_of(0)
        PercentileClip(percentile, percentile=50, history_size=1000, warmup_steps=3)
    """

    mode: ClassVar[str] = "percentile"
    reports_spikes: ClassVar[bool] = True

    def __init__(self, percentile: float = 10.0, history_size: int = 1000, warmup_steps: int = 25) -> None:
        check_in_range("percentile", percentile, 0.0, 100.0, low_open=False, high_open=False)
        check_count("history_size", history_size, allow_none=False)
        check_count("warmup_steps", warmup_steps, allow_none=False)
        self.percentile = float(percentile)
        self.history_size = int(history_size)
        self.warmup_steps = int(warmup_steps)
        # On the device from the first step, in the norms' own dtype (float32; float64 for a float64 model), as
        # AutoClip's history; NaN where empty (nanquantile skips it).
        self.norms = NormHistory(self.history_size)

    @property
    def history(self) -> Tensor | None:
        """The recorded norms in ring order, NaN where empty (device tensor; None before a norm is recorded)."""
        return self.norms.values if int(self.norms.count) or self.norms.values.device.type != "cpu" else None

    def clip_(self, step: ClipInput) -> ClipResult:
        h = self.norms.on(step.device, step.total.dtype)
        healthy = step.finite & ~step.bad
        if not step.update_statistics:  # a re-evaluated closure: this step is already counted
            healthy = healthy & False
        # Quantile of the filled slots only: the empty ones are NaN. NaN while empty (masked below).
        threshold = torch.nanquantile(h.values, self.percentile / 100.0).to(step.total.dtype)
        active = h.count >= self.warmup_steps
        # torch.clip_grad_norm_'s coefficient, as AutoClip applies it; exactly 1 in warm-up and on NaN/Inf steps.
        coef = torch.where(active & step.finite, (threshold / (step.total + step.eps)).clamp(max=1.0), 1.0)
        F.scale_(step.grads, coef)
        h.record(step.total, healthy)  # the norm before clipping; a bad step leaves the history as it was

        after = step.total * coef if step.log else None
        return ClipResult(coef < 1.0, after, torch.where(active, threshold, math.nan))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``history``: the recorded norms, oldest first (a CPU tensor); ``count``: healthy norms ever seen."""
        return self.norms.export()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms.restore(state)  # the newest norms, if the buffer shrank

    def describe(self) -> str:
        return (
            f"percentile, percentile={self.percentile:g}, history_size={self.history_size}, "
            f"warmup_steps={self.warmup_steps}"
        )
