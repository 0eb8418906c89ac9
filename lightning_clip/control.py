"""The engine's mechanisms for one optimizer: how a remedy's :class:`~lightning_clip.record.Request` is carried out.

A remedy only decides (:mod:`lightning_clip.remedies`); :class:`SlotControl` owns, once per optimizer:

* **skipping a step** -- ``p.grad = None`` (optimizers leave such parameters and their state alone), the fused
  optimizers' ``found_inf`` on the device, NaN gradients for fused ones under a GradScaler, and the
  :class:`StateGuard` that undoes what a skipped step still writes into the optimizer state;
* **the LR scale** on top of any scheduler (:class:`~lightning_clip.lr_scale.StepLRScale`, armed per update);
* **the snapshot store** (:class:`~lightning_clip.snapshot.SnapshotStore`): the newest snapshots by age, taken when a
  remedy asks, one when training starts and one when the optimizer's parameters change; and the LBFGS guard, a
  snapshot at each step start of a closure optimizer that moves the weights between evaluations;
* **the steps a remedy asked to skip** and the record of those data windows;
* **the optimizer hooks**, registered by this one owner, run in this order:

  ==========  =====================================================================================
  pre-hook    1. count the ``step()`` call, note which parameters have state (closure optimizers)
              2. the LBFGS guard's snapshot of the step start
              3. the initial snapshot (once, when the first step begins: after a resume's state is loaded)
              4. the LR scale, if armed
  post-hook   1. undo what a skipped step wrote into the optimizer state (:class:`StateGuard`)
              2. put the scheduler's LR back
              3. what waits for the update (the update ratio of a logging step)
              4. a snapshot a remedy asked for after this step
              5. the LBFGS guard's restore of the step start, when the step was skipped
  ==========  =====================================================================================
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip.lr_scale import StepLRScale
from lightning_clip.record import Request, RunEnd, StepRecord
from lightning_clip.snapshot import Snapshot, SnapshotStore, Statistics, no_statistics

__all__ = ["SlotControl", "StateGuard", "copy_windows", "fused_skip_is_safe", "skip_step"]


class StateGuard:
    """Undo what a skipped step still writes into the optimizer state, once, right after that step.

    Two things reach the state even when the update is skipped: fused kernels allocate the state of a parameter
    that has none before they look at ``found_inf`` (fused SGD's momentum with ``empty_like``: uninitialised
    memory that the next good step writes into the weights), and closure optimizers count evaluations in Python
    numbers (LBFGS's ``func_evals``). The guard removes state entries created by the step and puts the numbers
    back when :meth:`after_step` runs (the post-hook). A step that never runs (GradScaler skipped it) leaves the
    guard pending: drop it before the next step.
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

    def after_step(self) -> None:
        for p in self.missing:
            self.optimizer.state.pop(p, None)
        for p, saved in self.numbers.items():
            self.optimizer.state[p].update(saved)


def skip_step(step: StepRecord) -> StateGuard:
    """Make this optimizer step a no-op for weights and optimizer state; return the guard of its state (to run
    after the step: :meth:`StateGuard.after_step`)."""
    assert step.optimizer is not None
    guard = StateGuard(step.optimizer, step.state_before)
    if step.grads_scaled:
        # Fused + GradScaler: grad=None trips the scaler; non-finite grads make it skip instead.
        F.scale_(step.grads, float("nan"))
        return guard
    # Optimizers skip parameters whose grad is None: no update, no momentum/moment/step change.
    # (Zeroing would still move weights through momentum and weight decay.)
    for p in step.params:
        p.grad = None
    return guard


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


class SlotControl:
    """The mechanisms of one optimizer (see the module docstring), bound with :meth:`track`.

    ``snapshots``: how many snapshots the remedy restores from (0: no store); ``guard``: snapshot each step start
    (a closure optimizer that moves the weights between evaluations, under a remedy that skips).
    """

    def __init__(self) -> None:
        self.optimizer: Optimizer | None = None
        self.lr_scale = 1.0  # the LR multiplier of this optimizer's next updates (checkpointed)
        self.skip_remaining = 0  # steps a remedy asked to skip, still to come (checkpointed)
        self.rollbacks = 0  # snapshots restored (checkpointed)
        self.applied = 0  # updates in the current state's lineage (a restore sets it back: what it undid)
        self._applying = False  # this step's update is counted in ``applied`` (a later bad evaluation takes it back)
        self.windows: list[dict[str, Any]] = []  # the data windows skipped on request (checkpointed)
        self.store: SnapshotStore | None = None
        self.statistics: Statistics = no_statistics
        self.step_calls = 0  # optimizer.step() calls counted by the hooks
        self.in_step = False
        self.seen_call = -1  # the call the engine last saw
        self.state_at_step_start: set[int] = set()
        self.guard = False
        self.after_update: Callable[[], None] | None = None  # run once the running step's update is in
        self.step_bad: Tensor | None = None  # device flag: an evaluation of the running step was bad
        self._lr: StepLRScale | None = None
        self._state_guard: StateGuard | None = None  # the skip of a step not yet run
        self._found_inf_on = False  # found_inf was written on this optimizer by a device skip
        self._start: Snapshot | None = None  # the LBFGS guard's snapshot of the step start
        self._restore_start = False  # put the step start back once the step is over
        self._initial_due = False
        self._label_initial = False
        self._snapshot_label: int | None = None  # a snapshot is due after this step's update, with this label
        self._handles: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ binding
    def track(
        self,
        optimizer: Optimizer,
        *,
        guard: bool,
        snapshots: int,
        on_device: bool,
        statistics: Statistics,
        scales_lr: bool = True,
    ) -> None:
        """Own ``optimizer``'s hooks with the mechanisms the remedy declares (``scales_lr``: the LR scale; the others
        as in the class docstring)."""
        self.untrack()
        self.optimizer, self.guard, self.statistics = optimizer, guard, statistics
        self._start = Snapshot() if guard else None
        self.store = SnapshotStore(snapshots, on_device) if snapshots else None
        # The state training starts (or resumes) from, a restore target from step one: taken when the first step
        # begins, since Lightning restores a resumed optimizer's state after the callbacks are attached.
        self._initial_due = self.store is not None
        # Only a remedy that scales the LR gets the scale's work in every step's hooks.
        self._lr = StepLRScale(optimizer, self.lr_scale, deferred=True, hooks=False) if scales_lr else None
        # Bound methods, not closures: the callback must pickle (ddp_spawn, torch.save of a Trainer) mid-fit too.
        self._handles = (
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
            optimizer.register_state_dict_post_hook(self._state_dict_post),
        )

    def untrack(self) -> None:
        """Remove the hooks, put the scheduler's LR back, take back a device skip and free the snapshots."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.in_step, self._restore_start, self._state_guard = (), False, False, None
        if self._lr is not None:
            self._lr.remove()
            self._lr = None
        # found_inf stays on the optimizer and would skip every later step() made without the engine.
        if self._found_inf_on and self.optimizer is not None and hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf
        self._found_inf_on = False
        if self.store is not None:
            self.store.clear()  # training is over: free the copies (a new fit takes a fresh initial snapshot)

    def abandon(self) -> None:
        """An exception interrupted training, maybe mid-step: put the scheduler's LR back, and the weights and state
        of the step's start when a guarded closure step (LBFGS line search) was left half done."""
        if self._lr is not None:
            self._lr.disarm()
        if self.in_step and self._start is not None and self._start.taken and self.optimizer is not None:
            self._start.restore(self.optimizer)
            self._start.step = -1
        self.in_step = False

    # ------------------------------------------------------------------ the hooks (one owner, one order)
    def _pre(self, optimizer: Optimizer, *_: Any) -> None:
        self._restore_start = False  # the last step's, if it ran
        self.step_calls += 1
        self.in_step = True
        # Closure optimizers (LBFGS) create state before they evaluate the closure that decides a skip.
        self.state_at_step_start = {id(p) for p in optimizer.state}
        if self._start is not None:
            self._start.take(optimizer, self.step_calls)
        if self._initial_due and self.store is not None:  # labelled by the engine once the global step is known
            self._initial_due, self._label_initial = False, True
            self.store.take(optimizer, -1, self.statistics, self.applied)
        if self._lr is not None:
            self._lr._pre_step(optimizer, (), {})

    def _post(self, optimizer: Optimizer, *_: Any) -> None:
        self.in_step = False
        if self._state_guard is not None:
            self._state_guard.after_step()
            self._state_guard = None
        if self._lr is not None:
            self._lr._post_step(optimizer, (), {})
        if self.after_update is not None:
            after, self.after_update = self.after_update, None
            after()
        if self._snapshot_label is not None and self.store is not None:
            label, self._snapshot_label = self._snapshot_label, None
            self.store.take(optimizer, label, self.statistics, self.applied)
        if self._restore_start and self._start is not None and self._start.taken:
            self._restore_start = False
            self._start.restore(optimizer)
            self._start.step = -1  # restored once

    def _state_dict_post(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict if self._lr is None else self._lr._unscaled_state_dict(optimizer, state_dict)

    # ------------------------------------------------------------------ per step
    def reevaluation(self) -> bool:
        """Is this engine step a further closure evaluation within the same ``optimizer.step()``?"""
        again = self.in_step and self.seen_call == self.step_calls
        self.seen_call = self.step_calls
        return again

    def state_before(self) -> set[int] | None:
        """Parameters with optimizer state when the running ``step()`` began; None outside ``step()``."""
        return self.state_at_step_start if self.in_step else None

    def take_requested_skip(self) -> bool:
        """Is this step one a remedy asked to skip? (Counts it off.)"""
        if self.skip_remaining <= 0:
            return False
        self.skip_remaining -= 1
        return True

    def begin(self, step: StepRecord) -> None:
        """Before any decision: drop the guard of a skip that never ran, arm the LR scale, follow the parameters."""
        self._state_guard = None  # the last skipped step never ran (GradScaler skipped it): nothing to undo
        if self._lr is not None:  # this step's update uses the scale in force before it
            self._lr.scale = self.lr_scale
            if self.lr_scale != 1.0:
                self._lr.arm()
        if self.store is not None and not step.reevaluation:
            self._follow_parameters(step)

    def _follow_parameters(self, step: StepRecord) -> None:
        """Before this step's update: label the initial snapshot, take it (a plain loop: ``step()`` has not begun),
        or take a fresh one when the parameters changed since the newest (a param group added by an unfreeze): a
        restore must cover every parameter the optimizer steps now."""
        assert self.store is not None and self.optimizer is not None
        if self._label_initial:
            self._label_initial = False
            self.store.relabel_newest(step.global_step)
        if self._initial_due or not self.store.holds(self.optimizer):
            self._initial_due = False
            self.store.take(self.optimizer, step.global_step, self.statistics, self.applied)

    def skip_on_device(self, step: StepRecord, on: bool) -> None:
        """Skip ``step.skip`` steps on the device (fused optimizers, no host read) when ``on``; else make sure an
        earlier device decision does not carry over to a step decided on the host."""
        optimizer = step.optimizer
        if not on:
            if self._found_inf_on and optimizer is not None:
                optimizer.found_inf = torch.zeros_like(optimizer.found_inf)  # type: ignore[attr-defined]
            return
        if step.scaler is None:
            # torch's fused Adam/AdamW/SGD skip the whole update (and undo the step count) when found_inf == 1.
            optimizer.found_inf = step.skip.to(torch.float32)  # type: ignore[union-attr]
            self._found_inf_on = True
        else:
            # GradScaler overwrites found_inf in scaler.step(); it skips on non-finite gradients, so make the
            # gradients non-finite when the step is to be skipped for another reason (loss, input, spike).
            F.scale_(step.grads, torch.where(step.skip, float("nan"), 1.0))

    def carry_out(self, step: StepRecord, request: Request, skipped: bool) -> None:
        """Do what the remedy asked, in this order: restore, skip, LR, the steps to skip, a snapshot after the step.
        ``skipped``: the step is not applied (it was bad or requested), whatever the remedy asked."""
        if request.restore is not None:
            self._restore(step, request.restore)
        if request.skip:
            self._state_guard = skip_step(step)
        if (skipped or request.skip) and self.guard:
            self._restore_start = self.in_step  # LBFGS: undo the moves of the evaluations before this one
        applying = not (skipped or request.skip) and request.restore is None
        if not step.reevaluation:
            self.applied += int(applying)
            self._applying = applying
        elif self._applying and not applying:  # a later evaluation of a closure step is bad: the step is skipped
            self.applied -= 1
            self._applying = False
        if request.lr_factor != 1.0:
            self.lr_scale *= request.lr_factor
        if request.restore is not None:
            self.windows[-1]["lr_scale"] = self.lr_scale  # what the rollback left (the report's and the marker's)
        if request.skip_steps:
            self.skip_remaining = max(self.skip_remaining, int(request.skip_steps))
            if request.restore is None:
                self._open_window(step, None)
        if skipped or request.skip:  # a later bad evaluation (LBFGS) takes back a snapshot asked for the step
            self._snapshot_label = None
        elif request.snapshot and self.store is not None and not step.reevaluation:
            self._snapshot_label = step.global_step + 1  # the state after this step's update
        if step.requested and self.windows:
            self.windows[-1]["skipped"][1] = step.global_step  # the steps actually skipped

    def _restore(self, step: StepRecord, age: int) -> None:
        assert self.store is not None and self.optimizer is not None, "restore needs a remedy that keeps snapshots"
        snap = self.store.restore(self.optimizer, self.statistics, age)
        self.rollbacks += 1
        self._open_window(step, snap.step)
        self.windows[-1]["undone"] = self.applied - snap.applied  # the updates the restore threw away
        self.applied, self._applying = snap.applied, False
        if self.in_step and self._start is not None:  # a guarded closure step ends in the restored state
            self._start.take(self.optimizer, self.step_calls)

    def _open_window(self, step: StepRecord, snapshot_step: int | None) -> None:
        window: dict[str, Any] = {"global_step": step.global_step, "epoch": step.epoch, "batch_idx": step.batch_idx}
        if snapshot_step is not None:
            window["snapshot_step"] = snapshot_step
        window["skipped"] = [step.global_step, step.global_step]  # extended as the window's steps are skipped
        self.windows.append(window)

    def run_end(self, i: int, counts: dict[str, int], global_step: int, epoch: int, failed: bool) -> RunEnd:
        """What the remedy is told when training ends (:meth:`Remedy.finish`)."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        base_lr = groups[0].get("initial_lr", groups[0].get("lr")) if groups else None
        return RunEnd(
            i, counts, global_step, epoch, failed, self.rollbacks, copy_windows(self.windows), self.lr_scale, base_lr
        )

    def snapshot_labels(self) -> tuple[int, ...]:
        return tuple(self.store.labels()) if self.store is not None else ()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "skip_remaining": self.skip_remaining,
            "rollbacks": self.rollbacks,
            "windows": copy_windows(self.windows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.skip_remaining = int(state.get("skip_remaining", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.windows = copy_windows(state.get("windows", []))


def copy_windows(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Skipped windows copied deep enough that the copy's ``skipped`` lists do not grow with the originals."""
    return [{**w, "skipped": list(w["skipped"])} for w in windows]
