"""``nan_policy="halve_lr"``: skip the bad step and lower the learning rate, on top of any scheduler."""

from __future__ import annotations

import sys
from typing import ClassVar

from torch.optim import Optimizer

from lightning_clip.counters import StepCounters
from lightning_clip.lr_scale import StepLRScale
from lightning_clip.remedies.base import BadStepContext, StepRead, optional_int
from lightning_clip.remedies.skip import Skip
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
        self._hooks: dict[int, StepLRScale] = {}

    def attach(self, optimizer_idx: int, optimizer: Optimizer, counters: StepCounters) -> None:
        old = self._hooks.pop(optimizer_idx, None)
        if old is not None:
            old.remove()
        self._hooks[optimizer_idx] = StepLRScale(optimizer, counters.lr_scale, deferred=True)

    def detach(self) -> None:
        super().detach()
        for hook in self._hooks.values():
            hook.remove()
        self._hooks = {}

    def restore_lr(self) -> None:
        for hook in self._hooks.values():
            hook.disarm()

    def keeps_lr_scale(self) -> bool:
        return True

    def needs_read(self, step: BadStepContext) -> bool:
        return True  # the LR lives on the host

    def on_device(self, step: BadStepContext) -> None:
        # Always the host path: the skip and the LR decision are taken together.
        self._drop_pending_guard(step)

    def _on_device(self, step: BadStepContext) -> bool:
        return False

    def on_host(self, step: BadStepContext, read: StepRead) -> None:
        # This step's update uses the scale in force before it; what it teaches applies from the next step on
        # (a recovery counts this step as healthy only after its update, as GradScaler's growth does).
        in_force = step.counters.lr_scale
        hook = self._hooks.get(step.optimizer_idx)
        if hook is not None:
            hook.scale = in_force
            hook.arm()
        if read.bad:
            self._bad_step(step, read)
        elif read.skip:  # a spike (skip_spikes): skipped, the LR kept, and not a healthy step
            self._skip(step)
        elif not read.overflow:  # a GradScaler-skipped step is not healthy
            self._healthy(step)

    def _set_scale(self, step: BadStepContext, scale: float) -> None:
        step.counters.lr_scale = scale  # saved in checkpoints; armed from the next step on

    def _lower_lr(self, step: BadStepContext) -> None:
        scale = max(step.counters.lr_scale * self.lr_factor, self.min_lr_scale or _SMALLEST_SCALE)
        self._set_scale(step, scale)
        step.counters.healthy_steps = 0

    def _healthy(self, step: BadStepContext) -> None:
        counters = step.counters
        if self.lr_recovery_steps is None or counters.lr_scale >= 1.0:
            return
        counters.healthy_steps += 1
        if counters.healthy_steps >= self.lr_recovery_steps:  # like GradScaler's growth interval
            self._set_scale(step, min(1.0, counters.lr_scale / self.lr_factor))
            counters.healthy_steps = 0

    def detach_lr(self, step: BadStepContext) -> None:
        self.restore_lr()
