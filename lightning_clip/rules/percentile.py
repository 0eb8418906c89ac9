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
from lightning_clip.rules.base import ClipResult, ClipRule, GradStep
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
        self.history_size = history_size
        self.warmup_steps = warmup_steps
        # Device tensors, made on the first step (or by load_state_dict, on the CPU until then): ``history`` is
        # NaN where empty (nanquantile skips it), ``pos`` the next slot, ``count`` the healthy norms ever seen.
        self._stats: dict[str, Tensor] | None = None

    def _fresh(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "history": torch.full((self.history_size,), math.nan, dtype=dtype, device=device),
            "pos": torch.zeros((), dtype=torch.long, device=device),
            "count": torch.zeros((), dtype=torch.long, device=device),
        }

    def _stats_on(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        if self._stats is None:
            # The norms' own dtype (float32; float64 for a float64 model), as AutoClip's history.
            self._stats = self._fresh(device, dtype)
        elif self._stats["history"].device != device:  # loaded on the CPU: one host-to-device copy, no read
            self._stats = {k: v.to(device) for k, v in self._stats.items()}
        return self._stats

    @property
    def history(self) -> Tensor | None:
        """The recorded norms in ring order, NaN where empty (device tensor; None before a step)."""
        return None if self._stats is None else self._stats["history"]

    def clip_(self, step: GradStep) -> ClipResult:
        s = self._stats_on(step.device, step.total.dtype)
        history = s["history"]
        healthy = step.finite & ~step.bad
        if not step.update_statistics:  # a re-evaluated closure: this step is already counted
            healthy = healthy & False
        # Quantile of the filled slots only: the empty ones are NaN. NaN while empty (masked below).
        threshold = torch.nanquantile(history, self.percentile / 100.0).to(step.total.dtype)
        active = s["count"] >= self.warmup_steps
        # torch.clip_grad_norm_'s coefficient, as AutoClip applies it; exactly 1 in warm-up and on NaN/Inf steps.
        coef = torch.where(active & step.finite, (threshold / (step.total + step.eps)).clamp(max=1.0), 1.0)
        F.scale_(step.grads, coef)

        # Record the norm before clipping; a bad step rewrites the slot with its old value and does not advance.
        slot = s["pos"].reshape(1)
        x = step.total.to(history.dtype)
        history.index_copy_(0, slot, torch.where(healthy, x, history.index_select(0, slot)))
        s["pos"] = torch.where(healthy, (s["pos"] + 1) % self.history_size, s["pos"])
        s["count"] = s["count"] + healthy.long()

        after = step.total * coef if step.log else None
        return ClipResult(coef < 1.0, after, torch.where(active, threshold, math.nan))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``history``: the recorded norms, oldest first (a CPU tensor); ``count``: healthy norms ever seen."""
        if self._stats is None:
            return {"history": torch.zeros(0), "count": 0}
        history, pos = self._stats["history"].cpu(), int(self._stats["pos"].item())
        ordered = torch.cat([history[pos:], history[:pos]])  # oldest first
        return {"history": ordered[~ordered.isnan()].clone(), "count": int(self._stats["count"].item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = torch.as_tensor(state.get("history", []))
        saved = saved.to(saved.dtype if saved.is_floating_point() else torch.float32)
        kept = saved[-self.history_size :] if len(saved) else saved  # the newest, if the buffer shrank
        stats = self._fresh(torch.device("cpu"), kept.dtype)
        stats["history"][: len(kept)] = kept
        stats["pos"].fill_(len(kept) % self.history_size)
        stats["count"].fill_(int(state.get("count", len(kept))))
        self._stats = stats

    def describe(self) -> str:
        return (
            f"percentile, percentile={self.percentile:g}, history_size={self.history_size}, "
            f"warmup_steps={self.warmup_steps}"
        )
