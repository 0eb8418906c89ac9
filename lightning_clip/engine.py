"""The step pipeline: measure, detect, clip, count, remedy, report -- for Lightning and for plain loops alike.

One optimizer step, on the accumulated (under ``16-mixed``: unscaled) gradient, before the update:

=========  ==========================================  ============================================
stage      what                                        where
=========  ==========================================  ============================================
measure    per-tensor norms, the total norm            :mod:`lightning_clip.functional`
detect     bad-step flag: norm, loss, inputs, ranks    :mod:`lightning_clip.detect`
clip       the rule clips in place                     :mod:`lightning_clip.rules`
count      device-side counters                        :mod:`lightning_clip.counters`
remedy     skip / halve_lr / raise / ignore            :mod:`lightning_clip.remedies`
report     one host transfer, then the metrics dict    :mod:`lightning_clip.metrics`
=========  ==========================================  ============================================

Nothing is read back to the host unless the remedy asks for it (:meth:`Remedy.needs_read`) or the step logs;
then everything comes back in one transfer.

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

import copy
import math
import operator
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip import metrics as M
from lightning_clip.counters import COUNTERS, StepCounters
from lightning_clip.detect import BadStepDetector, SpikeDetector, agree_any, leaf_parameters
from lightning_clip.remedies import Ignore, Remedy, Skip
from lightning_clip.remedies.base import BadStepContext, RunEnd, StepRead
from lightning_clip.rules import ClipRule, GradStep, NormClip
from lightning_clip.validation import check_choice, check_finite, check_positive

LOG_NORMS = ("layer", "parameter", "total", "none")
_UNSET: Any = object()  # configure(): a setting not passed
_DTYPE, _DEVICE, _LAYOUT = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("layout")


@dataclass
class _Slot:
    """Everything per optimizer: the optimizer, its counters and its own copy of the rule."""

    optimizer: Optimizer | None
    counters: StepCounters
    rule: ClipRule
    spikes: SpikeDetector | None = None
    # Closure evaluations: optimizer.step() calls counted by its hooks; the call the engine last saw.
    step_calls: int = 0
    in_step: bool = False
    seen_call: int = -1
    handles: tuple[Any, ...] = ()
    state_at_step_start: set[int] = field(default_factory=set)
    # The foreach groups and names of the parameters stepped last time, keyed by their ids and device: the
    # same parameters step every time, so the Python loops over them run once.
    layout_key: tuple[Any, ...] = ()
    groups: list[F.Group] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    dtensor: bool = False

    def track(self, optimizer: Optimizer) -> None:
        """Watch ``optimizer.step()``: a second engine step inside one call is a re-evaluated closure (LBFGS)."""
        self.untrack()
        self.optimizer = optimizer
        # Bound methods, not closures: the callback must pickle (ddp_spawn, torch.save of a Trainer) mid-fit too.
        self.handles = (optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post))

    def _pre(self, optimizer: Optimizer, *_: Any) -> None:
        self.step_calls += 1
        self.in_step = True
        # Closure optimizers (LBFGS) create state before they evaluate the closure that decides a skip.
        self.state_at_step_start = {id(p) for p in optimizer.state}

    def _post(self, *_: Any) -> None:
        self.in_step = False

    def untrack(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.in_step = (), False

    def reevaluation(self) -> bool:
        """Is this engine step a further closure evaluation within the same ``optimizer.step()``?"""
        again = self.in_step and self.seen_call == self.step_calls
        self.seen_call = self.step_calls
        return again


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
            extreme outlier, through the remedy's skip (needs ``Skip`` or ``HalveLR``); counted in ``spike_skips``.
        name: tells this engine's metrics apart from another's: every tag gets the suffix ``/<name>``.

    In a loop: :meth:`attach` the optimizers once, then per optimizer step call :meth:`observe_loss` (and
    :meth:`observe_batch`) for each micro-batch, :meth:`step` after the last backward and before
    ``optimizer.step()``. Save :meth:`state_dict` with the checkpoint.
    """

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
    ) -> None:
        M.check_instance_name(name)
        self.rule = rule if rule is not None else NormClip()
        self.remedy = remedy if remedy is not None else Skip()
        if not isinstance(self.rule, ClipRule):
            raise ValueError(f"`rule` must be a lightning_clip.rules.ClipRule, got {self.rule!r}.")
        if not isinstance(self.remedy, Remedy):
            raise ValueError(f"`remedy` must be a lightning_clip.remedies.Remedy, got {self.remedy!r}.")
        if spike_skip is not None and not isinstance(self.remedy, Skip):
            raise ValueError(
                f"skipping spikes (`skip_spikes`) needs nan_policy 'skip' or 'halve_lr', which skip steps; got "
                f"nan_policy={self.remedy.policy!r}."
            )
        self.spike_skip = spike_skip
        self.spike_top_k = 3  # layers named when a logged step holds a spike
        self.name = name  # tags get the suffix /<name>
        self.detector = BadStepDetector(check_inputs, check_loss=not isinstance(self.remedy, Ignore))
        self.configure(norm_type=norm_type, eps=eps, log_norms=log_norms, check_inputs=check_inputs)
        self.warn: Callable[[str], None] = warn_at_caller
        self._slots: list[_Slot] = []
        self._names: dict[int, str] = {}

    # ------------------------------------------------------------------ settings
    def configure(
        self,
        *,
        norm_type: Any = _UNSET,
        eps: Any = _UNSET,
        log_norms: Any = _UNSET,
        check_inputs: Any = _UNSET,
    ) -> None:
        """Set the engine's own settings (those passed), checked as in the constructor; from the next step on."""
        if norm_type is not _UNSET:
            check_positive("norm_type", norm_type, allow_inf=True)
            self.norm_type = float(norm_type)
        if eps is not _UNSET:
            check_finite("eps", eps)
            if eps < 0:
                raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}.")
            self.eps = float(eps)
        if log_norms is not _UNSET:
            check_choice("log_norms", log_norms, LOG_NORMS)
            self.log_norms = log_norms
        if check_inputs is not _UNSET:
            if not isinstance(check_inputs, bool):
                raise ValueError(f"`check_inputs` must be True or False, got {check_inputs!r}.")
            self.detector.check_inputs = check_inputs

    def retune(self, rule: ClipRule | None = None, remedy: Remedy | None = None) -> None:
        """Take the settings (:attr:`~ClipRule.options`) of a freshly built, hence checked, ``rule`` or ``remedy``
        of the same kind into the rule of every optimizer or into the remedy; statistics and state stay."""
        for new, targets in (
            (rule, [self.rule, *(slot.rule for slot in self._slots)]),
            (remedy, [self.remedy]),
        ):
            if new is None:
                continue
            if type(new) is not type(targets[0]):
                raise ValueError(f"cannot retune {targets[0]!r} from a {type(new).__name__}: build a new engine.")
            for target in targets:
                for option in new.options:
                    setattr(target, option, getattr(new, option))

    # ------------------------------------------------------------------ set-up
    def attach(
        self, optimizers: Sequence[Optimizer], named_parameters: Iterable[tuple[str, Tensor]] | None = None
    ) -> None:
        """Bind the optimizers (in order: index ``i`` logs with the suffix ``_opt<i>``) and name the parameters.

        Counters loaded by :meth:`load_state_dict` are kept, matched by index.
        """
        self.detach()
        if named_parameters is not None:
            self._names = {id(p): name for name, p in named_parameters}
        for slot in self._slots:
            slot.layout_key = ()  # names may have changed
        for i, optimizer in enumerate(optimizers):
            self._slot_at(i).track(optimizer)
        del self._slots[max(len(optimizers), 1) :]
        for i, slot in enumerate(self._slots):
            if slot.optimizer is not None:
                self.remedy.attach(i, slot.optimizer, slot.counters)

    def attached_to(self, optimizers: Sequence[Optimizer]) -> bool:
        """Whether the slots are bound to exactly ``optimizers``, in this order (else :meth:`attach` them)."""
        bound = [slot.optimizer for slot in self._slots if slot.optimizer is not None]
        return len(bound) == len(optimizers) and all(map(_same_optimizer, bound, optimizers))

    def finish(self, global_step: int | None = None, epoch: int = 0, failed: bool = False) -> None:
        """Training is over: read the counters once and let the remedy report what the sync-free path has not
        (a fused optimizer's skips since the last read: a warning, or ``NonFiniteGradientError`` when the run
        ended on ``max_consecutive_nonfinite`` bad steps or more). ``failed``: an exception ended it; warn only.
        Call it after the last step of a plain loop; the callback calls it at the end of ``fit``."""
        for i, slot in enumerate(self._slots):
            if slot.optimizer is None or slot.counters.steps == 0:
                continue
            counts = slot.counters.totals()
            step = counts["steps"] if global_step is None else global_step
            self.remedy.finish(RunEnd(i, slot.counters, counts, step, epoch, failed, self.warn))

    def detach(self) -> None:
        """Remove every hook from the optimizers (LR scaling, step tracking) and restore their LR."""
        self.remedy.detach()
        for slot in self._slots:
            slot.untrack()

    def _slot_at(self, i: int) -> _Slot:
        while len(self._slots) <= i:
            self._slots.append(_Slot(None, StepCounters(), copy.deepcopy(self.rule), copy.deepcopy(self.spike_skip)))
        return self._slots[i]

    def _index_of(self, optimizer: Optimizer) -> int:
        for i, slot in enumerate(self._slots):
            if slot.optimizer is not None and _same_optimizer(slot.optimizer, optimizer):
                return i
        # An optimizer re-created for the same parameters takes over the slot (counters, LR scale, statistics) of
        # the one it replaces; one never attached (a plain loop that skipped attach) is bound in order of first use.
        params = _param_ids(optimizer)
        free = next(
            (i for i, s in enumerate(self._slots) if s.optimizer is not None and _param_ids(s.optimizer) == params),
            None,
        )
        if free is None:
            free = next((i for i, s in enumerate(self._slots) if s.optimizer is None), len(self._slots))
        slot = self._slot_at(free)
        slot.track(optimizer)
        self.remedy.attach(free, optimizer, slot.counters)
        return free

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
            return self._step(optimizer, log, scaler, sharded, distributed, read_every, global_step, epoch)
        finally:
            self.detector.step_done()

    def _step(
        self,
        optimizer: Optimizer,
        log: bool,
        scaler: Any,
        sharded: bool | Any | None,
        distributed: bool,
        read_every: int,
        global_step: int | None,
        epoch: int,
    ) -> dict[str, float]:
        opt_idx = self._index_of(optimizer)
        slot = self._slots[opt_idx]
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if sharded is None:
            # From every parameter, not only those with a gradient: a rank whose shard holds no gradient must
            # still take part in the same collectives as the others.
            sharded = distributed and any(
                getattr(p, "_fsdp_flattened", False) for group in optimizer.param_groups for p in group["params"]
            )
        group = sharded if sharded is not None and not isinstance(sharded, bool) else None
        all_reduce = F.distributed_all_reduce(group) if sharded is not None and sharded is not False else None
        if not params:
            # Every parameter frozen or unused: nothing to clip. A rank still joins the collectives the others
            # make (norm, loss/input flag, clipped flag), in the same order, or they would hang in theirs.
            device = _device_of(optimizer)
            if all_reduce is not None:
                F.total_norm([], self.norm_type, all_reduce=all_reduce)
            if self.detector.active:
                # Consume this optimizer's losses (those owed to another stay for its step), so a NaN loss of a
                # step without gradients does not spoil this optimizer's next step; ranks agree when distributed.
                mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
                self.detector.flag(device, agree=distributed, params=mine)
            if all_reduce is not None:
                agree_any(torch.zeros((), dtype=torch.bool, device=device))
            return {}
        grads: list[Tensor] = [p.grad for p in params]
        device = grads[0].device
        counters = slot.counters.to(device)
        reevaluation = slot.reevaluation()
        key = (
            tuple(map(id, params)),
            tuple(map(type, grads)),
            tuple(map(_DTYPE, grads)),
            tuple(map(_DEVICE, grads)),
            tuple(map(_LAYOUT, grads)),  # a gradient may turn sparse (or back) between steps
        )
        if key != slot.layout_key:
            slot.names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]
            slot.dtensor = any(spec is not None for spec in F.local_shards(grads, slot.names)[1])
            slot.layout_key, slot.groups = key, F.plan(F.local_shards(grads)[0] if slot.dtensor else grads)
        names = slot.names
        specs: list[F.ShardSpec | None] = []
        if slot.dtensor:
            # DTensor gradients (FSDP2, tensor parallel): the math runs on the local shards, in place.
            grads, specs = F.local_shards(grads, names)
        if reevaluation and self.remedy.skips_bad_steps:
            raise ValueError(
                f"{type(optimizer).__name__} evaluated its closure more than once in one step() and moves the weights "
                f"between evaluations (LBFGS with max_iter > 1 or a line search): nan_policy={self.remedy.policy!r} "
                "cannot undo a move made before a bad evaluation. Use nan_policy='raise' or 'ignore' with it, or "
                "LBFGS(max_iter=1, line_search_fn=None)."
            )
        ctx = BadStepContext(
            optimizer=optimizer,
            optimizer_idx=opt_idx,
            params=params,
            grads=grads,
            names=names,
            norms=[],
            bad=counters.false,
            scaler=scaler,
            counters=counters,
            read_every=read_every,
            global_step=counters.steps if global_step is None else global_step,
            epoch=epoch,
            batch_idx=self.detector.last_batch_idx(),
            loss_nonfinite=self.detector.loss_nonfinite,
            input_problems=self.detector.input_problems,
            warn=self.warn,
            state_before=slot.state_at_step_start if slot.in_step else None,
        )

        # --- measure (in true units: fused optimizers under fp16 still hold scaled gradients here)
        inv_scale = scaler._scale.double().reciprocal().float().to(device) if ctx.grads_scaled else None
        # A rule that reads every element anyway (value mode) also tells whether they are finite; when nothing
        # needs the p-norm this step (no logging, no spike history, whole unscaled gradients) it is not measured.
        lazy = (
            slot.rule.measures_finite
            and not log
            and slot.spikes is None
            and not slot.dtensor
            and all_reduce is None
            and inv_scale is None
        )
        norms: list[Tensor] = []
        total = finite = None
        if not lazy:
            norms = F.grad_norms(grads, self.norm_type, slot.groups)
            if slot.dtensor:
                norms, total = F.reduce_sharded_norms(norms, specs, self.norm_type)
                total = total.to(device)
            else:
                total = F.total_norm(norms, self.norm_type, all_reduce=all_reduce).to(device)
            if inv_scale is not None:
                total = total * inv_scale
            finite = torch.isfinite(total)

        # --- detect (the loss and input evidence; the gradient's own check needs `finite`)
        data_bad = None
        if self.detector.active:
            data_bad = self.detector.flag(device, agree=distributed, params={id(p) for p in params})
        fp16 = scaler is not None and not isinstance(self.remedy, Ignore)

        def bad_and_overflow(finite: Tensor) -> tuple[Tensor, Tensor]:
            if fp16:
                # fp16: non-finite gradients with a finite loss are GradScaler overflows, not divergence.
                bad = data_bad if data_bad is not None else counters.false
                return bad, ~finite & ~bad
            return (~finite if data_bad is None else ~finite | data_bad), counters.false

        bad = overflow = counters.false
        if finite is not None:
            bad, overflow = bad_and_overflow(finite)

        # --- clip, count
        result = slot.rule.clip_(
            GradStep(
                params=params,
                grads=grads,
                names=ctx.names,
                norms=norms,
                total=total if total is not None else torch.full((), math.nan, device=device),
                finite=finite if finite is not None else counters.false,
                finite_measured=finite is not None,
                bad=bad,
                norm_type=self.norm_type,
                eps=self.eps,
                inv_scale=inv_scale,
                log=log,
                update_statistics=not reevaluation,
                groups=slot.groups,
                reduce_total=self._reducer(slot, specs, all_reduce),
                sharded=slot.dtensor or all_reduce is not None,
            )
        )
        if finite is None:  # measured by the rule, before it clamped (clamping turns +-Inf finite)
            if result.finite is None or result.tensor_norms is None:
                raise RuntimeError(f"{slot.rule!r} measures finiteness but returned none")
            finite, norms = result.finite, list(result.tensor_norms)
            bad, overflow = bad_and_overflow(finite)
            total = torch.full((), math.nan, device=device)
        assert total is not None and finite is not None  # for the type checker: set on both paths
        ctx.bad, ctx.norms = bad, norms
        # An extreme outlier is skipped rather than clipped (skip_spikes); the total is the same on every rank.
        spike = counters.false
        if slot.spikes is not None and not reevaluation:
            spike = slot.spikes.flag(total, bad | overflow)
        ctx.skip = bad | spike
        clipped = result.clipped & ~ctx.skip
        if slot.dtensor or all_reduce is not None:
            # Element-wise rules (value, AGC) see only this rank's shard: every rank must count the same step.
            clipped = agree_any(clipped)
        if not reevaluation:  # counters count optimizer steps, not closure evaluations
            counters.update(clipped, bad, overflow, spike)

        # --- remedy: device part, then the host part only when it (or logging) needs the values
        self.remedy.on_device(ctx)
        if not (self.remedy.needs_read(ctx) or log):
            return {}
        head = [bad, counters.streak, overflow, ctx.skip]
        layer_names: list[str] = []
        layer_norms: list[Tensor] = []
        if log:
            threshold = result.threshold
            head += [
                total,
                total if result.total_after is None else result.total_after,
                clipped,
                torch.as_tensor(math.nan if threshold is None else threshold, device=device),
            ]
            layer_names, layer_norms = self._layer_norms(ctx.names, norms, inv_scale, device)
        values = torch.cat(  # the one device-to-host transfer of this step
            [torch.stack([h.to(device=device, dtype=torch.float64) for h in head]), counters.counts.to(torch.float64)]
            + ([torch.stack(layer_norms).to(torch.float64)] if layer_norms else [])
        ).tolist()
        n_head = len(head)
        counts = counters.from_values(values[n_head : n_head + len(COUNTERS)])
        counts["skipped_steps"] = self._skipped(counts)
        read = StepRead(bool(values[0]), int(values[1]), bool(values[2]), counts, skip=bool(values[3]))
        self.remedy.on_host(ctx, read)
        if not log:
            return {}
        step_values = {
            "total": values[4],
            "total_clipped": values[5],
            "clipped": values[6],
            "threshold": None if math.isnan(values[7]) else values[7],
            "max_norm": getattr(slot.rule, "max_norm", None),
            "lr_scale": self._lr_scale(slot),
        }
        group = (
            None
            if self.log_norms in ("total", "none")
            else (M.LAYER_GROUP if self.log_norms == "layer" else M.PARAM_GROUP)
        )
        layer_values = values[n_head + len(COUNTERS) :]
        out = M.step_metrics(opt_idx, step_values, counts, group, layer_names, layer_values, self.name)
        spiked = (read.skip and not read.bad) or (slot.rule.reports_spikes and step_values["clipped"] > 0)
        if spiked and layer_values:
            share = self._attribute_spike(ctx, read, step_values, layer_names, layer_values)
            out[M.tag(M.TOP_LAYER_SHARE, opt_idx, self.name)] = share
        return out

    def _attribute_spike(
        self, ctx: BadStepContext, read: StepRead, values: dict[str, Any], names: Sequence[str], norms: Sequence[float]
    ) -> float:
        """Name the layers that carried a spike (host values of this logging step: no extra read); return the
        top layer's share of the squared norm."""
        ranked = sorted(zip(names, norms), key=lambda pair: -pair[1] if math.isfinite(pair[1]) else math.inf)
        squares = sum(n * n for _, n in ranked if math.isfinite(n)) or 1.0
        top = ranked[: self.spike_top_k]
        listed = ", ".join(f"{name} ({norm:.3g}, {100 * norm * norm / squares:.0f}%)" for name, norm in top)
        action = "skipped" if read.skip else "clipped"
        threshold = values["threshold"]
        self.warn(
            f"Gradient spike {action} at global step {ctx.global_step} (optimizer {ctx.optimizer_idx}): total norm "
            f"{values['total']:.4g}"
            + (f", threshold {threshold:.4g}" if threshold is not None else "")
            + f". Largest {'layers' if self.log_norms == 'layer' else 'parameters'} (norm, share of the squared "
            f"norm): {listed}."
        )
        return top[0][1] ** 2 / squares if top and math.isfinite(top[0][1]) else math.nan

    def _reducer(
        self, slot: _Slot, specs: list[F.ShardSpec | None], all_reduce: Callable[[Tensor, str], Tensor] | None
    ) -> Callable[[Sequence[Tensor]], Tensor] | None:
        """How a rule gets the total norm of sharded gradients (the same collectives as the measured norm)."""
        if slot.dtensor:
            return lambda tensors: F.reduce_sharded_norms(
                F.grad_norms(tensors, self.norm_type, slot.groups), specs, self.norm_type
            )[1]
        if all_reduce is not None:
            return lambda tensors: F.total_norm(
                F.grad_norms(tensors, self.norm_type, slot.groups), self.norm_type, all_reduce=all_reduce
            )
        return None

    def _layer_norms(
        self, names: Sequence[str], norms: Sequence[Tensor], inv_scale: Tensor | None, device: torch.device
    ) -> tuple[list[str], list[Tensor]]:
        if self.log_norms in ("total", "none"):
            return [], []
        moved = [n.to(device) for n in norms]
        if inv_scale is not None:
            moved = [n * inv_scale for n in moved]
        if self.log_norms == "parameter":
            return list(names), [n.float() for n in moved]
        layers: dict[str, list[Tensor]] = {}
        for name, n in zip(names, moved):
            layers.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(n)
        return list(layers), [F.total_norm(ns, self.norm_type).float() for ns in layers.values()]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, LR scale and rule statistics of every optimizer (host values)."""
        return {
            "version": 2,
            "optimizers": [
                {
                    **slot.counters.state_dict(),
                    "rule": slot.rule.state_dict(),
                    "spikes": slot.spikes.state_dict() if slot.spikes is not None else {},
                }
                for slot in self._slots
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also the ``version: 1`` format of lightning-clip 0.1.0)."""
        self._slots = []
        for i, state in enumerate(state_dict.get("optimizers", [])):
            slot = self._slot_at(i)
            slot.counters = StepCounters.from_state_dict(state)
            if not self.remedy.keeps_lr_scale():
                # A checkpoint from halve_lr resumed under another policy: no scale is applied, so none is kept.
                slot.counters.lr_scale, slot.counters.healthy_steps = 1.0, 0
            if state.get("rule"):
                slot.rule.load_state_dict(state["rule"])
            if state.get("spikes") and slot.spikes is not None:
                slot.spikes.load_state_dict(state["spikes"])

    def _lr_scale(self, slot: _Slot) -> float:
        return slot.counters.lr_scale if self.remedy.keeps_lr_scale() else 1.0

    @property
    def lr_scales(self) -> list[float]:
        """The LR multiplier applied to each optimizer's steps."""
        return [self._lr_scale(slot) for slot in self._slots]

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts over all optimizers (reads the device: not for the hot path)."""
        out = dict.fromkeys(("steps", *COUNTERS), 0)
        for slot in self._slots:
            for k, v in slot.counters.totals().items():
                if k in out:
                    out[k] += v
        out["skipped_steps"] = self._skipped(out)
        return out

    def counters_of(self, optimizer_idx: int) -> dict[str, int]:
        """Counts of one optimizer, with its current run of bad steps (``nonfinite_streak``)."""
        out = self._slots[optimizer_idx].counters.totals()
        out["skipped_steps"] = self._skipped(out)
        return out

    def _skipped(self, counts: dict[str, int]) -> int:
        # Skipped steps: bad ones and spikes, under a remedy that skips.
        return counts["nonfinite_steps"] + counts["spike_skips"] if self.remedy.skips_bad_steps else 0

    def rule_of(self, optimizer_idx: int) -> ClipRule:
        """The rule (with its statistics) of one optimizer."""
        return self._slots[optimizer_idx].rule


def warn_at_caller(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside this package (the user's ``engine.step`` line)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: types.FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _param_ids(optimizer: Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _device_of(optimizer: Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
