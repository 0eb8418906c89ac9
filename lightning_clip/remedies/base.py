"""What a remedy is: :class:`Remedy`, the step it acts on (:class:`BadStepContext`) and its values (:class:`StepRead`).

A remedy is the answer to ``nan_policy``: what happens to a step whose gradient, loss or inputs are NaN/Inf.
It acts in two phases, so that the sync-free paths stay sync-free by construction:

1. :meth:`Remedy.on_device` -- with device flags only (e.g. a fused optimizer's ``found_inf``);
2. :meth:`Remedy.on_host` -- only on steps where :meth:`Remedy.needs_read` said so (or that log), after the
   engine's single device-to-host transfer, with the values in :class:`StepRead`.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip.counters import StepCounters
from lightning_clip.diagnosis import BadStep, describe
from lightning_clip.errors import NonFiniteGradientError


@dataclass
class BadStepContext:
    """One optimizer step, as a remedy sees it. ``bad`` is a 0-dim bool on the device."""

    optimizer: Optimizer
    optimizer_idx: int
    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    names: Sequence[str]
    norms: Sequence[Tensor]
    bad: Tensor
    scaler: Any  # a torch.amp.GradScaler under fp16, else None
    counters: StepCounters
    read_every: int  # a sync-free remedy reads its counters at least this often
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = -1
    loss_nonfinite: Callable[[], bool] = lambda: False
    input_problems: Callable[[], list[str]] = list
    warn: Callable[[str], None] = lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3)
    # ids of the parameters that had optimizer state when ``optimizer.step()`` began, when this step runs inside
    # it (a closure); None when the update has not begun (plain loops, fp16)
    state_before: set[int] | None = None
    # bad, or a spike the engine was told to skip (skip_spikes): the step to skip. None: ``bad``.
    skip: Tensor | None = None

    @property
    def skip_flag(self) -> Tensor:
        return self.bad if self.skip is None else self.skip

    @property
    def grads_scaled(self) -> bool:
        """Fused optimizers under fp16 unscale inside their step: in the hook the gradients are still scaled."""
        return self.scaler is not None and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))


@dataclass
class StepRead:
    """The host values of one step, from the engine's single transfer."""

    bad: bool
    streak: int  # consecutive bad steps of this optimizer, this one included
    overflow: bool  # a GradScaler overflow (fp16), not divergence
    counts: dict[str, int]
    skip: bool = False  # bad, or a spike to skip (skip_spikes)


class Remedy:
    """Base class of the NaN policies. Subclasses set :attr:`policy` and override the hooks they need."""

    policy: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    skips_bad_steps: ClassVar[bool] = False  # a bad step is not applied (counts as skipped)

    @classmethod
    def from_options(cls, **options: Any) -> Remedy:
        """Build from the callback's arguments named in :attr:`options`."""
        return cls(**{k: v for k, v in options.items() if k in cls.options})

    def attach(self, optimizer_idx: int, optimizer: Optimizer, counters: StepCounters) -> None:
        """Called once per optimizer when training starts (e.g. to install LR hooks)."""

    def detach(self) -> None:
        """Undo :meth:`attach` (training ended or failed)."""

    def restore_lr(self) -> None:
        """Put the scheduler's LR back now (an exception interrupted the step)."""

    def keeps_lr_scale(self) -> bool:
        """Whether a checkpointed LR scale applies under this remedy (else a resume resets it to 1.0)."""
        return False

    def needs_read(self, step: BadStepContext) -> bool:
        """Whether this step needs the host values (:meth:`on_host`). False keeps it free of host syncs."""
        return False

    def on_device(self, step: BadStepContext) -> None:
        """Act on device flags only (no host read)."""

    def on_host(self, step: BadStepContext, read: StepRead) -> None:
        """Act on the values read back (only called when :meth:`needs_read` or the step logs)."""

    def finish(self, end: RunEnd) -> None:
        """Training is over (``end.failed``: by an exception): report what the sync-free path has not read yet."""


@dataclass
class RunEnd:
    """One optimizer's counters at the end of training, read back once, for :meth:`Remedy.finish`."""

    optimizer_idx: int
    counters: StepCounters
    counts: dict[str, int]  # the totals, with ``nonfinite_streak``
    global_step: int
    epoch: int
    failed: bool  # an exception ended training: report, never raise
    warn: Callable[[str], None]


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
        self.handle: Any = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, *_: Any) -> None:
        for p in self.missing:
            self.optimizer.state.pop(p, None)
        for p, saved in self.numbers.items():
            self.optimizer.state[p].update(saved)
        self.remove()

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def skip_step(step: BadStepContext) -> StateGuard:
    """Make this optimizer step a no-op for weights and optimizer state; return the guard of its state."""
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


def nonfinite_names(step: BadStepContext) -> list[str]:
    """Names of the parameters whose gradient norm is NaN/Inf (a host read: the bad path only)."""
    device = step.bad.device
    flags = torch.stack([~torch.isfinite(n).to(device) for n in step.norms]).tolist()
    return [name for name, flag in zip(step.names, flags) if flag]


def diagnose(step: BadStepContext, read: StepRead, action: str, lr_scale: float, stopping: bool) -> BadStep:
    """What is known about this bad step, for the warning or the error."""
    return BadStep(
        global_step=step.global_step,
        epoch=step.epoch,
        batch_idx=step.batch_idx,
        optimizer_idx=step.optimizer_idx,
        nonfinite_names=nonfinite_names(step),
        num_params=len(step.params),
        loss_nonfinite=step.loss_nonfinite(),
        input_problems=step.input_problems(),
        consecutive=read.streak,
        skipped_total=read.counts["nonfinite_steps"] - (1 if stopping else 0),
        lr_scale=lr_scale,
        action=action,
    )


def raise_nonfinite(info: BadStep, prefix: str = "") -> None:
    raise NonFiniteGradientError(prefix + describe(info), info.global_step, info.nonfinite_names, info.consecutive)


def warn_due(nonfinite_total: int) -> bool:
    """Rate limit: warn at the 1st, 2nd, 4th, 8th, ... bad step."""
    return nonfinite_total > 0 and nonfinite_total & (nonfinite_total - 1) == 0


def optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)
