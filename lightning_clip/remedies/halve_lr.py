"""``nan_policy="halve_lr"``: skip the bad step and lower the learning rate, on top of any scheduler."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_clip.remedies.base import NOTHING, Remedy, Request, StepRead, StepRecord, lr_factor_to, optional_int
from lightning_clip.remedies.skip import skip_bad, skip_finite
from lightning_clip.validation import check_count, check_in_range


class HalveLR(Remedy):
    """Skip the bad step and multiply the LR by ``lr_factor``; optionally recover after healthy steps.

    The article's first remedy for NaN. The engine applies the scale around each optimizer update
    (:class:`~lightning_clip.StepLRScale`), so schedulers keep their own values: the LR of a step is
    ``schedule(t) * lr_factor ** k``. ``min_lr_scale`` is a floor on the scale; after ``lr_recovery_steps``
    healthy steps in a row one reduction is undone (never above 1.0). A GradScaler overflow (fp16) is
    neither bad nor healthy. Needs the bad-step flag on the host: one read per step.

    Example::

        >>> from lightning_clip.remedies import HalveLR
        >>> HalveLR(lr_factor=0.5, lr_recovery_steps=100).lr_factor
        0.5
    """

    policy: ClassVar[str] = "halve_lr"
    options: ClassVar[tuple[str, ...]] = ("lr_factor", "min_lr_scale", "lr_recovery_steps", "max_consecutive_nonfinite")
    skips_steps: ClassVar[bool] = True
    scales_lr: ClassVar[bool] = True

    def __init__(
        self,
        lr_factor: float = 0.5,
        min_lr_scale: float | None = None,
        lr_recovery_steps: int | None = None,
        max_consecutive_nonfinite: int | None = 10,
    ) -> None:
        check_in_range("lr_factor", lr_factor, 0.0, 1.0)
        check_in_range("min_lr_scale", min_lr_scale, 0.0, 1.0, high_open=False, allow_none=True)
        check_count("lr_recovery_steps", lr_recovery_steps)
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        self.lr_factor = float(lr_factor)
        self.min_lr_scale = None if min_lr_scale is None else float(min_lr_scale)
        self.lr_recovery_steps = optional_int(lr_recovery_steps)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)
        self.healthy_steps = 0  # in a row, since the last reduction (recovery)

    def needs_read(self, step: StepRecord) -> bool:
        return True  # the LR decision is taken on the host

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        # This step's update uses the scale in force before it; what it teaches applies from the next step on
        # (a recovery counts this step as healthy only after its update, as GradScaler's growth does).
        if read.bad:
            self.healthy_steps = 0
            factor = lr_factor_to(read.lr_scale, read.lr_scale * self.lr_factor, self.min_lr_scale)
            limit, scale = self.max_consecutive_nonfinite, read.lr_scale * factor
            return skip_bad(step, read, limit, "step skipped, LR scaled down", scale, lr_factor=factor)
        if read.skip:  # a spike or a requested skip: skipped, the LR kept, and not a healthy step
            return skip_finite(step, read, self.max_consecutive_nonfinite, "step skipped, LR kept")
        if read.overflow:  # a GradScaler-skipped step is not healthy
            return NOTHING
        self.healthy_steps, factor = recovery(self.healthy_steps, self.lr_recovery_steps, read.lr_scale, self.lr_factor)
        return Request(lr_factor=factor) if factor != 1.0 else NOTHING

    def state_dict(self) -> dict[str, Any]:
        return {"healthy_steps": self.healthy_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.healthy_steps = int(state.get("healthy_steps", 0))


def recovery(healthy_steps: int, after: int | None, scale: float, reduction: float) -> tuple[int, float]:
    """One more healthy step: ``(healthy steps in a row, LR factor)``; after ``after`` of them one ``reduction`` is
    undone (never above 1.0), like GradScaler's growth interval."""
    if after is None or scale >= 1.0:
        return healthy_steps, 1.0
    healthy_steps += 1
    if healthy_steps < after:
        return healthy_steps, 1.0
    return 0, min(1.0, scale / reduction) / scale


__all__ = ["HalveLR", "recovery"]
