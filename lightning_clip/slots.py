"""One optimizer's place in the engine, split by job.

* :class:`SlotUnits` -- what persists and is checkpointed: the counters, this optimizer's copies of the clip rule and
  the remedy, the spike statistics, and the steps a remedy asked to skip.
* :class:`StepTracker` -- hooks on ``optimizer.step()``: tells a re-evaluated closure (LBFGS) from a new step, and
  which parameters had optimizer state when the step began.
* :class:`Layout` -- the cached foreach groups and names of the parameters stepped last time (and their layers, for
  logging steps): the same parameters step every time, so the Python loops over them run once.
* :class:`UpdateBuffers` -- the weights before a logging step's update, for its update-to-weight ratio: buffers kept
  between logging steps on the CPU, so the copy costs no fresh allocation.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip.counters import StepCounters
from lightning_clip.detect import SpikeDetector
from lightning_clip.health import VanishingMonitor, layer_of
from lightning_clip.remedies import Remedy
from lightning_clip.rules import ClipRule
from lightning_clip.snapshot import Snapshot
from lightning_clip.state import DeviceState

_DTYPE, _DEVICE, _LAYOUT = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("layout")
_SHAPE = operator.attrgetter("shape")


@dataclass
class SlotUnits:
    """The persistent state of one optimizer: its own copies of the units, saved flat in its checkpoint entry."""

    counters: StepCounters
    rule: ClipRule
    remedy: Remedy
    spikes: SpikeDetector | None = None  # total-norm spikes (skip_spikes)
    loss_spikes: SpikeDetector | None = None  # loss spikes (loss_spikes)
    vanishing: VanishingMonitor | None = None  # vanishing layers (vanishing_ratio)
    skip_remaining: int = 0  # steps a remedy asked the loop to skip (Request.skip_steps), still to come
    # the last applied update's ||dW|| / ||W|| per layer (device), measured after a logging step's update
    update_ratios: tuple[list[str], Tensor] | None = None

    @classmethod
    def copies_of(
        cls,
        rule: ClipRule,
        remedy: Remedy,
        spikes: SpikeDetector | None,
        loss_spikes: SpikeDetector | None,
        vanishing: VanishingMonitor | None = None,
    ) -> SlotUnits:
        return cls(StepCounters(), *copy.deepcopy((rule, remedy, spikes, loss_spikes, vanishing)))

    def statistics(self) -> list[DeviceState]:
        """The device statistics of this optimizer's units (the rule's, the spike histories), as a snapshot
        keeps them. Looked up on each call: loading a checkpoint may replace them."""
        units = (self.rule, self.spikes, self.loss_spikes)
        return [v for unit in units if unit is not None for v in vars(unit).values() if isinstance(v, DeviceState)]

    def take_requested_skip(self) -> bool:
        """Is this step one a remedy asked to skip? (Counts it off.)"""
        if self.skip_remaining <= 0:
            return False
        self.skip_remaining -= 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.counters.export(),
            "lr_scale": self.remedy.lr_scale,
            **self.remedy.state_dict(),
            "skip_remaining": self.skip_remaining,
            "rule": self.rule.state_dict(),
            "spikes": self.spikes.state_dict() if self.spikes is not None else {},
            **({"loss_spikes": self.loss_spikes.state_dict()} if self.loss_spikes is not None else {}),
            **({"vanishing": self.vanishing.state_dict()} if self.vanishing is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the flat entries of 0.1.0 and 0.2.0.dev0 too)."""
        self.counters = StepCounters.restore(state)
        self.remedy.load_state_dict(state)  # a remedy without an LR scale ignores a saved one
        self.skip_remaining = int(state.get("skip_remaining", 0))
        if state.get("rule"):
            self.rule.load_state_dict(state["rule"])
        if state.get("spikes") and self.spikes is not None:
            self.spikes.load_state_dict(state["spikes"])
        if state.get("loss_spikes") and self.loss_spikes is not None:
            self.loss_spikes.load_state_dict(state["loss_spikes"])
        if state.get("vanishing") and self.vanishing is not None:
            self.vanishing.load_state_dict(state["vanishing"])


