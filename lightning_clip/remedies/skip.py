"""``nan_policy="skip"``: a bad step becomes a true no-op: weights and optimizer state untouched."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_clip.diagnosis import describe
from lightning_clip.remedies.base import (
    NOTHING,
    Remedy,
    Request,
    RunEnd,
    StepRead,
    StepRecord,
    Stop,
    diagnose,
    optional_int,
    stop,
    stop_at,
    warn_due,
)
from lightning_clip.validation import check_count


class Skip(Remedy):
    """Skip bad steps; stop after ``max_consecutive_nonfinite`` bad steps in a row (None: never).

    Non-fused optimizers skip by ``p.grad = None`` (optimizers leave such parameters and their state alone;
    zeroing would still move weights through momentum and weight decay): one host read per step. Fused
    optimizers skip on the device through ``found_inf`` with no host read (:attr:`skips_on_device`); their streak
    limit and warnings wait for the next read (a logging step, every ``read_every`` steps, or the end of training).

    Example::

        >>> from lightning_clip.remedies import Skip
        >>> Skip(max_consecutive_nonfinite=5).max_consecutive_nonfinite
        5
    """

    policy: ClassVar[str] = "skip"
    options: ClassVar[tuple[str, ...]] = ("max_consecutive_nonfinite",)
    skips_steps: ClassVar[bool] = True
    skips_on_device: ClassVar[bool] = True

    def __init__(self, max_consecutive_nonfinite: int | None = 10) -> None:
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)
        self.reported_nonfinite = 0  # bad steps already warned about (the device path reports late)

    def needs_read(self, step: StepRecord) -> bool:
        if step.skipped_on_device:
            assert step.counters is not None
            return step.counters.steps % max(step.read_every, 1) == 0
        return True  # grad=None is decided on the host

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        if step.skipped_on_device:  # already skipped: report what the counters say
            return self._report_device_skips(read.counts["nonfinite_steps"], read.streak, step.global_step, step.epoch)
        if read.bad:
            self.reported_nonfinite = read.counts["nonfinite_steps"]  # the host path reports as it goes
            return skip_bad(step, read, self.max_consecutive_nonfinite, "step skipped", read.lr_scale)
        if read.skip:
            return skip_finite(step, read, self.max_consecutive_nonfinite, "step skipped")
        return NOTHING

    def finish(self, end: RunEnd) -> Request:
        # Skips made on the device since the last read: a run that ends first must still warn or stop.
        total, streak = end.counts["nonfinite_steps"], end.counts["nonfinite_streak"]
        return self._report_device_skips(total, streak, end.global_step, end.epoch)

    def _report_device_skips(self, total: int, streak: int, global_step: int, epoch: int) -> Request:
        """Fused path: the skips happened on the device; warn or stop now that the counters are on the host."""
        new = total - self.reported_nonfinite
        if new <= 0:
            return NOTHING
        self.reported_nonfinite = total
        limit = self.max_consecutive_nonfinite
        if stop_at(limit, streak):
            message = (
                f"{streak} consecutive bad steps (NaN/Inf or spikes; max_consecutive_nonfinite={limit}); "
                f"all were skipped on the device (fused optimizer), weights are finite. Global step "
                f"{global_step}, epoch {epoch}."
            )
            return Request(stop=Stop(message, global_step, [], streak))
        return Request(
            warn=f"{new} step(s) with non-finite gradients were skipped on the device (fused optimizer) up to global "
            f"step {global_step}; {total} in total, {streak} in a row now."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"reported_nonfinite": self.reported_nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reported_nonfinite = int(state.get("reported_nonfinite", 0))  # a resumed run reports only new ones


# ----------------------------------------------------------------------------- shared by the skipping policies
def skip_bad(
    step: StepRecord, read: StepRead, limit: int | None, action: str, lr_scale: float, lr_factor: float = 1.0
) -> Request:
    """Skip a bad (NaN/Inf) step, warned about at the 1st, 2nd, 4th, ... one; stop at ``limit`` in a row.
    ``lr_scale``: the scale after this decision (for the message)."""
    if stop_at(limit, read.streak):
        info = diagnose(step, read, "raised NonFiniteGradientError", lr_scale, stopping=True)
        prefix = f"{read.streak} consecutive steps with non-finite gradients (max_consecutive_nonfinite={limit}).\n"
        return stop(info, prefix)
    due = warn_due(read.counts["nonfinite_steps"])
    warn = describe(diagnose(step, read, action, lr_scale, stopping=False)) if due else None
    return Request(skip=True, lr_factor=lr_factor, warn=warn)


def skip_finite(step: StepRecord, read: StepRead, limit: int | None, action: str) -> Request:
    """Skip a finite step: one of a requested data window, or a spike. A spike is not a healthy step either: it counts
    towards ``max_consecutive_nonfinite`` (a lasting rise of the loss would otherwise be skipped forever, silently)
    and is warned about at the 1st, 2nd, 4th, ... spike (a logging step names its layers itself)."""
    if step.requested:
        return Request(skip=True)
    if stop_at(limit, read.streak):
        info = diagnose(step, read, "raised NonFiniteGradientError", read.lr_scale, stopping=True)
        return stop(info, f"{read.streak} bad steps in a row, spikes included (max_consecutive_nonfinite={limit}).\n")
    due = not step.log and warn_due(read.counts["spike_skips"])
    warn = describe(diagnose(step, read, action, read.lr_scale, stopping=False)) if due else None
    return Request(skip=True, warn=warn)


__all__ = ["Skip", "skip_bad", "skip_finite"]
