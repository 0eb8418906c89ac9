"""What a remedy is: :class:`Remedy`, a policy per optimizer that reads a step and decides.

A remedy is the answer to ``nan_policy``: what happens to a step whose gradient, loss or inputs are NaN/Inf (or
that the engine flags as a spike). It only decides: it reads the step (:class:`StepRecord`, and the host values of
its one transfer, :class:`StepRead`) and returns a :class:`Request` -- skip this step, skip the next k steps,
multiply the LR scale, restore a snapshot, keep one, warn, or stop with a diagnosis. The engine carries the request
out with the mechanisms it owns once per optimizer (:mod:`lightning_clip.control`): the skip (``grad=None``,
``found_inf``, the state guard), the LR scale over any scheduler, the snapshot store and the optimizer hooks.

The engine copies the remedy once per optimizer, so its state (a count of healthy steps, what it has reported) is
that optimizer's, and saved with :meth:`Remedy.state_dict`. The protocol has five methods: :meth:`~Remedy.needs_read`
(False keeps a step free of host syncs), :meth:`~Remedy.decide`, :meth:`~Remedy.finish`, and
``state_dict``/``load_state_dict``. The engine never asks which remedy it holds: it reads what the remedy declares
(:attr:`~Remedy.skips_steps`, :attr:`~Remedy.checks_loss`, :attr:`~Remedy.skips_on_device`,
:attr:`~Remedy.keeps_snapshots`).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch

from lightning_clip.diagnosis import BadStep, describe
from lightning_clip.record import NOTHING, Request, RunEnd, StepRead, StepRecord, Stop

__all__ = ["NOTHING", "Remedy", "Request", "RunEnd", "StepRead", "StepRecord", "Stop"]

# The LR scale never reaches 0.0 (lr_factor=1e-200 would underflow), so a recovery can always bring it back.
SMALLEST_SCALE = sys.float_info.min


class Remedy:
    """Base class of the NaN policies. Subclasses set :attr:`policy`, declare what they need, and decide."""

    policy: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    # A bad step is not applied (counts as skipped); only such a remedy may ask for skips (Request.skip/skip_steps).
    skips_steps: ClassVar[bool] = False
    # The loss (and checked inputs) decide whether a step is bad, and fp16 overflows are told apart from
    # divergence; False: only the gradient is looked at, and nothing is read outside logging steps.
    checks_loss: ClassVar[bool] = True
    # Bad steps are skipped on the device, with no host read, where the optimizer allows it (fused optimizers with
    # their state in place); the remedy then sees the counts only every so often (``needs_read``).
    skips_on_device: ClassVar[bool] = False
    # The remedy changes the LR scale (Request.lr_factor); a scale saved by another policy is not carried over.
    scales_lr: ClassVar[bool] = False
    # How many snapshots the engine keeps for this remedy to restore (Request.restore); 0: none.
    keeps_snapshots: ClassVar[int] = 0
    snapshot_on_device: bool = False  # keep them on the device rather than in pinned host memory

    @property
    def reads_loss(self) -> bool:
        """Whether :meth:`decide` reads the step's loss (``StepRead.loss``; the mean over ranks)."""
        return False

    @classmethod
    def from_options(cls, **options: Any) -> Remedy:
        """Build from the callback's arguments named in :attr:`options`."""
        return cls(**{k: v for k, v in options.items() if k in cls.options})

    def needs_read(self, step: StepRecord) -> bool:
        """Whether this step needs the host values (:meth:`decide`). False keeps it free of host syncs."""
        return False

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        """What to do with this step and the next ones (called when :meth:`needs_read` or the step logs)."""
        return NOTHING

    def finish(self, end: RunEnd) -> Request:
        """Training is over (``end.failed``: by an exception): report what the sync-free path has not read yet
        (``warn``, or ``stop``, which the engine raises only when training did not fail)."""
        return NOTHING

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's remedy state (its own section of the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.options)})"


# ----------------------------------------------------------------------------- shared decisions
def lr_factor_to(scale: float, target: float, floor: float | None) -> float:
    """The factor that takes the LR scale from ``scale`` to ``target``, not below ``floor`` (never 0)."""
    return max(target, floor or SMALLEST_SCALE) / scale


def stop_at(limit: int | None, consecutive: int) -> bool:
    """``max_consecutive_nonfinite`` reached?"""
    return limit is not None and consecutive >= limit


def stop(info: BadStep, prefix: str = "") -> Request:
    """A request to raise :class:`~lightning_clip.NonFiniteGradientError` with the diagnosis of ``info``."""
    return Request(stop=Stop(prefix + describe(info), info.global_step, info.nonfinite_names, info.consecutive))


# ----------------------------------------------------------------------------- shared actions
def nonfinite_names(step: StepRecord) -> list[str]:
    """Names of the parameters whose gradient norm is NaN/Inf (a host read: the bad path only)."""
    device = step.bad.device
    flags = torch.stack([~torch.isfinite(n).to(device) for n in step.norms]).tolist()
    return [name for name, flag in zip(step.names, flags) if flag]


def diagnose(
    step: StepRecord, read: StepRead, action: str, lr_scale: float, stopping: bool, consecutive: int | None = None
) -> BadStep:
    """What is known about this bad step (NaN/Inf, or a finite spike), for the warning or the error.

    ``consecutive``: the bad steps without a healthy one in between, when the remedy counts them itself (rollback);
    else the device streak. The stopping step itself is not counted as skipped: it raises instead.
    """
    nonfinite = read.bad
    return BadStep(
        global_step=step.global_step,
        epoch=step.epoch,
        batch_idx=step.batch_idx,
        optimizer_idx=step.optimizer_idx,
        nonfinite_names=nonfinite_names(step) if nonfinite else [],
        num_params=len(step.params),
        loss_nonfinite=step.loss_nonfinite() if nonfinite else False,
        input_problems=step.input_problems() if nonfinite else [],
        consecutive=read.streak if consecutive is None else consecutive,
        skipped_total=max(read.counts["skipped_steps"] - (1 if stopping else 0), 0),
        lr_scale=lr_scale,
        action=action,
        spikes=() if nonfinite else step.spikes(),
    )


def warn_due(nonfinite_total: int) -> bool:
    """Rate limit: warn at the 1st, 2nd, 4th, 8th, ... bad step."""
    return nonfinite_total > 0 and nonfinite_total & (nonfinite_total - 1) == 0


def optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)
