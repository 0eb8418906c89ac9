"""``nan_policy="rollback"``: go back to a healthy in-memory snapshot and skip the data window (PaLM's recipe).

PaLM (Chowdhery et al. 2022, §5.1) met about 20 loss spikes at 540B despite clipping; each time they restarted by
hand from about 100 steps before the spike and skipped 200-500 batches: the spikes came from data x state, and
skipping one step cannot undo a state that has already drifted. This remedy automates it, in memory.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch

from lightning_clip.diagnosis import describe, describe_spike
from lightning_clip.remedies.base import (
    NOTHING,
    Remedy,
    Request,
    StepRead,
    StepRecord,
    diagnose,
    lr_factor_to,
    optional_int,
    stop,
    stop_at,
    warn_due,
)
from lightning_clip.remedies.halve_lr import recovery
from lightning_clip.validation import check_count, check_in_range


class Rollback(Remedy):
    """On a bad step (NaN/Inf loss or gradient, or a spike from ``skip_spikes``/``loss_spikes``): restore the newest
    healthy snapshot, skip the data window, and lower the LR.

    Args:
        snapshot_every: after every ``snapshot_every``-th step (k * snapshot_every steps done), when the steps since
            the last snapshot were healthy, keep a snapshot of this optimizer's weights, its state and the
            callback's statistics (rule, spike histories). One more is taken when training starts. At most two are
            kept, in pinned host memory for GPU parameters (``snapshot_on_device``: on the device), sync-free.
        rollback_after: this many bad steps in a row trigger a rollback; fewer are skipped as ``skip`` does.
        rollback_skip_steps: after a rollback, skip the bad step and this many more optimizer steps (the data
            window; under accumulation a step is a whole window).
        rollback_lr_factor: multiply the LR by this at each rollback, on top of any scheduler (1.0 keeps it);
            ``lr_recovery_steps`` and ``min_lr_scale`` work as under ``halve_lr``.
        max_consecutive_nonfinite: raise :class:`~lightning_clip.NonFiniteGradientError` after this many bad steps
            without a healthy step in between, rollbacks included: a run that stays bad stops.

    Counters and the LR schedule keep the Trainer's timeline: a rollback restores the weights, the optimizer state
    and the statistics, not the param groups' hyperparameters, the counters or the global step. One host read per
    step (the decision is taken on the host). Counted in ``rollbacks``; each skipped window (global steps, epoch,
    batch) is recorded by the engine (:meth:`ClipEngine.skipped_windows`) and kept in the checkpoint.

    Example::

        >>> import torch
        >>> from lightning_clip import ClipEngine
        >>> from lightning_clip.remedies import Rollback
        >>> from lightning_clip.rules import NormClip
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = ClipEngine(NormClip(), Rollback(snapshot_every=2, rollback_skip_steps=1, rollback_lr_factor=1.0))
        >>> engine.attach([opt], model.named_parameters())
        >>> engine.warn = lambda message: None
        >>> for step in range(6):
        ...     loss = model(torch.ones(1, 2)).sum() * (float("nan") if step == 3 else 1.0)
        ...     engine.observe_loss(loss)
        ...     loss.backward()
        ...     _ = engine.step(opt)
        ...     opt.step()
        ...     opt.zero_grad()
        >>> engine.counters["rollbacks"], engine.skipped_windows()[0]["snapshot_step"]
        (1, 2)
    """

    policy: ClassVar[str] = "rollback"
    options: ClassVar[tuple[str, ...]] = (
        "snapshot_every",
        "rollback_after",
        "rollback_skip_steps",
        "rollback_lr_factor",
        "min_lr_scale",
        "lr_recovery_steps",
        "max_consecutive_nonfinite",
    )
    skips_steps: ClassVar[bool] = True
    scales_lr: ClassVar[bool] = True
    keeps_snapshots: ClassVar[int] = 2  # the newest is restored; the one before stays until the next is taken

    def __init__(
        self,
        snapshot_every: int = 50,
        rollback_after: int = 1,
        rollback_skip_steps: int = 0,
        rollback_lr_factor: float = 0.5,
        min_lr_scale: float | None = None,
        lr_recovery_steps: int | None = None,
        max_consecutive_nonfinite: int | None = 10,
        snapshot_on_device: bool = False,
    ) -> None:
        check_count("snapshot_every", snapshot_every, allow_none=False)
        check_count("rollback_after", rollback_after, allow_none=False)
        if isinstance(rollback_skip_steps, bool) or not isinstance(rollback_skip_steps, int) or rollback_skip_steps < 0:
            raise ValueError(f"`rollback_skip_steps` must be an integer >= 0, got {rollback_skip_steps!r}.")
        check_in_range("rollback_lr_factor", rollback_lr_factor, 0.0, 1.0, high_open=False)
        check_in_range("min_lr_scale", min_lr_scale, 0.0, 1.0, high_open=False, allow_none=True)
        check_count("lr_recovery_steps", lr_recovery_steps)
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        if not isinstance(snapshot_on_device, bool):
            raise ValueError(f"`snapshot_on_device` must be True or False, got {snapshot_on_device!r}.")
        self.snapshot_every = int(snapshot_every)
        self.rollback_after = int(rollback_after)
        self.rollback_skip_steps = int(rollback_skip_steps)
        self.rollback_lr_factor = float(rollback_lr_factor)
        self.min_lr_scale = None if min_lr_scale is None else float(min_lr_scale)
        self.lr_recovery_steps = optional_int(lr_recovery_steps)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)
        self.snapshot_on_device = snapshot_on_device
        # Checkpointed, so that a resumed run decides as a straight one would:
        self.healthy_steps = 0  # in a row, since the last rollback (recovery)
        self._bad_run = 0  # bad steps in a row (towards rollback_after)
        self._unhealthy = 0  # bad steps since the last healthy one, rollbacks included (max_consecutive_nonfinite)
        self._clean = True  # every step since the newest snapshot was healthy

    def needs_read(self, step: StepRecord) -> bool:
        return True  # the decision is taken on the host

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        if step.requested:  # a step of the data window: skipped, neither healthy nor bad (a NaN in it too)
            request = Request(skip=True)
        elif read.bad or read.skip:  # NaN/Inf, or a spike
            request = self._bad_step(step, read)
        elif not read.overflow:  # a GradScaler-skipped step is neither healthy nor bad
            self._bad_run = self._unhealthy = 0
            self.healthy_steps, factor = recovery(
                self.healthy_steps, self.lr_recovery_steps, read.lr_scale, self.rollback_lr_factor
            )
            request = Request(lr_factor=factor) if factor != 1.0 else NOTHING
        else:
            request = NOTHING
        if read.counts["steps"] % self.snapshot_every == 0:  # a snapshot point: the state after this step, if well
            healthy_period = self._clean and not read.skip
            self._clean = True  # the next period starts
            if healthy_period:
                return replace(request, snapshot=True)
        return request

    def _bad_step(self, step: StepRecord, read: StepRead) -> Request:
        self._clean = False
        self._bad_run += 1
        self._unhealthy += 1
        limit = self.max_consecutive_nonfinite
        if stop_at(limit, self._unhealthy):
            info = diagnose(
                step, read, "raised NonFiniteGradientError", read.lr_scale, stopping=True, consecutive=self._unhealthy
            )
            rollbacks = read.counts.get("rollbacks", 0)
            return stop(
                info,
                f"{self._unhealthy} bad steps without a healthy one in between, {rollbacks} rollback(s) "
                f"(max_consecutive_nonfinite={limit}).\n",
            )
        if self._bad_run < self.rollback_after or not read.snapshots:
            warn = None
            if read.bad and warn_due(read.counts["nonfinite_steps"]):
                info = diagnose(step, read, "step skipped", read.lr_scale, stopping=False, consecutive=self._bad_run)
                warn = describe(info)
            return Request(skip=True, warn=warn)
        return self._roll_back(step, read)

    def _roll_back(self, step: StepRecord, read: StepRead) -> Request:
        self._bad_run = 0
        self.healthy_steps = 0
        self._clean = True  # the state is the snapshot's again
        factor = lr_factor_to(read.lr_scale, read.lr_scale * self.rollback_lr_factor, self.min_lr_scale)
        cause = "NaN/Inf" if read.bad else "; ".join(describe_spike(*spike) for spike in step.spikes())
        warn = (
            f"Rolled back at global step {step.global_step} (epoch {step.epoch}, batch {step.batch_idx}, optimizer "
            f"{step.optimizer_idx}, {cause}): restored the snapshot taken before global step {read.snapshots[0]}; "
            f"skipping this step and this optimizer's next {self.rollback_skip_steps}; LR scale now "
            f"{read.lr_scale * factor:.4g}; {read.counts.get('rollbacks', 0) + 1} rollback(s) so far. Largest "
            f"gradients of the step: {_top_layers(step)}."
        )
        return Request(restore=0, skip=True, skip_steps=self.rollback_skip_steps, lr_factor=factor, warn=warn)

    def state_dict(self) -> dict[str, Any]:
        return {
            "healthy_steps": self.healthy_steps,
            "bad_run": self._bad_run,
            "unhealthy": self._unhealthy,
            "clean": self._clean,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.healthy_steps = int(state.get("healthy_steps", 0))
        self._bad_run = int(state.get("bad_run", 0))
        self._unhealthy = int(state.get("unhealthy", 0))
        self._clean = bool(state.get("clean", True))


def _top_layers(step: StepRecord, k: int = 3) -> str:
    """The parameters with the largest gradient norms of this step, non-finite first (a host read: bad path)."""
    if not step.norms:
        return "not measured"
    norms = torch.stack([n.to(step.device, torch.float64) for n in step.norms]).tolist()
    ranked = sorted(zip(step.names, norms), key=lambda pair: -math.inf if not math.isfinite(pair[1]) else -pair[1])
    return ", ".join(f"{name} ({norm:.3g})" for name, norm in ranked[:k])


__all__ = ["Rollback"]
