"""What a remedy is: :class:`Remedy`, one unit per optimizer that acts on the engine's :class:`StepRecord`.

A remedy is the answer to ``nan_policy``: what happens to a step whose gradient, loss or inputs are NaN/Inf (or
that the engine flags as a spike). The engine copies it once per optimizer, so its state (an LR scale, a pending
state guard, what it has reported) is that optimizer's, and saved with :meth:`Remedy.state_dict`. It acts in two
phases, so that the sync-free paths stay sync-free by construction:

1. :meth:`Remedy.on_device` -- with device flags only (e.g. a fused optimizer's ``found_inf``);
2. :meth:`Remedy.on_host` -- only on steps where :meth:`Remedy.needs_read` said so (or that log), after the
   engine's single device-to-host transfer, with the values in :class:`StepRead`. It may return a
   :class:`Request` to the loop (skip the next steps), which the engine honours.

The engine and the callback never ask which remedy they hold: they read what it declares (:attr:`skips_steps`,
:attr:`checks_loss`, :attr:`lr_scale`) and call its hooks.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_clip.diagnosis import BadStep, describe
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.record import Request, RunEnd, StepRead, StepRecord
from lightning_clip.snapshot import Statistics, no_statistics

__all__ = ["Remedy", "Request", "RunEnd", "StateGuard", "StepRead", "StepRecord", "skip_step"]


class Remedy:
    """Base class of the NaN policies. Subclasses set :attr:`policy`, declare what they do, and override the hooks
    they need. One copy serves one optimizer."""

    policy: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    # A bad step is not applied (counts as skipped); only such a remedy may request skips (Request.skip_steps).
    skips_steps: ClassVar[bool] = False
    # The loss (and checked inputs) decide whether a step is bad, and fp16 overflows are told apart from
    # divergence; False: only the gradient is looked at, and nothing is read outside logging steps.
    checks_loss: ClassVar[bool] = True
    # The multiplier this remedy applies to its optimizer's LR (saved in checkpoints as ``lr_scale``).
    lr_scale: float = 1.0

    @classmethod
    def from_options(cls, **options: Any) -> Remedy:
        """Build from the callback's arguments named in :attr:`options`."""
        return cls(**{k: v for k, v in options.items() if k in cls.options})

    def attach(self, optimizer: Optimizer, statistics: Statistics = no_statistics) -> None:
        """Training starts (or the optimizer was re-created) with ``optimizer``: e.g. install LR hooks.
        ``statistics`` gives the optimizer's device statistics (rule, spike histories), for a remedy that
        snapshots them."""

    def detach(self) -> None:
        """Undo :meth:`attach` (training ended or failed)."""

    def on_exception(self) -> None:
        """An exception interrupted training, maybe mid-step: put the scheduler's LR back now."""

    def needs_read(self, step: StepRecord) -> bool:
        """Whether this step needs the host values (:meth:`on_host`). False keeps it free of host syncs."""
        return False

    def on_device(self, step: StepRecord) -> None:
        """Act on device flags only (no host read)."""

    def on_host(self, step: StepRecord, read: StepRead) -> Request | None:
        """Act on the values read back (only called when :meth:`needs_read` or the step logs); may ask the loop
        for something (:class:`Request`)."""
        return None

    def finish(self, end: RunEnd) -> None:
        """Training is over (``end.failed``: by an exception): report what the sync-free path has not read yet."""

    def counts(self) -> dict[str, int]:
        """Counters this remedy keeps on the host (e.g. ``rollbacks``), reported and logged beside the engine's."""
        return {}

    def skipped_windows(self) -> list[dict[str, Any]]:
        """The data windows this remedy skipped (e.g. after a rollback), to persist beside the logs."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's remedy state, saved flat beside its counters."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from an optimizer's checkpoint entry (its counters are in it too)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.options)})"


# ----------------------------------------------------------------------------- shared actions
class StateGuard:
    """Undo what a skipped step still writes into the optimizer state, once, right after that step.

    Two things reach the state even when the update is skipped: fused kernels allocate the state of a parameter
    that has none before they look at ``found_inf`` (fused SGD's momentum with ``empty_like``: uninitialised
    memory that the next good step writes into the weights), and closure optimizers count evaluations in Python
    numbers (LBFGS's ``func_evals``). The guard removes state entries created by the step and puts the numbers
    back. A step that never runs (GradScaler skipped it) leaves the guard pending: :meth:`remove` it before the
    next step.
    """

    def __init__(self, optimizer: Optimizer, state_before: set[int] | None = None) -> None:
        self.optimizer = optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = optimizer.state
        if state_before is None:
            self.missing = [p for p in params if not state.get(p)]
        else:  # inside step(): state created since it began (LBFGS's counters) is the step's own
            self.missing = [p for p in params if id(p) not in state_before]
        gone = {id(p) for p in self.missing}
        self.numbers = {
            p: {k: v for k, v in state[p].items() if isinstance(v, numbers.Number)}
            for p in params
            if state.get(p) and id(p) not in gone
        }
        self.done = False
        self.handle: Any = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, *_: Any) -> None:
        if self.done:
            return
        for p in self.missing:
            self.optimizer.state.pop(p, None)
        for p, saved in self.numbers.items():
            self.optimizer.state[p].update(saved)
        # Once only; the hook itself is removed later (remove()): removing it while the optimizer iterates over
        # its post-hooks fails when a hook registered after it (an LBFGS restore) is still to run.
        self.done = True

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def skip_step(step: StepRecord) -> StateGuard:
    """Make this optimizer step a no-op for weights and optimizer state; return the guard of its state."""
    assert step.optimizer is not None
    guard = StateGuard(step.optimizer, step.state_before)
    if step.grads_scaled:
        # Fused + GradScaler: grad=None trips the scaler; non-finite grads make it skip instead.
        from lightning_clip import functional as F

        F.scale_(step.grads, float("nan"))
        return guard
    # Optimizers skip parameters whose grad is None: no update, no momentum/moment/step change.
    # (Zeroing would still move weights through momentum and weight decay.)
    for p in step.params:
        p.grad = None
    return guard


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


def raise_nonfinite(info: BadStep, prefix: str = "") -> None:
    raise NonFiniteGradientError(prefix + describe(info), info.global_step, info.nonfinite_names, info.consecutive)


def warn_due(nonfinite_total: int) -> bool:
    """Rate limit: warn at the 1st, 2nd, 4th, 8th, ... bad step."""
    return nonfinite_total > 0 and nonfinite_total & (nonfinite_total - 1) == 0


def optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)
