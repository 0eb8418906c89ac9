"""``nan_policy="skip"``: a bad step becomes a true no-op: weights and optimizer state untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip.counters import StepCounters
from lightning_clip.diagnosis import describe
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.remedies.base import (
    BadStepContext,
    Remedy,
    RunEnd,
    StateGuard,
    StepRead,
    diagnose,
    optional_int,
    raise_nonfinite,
    skip_step,
    warn_due,
)
from lightning_clip.validation import check_count


def fused_skip_is_safe(step: BadStepContext) -> bool:
    """Can this step be skipped on the device, through the fused optimizer's ``found_inf``?

    Only for fused optimizers, and only once the state of every parameter being stepped exists: a fused kernel
    allocates missing state before it reads ``found_inf`` (torch's fused SGD creates momentum buffers with
    ``empty_like``), so a skipped first step would leave state behind, uninitialised for SGD, which the next good
    step writes into the weights. Until then steps take the host path, where a skip creates no state.
    """
    opt = step.optimizer
    if not opt.param_groups or not all(group.get("fused") for group in opt.param_groups):
        return False
    if isinstance(opt, torch.optim.SGD):  # SGD keeps state only with momentum
        return not any(
            group.get("momentum", 0)
            and any(opt.state.get(p, {}).get("momentum_buffer") is None for p in group["params"] if p.grad is not None)
            for group in opt.param_groups
        )
    return all(opt.state.get(p) for p in step.params)


class Skip(Remedy):
    """Skip bad steps; raise after ``max_consecutive_nonfinite`` bad steps in a row (None: never).

    Non-fused optimizers skip by ``p.grad = None`` (optimizers leave such parameters and their state alone;
    zeroing would still move weights through momentum and weight decay): one host read per step. Fused
    optimizers skip on the device through ``found_inf`` with no host read; their streak limit and warnings
    wait for the next read (a logging step, or every ``read_every`` steps).

    Example::

        >>> from lightning_clip.remedies import Skip
        >>> Skip(max_consecutive_nonfinite=5).max_consecutive_nonfinite
        5
    """

    policy: ClassVar[str] = "skip"
    options: ClassVar[tuple[str, ...]] = ("max_consecutive_nonfinite",)
    skips_bad_steps: ClassVar[bool] = True

    def __init__(self, max_consecutive_nonfinite: int | None = 10) -> None:
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)
        self._found_inf_set: list[Optimizer] = []  # optimizers whose found_inf this remedy wrote
        self._guards: dict[int, StateGuard] = {}  # per optimizer: the state guard of a skip not yet stepped

    def detach(self) -> None:
        # found_inf stays on the optimizer and would skip every later step() made without the engine.
        for optimizer in self._found_inf_set:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        self._found_inf_set = []
        for guard in self._guards.values():
            guard.remove()
        self._guards = {}

    def _skip(self, step: BadStepContext) -> None:
        self._guards[step.optimizer_idx] = skip_step(step)

    # --- the two paths
    def _on_device(self, step: BadStepContext) -> bool:
        return fused_skip_is_safe(step)

    def needs_read(self, step: BadStepContext) -> bool:
        if self._on_device(step):
            return step.counters.steps % max(step.read_every, 1) == 0
        return True  # grad=None is decided on the host

    def _drop_pending_guard(self, step: BadStepContext) -> None:
        pending = self._guards.pop(step.optimizer_idx, None)
        if pending is not None:  # the last skipped step never ran (GradScaler skipped it): nothing to undo
            pending.remove()

    def on_device(self, step: BadStepContext) -> None:
        self._drop_pending_guard(step)
        if not self._on_device(step):
            if any(opt is step.optimizer for opt in self._found_inf_set):
                # A step on the host path must not inherit the last device decision.
                step.optimizer.found_inf = torch.zeros_like(step.optimizer.found_inf)  # type: ignore[attr-defined]
            return
        if step.scaler is None:
            # torch's fused Adam/AdamW/SGD skip the whole update (and undo the step count) when found_inf == 1.
            step.optimizer.found_inf = step.skip_flag.to(torch.float32)  # type: ignore[attr-defined]
            if not any(opt is step.optimizer for opt in self._found_inf_set):
                self._found_inf_set.append(step.optimizer)
        else:
            # GradScaler overwrites found_inf in scaler.step(); it skips on non-finite gradients, so make the
            # gradients non-finite when the step is bad for another reason (loss or input).
            F.scale_(step.grads, torch.where(step.skip_flag, float("nan"), 1.0))

    def on_host(self, step: BadStepContext, read: StepRead) -> None:
        if self._on_device(step):
            self._report_device_skips(
                step.counters, read.counts["nonfinite_steps"], read.streak, step.global_step, step.epoch, step.warn
            )
        elif read.bad:
            self._bad_step(step, read)
        elif read.skip:  # a spike (skip_spikes): skipped without a diagnosis, counted in spike_skips
            self._skip(step)

    # --- bad steps on the host path
    action: ClassVar[str] = "step skipped"

    def _lower_lr(self, step: BadStepContext) -> None:
        """Hook for :class:`~lightning_clip.remedies.HalveLR`."""

    def _bad_step(self, step: BadStepContext, read: StepRead) -> None:
        step.counters.reported_nonfinite = read.counts["nonfinite_steps"]  # the host path reports as it goes
        self._lower_lr(step)
        limit = self.max_consecutive_nonfinite
        stop = limit is not None and read.streak >= limit
        if not (stop or warn_due(read.counts["nonfinite_steps"])):
            self._skip(step)
            return
        info = diagnose(
            step,
            read,
            "raised NonFiniteGradientError" if stop else self.action,
            step.counters.lr_scale if self.keeps_lr_scale() else 1.0,
            stopping=stop,
        )
        if stop:
            self.detach_lr(step)
            raise_nonfinite(
                info,
                f"{read.streak} consecutive steps with non-finite gradients (max_consecutive_nonfinite={limit}).\n",
            )
        self._skip(step)
        step.warn(describe(info))

    def detach_lr(self, step: BadStepContext) -> None:
        """Before raising: leave the optimizer's LR as the scheduler set it."""

    def finish(self, end: RunEnd) -> None:
        # Skips made on the device since the last read: a run that ends first must still warn or raise.
        self._report_device_skips(
            end.counters,
            end.counts["nonfinite_steps"],
            end.counts["nonfinite_streak"],
            end.global_step,
            end.epoch,
            end.warn,
            may_raise=not end.failed,
        )

    def _report_device_skips(
        self,
        counters: StepCounters,
        total: int,
        streak: int,
        global_step: int,
        epoch: int,
        warn: Callable[[str], None],
        may_raise: bool = True,
    ) -> None:
        """Fused path: the skips happened on the device; warn or raise now that the counters are on the host."""
        new = total - counters.reported_nonfinite
        if new <= 0:
            return
        counters.reported_nonfinite = total
        limit = self.max_consecutive_nonfinite
        if may_raise and limit is not None and streak >= limit:
            raise_device = (
                f"{streak} consecutive steps with non-finite gradients (max_consecutive_nonfinite={limit}); "
                f"all were skipped on the device (fused optimizer), weights are finite. Global step "
                f"{global_step}, epoch {epoch}."
            )
            raise NonFiniteGradientError(raise_device, global_step, [], streak)
        warn(
            f"{new} step(s) with non-finite gradients were skipped on the device (fused optimizer) up to global "
            f"step {global_step}; {total} in total, {streak} in a row now."
        )
