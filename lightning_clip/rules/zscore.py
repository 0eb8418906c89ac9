"""``mode="zscore"``: clip spikes of the total norm, found by their z-score against an EMA of past norms.

A. Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025 (arXiv:2504.02507).
Mirrors the ``zclip`` package 1.0.0 (``ZClip.step``) step for step, with the statistics on the device, a
NaN/Inf step left out of them, and a ``state_dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_clip import functional as F
from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule
from lightning_clip.state import DeviceState
from lightning_clip.validation import check_choice, check_count, check_in_range, check_positive

CLIP_OPTIONS = F.ZSCORE_OPTIONS


def stats_dtype(device: torch.device) -> torch.dtype:
    """float64 for running statistics (as the Python floats of the reference packages), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


class ZScoreStats(DeviceState):
    """ZClip's running statistics: EMA mean and variance, and the warm-up norms until they are initialised."""

    mean: Tensor
    var: Tensor
    warmup_norms: Tensor
    collected: Tensor
    initialized: Tensor

    def __init__(self, warmup_steps: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.zeros((), dtype=torch.float64))
        self.register_buffer("warmup_norms", torch.zeros(warmup_steps, dtype=torch.float64))
        self.register_buffer("collected", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def current(self) -> F.ZScoreState:
        """The buffers as :func:`~lightning_clip.functional.zscore_clip_` takes them (no copy)."""
        b = self.live
        return F.ZScoreState(
            mean=b["mean"],
            var=b["var"],
            warmup_norms=b["warmup_norms"],
            collected=b["collected"],
            initialized=b["initialized"],
        )

    def replace(self, state: F.ZScoreState) -> None:
        """Take the statistics :func:`~lightning_clip.functional.zscore_clip_` returned as the buffers."""
        self.live.update(state._asdict())


class ZScoreClip(ClipRule):
    r"""ZClip: keep an EMA mean :math:`\mu` and variance :math:`\sigma^2` of the total norm :math:`x`; when
    :math:`z = (x - \mu) / (\sigma + \epsilon) > z_t` (``z_threshold``), rescale the gradient to

    * ``"adaptive_scaling"`` (ZClip's default): :math:`\mu + z_t \sigma / (z / z_t)`, pulled lower the larger the spike;
    * ``"mean"``: :math:`\mu`;
    * ``"fixed"`` (ZClip's ``mode="percentile"``): :math:`\mu + z_t \sigma`, whenever :math:`x` exceeds it.

    then update :math:`\mu \leftarrow \alpha\mu + (1-\alpha)v`, :math:`\sigma^2 \leftarrow \alpha\sigma^2 +
    (1-\alpha)(v-\mu)^2` (the new :math:`\mu`) with :math:`v` the norm after the spike clip (not after
    ``max_norm``), :math:`\alpha` = ``ema_decay``, :math:`\epsilon` the engine's ``eps``. The first
    ``warmup_steps`` healthy norms only initialise :math:`\mu, \sigma^2` (their mean and population variance).

    Args:
        z_threshold: :math:`z_t`, the z-score above which a norm is a spike.
        ema_decay: :math:`\alpha`, in (0, 1).
        warmup_steps: healthy steps whose norms initialise the statistics; no spike clipping before.
        max_norm: optional absolute cap on the total norm, warm-up included (ZClip's ``max_grad_norm``, whose
            default there is 1.0; here None).
        clip_option: ``"adaptive_scaling"``, ``"mean"`` or ``"fixed"``, the target of a spike (above).

    The step is :func:`lightning_clip.functional.zscore_clip_` (a plain loop can call it with its own
    :class:`~lightning_clip.functional.ZScoreState`); this class keeps the statistics as device buffers with a
    ``state_dict``, and feeds it the engine's total norm and bad-step flag.

    A step with ``step.bad`` or a NaN/Inf norm changes no statistic, and its gradients are left bit-identical.
    ``grad_clip/threshold`` is the largest norm that passes unclipped this step: :math:`\mu + z_t(\sigma +
    \epsilon)` (``"fixed"``: :math:`\mu + z_t\sigma`), capped by ``max_norm``; during warm-up ``max_norm``.

    Example::

        >>> import torch
        >>> from lightning_clip.rules import ZScoreClip
        >>> from lightning_clip.engine import ClipEngine
        >>> from lightning_clip.remedies import Ignore
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([w], lr=0.0)
        >>> engine = ClipEngine(ZScoreClip(warmup_steps=4), Ignore())
        >>> for norm in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]:       # warm-up, one healthy step, a spike
        ...     w.grad = torch.tensor([norm])
        ...     _ = engine.step(opt)
        >>> round(w.grad.item(), 3)                              # 50 -> mu + z_t sigma / (z / z_t)
        1.002
        >>> engine.rule_of(0)
        ZScoreClip(zscore, z_threshold=2.5, ema_decay=0.97, warmup_steps=4, adaptive_scaling)
    """

    mode: ClassVar[str] = "zscore"
    reports_spikes: ClassVar[bool] = True

    def __init__(
        self,
        z_threshold: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        clip_option: str = "adaptive_scaling",
    ) -> None:
        check_positive("z_threshold", z_threshold)
        check_in_range("ema_decay", ema_decay, 0.0, 1.0)
        check_count("warmup_steps", warmup_steps, allow_none=False)
        check_positive("max_norm", max_norm, allow_none=True)
        check_choice("clip_option", clip_option, CLIP_OPTIONS)
        self.z_threshold = float(z_threshold)
        self.ema_decay = float(ema_decay)
        self.warmup_steps = int(warmup_steps)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.clip_option = clip_option
        self.stats = ZScoreStats(self.warmup_steps)  # on the device from the first step

    @property
    def mean(self) -> Tensor:
        """:math:`\\mu`, the EMA of the total norm (device tensor; 0 until warm-up ends)."""
        return self.stats.mean

    @property
    def var(self) -> Tensor:
        """:math:`\\sigma^2`, the EMA variance of the total norm (as :attr:`mean`)."""
        return self.stats.var

    # ------------------------------------------------------------------ the step
    def clip_(self, step: ClipInput) -> ClipResult:
        stats = self.stats.on(step.device, stats_dtype(step.device))
        # A bad step (NaN loss, ...) or a re-evaluated closure (already counted) changes no statistic.
        healthy = ~step.bad if step.update_statistics else step.bad & False
        out = F.zscore_clip_(
            step.grads,
            step.total,
            stats.current(),
            self.z_threshold,
            self.ema_decay,
            self.max_norm,
            self.clip_option,
            step.eps,
            step.finite,
            healthy,
        )
        stats.replace(out.state)
        after = step.total * out.coef.to(step.total.dtype) if step.log else None
        return ClipResult(out.coef < 1.0, after, out.threshold)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``mean``, ``var`` (floats), ``initialized``, and the warm-up norms collected so far (floats)."""
        s = self.stats
        collected = int(s.collected)
        return {
            "mean": float(s.mean),
            "var": float(s.var),
            "initialized": bool(s.initialized),
            "warmup_norms": s.warmup_norms[: min(collected, self.warmup_steps)].tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stats = ZScoreStats(self.warmup_steps)
        norms = torch.tensor(state.get("warmup_norms", []), dtype=torch.float64)[: self.warmup_steps]
        stats.warmup_norms[: len(norms)] = norms
        stats.collected.fill_(len(norms))
        stats.mean.fill_(float(state.get("mean", 0.0)))
        stats.var.fill_(float(state.get("var", 0.0)))
        initialized = bool(state.get("initialized", False))
        if not initialized and len(norms) == self.warmup_steps:
            # A shorter warm-up than the saved run's: it is over, initialise as the step would have.
            stats.mean.fill_(norms.mean().item())
            stats.var.fill_((norms - norms.mean()).pow(2).mean().item())
            initialized = True
        stats.initialized.fill_(initialized)
        self.stats = stats

    def describe(self) -> str:
        cap = "" if self.max_norm is None else f", max_norm={self.max_norm:g}"
        return (
            f"zscore, z_threshold={self.z_threshold:g}, ema_decay={self.ema_decay:g}, "
            f"warmup_steps={self.warmup_steps}{cap}, {self.clip_option}"
        )
