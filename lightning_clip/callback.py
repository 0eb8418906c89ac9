"""The Lightning wiring: :class:`GradientClipping` runs the functional math in ``on_before_optimizer_step``.

Per optimizer step, on the accumulated (and, under ``16-mixed``, unscaled) gradient, before the step:

1. per-parameter norms and the total norm, on the device (:mod:`lightning_clip.functional`);
2. a bad-step flag: total norm NaN/Inf, loss NaN/Inf, or (``check_inputs``) a batch with NaN/Inf;
3. clipping (value or norm), with a coefficient that leaves NaN gradients alone;
4. the NaN policy: skip the step, halve the LR, raise, or ignore;
5. on logging steps only, one device-to-host transfer of everything logged, written straight to
   ``trainer.loggers``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from lightning_clip._namespaces import CallbackBase
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip.counters import COUNTERS, StepCounters
from lightning_clip.diagnosis import BadStep, describe
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.inputs import describe_nonfinite, nonfinite_flag
from lightning_clip.lr_scale import StepLRScale

Mode = Literal["norm", "value", "none"]
NanPolicy = Literal["skip", "halve_lr", "raise", "ignore"]
LogNorms = Literal["layer", "parameter", "total", "none"]

_MODES = ("norm", "value", "none")
_NAN_POLICIES = ("skip", "halve_lr", "raise", "ignore")
_LOG_NORMS = ("layer", "parameter", "total", "none")



def _check_positive(name: str, value: Optional[float], allow_inf: bool = False, required: bool = False) -> None:
    if value is None:
        if required:
            raise ValueError(f"`{name}` is required: a positive number, got None.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        allowed = "a positive number or float('inf')" if allow_inf else "a finite positive number"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")


class GradientClipping(CallbackBase):
    r"""Clip gradients, log their norms and survive NaN/Inf, in ``on_before_optimizer_step``.

    Args:
        mode: ``"norm"`` rescales all gradients so their global ``norm_type``-norm is at most
            ``max_norm``: :math:`g \leftarrow g \cdot \min(1, \text{max\_norm} / (\|g\|_p + \epsilon))`.
            ``"value"`` clamps every element into ``[min_value, max_value]``. ``"none"`` only monitors.
        max_norm: the cap on the global norm (``mode="norm"``).
        norm_type: ``p`` of the norm: any ``p > 0`` or ``float("inf")``. Used for clipping and logging.
        clip_value: ``mode="value"``: the symmetric range ``[-clip_value, clip_value]``.
        min_value: ``mode="value"``: lower bound of an asymmetric range (alone, or with ``max_value``).
        max_value: ``mode="value"``: upper bound of an asymmetric range.
        nan_policy: what to do when a gradient element is NaN/Inf (or the loss, or a checked input):
            ``"skip"`` makes the optimizer step a no-op (weights and optimizer state untouched);
            ``"halve_lr"`` skips and multiplies the LR by ``lr_factor`` on top of any scheduler;
            ``"raise"`` raises :class:`~lightning_clip.NonFiniteGradientError`; ``"ignore"`` does nothing.
        lr_factor: ``halve_lr``: the factor applied per bad step, in (0, 1).
        min_lr_scale: ``halve_lr``: the LR scale never goes below this (in (0, 1]); None for no floor.
        lr_recovery_steps: ``halve_lr``: after this many healthy steps in a row, undo one reduction
            (never above 1.0). None never recovers.
        max_consecutive_nonfinite: ``skip``/``halve_lr``: raise after this many bad steps in a row of one
            optimizer (None: never). With a fused optimizer under ``skip`` the check runs at the next
            logging step (or every ``log_every_n_steps`` steps when nothing logs), to stay sync-free.
        check_inputs: check each training batch's floating tensors for NaN/Inf before the forward pass.
        log_norms: ``"layer"`` logs the total and each layer's norm, ``"parameter"`` each parameter's,
            ``"total"`` only the totals and counters, ``"none"`` nothing.
        eps: added to the total norm before dividing (as in ``torch.nn.utils.clip_grad_norm_``).
        name: tells two instances of the same ``mode`` in one Trainer apart in checkpoints. The checkpoint
            key depends on ``mode`` and ``name`` only, so tuning ``max_norm`` between runs keeps the state.

    Logged on logging steps (``Trainer(log_every_n_steps)``) to every logger of the Trainer:
    ``grad_norm/total`` (before clipping), ``grad_norm/total_clipped`` (after), ``grad_norm_layer/<name>``
    or ``grad_norm_param/<name>``, and ``grad_clip/{max_norm, clipped_steps, nonfinite_steps,
    skipped_steps, amp_overflows, lr_scale, steps}``. With several optimizers, optimizer ``i > 0``
    gets the suffix ``_opt<i>``.

    Example::

        import pytorch_lightning as pl
        from lightning_clip import GradientClipping

        trainer = pl.Trainer(callbacks=[GradientClipping(mode="norm", max_norm=1.0, nan_policy="skip")])
        trainer.fit(model)

        # asymmetric value range, halve the LR on NaN and recover after 100 healthy steps
        GradientClipping(mode="value", min_value=-0.5, max_value=1.0,
                         nan_policy="halve_lr", lr_recovery_steps=100)
    """

    def __init__(
        self,
        mode: Mode = "norm",
        max_norm: float = 1.0,
        norm_type: float = 2.0,
        clip_value: Optional[float] = None,
        min_value: Optional[float] = None,
        max_value: Optional[float] = None,
        nan_policy: NanPolicy = "skip",
        lr_factor: float = 0.5,
        min_lr_scale: Optional[float] = None,
        lr_recovery_steps: Optional[int] = None,
        max_consecutive_nonfinite: Optional[int] = 10,
        check_inputs: bool = False,
        log_norms: LogNorms = "layer",
        eps: float = F.EPS,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_choice("mode", mode, _MODES)
        _check_choice("nan_policy", nan_policy, _NAN_POLICIES)
        _check_choice("log_norms", log_norms, _LOG_NORMS)
        _check_positive("max_norm", max_norm, required=True)
        _check_positive("norm_type", norm_type, allow_inf=True, required=True)
        _check_positive("clip_value", clip_value)
        for arg, bound in (("min_value", min_value), ("max_value", max_value)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound)):
                raise ValueError(f"`{arg}` must be a number or None, got {bound!r}.")
        if mode == "value":
            if clip_value is not None and (min_value is not None or max_value is not None):
                raise ValueError(
                    f"mode='value' takes either `clip_value` (symmetric) or `min_value`/`max_value` (asymmetric), "
                    f"got clip_value={clip_value!r}, min_value={min_value!r}, max_value={max_value!r}."
                )
            if clip_value is None and min_value is None and max_value is None:
                raise ValueError(
                    "mode='value' needs a bound: set `clip_value` (range [-clip_value, clip_value]) "
                    "or `min_value` and/or `max_value`; got none."
                )
            if min_value is not None and max_value is not None and min_value > max_value:
                raise ValueError(f"`min_value` ({min_value!r}) must be <= `max_value` ({max_value!r}).")
        if mode != "value" and (clip_value is not None or min_value is not None or max_value is not None):
            raise ValueError(
                f"`clip_value`, `min_value` and `max_value` apply to mode='value' only; got mode={mode!r} with "
                f"clip_value={clip_value!r}, min_value={min_value!r}, max_value={max_value!r}."
            )
        if nan_policy != "halve_lr" and (min_lr_scale is not None or lr_recovery_steps is not None):
            raise ValueError(
                f"`min_lr_scale` and `lr_recovery_steps` apply to nan_policy='halve_lr' only; got "
                f"nan_policy={nan_policy!r} with min_lr_scale={min_lr_scale!r}, lr_recovery_steps={lr_recovery_steps!r}."
            )
        if not (isinstance(lr_factor, (int, float)) and 0 < lr_factor < 1):
            raise ValueError(f"`lr_factor` must be in (0, 1), got {lr_factor!r}.")
        if min_lr_scale is not None and not (isinstance(min_lr_scale, (int, float)) and 0 < min_lr_scale <= 1):
            raise ValueError(f"`min_lr_scale` must be in (0, 1] or None, got {min_lr_scale!r}.")
        for arg, count in (("lr_recovery_steps", lr_recovery_steps), ("max_consecutive_nonfinite", max_consecutive_nonfinite)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ValueError(f"`{arg}` must be a positive integer or None, got {count!r}.")
        if not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}.")

        self.mode = mode
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        if clip_value is not None:
            min_value, max_value = -float(clip_value), float(clip_value)
        self.clip_value = clip_value
        self.min_value = None if min_value is None else float(min_value)
        self.max_value = None if max_value is None else float(max_value)
        self.nan_policy = nan_policy
        self.lr_factor = float(lr_factor)
        self.min_lr_scale = min_lr_scale
        self.lr_recovery_steps = lr_recovery_steps
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.check_inputs = check_inputs
        self.log_norms = log_norms
        self.eps = float(eps)
        if name is not None and not isinstance(name, str):
            raise ValueError(f"`name` must be a string or None, got {name!r}.")
        self.name = name

        # One StepCounters per optimizer (saved in state_dict).
        self._tallies: list[StepCounters] = []
        # Per accumulation window: reset by the first batch after an optimizer step.
        self._loss_bad: Optional[Tensor] = None
        self._window_batches: list[tuple[int, Any, Optional[Tensor]]] = []
        self._window_done = False
        # Per fit.
        self._names: dict[int, str] = {}
        self._lr_hooks: list[StepLRScale] = []

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # Not max_norm & co.: re-tuning a threshold on resume must not drop the LR scale and counters.
        return self._generate_state_key(mode=self.mode, name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "optimizers": [t.state_dict() for t in self._tallies]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tallies = [StepCounters.from_state_dict(s) for s in state_dict.get("optimizers", [])]
        for hook, tally in zip(self._lr_hooks, self._tallies):
            hook.scale = tally.lr_scale

    @property
    def lr_scales(self) -> list[float]:
        """The current LR multiplier of each optimizer (``halve_lr``)."""
        return [t.lr_scale for t in self._tallies]

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts over all optimizers (reads the device: not for the hot path)."""
        out = dict.fromkeys(("steps",) + COUNTERS, 0)
        for t in self._tallies:
            for k, v in t.totals().items():
                if k in out:
                    out[k] += v
        out["skipped_steps"] = self._skipped(out["nonfinite_steps"])
        return out

    def counters_of(self, optimizer_idx: int) -> dict[str, int]:
        """Counts of one optimizer, with its current run of bad steps (``nonfinite_streak``)."""
        out = self._tallies[optimizer_idx].totals()
        out["skipped_steps"] = self._skipped(out["nonfinite_steps"])
        return out

    def _skipped(self, nonfinite: int) -> int:
        return nonfinite if self.nan_policy in ("skip", "halve_lr") else 0

    # ------------------------------------------------------------------ fit set-up
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"`Trainer(gradient_clip_val={trainer.gradient_clip_val!r})` and `GradientClipping` would both clip. "
                "Remove `gradient_clip_val` (and `gradient_clip_algorithm`) from the Trainer; configure "
                "clipping on the callback: GradientClipping(mode='norm', max_norm=...) or mode='value'."
            )

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        n = len(trainer.optimizers)
        self._tallies = (self._tallies + [StepCounters() for _ in range(n)])[:max(n, 1)]
        self._remove_lr_hooks()
        if self.nan_policy == "halve_lr":
            self._lr_hooks = [StepLRScale(opt, t.lr_scale) for opt, t in zip(trainer.optimizers, self._tallies)]

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_lr_hooks()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_lr_hooks()

    def _remove_lr_hooks(self) -> None:
        for hook in self._lr_hooks:
            hook.remove()
        self._lr_hooks = []

    # ------------------------------------------------------------------ per micro-batch
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self._window_done:  # a new accumulation window (all optimizers of the last batch have stepped)
            self._window_batches, self._window_done = [], False
        flag = nonfinite_flag(batch) if self.check_inputs else None
        # Keep the batch only while checking inputs: it is needed to say where the NaN is.
        self._window_batches.append((batch_idx, batch if self.check_inputs else None, flag))

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self.nan_policy == "ignore" or not isinstance(loss, Tensor):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad.to(self._loss_bad.device)

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer) -> None:
        try:
            self._step(trainer, optimizer)
        finally:
            self._loss_bad = None  # each backward's loss belongs to the step that follows it
            self._window_done = True

    def _step(self, trainer: "pl.Trainer", optimizer: Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            # Every parameter frozen or unused this step: nothing to clip or check. A sharded rank still
            # joins the norm's all-reduce so the others do not hang.
            all_reduce = self._all_reduce(trainer)
            if all_reduce is not None:
                F.total_norm([], self.norm_type, all_reduce=all_reduce)
            self._data_bad(trainer, trainer.strategy.root_device)  # likewise the loss/input flags' all-reduce
            return
        grads = [p.grad for p in params]
        opt_idx = self._optimizer_index(trainer, optimizer)
        device = grads[0].device
        while len(self._tallies) <= opt_idx:
            self._tallies.append(StepCounters())
        tally = self._tallies[opt_idx].to(device)

        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Fused optimizers under fp16 unscale inside their step: here the gradients are still scaled.
        grads_scaled = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        inv_scale = scaler._scale.double().reciprocal().float().to(device) if grads_scaled else None

        norms = F.grad_norms(grads, self.norm_type)
        total = F.total_norm(norms, self.norm_type, all_reduce=self._all_reduce(trainer)).to(device)
        if inv_scale is not None:
            total = total * inv_scale
        finite = torch.isfinite(total)

        # --- bad-step flag, on the device: gradient, loss, or input
        data_bad = self._data_bad(trainer, device)
        overflow = tally.false
        if scaler is not None and self.nan_policy != "ignore":
            # fp16: non-finite gradients with a finite loss are GradScaler overflows, not divergence.
            bad = data_bad if data_bad is not None else tally.false
            overflow = ~finite & ~bad
        else:
            bad = ~finite if data_bad is None else ~finite | data_bad

        # --- clip
        log = bool(trainer.loggers) and self.log_norms != "none" and self._should_log(trainer)
        clipped, total_clipped = self._clip(grads, total, finite, inv_scale, log, tally.false)
        tally.update(clipped & ~bad, bad, overflow)

        device_skip = self.nan_policy == "skip" and all(group.get("fused") for group in optimizer.param_groups)
        if device_skip:
            self._skip_on_device(optimizer, grads, bad, scaler)
            # Decided on the device; the streak limit and warnings wait for a read we make anyway (a logging
            # step), or every log_every_n_steps steps when nothing logs (0 = logging off: Lightning's default).
            needs_read = tally.steps % (trainer.log_every_n_steps or 50) == 0
        else:
            needs_read = self.nan_policy != "ignore"  # skip (grad=None), halve_lr and raise decide on the host
        if not (needs_read or log):
            return

        # One device-to-host transfer for the decision and everything logged.
        head = [bad, tally.streak, overflow] + ([total, total_clipped] if log else [])
        layer_names, layer_norms = self._layer_norms(params, norms, inv_scale, device) if log else ([], [])
        values = torch.cat(
            [torch.stack([h.to(torch.float64) for h in head]), tally.counts.to(torch.float64)]
            + ([torch.stack(layer_norms).to(torch.float64)] if layer_norms else [])
        ).tolist()
        is_bad, streak, overflowed = bool(values[0]), int(values[1]), bool(values[2])
        n_head = len(head)
        counts = tally.from_values(values[n_head:n_head + len(COUNTERS)])

        if device_skip:
            self._check_device_skips(trainer, tally, streak, counts)
        elif is_bad:
            self._handle_bad(trainer, optimizer, opt_idx, params, norms, grads, scaler, streak, counts)
        elif self.nan_policy == "halve_lr" and not overflowed:  # a GradScaler-skipped step is not healthy
            self._healthy(opt_idx)
        if log:
            layer_values = values[n_head + len(COUNTERS):]
            self._log(trainer, opt_idx, values[3], values[4], counts, layer_names, layer_values)

    # ------------------------------------------------------------------ pieces of the step
    def _optimizer_index(self, trainer: "pl.Trainer", optimizer: Optimizer) -> int:
        for i, opt in enumerate(trainer.optimizers):
            if opt is optimizer or getattr(opt, "_optimizer", None) is optimizer:
                return i
        return 0

    def _all_reduce(self, trainer: "pl.Trainer"):
        # Sharded strategies hold a slice of every gradient: the norm must be reduced across ranks.
        if "FSDP" not in type(trainer.strategy).__name__ or trainer.world_size < 2:
            return None
        return F.distributed_all_reduce()

    def _data_bad(self, trainer: "pl.Trainer", device: torch.device) -> Optional[Tensor]:
        if not self.check_inputs and self.nan_policy == "ignore":
            return None  # nothing tracked on any rank
        flags = [f.to(device) for _, _, f in self._window_batches if f is not None]
        if self._loss_bad is not None:
            flags.append(self._loss_bad.to(device))
        # A rank with nothing flagged (e.g. no backward this step) still joins the all-reduce below.
        bad = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)
        if trainer.world_size > 1:
            # Loss and input checks are rank-local; every rank must take the same decision.
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = bad.to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                bad = flag.bool()
        return bad

    def _clip(
        self, grads: list[Tensor], total: Tensor, finite: Tensor, inv_scale: Optional[Tensor], log: bool,
        false: Tensor,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Clip in place. Return (did norm clipping scale the gradients, total norm after clipping if logging)."""
        if self.mode == "norm":
            coef = F.clip_by_norm_(grads, self.max_norm, total, self.eps, finite=finite)
            return coef < 1.0, (total * coef if log else None)
        if self.mode == "value":
            if inv_scale is not None:
                # Scaled fp16 gradients: clamp in true units. The scale is a power of two: the round trip is exact.
                F.scale_(grads, inv_scale)
            F.clip_by_value_(grads, self.min_value, self.max_value)
            # The norm after clamping costs a second pass: only on logging steps.
            after = F.total_norm(F.grad_norms(grads, self.norm_type), self.norm_type).to(total.device) if log else None
            if inv_scale is not None:
                # Back to scaled units. Clamping made +-Inf finite: put NaN back on an overflowed step, or
                # GradScaler (which checks inside the fused step) would apply it instead of skipping it.
                F.scale_(grads, torch.where(finite, inv_scale.reciprocal(), float("nan")))
            return false, after
        return false, total

    def _skip_on_device(self, optimizer: Optimizer, grads: list[Tensor], bad: Tensor, scaler: Any) -> None:
        """Skip a fused optimizer's step with no host read."""
        if scaler is None:
            # torch's fused Adam/AdamW/SGD skip the whole update (and undo the step count) when found_inf == 1.
            optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
        else:
            # GradScaler overwrites found_inf in scaler.step(); it skips on non-finite gradients, so make
            # gradients non-finite when the step is bad for another reason (loss or input).
            F.scale_(grads, torch.where(bad, float("nan"), 1.0))

    def _should_log(self, trainer: "pl.Trainer") -> bool:
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None:
            return bool(connector.should_update_logs)
        return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0

    def _layer_norms(self, params: list[Tensor], norms: list[Tensor], inv_scale: Optional[Tensor], device: torch.device) -> tuple[list[str], list[Tensor]]:
        if self.log_norms == "total":
            return [], []
        names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]
        norms = [n.to(device) for n in norms]
        if inv_scale is not None:
            norms = [n * inv_scale for n in norms]
        if self.log_norms == "parameter":
            return names, [n.float() for n in norms]
        layers: dict[str, list[Tensor]] = {}
        for name, n in zip(names, norms):
            layers.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(n)
        return list(layers), [F.total_norm(ns, self.norm_type).float() for ns in layers.values()]

    def _data_problems(self) -> list[str]:
        problems = []
        for batch_idx, batch, flag in self._window_batches:
            if batch is not None and flag is not None and bool(flag):
                problems += [f"batch {batch_idx}: {p}" for p in describe_nonfinite(batch)]
        return problems

    def _handle_bad(
        self, trainer: "pl.Trainer", optimizer: Optimizer, opt_idx: int, params: list[Tensor],
        norms: list[Tensor], grads: list[Tensor], scaler: Any, streak: int, counts: dict[str, int],
    ) -> None:
        if self.nan_policy == "ignore":
            return
        if self.nan_policy == "halve_lr":
            tally = self._tallies[opt_idx]
            scale = tally.lr_scale * self.lr_factor
            self._set_lr_scale(opt_idx, scale if self.min_lr_scale is None else max(scale, self.min_lr_scale))
            tally.healthy_steps = 0
        stop = self.nan_policy == "raise" or (
            self.max_consecutive_nonfinite is not None and streak >= self.max_consecutive_nonfinite
        )
        warn_now = stop or self._warn_due(counts["nonfinite_steps"])
        if not (stop or warn_now):
            self._skip(optimizer, params, grads, scaler)
            return
        flags = torch.stack([~torch.isfinite(n).to(grads[0].device) for n in norms]).tolist()  # bad path: one more read
        bad_names = [self._names.get(id(p), f"param{i}") for i, (p, f) in enumerate(zip(params, flags)) if f]
        action = "raised NonFiniteGradientError" if stop else (
            "step skipped, LR scaled down" if self.nan_policy == "halve_lr" else "step skipped")
        info = BadStep(
            global_step=trainer.global_step, epoch=trainer.current_epoch,
            batch_idx=self._window_batches[-1][0] if self._window_batches else -1,
            optimizer_idx=opt_idx, nonfinite_names=bad_names, num_params=len(params),
            loss_nonfinite=bool(self._loss_bad) if self._loss_bad is not None else False,
            input_problems=self._data_problems(), consecutive=streak,
            skipped_total=counts["nonfinite_steps"] - (1 if stop else 0),
            lr_scale=self._tallies[opt_idx].lr_scale, action=action,
        )
        message = describe(info)
        if stop:
            for hook in self._lr_hooks:
                hook.restore()
            if self.nan_policy != "raise":
                message = f"{streak} consecutive steps with non-finite gradients (max_consecutive_nonfinite=" \
                          f"{self.max_consecutive_nonfinite}).\n" + message
            raise NonFiniteGradientError(message, trainer.global_step, bad_names, streak)
        self._skip(optimizer, params, grads, scaler)
        rank_zero_warn(message, category=RuntimeWarning)

    def _skip(self, optimizer: Optimizer, params: list[Tensor], grads: list[Tensor], scaler: Any) -> None:
        """Make this optimizer step a no-op for weights and optimizer state."""
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused + GradScaler: grad=None trips the scaler; non-finite grads make it skip instead.
            F.scale_(grads, float("nan"))
            return
        # Optimizers skip parameters whose grad is None: no update, no momentum/moment/step change.
        # (Zeroing would still move weights through momentum and weight decay.)
        for p in params:
            p.grad = None

    def _warn_due(self, nonfinite_total: int) -> bool:
        # Rate limit: warn at the 1st, 2nd, 4th, 8th, ... bad step.
        return nonfinite_total > 0 and nonfinite_total & (nonfinite_total - 1) == 0

    def _check_device_skips(self, trainer: "pl.Trainer", tally: StepCounters, streak: int, counts: dict[str, int]) -> None:
        """Fused skip path: skips happened on the device; warn/raise when we next read the counters."""
        new = counts["nonfinite_steps"] - tally.reported_nonfinite
        if new <= 0:
            return
        tally.reported_nonfinite = counts["nonfinite_steps"]
        if self.max_consecutive_nonfinite is not None and streak >= self.max_consecutive_nonfinite:
            raise NonFiniteGradientError(
                f"{streak} consecutive steps with non-finite gradients (max_consecutive_nonfinite="
                f"{self.max_consecutive_nonfinite}); all were skipped on the device (fused optimizer), "
                f"weights are finite. Global step {trainer.global_step}, epoch {trainer.current_epoch}.",
                trainer.global_step, [], streak,
            )
        rank_zero_warn(
            f"{new} step(s) with non-finite gradients were skipped on the device (fused optimizer) up to global "
            f"step {trainer.global_step}; {counts['nonfinite_steps']} in total, {streak} in a row now.",
            category=RuntimeWarning,
        )

    def _healthy(self, opt_idx: int) -> None:
        tally = self._tallies[opt_idx]
        if self.lr_recovery_steps is None or tally.lr_scale >= 1.0:
            return
        tally.healthy_steps += 1
        if tally.healthy_steps >= self.lr_recovery_steps:  # like GradScaler's growth interval
            self._set_lr_scale(opt_idx, min(1.0, tally.lr_scale / self.lr_factor))
            tally.healthy_steps = 0

    def _set_lr_scale(self, opt_idx: int, scale: float) -> None:
        """Record the scale (saved in checkpoints) and hand it to the optimizer's step hooks."""
        self._tallies[opt_idx].lr_scale = scale
        if opt_idx < len(self._lr_hooks):
            self._lr_hooks[opt_idx].scale = scale

    def _log(
        self, trainer: "pl.Trainer", opt_idx: int, total: float, total_clipped: float, counts: dict[str, int],
        layer_names: list[str], layer_values: list[float],
    ) -> None:
        suffix = f"_opt{opt_idx}" if opt_idx > 0 else ""
        metrics = {
            f"grad_norm/total{suffix}": total,
            f"grad_norm/total_clipped{suffix}": total_clipped,
            f"grad_clip/steps{suffix}": counts["steps"],
            f"grad_clip/nonfinite_steps{suffix}": counts["nonfinite_steps"],
            f"grad_clip/skipped_steps{suffix}": self._skipped(counts["nonfinite_steps"]),
            f"grad_clip/amp_overflows{suffix}": counts["amp_overflows"],
            f"grad_clip/lr_scale{suffix}": self._tallies[opt_idx].lr_scale,
        }
        if self.mode == "norm":
            # Value mode checks "did clamping change anything" only on logging steps (total vs total_clipped).
            metrics[f"grad_clip/clipped_steps{suffix}"] = counts["clipped_steps"]
            metrics[f"grad_clip/max_norm{suffix}"] = self.max_norm
        group = "grad_norm_layer" if self.log_norms == "layer" else "grad_norm_param"
        metrics.update({f"{group}/{name}{suffix}": v for name, v in zip(layer_names, layer_values)})
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
