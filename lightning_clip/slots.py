"""One optimizer's place in the engine, split by job.

* :class:`SlotUnits` -- this optimizer's units: the counters, its copies of the clip rule and the remedy, the spike
  detectors and the vanishing monitor.
* :class:`~lightning_clip.control.SlotControl` -- the mechanisms a remedy's requests are carried out with (skip, LR
  scale, snapshots, the steps to skip) and the one owner of the optimizer's hooks.
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
from lightning_clip.control import SlotControl
from lightning_clip.counters import StepCounters
from lightning_clip.detect import BadStepDetector, SpikeDetector, agree_any
from lightning_clip.health import VanishingMonitor, layer_of
from lightning_clip.record import SpikeCheck, StepRecord
from lightning_clip.remedies import Remedy
from lightning_clip.rules import ClipRule
from lightning_clip.state import DeviceState

_DTYPE, _DEVICE, _LAYOUT = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("layout")
_SHAPE = operator.attrgetter("shape")


@dataclass
class SlotUnits:
    """One optimizer's own copies of the units, with their statistics and state (each its own checkpoint section)."""

    counters: StepCounters
    rule: ClipRule
    remedy: Remedy
    spikes: SpikeDetector | None = None  # total-norm spikes (skip_spikes)
    loss_spikes: SpikeDetector | None = None  # loss spikes (loss_spikes)
    vanishing: VanishingMonitor | None = None  # vanishing layers (vanishing_ratio)
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

    def rule_measures(self, step: StepRecord) -> bool:
        """Whether the rule measures this step itself: it reads every element anyway (``measures_finite``, value
        mode) and nothing else needs the p-norm (no logging, no spike history, whole unscaled gradients)."""
        return (
            self.rule.measures_finite
            and not step.log
            and self.spikes is None
            and not step.sharded
            and step.inv_scale is None
        )

    def flag_spikes(self, step: StepRecord) -> None:
        """The spike detectors' verdict on this step (``spike``, with its ``spike_checks``): ``skip_spikes`` on the
        total norm, ``loss_spikes`` on the loss (agreed across ranks); only where ``update_statistics``."""
        if self.spikes is not None and step.update_statistics:  # the total is the same on every rank
            step.spike = self.spikes.flag(step.total, step.bad | step.overflow)
            step.spike_checks.append(SpikeCheck("gradient norm", step.total, self.spikes.threshold, step.spike))
        if self.loss_spikes is not None and step.update_statistics and step.loss is not None:
            loss_spike = self.loss_spikes.flag(step.loss, step.bad | step.overflow)
            if step.distributed:  # each rank has its own loss: the ranks skip together
                loss_spike = agree_any(loss_spike)
            step.spike_checks.append(SpikeCheck("loss", step.loss, self.loss_spikes.threshold, loss_spike))
            step.spike = loss_spike if step.spike is None else step.spike | loss_spike

    def statistics(self) -> list[DeviceState]:
        """The device statistics of this optimizer's units (the rule's, the spike histories), as a snapshot
        keeps them. Looked up on each call: loading a checkpoint may replace them."""
        units = (self.rule, self.spikes, self.loss_spikes)
        return [v for unit in units if unit is not None for v in vars(unit).values() if isinstance(v, DeviceState)]


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
    """One optimizer: :class:`SlotUnits`, :class:`~lightning_clip.control.SlotControl` (mechanisms, hooks),
    :class:`Layout` (cache) and :class:`UpdateBuffers` (the update ratio's copy of the weights). Its checkpoint entry
    (format 3) has one section per unit; no unit reads another's."""

    units: SlotUnits
    control: SlotControl = field(default_factory=SlotControl)
    layout: Layout = field(default_factory=Layout)
    updates: UpdateBuffers = field(default_factory=UpdateBuffers)

    @property
    def optimizer(self) -> Optimizer | None:
        return self.control.optimizer

    def bind(self, optimizer: Optimizer) -> None:
        """Track ``optimizer`` with the mechanisms this slot's remedy declares. A closure optimizer that moves the
        weights between evaluations (LBFGS) is snapshotted at each step start under a remedy that skips: a bad
        evaluation anywhere in the step restores it, so the step is a no-op."""
        remedy = self.units.remedy
        self.control.track(
            optimizer,
            guard=remedy.skips_steps and _moves_between_evaluations(optimizer),
            snapshots=remedy.keeps_snapshots,
            on_device=remedy.snapshot_on_device,
            statistics=self.units.statistics,
            scales_lr=remedy.scales_lr,
        )

    def record(
        self,
        i: int,
        optimizer: Optimizer,
        names: dict[int, str],
        detector: BadStepDetector,
        all_reduce: Callable[[Tensor, str], Tensor] | None,
        norm_type: float,
        eps: float,
        warn: Callable[[str], None],
    ) -> StepRecord | None:
        """The record of this optimizer's step ``i`` (None when no parameter has a gradient): the parameters with a
        gradient (``names`` by id), their gradients (the local shards of DTensor gradients), the cached layout, the
        control's view of the step and the evidence of ``detector``; ``all_reduce``: the collective of flat shards
        (FSDP1), if any. The flags are placeholders until measured."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads: list[Tensor] = [p.grad for p in params]
        counters = self.units.counters.on(grads[0].device)
        layout = self.layout.update(params, grads, names)
        specs: list[F.ShardSpec | None] = []
        if layout.dtensor:  # DTensor gradients (FSDP2, tensor parallel): the math runs on the local shards, in place
            grads, specs = F.local_shards(grads, layout.names)
        control, remedy = self.control, self.units.remedy
        reevaluation = control.reevaluation()
        if reevaluation and remedy.skips_steps and not control.guard:
            _refuse_moving_closure(optimizer, remedy)
        requested = control.take_requested_skip() if not reevaluation else False
        false = counters.false
        return StepRecord(
            params=params,
            grads=grads,
            names=layout.names,
            optimizer=optimizer,
            optimizer_idx=i,
            groups=layout.groups,
            norm_type=norm_type,
            eps=eps,
            sharded=layout.dtensor or all_reduce is not None,
            update_statistics=not (reevaluation or requested),
            reevaluation=reevaluation,
            state_before=control.state_before(),
            batch_idx=detector.last_batch_idx(),
            specs=specs,
            all_reduce=all_reduce,
            total=false,  # placeholders until measured: no allocation per step
            finite=false,
            bad=false,
            overflow=false,
            clipped=false,
            requested=requested,
            counters=counters,
            loss_nonfinite=detector.loss_nonfinite,
            input_problems=detector.input_problems,
            warn=warn,
        )

    def state_dict(self) -> dict[str, Any]:
        units = self.units
        pairs = (("spikes", units.spikes), ("loss_spikes", units.loss_spikes))
        detectors = {name: d.state_dict() for name, d in pairs if d is not None}
        return {
            "counters": units.counters.export(),
            "control": self.control.state_dict(),
            "remedy": units.remedy.state_dict(),
            "rule": units.rule.state_dict(),
            "detectors": {name: state for name, state in detectors.items() if state},
            "reporter": {"vanishing": units.vanishing.state_dict()} if units.vanishing is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, or an optimizer's flat entry of 0.1.0 / 0.2.0.dev0 (``version`` 1 and 2)."""
        if "counters" not in state:
            state = sections_of_flat_entry(state)
        units = self.units
        units.counters = StepCounters.restore(state["counters"])
        self.control.load_state_dict(state.get("control", {}))
        if not units.remedy.scales_lr:  # resumed under a policy that keeps the scheduler's LR (skip after halve_lr)
            self.control.lr_scale = 1.0
        units.remedy.load_state_dict(state.get("remedy", {}))
        if state.get("rule"):
            units.rule.load_state_dict(state["rule"])
        detectors = state.get("detectors", {})
        for name, detector in (("spikes", units.spikes), ("loss_spikes", units.loss_spikes)):
            if detectors.get(name) and detector is not None:
                detector.load_state_dict(detectors[name])
        vanishing = state.get("reporter", {}).get("vanishing")
        if vanishing and units.vanishing is not None:
            units.vanishing.load_state_dict(vanishing)


