"""The step pipeline: measure, detect, clip, count, remedy, report -- for Lightning and for plain loops alike.

One optimizer step, on the accumulated (under ``16-mixed``: unscaled) gradient, before the update, as stages over
one :class:`~lightning_clip.record.StepRecord`:

=========  ==========================================  ============================================
stage      what                                        where
=========  ==========================================  ============================================
layout     parameters, gradients, names, shards        :mod:`lightning_clip.slots`
measure    per-tensor norms, the total norm            :mod:`lightning_clip.functional`
detect     bad-step flag: norm, loss, inputs, ranks    :mod:`lightning_clip.detect`
clip       the rule clips in place; spikes flagged     :mod:`lightning_clip.rules`
count      device-side counters                        :mod:`lightning_clip.counters`
remedy     skip / halve_lr / raise / ignore            :mod:`lightning_clip.remedies`
report     one host transfer, then the metrics dict    :mod:`lightning_clip.record`, :mod:`lightning_clip.reporter`
=========  ==========================================  ============================================

Nothing is read back to the host unless the remedy asks for it (:meth:`Remedy.needs_read`) or the step logs;
then everything comes back in one transfer, read by name. Each optimizer has its own copies of the rule and the
remedy (:mod:`lightning_clip.slots`); the engine never asks which rule or remedy it holds, only what they declare.

Example (a plain PyTorch loop)::

    >>> import torch
    >>> from lightning_clip.engine import ClipEngine
    >>> from lightning_clip.rules import NormClip
    >>> from lightning_clip.remedies import HalveLR
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> engine = ClipEngine(NormClip(max_norm=1.0), HalveLR())
    >>> engine.attach([opt], model.named_parameters())
    >>> for step in range(3):
    ...     loss = model(torch.randn(8, 4)).pow(2).mean() * (float("nan") if step == 1 else 1.0)
    ...     engine.observe_loss(loss)
    ...     loss.backward()
    ...     metrics = engine.step(opt, log=True)
    ...     opt.step()
    ...     opt.zero_grad()
    >>> engine.counters["skipped_steps"], engine.lr_scales
    (1, [0.5])
    >>> sorted(k for k in metrics if k.startswith("grad_norm/"))
    ['grad_norm/total', 'grad_norm/total_clipped']
"""

from __future__ import annotations

import math
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip import metrics as M
from lightning_clip.control import copy_windows, fused_skip_is_safe
from lightning_clip.counters import COUNTERS
from lightning_clip.detect import BadStepDetector, SpikeDetector, agree_any, leaf_parameters
from lightning_clip.distributed import flat_shard_all_reduce, join_without_gradients, param_ids, total_norm_reducer
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.health import VanishingEvent, VanishingMonitor
from lightning_clip.record import HostRead, Request, StepRead, StepRecord
from lightning_clip.remedies import Remedy, build_remedy
from lightning_clip.reporter import LoggedValues, Reporter
from lightning_clip.rules import ClipRule, NormClip
from lightning_clip.slots import Slot, SlotUnits
from lightning_clip.validation import check_choice, check_count, check_finite, check_positive

LOG_NORMS = ("layer", "parameter", "total", "none")
_UNSET: Any = object()  # configure(): a setting not passed


