"""``nan_policy="skip"``: a bad step becomes a true no-op: weights and optimizer state untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip.diagnosis import describe
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.remedies.base import (
    Remedy,
    Request,
    RunEnd,
    StateGuard,
    StepRead,
    StepRecord,
    diagnose,
    optional_int,
    raise_nonfinite,
    skip_step,
    warn_due,
)
from lightning_clip.validation import check_count


def fused_skip_is_safe(step: StepRecord) -> bool:
    """Can this step be skipped on the device, through the fused optimizer's ``found_inf``?

    Only for fused optimizers, and only once the state of every parameter being stepped exists: a fused kernel
    allocates missing state before it reads ``found_inf`` (torch's fused SGD creates momentum buffers with
    ``empty_like``), so a skipped first step would leave state behind, uninitialised for SGD, which the next good
    step writes into the weights. Until then steps take the host path, where a skip creates no state.
    """
    opt = step.optimizer
    if opt is None or not opt.param_groups or not all(group.get("fused") for group in opt.param_groups):
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
    wait for the next read (a logging step, every ``read_every`` steps, or the end of training).

    Example::

        >>> from lightning_clip.remedies import Skip
        >>> Skip(max_consecutive_nonfinite=5).max_consecutive_nonfinite
        5
    """

    policy: ClassVar[str] = "skip"
    options: ClassVar[tuple[str, ...]] = ("max_consecutive_nonfinite",)
    skips_steps: ClassVar[bool] = True

    def __init__(self, max_consecutive_nonfinite: int | None = 10) -> None:
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)
        self._found_inf_on: Optimizer | None = None  # the optimizer whose found_inf this remedy wrote
        self._guard: StateGuard | None = None  # the state guard of a skip not yet stepped
        self.reported_nonfinite = 0  # bad steps already warned about (the device path reports late)

    def detach(self) -> None:
        # found_inf stays on the optimizer and would skip every later step() made without the engine.
        if self._found_inf_on is not None and hasattr(self._found_inf_on, "found_inf"):
            del self._found_inf_on.found_inf
        self._found_inf_on = None
        self._drop_pending_guard()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reported_nonfinite = int(state.get("nonfinite_steps", 0))  # a resumed run reports only new ones

    def _skip(self, step: StepRecord) -> None:
        self._guard = skip_step(step)

    # --- the two paths
    def _on_device(self, step: StepRecord) -> bool:
        return fused_skip_is_safe(step)

    def needs_read(self, step: StepRecord) -> bool:
        if self._on_device(step):
            assert step.counters is not None
            return step.counters.steps % max(step.read_every, 1) == 0
        return True  # grad=None is decided on the host

    def _drop_pending_guard(self) -> None:
        if self._guard is not None:  # the last skipped step never ran (GradScaler skipped it): nothing to undo
            self._guard.remove()
            self._guard = None

    def on_device(self, step: StepRecord) -> None:
        self._drop_pending_guard()
        optimizer = step.optimizer
        if not self._on_device(step):
            if self._found_inf_on is optimizer and optimizer is not None:
                # A step on the host path must not inherit the last device decision.
                optimizer.found_inf = torch.zeros_like(optimizer.found_inf)  # type: ignore[attr-defined]
            return
        if step.scaler is None:
            # torch's fused Adam/AdamW/SGD skip the whole update (and undo the step count) when found_inf == 1.
            optimizer.found_inf = step.skip.to(torch.float32)  # type: ignore[union-attr]
            self._found_inf_on = optimizer
        else:
            # GradScaler overwrites found_inf in scaler.step(); it skips on non-finite gradients, so make the
            # gradients non-finite when the step is to be skipped for another reason (loss, input, spike).
            F.scale_(step.grads, torch.where(step.skip, float("nan"), 1.0))

    def on_host(self, step: StepRecord, read: StepRead) -> Request | None:
        if self._on_device(step):
            self._report_device_skips(
                read.counts["nonfinite_steps"], read.streak, step.global_step, step.epoch, step.warn
            )
        elif read.bad:
            return self._bad_step(step, read)
        elif read.skip:  # a spike (skip_spikes, loss_spikes) or a requested skip: counted apart
            self._skipped_finite(step, read)
        return None

    def _skipped_finite(self, step: StepRecord, read: StepRead) -> None:
        """Skip a finite step: one of a requested data window, or a spike. A spike is not a healthy step either: it
        counts towards ``max_consecutive_nonfinite`` (a lasting rise of the loss would otherwise be skipped forever,
        silently) and is warned about at the 1st, 2nd, 4th, ... spike (a logging step names its layers itself)."""
        if step.requested:
            self._skip(step)
            return
        limit = self.max_consecutive_nonfinite
        if limit is not None and read.streak >= limit:
            info = diagnose(step, read, "raised NonFiniteGradientError", self.lr_scale, stopping=True)
            self.on_exception()
            raise_nonfinite(
                info, f"{read.streak} bad steps in a row, spikes included (max_consecutive_nonfinite={limit}).\n"
            )
        self._skip(step)
        if not step.log and warn_due(read.counts["spike_skips"]):
            step.warn(describe(diagnose(step, read, self.spike_action, self.lr_scale, stopping=False)))

    # --- bad steps on the host path
    action: ClassVar[str] = "step skipped"
    spike_action: ClassVar[str] = "step skipped"

    def _lower_lr(self, step: StepRecord) -> None:
        """Hook for :class:`~lightning_clip.remedies.HalveLR`."""

    def _bad_step(self, step: StepRecord, read: StepRead) -> Request | None:
        self.reported_nonfinite = read.counts["nonfinite_steps"]  # the host path reports as it goes
        self._lower_lr(step)
        limit = self.max_consecutive_nonfinite
        stop = limit is not None and read.streak >= limit
        if not (stop or warn_due(read.counts["nonfinite_steps"])):
            self._skip(step)
            return None
        info = diagnose(
            step, read, "raised NonFiniteGradientError" if stop else self.action, self.lr_scale, stopping=stop
        )
        if stop:
            self.on_exception()
            raise_nonfinite(
                info,
                f"{read.streak} consecutive steps with non-finite gradients (max_consecutive_nonfinite={limit}).\n",
            )
        self._skip(step)
        step.warn(describe(info))
        return None

    def finish(self, end: RunEnd) -> None:
        # Skips made on the device since the last read: a run that ends first must still warn or raise.
        counts = end.counts
        self._report_device_skips(
            counts["nonfinite_steps"], counts["nonfinite_streak"], end.global_step, end.epoch, end.warn, not end.failed
        )

    def _report_device_skips(
        self,
        total: int,
        streak: int,
        global_step: int,
        epoch: int,
        warn: Callable[[str], None],
        may_raise: bool = True,
    ) -> None:
        """Fused path: the skips happened on the device; warn or raise now that the counters are on the host."""
        new = total - self.reported_nonfinite
        if new <= 0:
            return
        self.reported_nonfinite = total
        limit = self.max_consecutive_nonfinite
        if may_raise and limit is not None and streak >= limit:
            raise_device = (
                f"{streak} consecutive bad steps (NaN/Inf or spikes; max_consecutive_nonfinite={limit}); "
                f"all were skipped on the device (fused optimizer), weights are finite. Global step "
                f"{global_step}, epoch {epoch}."
            )
            raise NonFiniteGradientError(raise_device, global_step, [], streak)
        warn(
            f"{new} step(s) with non-finite gradients were skipped on the device (fused optimizer) up to global "
            f"step {global_step}; {total} in total, {streak} in a row now."
        )