def _moves_between_evaluations(optimizer: Optimizer) -> bool:
    """A closure optimizer that evaluates several times per step and moves the weights in between (LBFGS)."""
    defaults = optimizer.defaults
    return int(defaults.get("max_iter", 1) or 1) > 1 or defaults.get("line_search_fn") is not None


def _refuse_moving_closure(optimizer: Optimizer, remedy: Remedy) -> None:
    raise ValueError(
        f"{type(optimizer).__name__} evaluated its closure more than once in one step() and moves the weights "
        "between evaluations, but declares neither `max_iter` nor `line_search_fn` in its defaults (as LBFGS does, "
        f"which is snapshotted at each step start): nan_policy={remedy.policy!r} cannot undo a move made before a "
        "bad evaluation. Use nan_policy='raise' or 'ignore' with it, or declare `max_iter` in its defaults."
    )


# The keys of the flat entries of 0.1.0 and 0.2.0.dev0 that belong to each section of format 3.
_FLAT_CONTROL = ("lr_scale", "skip_remaining", "rollbacks", "windows")
_FLAT_REMEDY = ("healthy_steps", "bad_run", "unhealthy", "clean")


def sections_of_flat_entry(flat: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's flat checkpoint entry (``version`` 1 and 2) split into the sections of format 3.

    What the remedies kept nowhere is derived: a skip's reported bad steps from ``nonfinite_steps``, a rollback's run of
    bad steps from ``nonfinite_streak``."""
    streak = flat.get("nonfinite_streak", 0)
    remedy = {"reported_nonfinite": flat.get("nonfinite_steps", 0), "bad_run": streak, "unhealthy": streak}
    remedy.update({k: flat[k] for k in _FLAT_REMEDY if k in flat})
    return {
        "counters": {k: v for k, v in flat.items() if isinstance(v, int) and k not in _FLAT_REMEDY + _FLAT_CONTROL},
        "control": {k: flat[k] for k in _FLAT_CONTROL if k in flat},
        "remedy": remedy,
        "rule": flat.get("rule", {}),
        "detectors": {k: flat[k] for k in ("spikes", "loss_spikes") if flat.get(k)},
        "reporter": {"vanishing": flat["vanishing"]} if flat.get("vanishing") else {},
    }