class StepTracker:
    """Watch ``optimizer.step()``: a second engine step inside one call is a re-evaluated closure (LBFGS).

    With ``guard`` (a closure optimizer that moves the weights between evaluations, under a remedy that skips) it
    snapshots the weights and the optimizer state at each step start, and :meth:`restore_after_step` puts them
    back once the step is over: a bad evaluation anywhere in the step makes the whole step a no-op.
    """

    def __init__(self) -> None:
        self.optimizer: Optimizer | None = None
        self.step_calls = 0  # optimizer.step() calls counted by the hooks
        self.in_step = False
        self.seen_call = -1  # the call the engine last saw
        self.handles: tuple[Any, ...] = ()
        self.state_at_step_start: set[int] = set()
        self.guard = False
        self.after_update: Callable[[], None] | None = None  # run once the running step's update is in
        self.step_bad: Tensor | None = None  # device flag: an evaluation of the running step was bad
        self._start: Snapshot | None = None
        self._restore: Any = None  # the one-shot post-hook of a pending restore

    def track(self, optimizer: Optimizer, guard: bool = False) -> None:
        self.untrack()
        self.optimizer, self.guard = optimizer, guard
        self._start = Snapshot() if guard else None
        # Bound methods, not closures: the callback must pickle (ddp_spawn, torch.save of a Trainer) mid-fit too.
        self.handles = (optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post))

    def _pre(self, optimizer: Optimizer, *_: Any) -> None:
        self._drop_restore()  # the last step's, once it ran (not from inside the post-hooks: they are iterated)
        self.step_calls += 1
        self.in_step = True
        # Closure optimizers (LBFGS) create state before they evaluate the closure that decides a skip.
        self.state_at_step_start = {id(p) for p in optimizer.state}
        if self._start is not None:
            self._start.take(optimizer, self.step_calls)

    def _post(self, *_: Any) -> None:
        self.in_step = False
        if self.after_update is not None:
            after, self.after_update = self.after_update, None
            after()

    def restore_after_step(self) -> None:
        """Undo the running step once it ends (registered now, so after any hook a remedy added for it)."""
        if self._restore is None and self.in_step and self.optimizer is not None:
            self._restore = self.optimizer.register_step_post_hook(self._restore_start)

    def _restore_start(self, optimizer: Optimizer, *_: Any) -> None:
        if self._start is not None and self._start.taken:
            self._start.restore(optimizer)
            self._start.step = -1  # restored once

    def restart_from_here(self) -> None:
        """The state was restored mid-step (a rollback): the running step, if guarded, ends in this state."""
        if self.in_step and self._start is not None and self.optimizer is not None:
            self._start.take(self.optimizer, self.step_calls)

    def abandon(self) -> None:
        """An exception left ``step()`` half done (torch's strong-Wolfe line search fails on a NaN loss): put the
        weights and the state of the step's start back."""
        if self.in_step and self._start is not None and self._start.taken and self.optimizer is not None:
            self._start.restore(self.optimizer)
            self._start.step = -1
        self.in_step = False

    def _drop_restore(self) -> None:
        if self._restore is not None:
            self._restore.remove()
            self._restore = None

    def untrack(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._drop_restore()
        self.handles, self.in_step = (), False

    def reevaluation(self) -> bool:
        """Is this engine step a further closure evaluation within the same ``optimizer.step()``?"""
        again = self.in_step and self.seen_call == self.step_calls
        self.seen_call = self.step_calls
        return again

    def state_before(self) -> set[int] | None:
        """Parameters with optimizer state when the running ``step()`` began; None outside ``step()``."""
        return self.state_at_step_start if self.in_step else None


@dataclass
class Layout:
    """Foreach groups and names of the parameters stepped last time, keyed by their ids, dtypes, devices, layouts."""

    key: tuple[Any, ...] = ()
    groups: list[F.Group] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    dtensor: bool = False
    layer_names: list[str] = field(default_factory=list)  # the layers of ``names`` (logging steps), in order
    _layer_index: dict[torch.device, Tensor] = field(default_factory=dict)  # per tensor: its layer's position
    _weight_groups: list[F.Group] | None = None  # the foreach groups of the (dense, local) weights

    def update(self, params: list[Tensor], grads: list[Tensor], names: dict[int, str]) -> Layout:
        key = (
            tuple(map(id, params)),
            tuple(map(type, grads)),
            tuple(map(_DTYPE, grads)),
            tuple(map(_DEVICE, grads)),
            tuple(map(_LAYOUT, grads)),  # a gradient may turn sparse (or back) between steps
        )
        if key != self.key:
            self.names = [names.get(id(p), f"param{i}") for i, p in enumerate(params)]
            self.dtensor = any(spec is not None for spec in F.local_shards(grads, self.names)[1])
            self.key, self.groups = key, F.plan(F.local_shards(grads)[0] if self.dtensor else grads)
            self.layer_names, self._layer_index, self._weight_groups = [], {}, None
        return self

    def layers(self, device: torch.device) -> tuple[list[str], Tensor]:
        """The layers (:func:`~lightning_clip.health.layer_of` the names, in order of first appearance) and, on
        ``device``, each tensor's layer position: what a scatter of per-tensor norms into layer norms takes."""
        if device not in self._layer_index:
            index: dict[str, int] = {}
            positions = [index.setdefault(layer_of(name), len(index)) for name in self.names]
            self.layer_names = list(index)
            self._layer_index[device] = torch.tensor(positions, dtype=torch.long, device=device)
        return self.layer_names, self._layer_index[device]

    def weight_groups(self, weights: list[Tensor]) -> list[F.Group]:
        """:func:`~lightning_clip.functional.plan` of the weights of these parameters (dense even where a gradient
        is sparse), computed once per layout."""
        if self._weight_groups is None:
            self._weight_groups = F.plan(weights)
        return self._weight_groups


class UpdateBuffers:
    """The weights before a logging step's update, for its update-to-weight ratio :math:`\\|W_{before} - W_{after}\\|`.

    On the CPU the buffers are allocated once per layout and kept between logging steps (one copy of the weights,
    :meth:`nbytes`): a fresh copy there pays page faults on every measured logging step. On other devices the caching
    allocator already reuses freed blocks, so the copy is made per logging step and freed once measured, and no
    memory is held between logging steps. ``logging_steps`` counts the calls of :meth:`due`.
    """

    def __init__(self) -> None:
        self.before: list[Tensor] = []
        self.key: tuple[Any, ...] = ()
        self.shapes: tuple[Any, ...] = ()
        self.logging_steps = 0

    def due(self, every: int | None) -> bool:
        """Whether this logging step's update is measured: the 1st, then every ``every``-th (None: never)."""
        if every is None:
            self.clear()
            return False
        self.logging_steps += 1
        return (self.logging_steps - 1) % every == 0

    def take(self, weights: list[Tensor], key: tuple[Any, ...]) -> None:
        """Copy ``weights`` (the parameters of layout ``key``) into the buffers, allocating them on a new layout."""
        shapes = tuple(map(_SHAPE, weights))  # a parameter's data may be swapped for another shape in place
        if key != self.key or shapes != self.shapes or len(self.before) != len(weights):
            self.before = [torch.empty_like(w) for w in weights]
            self.key, self.shapes = key, shapes
        torch._foreach_copy_(self.before, weights)

    def update(self, weights: list[Tensor]) -> list[Tensor]:
        """``before - after`` per tensor, in the buffers themselves (their norms are the update's)."""
        torch._foreach_sub_(self.before, weights)
        return self.before

    def release(self) -> None:
        """After a measure: off the CPU, give the copy back to the caching allocator."""
        if self.before and self.before[0].device.type != "cpu":
            self.clear()

    def clear(self) -> None:
        self.before, self.key, self.shapes = [], (), ()

    def nbytes(self) -> int:
        """The memory held by the buffers now."""
        return sum(t.numel() * t.element_size() for t in self.before)


@dataclass
class Slot:
    """One optimizer: :class:`SlotUnits` (persistent), :class:`StepTracker` (hooks), :class:`Layout` (cache),
    :class:`UpdateBuffers` (the update ratio's copy of the weights)."""

    units: SlotUnits
    tracker: StepTracker = field(default_factory=StepTracker)
    layout: Layout = field(default_factory=Layout)
    updates: UpdateBuffers = field(default_factory=UpdateBuffers)

    @property
    def optimizer(self) -> Optimizer | None:
        return self.tracker.optimizer