class _OfReporter:
    """An engine attribute the engine's :class:`~lightning_clip.reporter.Reporter` holds: one copy, read and set
    through the engine (``engine.log_norms``) as before the reporter had it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: Any, owner: Any = None) -> Any:
        return self if engine is None else getattr(engine.reporter, self.name)

    def __set__(self, engine: Any, value: Any) -> None:
        setattr(engine.reporter, self.name, value)


def _same_optimizer(a: Any, b: Any) -> bool:
    # Lightning wraps optimizers (LightningOptimizer); compare the torch optimizer underneath.
    return a is b or getattr(a, "_optimizer", None) is b or getattr(b, "_optimizer", None) is a


class ClipEngine:
    """Clip gradients, count and log their norms, and apply a NaN policy, once per optimizer step.

    Args:
        rule: how to clip (:mod:`lightning_clip.rules`); default ``NormClip(max_norm=1.0)``.
        remedy: what to do with a NaN/Inf step (:mod:`lightning_clip.remedies`); default ``Skip()``.
        norm_type: ``p`` of the norms (any ``p > 0`` or ``inf``), for clipping and logging.
        eps: added to the total norm before dividing (as in ``torch.nn.utils.clip_grad_norm_``).
        check_inputs: check each batch passed to :meth:`observe_batch` for NaN/Inf.
        log_norms: ``"layer"``, ``"parameter"``, ``"total"`` or ``"none"``: what :meth:`step` returns when logging.
        spike_skip: a :class:`~lightning_clip.detect.SpikeDetector`: skip (not clip) a step whose total norm is an
            extreme outlier, through the remedy's skip (needs a remedy that skips steps); counted in ``spike_skips``.
        name: tells this engine's metrics apart from another's: every tag gets the suffix ``/<name>``.
        loss_spike: a :class:`~lightning_clip.detect.SpikeDetector` on the step's loss (the mean of its
            micro-batches' losses passed to :meth:`observe_loss`): a loss spike is skipped like a norm spike.
        vanishing: a :class:`~lightning_clip.health.VanishingMonitor`: on logging steps, each layer's
            ``||grad W|| / ||W||`` (the weight norms come in the same transfer) and a warning naming the layers that
            stay below its ratio; logged as ``grad_health/vanishing_layers`` (and per layer, ``log_norms="layer"``).
        update_ratio_every: with ``vanishing`` and ``log_norms="layer"``, measure each layer's update-to-weight
            ratio ``||dW|| / ||W||`` on the 1st and then every ``update_ratio_every``-th logging step (None: never);
            the weights before the update are copied into buffers kept between logging steps on the CPU (one copy
            of the parameters; :class:`~lightning_clip.slots.UpdateBuffers`).

    In a loop: :meth:`attach` the optimizers once, then per optimizer step call :meth:`observe_loss` (and
    :meth:`observe_batch`) for each micro-batch, :meth:`step` after the last backward and before
    ``optimizer.step()``, and :meth:`finish` after the last step. Save :meth:`state_dict` with the checkpoint.
    """

    norm_type: float  # set by configure, as eps
    eps: float
    # The reporter's settings (``configure`` sets the live ones), read and set here as the engine's own.
    log_norms = _OfReporter()
    update_ratio_every = _OfReporter()
    name = _OfReporter()  # tags get the suffix /<name>
    vanishing = _OfReporter()
    spike_top_k = _OfReporter()  # layers named when a logged step holds a spike

    def __init__(
        self,
        rule: ClipRule | None = None,
        remedy: Remedy | None = None,
        *,
        norm_type: float = 2.0,
        eps: float = F.EPS,
        check_inputs: bool = False,
        log_norms: str = "layer",
        spike_skip: SpikeDetector | None = None,
        name: str | None = None,
        loss_spike: SpikeDetector | None = None,
        vanishing: VanishingMonitor | None = None,
        update_ratio_every: int | None = 4,
    ) -> None:
        M.check_instance_name(name)
        self.rule = rule if rule is not None else NormClip()
        self.remedy = remedy if remedy is not None else build_remedy("skip")
        _check_units(self.rule, self.remedy, spike_skip, loss_spike)
        # Prototypes: each optimizer gets its own copies (SlotUnits), with their own statistics and state.
        self.spike_skip = spike_skip
        self.loss_spike = loss_spike
        self.reporter = Reporter(name=name, vanishing=vanishing)  # logging steps: per-layer norms, health, spikes
        self.detector = BadStepDetector(check_inputs, check_loss=self.remedy.checks_loss)
        self.detector.keep(loss_spike is not None, self.remedy.reads_loss)
        self._slots: list[Slot] = []
        self._names: dict[int, str] = {}
        self.configure(
            norm_type=norm_type,
            eps=eps,
            log_norms=log_norms,
            check_inputs=check_inputs,
            update_ratio_every=update_ratio_every,
        )
        self.warn: Callable[[str], None] = warn_at_caller

    # ------------------------------------------------------------------ settings
    def configure(
        self,
        *,
        norm_type: Any = _UNSET,
        eps: Any = _UNSET,
        log_norms: Any = _UNSET,
        check_inputs: Any = _UNSET,
        update_ratio_every: Any = _UNSET,
    ) -> None:
        """Set the engine's own settings (those passed), checked as in the constructor; from the next step on."""
        settings = _checked_settings(norm_type, eps, log_norms, check_inputs, update_ratio_every)
        if "check_inputs" in settings:
            self.detector.check_inputs = settings.pop("check_inputs")
        for setting, value in settings.items():  # log_norms, update_ratio_every: the reporter's (_OfReporter)
            setattr(self, setting, value)
        if self.update_ratio_every is None or self.log_norms != "layer":
            for slot in self._slots:  # no update ratio measured any more: its copy of the weights goes
                slot.updates.clear()

    def retune(self, rule: ClipRule | None = None, remedy: Remedy | None = None) -> None:
        """Take the settings (``options``) of a freshly built, hence checked, ``rule`` or ``remedy`` of the same
        kind into the prototype and every optimizer's copy; statistics and state stay."""
        if rule is not None:
            _copy_options(rule, [self.rule, *(slot.units.rule for slot in self._slots)])
        if remedy is not None:
            _copy_options(remedy, [self.remedy, *(slot.units.remedy for slot in self._slots)])
            self.detector.keep(self.loss_spike is not None, self.remedy.reads_loss)

    # ------------------------------------------------------------------ set-up and tear-down
    def attach(
        self, optimizers: Sequence[Optimizer], named_parameters: Iterable[tuple[str, Tensor]] | None = None
    ) -> None:
        """Bind the optimizers (in order: index ``i`` logs with the suffix ``_opt<i>``) and name the parameters.

        Slots follow the list by position: a re-created optimizer takes over the counters, LR scale and statistics
        of the one it replaces; state loaded by :meth:`load_state_dict` is kept, matched by index.
        """
        self.detach()
        if named_parameters is not None:
            self._names = {id(p): name for name, p in named_parameters}
        for slot in self._slots:
            slot.layout.key = ()  # names may have changed
        for i, optimizer in enumerate(optimizers):
            self._slot_at(i).bind(optimizer)
        del self._slots[max(len(optimizers), 1) :]

    def attached_to(self, optimizers: Sequence[Optimizer]) -> bool:
        """Whether the slots are bound to exactly ``optimizers``, in this order (else :meth:`attach` them)."""
        bound = [slot.optimizer for slot in self._slots if slot.optimizer is not None]
        return len(bound) == len(optimizers) and all(map(_same_optimizer, bound, optimizers))

    def detach(self) -> None:
        """Remove every hook from the optimizers (LR scaling, step tracking), restore their LR, free the snapshots."""
        for slot in self._slots:
            slot.control.untrack()

    def on_exception(self) -> None:
        """An exception interrupted training (maybe mid-step): the scheduler's LR goes back, and a guarded closure
        optimizer (LBFGS) interrupted inside ``step()`` gets the weights of the step's start back."""
        for slot in self._slots:
            slot.control.abandon()

    def finish(self, global_step: int | None = None, epoch: int = 0, failed: bool = False) -> None:
        """Training is over: read the counters once and let each remedy report what the sync-free path has not
        (a fused optimizer's skips since the last read: a warning, or ``NonFiniteGradientError`` when the run
        ended on ``max_consecutive_nonfinite`` bad steps or more). ``failed``: an exception ended it; warn only.
        Call it after the last step of a plain loop; the callback calls it at the end of ``fit``."""
        for i, slot in enumerate(self._slots):
            if slot.optimizer is None or slot.units.counters.steps == 0:
                continue
            counts = slot.units.counters.totals()
            step = counts["steps"] if global_step is None else global_step
            request = slot.units.remedy.finish(slot.control.run_end(i, counts, step, epoch, failed))
            if request.warn is not None:
                self.warn(request.warn)
            if request.stop is not None and not failed:
                raise NonFiniteGradientError(*astuple(request.stop))

    def _slot_at(self, i: int) -> Slot:
        while len(self._slots) <= i:
            units = SlotUnits.copies_of(self.rule, self.remedy, self.spike_skip, self.loss_spike, self.vanishing)
            self._slots.append(Slot(units))
        return self._slots[i]

    def _slot_of(self, optimizer: Optimizer) -> tuple[int, Slot]:
        for i, slot in enumerate(self._slots):
            if slot.optimizer is not None and _same_optimizer(slot.optimizer, optimizer):
                return i, slot
        # An optimizer re-created for the same parameters takes over the slot (counters, LR scale, statistics) of
        # the one it replaces; one never attached (a plain loop that skipped attach) is bound in order of first use.
        params = param_ids(optimizer)
        taken = [i for i, s in enumerate(self._slots) if s.optimizer is not None and param_ids(s.optimizer) == params]
        free = [i for i, s in enumerate(self._slots) if s.optimizer is None]
        i = (taken or free or [len(self._slots)])[0]
        slot = self._slot_at(i)
        slot.bind(optimizer)
        return i, slot

    # ------------------------------------------------------------------ per micro-batch
    def observe_batch(self, batch: Any, batch_idx: int = -1) -> None:
        """A micro-batch is about to be used (checked for NaN/Inf when ``check_inputs``)."""
        self.detector.observe_batch(batch, batch_idx)

    def observe_loss(self, loss: Any) -> None:
        """A loss is about to be back-propagated (a NaN/Inf loss makes the next step bad).

        With several optimizers the loss spoils only the steps of the optimizers whose parameters it reaches
        (two backwards before two steps, in manual optimization).
        """
        owners = None
        if len(self._slots) > 1 and isinstance(loss, Tensor) and loss.grad_fn is not None and self.detector.check_loss:
            owners = leaf_parameters(loss)
        self.detector.observe_loss(loss, owners)

    # ------------------------------------------------------------------ per optimizer step
    def step(
        self,
        optimizer: Optimizer,
        *,
        log: bool = False,
        scaler: Any = None,
        sharded: bool | Any | None = None,
        distributed: bool = False,
        read_every: int = 50,
        global_step: int | None = None,
        epoch: int = 0,
    ) -> dict[str, float]:
        """Run the pipeline on ``optimizer``'s gradients, in place. Call it after backward, before the update.

        Args:
            log: return the metrics of this step (costs the one host transfer).
            scaler: the ``GradScaler`` under fp16 (its overflows are told apart from divergence).
            sharded: each rank holds a flat shard of every gradient (FSDP1): the norm is all-reduced over the
                world, or over this process group (FSDP1 HYBRID_SHARD: the shard group). None: detected from the
                parameters (FSDP1 marks them; pass False for NO_SHARD, whose parameters are marked too). DTensor
                gradients (FSDP2, tensor parallel) are always reduced over their own mesh dims.
            distributed: several ranks take this step together: the loss/input flags are agreed.
            read_every: a sync-free remedy reads its counters at least every this many steps.
            global_step, epoch: where the run is, for messages (default: this optimizer's step count).

        Returns the metrics (tag -> value) when ``log``, else an empty dict.
        """
        try:
            i, slot = self._slot_of(optimizer)
            all_reduce = flat_shard_all_reduce(optimizer, sharded, distributed)
            step = self._layout(i, slot, optimizer, all_reduce)
            if step is None:  # no gradient here: join the collectives the other ranks make, in the same order
                join_without_gradients(optimizer, all_reduce, distributed, self.detector, self.norm_type)
                return {}
            step.log, step.scaler, step.read_every, step.epoch = log, scaler, read_every, epoch
            step.global_step = slot.units.counters.steps if global_step is None else global_step
            self._measure(slot, step)
            self._detect(step, distributed)
            self._clip(slot, step)
            self._count(slot, step)
            return self._remedy(i, slot, step)
        finally:
            self.detector.step_done()

    def _layout(
        self, i: int, slot: Slot, optimizer: Optimizer, all_reduce: Callable[[Tensor, str], Tensor] | None
    ) -> StepRecord | None:
        """Stage 1: the record of this step (None when no parameter has a gradient): :meth:`Slot.record
        <lightning_clip.slots.Slot.record>`, with the engine's settings and evidence."""
        step = slot.record(i, optimizer, self._names, self.detector, all_reduce, self.norm_type, self.eps, self.warn)
        if step is not None:
            step.reduce_total = total_norm_reducer(step)
        return step

    def _measure(self, slot: Slot, step: StepRecord) -> None:
        """Stage 2: per-tensor norms and the total, in true units (fused optimizers under fp16 still hold scaled
        gradients here). Skipped when the rule reads every element anyway (value mode) and nothing else needs the
        p-norm this step (no logging, no spike history, whole unscaled gradients): the rule reports finiteness."""
        device = step.grads[0].device
        if step.grads_scaled:
            step.inv_scale = step.scaler._scale.double().reciprocal().float().to(device)
        if slot.units.rule_measures(step):
            step.finite_measured = False
            return
        norms = F.grad_norms(step.grads, self.norm_type, step.groups)
        if step.specs:
            norms, total = F.reduce_sharded_norms(norms, step.specs, self.norm_type)
        else:
            total = F.total_norm(norms, self.norm_type, all_reduce=step.all_reduce)
        total = total.to(device)
        if step.inv_scale is not None:
            total = total * step.inv_scale
        step.norms, step.total, step.finite = norms, total, torch.isfinite(total)

    def _detect(self, step: StepRecord, distributed: bool) -> None:
        """Stage 3: the loss and input evidence (agreed across ranks), then the bad-step flag."""
        if self.detector.active:
            step.data_bad = self.detector.flag(step.device, agree=distributed, params={id(p) for p in step.params})
            step.loss = self.detector.step_loss(step.device, agree=distributed)
        step.distributed = distributed
        if step.finite_measured:
            self._judge(step)

    def _judge(self, step: StepRecord) -> None:
        """``bad`` and ``overflow`` from ``finite`` and the evidence."""
        assert step.counters is not None
        false = step.counters.false
        if step.scaler is not None and self.remedy.checks_loss:
            # fp16: non-finite gradients with a finite loss are GradScaler overflows, not divergence.
            step.bad = step.data_bad if step.data_bad is not None else false
            step.overflow = ~step.finite & ~step.bad
        else:
            step.bad = ~step.finite if step.data_bad is None else ~step.finite | step.data_bad

    def _clip(self, slot: Slot, step: StepRecord) -> None:
        """Stage 4: the rule clips in place; an extreme outlier is flagged to be skipped rather than clipped."""
        result = slot.units.rule.clip_(step.clip_input())  # the rule sees a read-only view, not the record
        if not step.finite_measured:  # measured by the rule, before it clamped (clamping turns +-Inf finite)
            if result.finite is None or result.tensor_norms is None:
                raise RuntimeError(f"{slot.units.rule!r} measures finiteness but returned none")
            step.finite, step.norms = result.finite, list(result.tensor_norms)
            self._judge(step)
            step.total = torch.full((), math.nan, device=step.device)
        slot.units.flag_spikes(step)
        clipped = result.clipped & ~step.skip
        if step.sharded:
            # Element-wise rules (value, AGC) see only this rank's shard: every rank must count the same step.
            clipped = agree_any(clipped)
        step.result, step.clipped = result, clipped

    def _count(self, slot: Slot, step: StepRecord) -> None:
        """Stage 5: the device counters (optimizer steps, not closure evaluations: a step whose first evaluation was
        fine and a later one bad counts once, as bad)."""
        control = slot.control
        if not step.reevaluation:
            slot.units.counters.update(step.clipped, step.bad, step.overflow, step.spike, step.requested)
            control.step_bad = step.bad
        elif control.step_bad is not None:
            slot.units.counters.count_late_bad(step.bad & ~control.step_bad)
            control.step_bad = control.step_bad | step.bad

    def _remedy(self, i: int, slot: Slot, step: StepRecord) -> dict[str, float]:
        """Stage 6: the device part of the skip (fused optimizers); when the remedy or logging needs the values, the
        one host read, the remedy's decision and the engine carrying it out."""
        remedy, control = slot.units.remedy, slot.control
        control.begin(step)
        step.skipped_on_device = remedy.skips_on_device and fused_skip_is_safe(step)
        control.skip_on_device(step, step.skipped_on_device)
        if not (remedy.needs_read(step) or step.log):
            return {}
        values, logged = self._read(slot, step)
        counts = self._counts(slot, slot.units.counters.from_values(values["counts"]))
        read = StepRead(
            bool(values["bad"]),
            int(values["streak"]),
            bool(values["overflow"]),
            counts,
            bool(values["skip"]),
            control.lr_scale,
            control.snapshot_labels(),
            values.get("loss", math.nan),
        )
        request = remedy.decide(step, read)
        self._carry_out(slot, step, read, request)
        if logged is None:
            return {}
        if not read.skip:
            self.reporter.watch_update(slot, step)
        # The counts again: a restore this step has changed ``rollbacks``.
        return self.reporter.report(i, slot, step, logged, self._counts(slot, counts))

    def _carry_out(self, slot: Slot, step: StepRecord, read: StepRead, request: Request) -> None:
        """What the remedy decided, by the slot's mechanisms (:meth:`SlotControl.carry_out`); a stop raises here,
        before the step is applied."""
        remedy = slot.units.remedy
        if request.stop is not None:
            slot.control.abandon()  # the scheduler's LR back before the error leaves the step
            raise NonFiniteGradientError(*astuple(request.stop))
        _check_declared(remedy, request)
        skip = (request.skip or step.requested) and not step.skipped_on_device
        slot.control.carry_out(step, replace(request, skip=skip), read.skip and remedy.skips_steps)
        if request.warn is not None:
            self.warn(request.warn)

    def _counts(self, slot: Slot, counts: dict[str, int]) -> dict[str, int]:
        """The counts of a slot: its counters', ``rollbacks`` for a remedy that restores, ``skipped_steps``."""
        if slot.units.remedy.keeps_snapshots:
            counts["rollbacks"] = slot.control.rollbacks
        counts["skipped_steps"] = self._skipped(counts)
        return counts

    def _read(self, slot: Slot, step: StepRecord) -> tuple[dict[str, Any], LoggedValues | None]:
        """The one device-to-host transfer of this step, by name: the remedy's values and, on a logging step, the
        reporter's (:meth:`Reporter.add_to <lightning_clip.reporter.Reporter.add_to>`), typed."""
        assert step.counters is not None
        read = HostRead(step.device)
        read.add("bad", step.bad)
        read.add("streak", step.counters.streak)
        read.add("overflow", step.overflow)
        read.add("skip", step.skip)
        read.add("spike", step.counters.false if step.spike is None else step.spike)
        read.add_all("counts", step.counters.counts)
        if slot.units.remedy.reads_loss:
            read.add("loss", step.loss if step.loss is not None else torch.full((), math.nan))
        names = self.reporter.add_to(read, slot, step) if step.log else None
        values = read.read()
        return values, None if names is None else LoggedValues.of(values, names)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, remedy state (the LR scale) and rule statistics of every optimizer (host values)."""
        return {"version": 3, "optimizers": [slot.state_dict() for slot in self._slots]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also the flat ``version`` 1 and 2 entries of lightning-clip 0.1.0 and
        0.2.0.dev0)."""
        self.detach()
        self._slots = []
        for i, state in enumerate(state_dict.get("optimizers", [])):
            self._slot_at(i).load_state_dict(state)

    @property
    def lr_scales(self) -> list[float]:
        """The LR multiplier applied to each optimizer's steps."""
        return [slot.control.lr_scale for slot in self._slots]

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts over all optimizers (reads the device: not for the hot path)."""
        out = dict.fromkeys(("steps", *COUNTERS), 0)
        for i in range(len(self._slots)):
            for k, v in self.counters_of(i).items():
                if k != "nonfinite_streak" and k != "skipped_steps":
                    out[k] = out.get(k, 0) + v
        out["skipped_steps"] = self._skipped(out)
        return out

    def counters_of(self, optimizer_idx: int) -> dict[str, int]:
        """Counts of one optimizer, with its current run of bad steps (``nonfinite_streak``)."""
        slot = self._slots[optimizer_idx]
        return self._counts(slot, slot.units.counters.totals())

    def skipped_windows(self) -> list[dict[str, Any]]:
        """The data windows the remedies skipped (rollbacks), each with its ``optimizer`` index."""
        return [{"optimizer": i, **w} for i, slot in enumerate(self._slots) for w in copy_windows(slot.control.windows)]

    def _skipped(self, counts: dict[str, int]) -> int:
        # Skipped steps: bad ones, spikes and requested ones, under a remedy that skips.
        if not self.remedy.skips_steps:
            return 0
        return counts["nonfinite_steps"] + counts["spike_skips"] + counts["requested_skips"]

    def vanishing_layers(self) -> list[str]:
        """The layers named as vanishing so far (every optimizer's; ``vanishing_ratio``), sorted by name."""
        return sorted({layer for slot in self._slots if slot.units.vanishing for layer in slot.units.vanishing.warned})

    def vanishing_events(self) -> list[VanishingEvent]:
        """Every vanishing-gradient warning so far, as a record (step, optimizer, layers and ratios), in order.
        Not part of the checkpoint: after a resume, the events since the resume."""
        return list(self.reporter.vanishing_events)

    def snapshot_nbytes(self, optimizer_idx: int = 0) -> int:
        """Memory held by one optimizer's snapshots now (rollback; 0 once training ended)."""
        store = self._slots[optimizer_idx].control.store
        return store.nbytes if store is not None else 0

    def rule_of(self, optimizer_idx: int) -> ClipRule:
        """The rule (with its statistics) of one optimizer."""
        return self._slots[optimizer_idx].units.rule

    def remedy_of(self, optimizer_idx: int) -> Remedy:
        """The remedy (with its state) of one optimizer."""
        return self._slots[optimizer_idx].units.remedy


def _check_units(
    rule: ClipRule, remedy: Remedy, spike_skip: SpikeDetector | None, loss_spike: SpikeDetector | None
) -> None:
    """The engine's units are what they say, and a spike detector comes with a remedy that skips steps."""
    if not isinstance(rule, ClipRule):
        raise ValueError(f"`rule` must be a lightning_clip.rules.ClipRule, got {rule!r}.")
    if not isinstance(remedy, Remedy):
        raise ValueError(f"`remedy` must be a lightning_clip.remedies.Remedy, got {remedy!r}.")
    for setting, detector in (("skip_spikes", spike_skip), ("loss_spikes", loss_spike)):
        if detector is not None and not remedy.skips_steps:
            raise ValueError(
                f"`{setting}` needs a nan_policy that skips steps ('skip', 'halve_lr', 'rollback'); got "
                f"nan_policy={remedy.policy!r}."
            )


def _checked_settings(
    norm_type: Any, eps: Any, log_norms: Any, check_inputs: Any, update_ratio_every: Any
) -> dict[str, Any]:
    """The settings of :meth:`ClipEngine.configure` that were passed (not ``_UNSET``), checked and converted."""
    out: dict[str, Any] = {}
    if norm_type is not _UNSET:
        check_positive("norm_type", norm_type, allow_inf=True)
        out["norm_type"] = float(norm_type)
    if eps is not _UNSET:
        check_finite("eps", eps)
        if eps < 0:
            raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}.")
        out["eps"] = float(eps)
    if log_norms is not _UNSET:
        check_choice("log_norms", log_norms, LOG_NORMS)
        out["log_norms"] = log_norms
    if check_inputs is not _UNSET:
        if not isinstance(check_inputs, bool):
            raise ValueError(f"`check_inputs` must be True or False, got {check_inputs!r}.")
        out["check_inputs"] = check_inputs
    if update_ratio_every is not _UNSET:
        check_count("update_ratio_every", update_ratio_every)
        out["update_ratio_every"] = None if update_ratio_every is None else int(update_ratio_every)
    return out


def _copy_options(new: ClipRule | Remedy, targets: Sequence[ClipRule | Remedy]) -> None:
    if type(new) is not type(targets[0]):
        raise ValueError(f"cannot retune {targets[0]!r} from a {type(new).__name__}: build a new one instead.")
    for target in targets:
        for option in new.options:
            setattr(target, option, getattr(new, option))


def _check_declared(remedy: Remedy, request: Request) -> None:
    """A remedy asks only for what it declares (the engine sets up the mechanisms by the declarations)."""
    if (request.skip or request.skip_steps or request.restore is not None) and not remedy.skips_steps:
        raise ValueError(f"{remedy!r} asked to skip steps but does not declare `skips_steps`.")
    if request.lr_factor != 1.0 and not remedy.scales_lr:
        raise ValueError(f"{remedy!r} asked to scale the LR but does not declare `scales_lr`.")
    if request.restore is not None and not remedy.keeps_snapshots:
        raise ValueError(f"{remedy!r} asked to restore a snapshot but does not declare `keeps_snapshots`.")


def warn_at_caller(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside this package (the user's ``engine.step`` line)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: types.FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)
