"""``nan_policy="rollback"``: go back to a healthy in-memory snapshot and skip the data window (PaLM's recipe).

PaLM (Chowdhery et al. 2022, §5.1) met about 20 loss spikes at 540B despite clipping; each time they restarted by
hand from about 100 steps before the spike and skipped 200-500 batches: the spikes came from data x state, and
skipping one step cannot undo a state that has already drifted. This remedy automates it, in memory.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_clip.diagnosis import describe, describe_spike
from lightning_clip.remedies.base import (
    Request,
    StepRead,
    StepRecord,
    diagnose,
    no_statistics,
    raise_nonfinite,
    warn_due,
)
from lightning_clip.remedies.halve_lr import _SMALLEST_SCALE, HalveLR
from lightning_clip.snapshot import Snapshot, Statistics
from lightning_clip.validation import check_count, check_in_range

_KEPT = 2  # snapshots kept: the newest is restored; the one before it stays until the next is taken


class Rollback(HalveLR):
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
    batch) is kept in :meth:`skipped_windows` and the checkpoint.

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
    action: ClassVar[str] = "rolled back"

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
        super().__init__(0.5, min_lr_scale, lr_recovery_steps, max_consecutive_nonfinite)
        check_count("snapshot_every", snapshot_every, allow_none=False)
        check_count("rollback_after", rollback_after, allow_none=False)
        if isinstance(rollback_skip_steps, bool) or not isinstance(rollback_skip_steps, int) or rollback_skip_steps < 0:
            raise ValueError(f"`rollback_skip_steps` must be an integer >= 0, got {rollback_skip_steps!r}.")
        check_in_range("rollback_lr_factor", rollback_lr_factor, 0.0, 1.0, high_open=False)
        if not isinstance(snapshot_on_device, bool):
            raise ValueError(f"`snapshot_on_device` must be True or False, got {snapshot_on_device!r}.")
        self.snapshot_every = int(snapshot_every)
        self.rollback_after = int(rollback_after)
        self.rollback_skip_steps = int(rollback_skip_steps)
        self.rollback_lr_factor = float(rollback_lr_factor)
        self.snapshot_on_device = snapshot_on_device
        self.rollbacks = 0
        self.windows: list[dict[str, Any]] = []
        self._snapshots: deque[Snapshot] = deque()
        self._optimizer: Optimizer | None = None
        self._statistics: Statistics = no_statistics
        # Checkpointed (state_dict), so that a resumed run decides as a straight one would:
        self._bad_run = 0  # bad steps in a row (towards rollback_after)
        self._unhealthy = 0  # bad steps since the last healthy one, rollbacks included (max_consecutive_nonfinite)
        self._clean = True  # every step since the newest snapshot was healthy
        # Snapshots are labelled with the global step their state precedes (that of the step after the one they
        # follow), as the windows are: in a plain loop the engine's step count.
        self._snapshot_label: int | None = None  # set when a snapshot is due after this step's update
        self._next_label = 0  # the global step after the running one
        self._label_initial = False  # the initial snapshot was taken before its step's global step was known
        self._initial_due = False
        self._after: Any = None
        self._before: Any = None

    # --- binding
    def attach(self, optimizer: Optimizer, statistics: Statistics = no_statistics) -> None:
        super().attach(optimizer, statistics)
        if self._after is not None:
            self._after.remove()
        self._optimizer, self._statistics = optimizer, statistics
        self._after = optimizer.register_step_post_hook(self._after_step)
        self._before = optimizer.register_step_pre_hook(self._before_step)
        self._snapshots.clear()
        # The state training starts (or resumes) from, a rollback target from step one: taken when the first step
        # begins, since Lightning restores a resumed optimizer's state after the callbacks are attached.
        self._initial_due = True

    def detach(self) -> None:
        super().detach()
        for handle in (self._after, self._before):
            if handle is not None:
                handle.remove()
        self._after = self._before = None
        self._snapshots.clear()  # training is over: free the copies (a new fit takes a fresh initial snapshot)

    @property
    def snapshot_nbytes(self) -> int:
        """Memory held by this optimizer's snapshots now (0 once training ended)."""
        return sum(snap.nbytes() for snap in self._snapshots)

    def _take(self, label: int) -> None:
        assert self._optimizer is not None
        # Recycle the oldest snapshot's buffers once two are kept.
        snap = self._snapshots.popleft() if len(self._snapshots) >= _KEPT else Snapshot(self.snapshot_on_device)
        snap.take(self._optimizer, label, self._statistics)
        self._snapshots.append(snap)
        self._clean = True

    def _before_step(self, *_: Any) -> None:
        if self._initial_due:  # labelled in on_host, once the step's global step is known
            self._initial_due, self._label_initial = False, True
            self._take(-1)

    def _after_step(self, *_: Any) -> None:
        if self._snapshot_label is not None:  # this step's update is in: k * snapshot_every steps are done
            label, self._snapshot_label = self._snapshot_label, None
            self._take(label)

    def _follow_parameters(self, step: StepRecord) -> None:
        """Before this step's update: a snapshot of the state training starts from (a plain loop's first step), or a
        fresh one when the optimizer's parameters changed since the newest (a param group added by an unfreeze):
        a rollback must restore every parameter the optimizer steps now."""
        if step.reevaluation:
            return
        if self._label_initial:
            self._label_initial = False
            self._snapshots[-1].step = step.global_step
        if self._initial_due:  # a plain loop: step() has not begun, no update is in yet
            self._initial_due = False
            self._take(step.global_step)
        elif self._snapshots and not self._snapshots[-1].holds(step.optimizer):
            self._take(step.global_step)

    # --- the step
    def on_host(self, step: StepRecord, read: StepRead) -> Request | None:
        if self._hook is not None:  # this step's update uses the scale in force before it
            self._hook.scale = self.lr_scale
            self._hook.arm()
        self._follow_parameters(step)
        request = None
        if step.requested:  # a step of the data window: skipped, neither healthy nor bad (a NaN in it too)
            self._skip(step)
            self.windows[-1]["skipped"][1] = step.global_step  # the steps actually skipped
        elif read.bad or read.skip:  # NaN/Inf, or a spike
            request = self._bad_step(step, read)
        elif not read.overflow:  # a GradScaler-skipped step is neither healthy nor bad
            self._bad_run = self._unhealthy = 0
            self._healthy()
        if not step.reevaluation:  # a closure optimizer's further evaluations belong to the same step
            self._next_label = step.global_step + 1
        if read.counts["steps"] % self.snapshot_every == 0:  # a snapshot point: the state after this step, if well
            self._snapshot_label = self._next_label if self._clean and not read.skip else None
            self._clean = True  # the next period starts
        return request

    def _bad_step(self, step: StepRecord, read: StepRead) -> Request | None:
        self.reported_nonfinite = read.counts["nonfinite_steps"]
        self._clean = False
        self._bad_run += 1
        self._unhealthy += 1
        limit = self.max_consecutive_nonfinite
        if limit is not None and self._unhealthy >= limit:
            self.on_exception()
            info = diagnose(
                step, read, "raised NonFiniteGradientError", self.lr_scale, stopping=True, consecutive=self._unhealthy
            )
            raise_nonfinite(
                info,
                f"{self._unhealthy} bad steps without a healthy one in between, {self.rollbacks} rollback(s) "
                f"(max_consecutive_nonfinite={limit}).\n",
            )
        if self._bad_run < self.rollback_after or not self._snapshots:
            self._skip(step)
            if read.bad and warn_due(read.counts["nonfinite_steps"]):
                info = diagnose(step, read, "step skipped", self.lr_scale, stopping=False, consecutive=self._bad_run)
                step.warn(describe(info))
            return None
        return self._roll_back(step, read)

    def _roll_back(self, step: StepRecord, read: StepRead) -> Request | None:
        assert self._optimizer is not None
        snap = self._snapshots[-1]
        snap.restore(self._optimizer, self._statistics)
        self._skip(step)  # after the restore: the bad step's own update is a no-op
        self._bad_run = 0
        self.lr_scale = max(self.lr_scale * self.rollback_lr_factor, self.min_lr_scale or _SMALLEST_SCALE)
        self.healthy_steps = 0
        self.rollbacks += 1
        self._clean = True  # the state is the snapshot's again
        window: dict[str, Any] = {
            "global_step": step.global_step,
            "epoch": step.epoch,
            "batch_idx": step.batch_idx,
            "snapshot_step": snap.step,
            "skipped": [step.global_step, step.global_step],  # extended as the window's steps are skipped
        }
        self.windows.append(window)
        cause = "NaN/Inf" if read.bad else "; ".join(describe_spike(*spike) for spike in step.spikes())
        step.warn(
            f"Rolled back at global step {step.global_step} (epoch {step.epoch}, batch {step.batch_idx}, optimizer "
            f"{step.optimizer_idx}, {cause}): restored the snapshot taken before global step {snap.step}; skipping "
            f"this step and this optimizer's next {self.rollback_skip_steps}; LR scale now {self.lr_scale:.4g}; "
            f"{self.rollbacks} rollback(s) so far. Largest gradients of the step: {_top_layers(step)}."
        )
        return Request(skip_steps=self.rollback_skip_steps, restored=True)

    def _recovery_factor(self) -> float:
        return self.rollback_lr_factor  # a recovery undoes one rollback's reduction

    # --- reporting and state
    def counts(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks}

    def skipped_windows(self) -> list[dict[str, Any]]:
        return [{**w, "skipped": list(w["skipped"])} for w in self.windows]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "rollbacks": self.rollbacks,
            "windows": self.skipped_windows(),
            "bad_run": self._bad_run,
            "unhealthy": self._unhealthy,
            "clean": self._clean,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rollbacks = int(state.get("rollbacks", 0))
        self.windows = [{**w, "skipped": list(w["skipped"])} for w in state.get("windows", [])]
        # Checkpoints of 0.2.0.dev0 kept no count of their own: their bad-step streak is the best estimate.
        streak = int(state.get("nonfinite_streak", 0))
        self._bad_run = int(state.get("bad_run", streak))
        self._unhealthy = int(state.get("unhealthy", streak))
        self._clean = bool(state.get("clean", True))


def _top_layers(step: StepRecord, k: int = 3) -> str:
    """The parameters with the largest gradient norms of this step, non-finite first (a host read: bad path)."""
    if not step.norms:
        return "not measured"
    norms = torch.stack([n.to(step.device, torch.float64) for n in step.norms]).tolist()
    ranked = sorted(zip(step.names, norms), key=lambda pair: -math.inf if not math.isfinite(pair[1]) else -pair[1])
    return ", ".join(f"{name} ({norm:.3g})" for name, norm in ranked[:k])


__all__ = ["Rollback"]
