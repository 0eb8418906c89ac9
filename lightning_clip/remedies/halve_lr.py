"""``nan_policy="halve_lr"``: skip the bad step and lower the learning rate, on top of any scheduler."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from torch.optim import Optimizer

from lightning_clip.lr_scale import StepLRScale
from lightning_clip.remedies.base import Request, StepRead, StepRecord, no_statistics, optional_int
from lightning_clip.remedies.skip import Skip
from lightning_clip.snapshot import Statistics
from lightning_clip.validation import check_count, check_in_range

# The scale never reaches 0.0 (lr_factor=1e-200 would underflow), so recovery can always bring it back.
_SMALLEST_SCALE = sys.float_info.min


class HalveLR(Skip):
    """Skip the bad step and multiply the LR by ``lr_factor``; optionally recover after healthy steps.

    The article's first remedy for NaN. The scale is applied around each optimizer update by
    :class:`~lightning_clip.StepLRScale`, so schedulers keep their own values: the LR of a step is
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
    action: ClassVar[str] = "step skipped, LR scaled down"
    spike_action: ClassVar[str] = "step skipped, LR kept"

    def __init__(
        self,
        lr_factor: float = 0.5,
        min_lr_scale: float | None = None,
        lr_recovery_steps: int | None = None,
        max_consecutive_nonfinite: int | None = 10,
    ) -> None:
        super().__init__(max_consecutive_nonfinite)
        check_in_range("lr_factor", lr_factor, 0.0, 1.0)
        check_in_range("min_lr_scale", min_lr_scale, 0.0, 1.0, high_open=False, allow_none=True)
        check_count("lr_recovery_steps", lr_recovery_steps)
        self.lr_factor = float(lr_factor)
        self.min_lr_scale = None if min_lr_scale is None else float(min_lr_scale)
        self.lr_recovery_steps = optional_int(lr_recovery_steps)
        self.lr_scale = 1.0  # applied to this optimizer's updates; saved in checkpoints
        self.healthy_steps = 0  # in a row, since the last reduction (recovery)
        self._hook: StepLRScale | None = None

    def attach(self, optimizer: Optimizer, statistics: Statistics = no_statistics) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = StepLRScale(optimizer, self.lr_scale, deferred=True)

    def detach(self) -> None:
        super().detach()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_exception(self) -> None:
        if self._hook is not None:
            self._hook.disarm()

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "healthy_steps": self.healthy_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.healthy_steps = int(state.get("healthy_steps", 0))

    def needs_read(self, step: StepRecord) -> bool:
        return True  # the LR lives on the host

    def on_device(self, step: StepRecord) -> None:
        # Always the host path: the skip and the LR decision are taken together.
        self._drop_pending_guard()

    def _on_device(self, step: StepRecord) -> bool:
        return False

    def on_host(self, step: StepRecord, read: StepRead) -> Request | None:
        # This step's update uses the scale in force before it; what it teaches applies from the next step on
        # (a recovery counts this step as healthy only after its update, as GradScaler's growth does).
        if self._hook is not None:
            self._hook.scale = self.lr_scale
            self._hook.arm()
        if read.bad:
            return self._bad_step(step, read)
        if read.skip:  # a spike or a requested skip: skipped, the LR kept, and not a healthy step
            self._skipped_finite(step, read)
        elif not read.overflow:  # a GradScaler-skipped step is not healthy
            self._healthy()
        return None

    def _recovery_factor(self) -> float:
        """The factor one recovery undoes."""
        return self.lr_factor

    def _lower_lr(self, step: StepRecord) -> None:
        self.lr_scale = max(self.lr_scale * self.lr_factor, self.min_lr_scale or _SMALLEST_SCALE)
        self.healthy_steps = 0

    def _healthy(self) -> None:
        if self.lr_recovery_steps is None or self.lr_scale >= 1.0:
            return
        self.healthy_steps += 1
        if self.healthy_steps >= self.lr_recovery_steps:  # like GradScaler's growth interval
            self.lr_scale = min(1.0, self.lr_scale / self._recovery_factor())
            self.healthy_steps = 0
