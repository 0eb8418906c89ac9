"""The Lightning wiring: :class:`GradientClipping` hands what the Trainer knows to the engine.

The engine does the work (measure, detect, clip, remedy, report); this module only adapts Lightning: it hooks
``on_before_optimizer_step`` and the micro-batch hooks, tells the engine the precision plugin's GradScaler,
whether the strategy shards or replicates, whether this step logs, and writes the metrics to
``trainer.loggers``. The class derives from the ``Callback`` of ``pytorch_lightning`` and, when installed,
of ``lightning.pytorch``, so either Trainer and either ``LightningCLI`` accepts it.
"""

from __future__ import annotations

import importlib
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip._namespaces import CallbackBase
from lightning_clip.detect import SpikeDetector
from lightning_clip.engine import ClipEngine
from lightning_clip.remedies import build_remedy
from lightning_clip.rules import ClipRule, build_rule
from lightning_clip.validation import check_count, check_in_range, check_optional_str, check_positive


class GradientClipping(CallbackBase):
    r"""Clip gradients, log their norms and survive NaN/Inf, in ``on_before_optimizer_step``.

    Args:
        mode: the clip rule (:mod:`lightning_clip.rules`). ``"norm"`` rescales all gradients so their global
            ``norm_type``-norm is at most ``max_norm``:
            :math:`g \leftarrow g \cdot \min(1, \text{max\_norm} / (\|g\|_p + \epsilon))`.
            ``"value"`` clamps every element into ``[min_value, max_value]``. ``"none"`` only monitors.
        max_norm: the cap on the global norm (``mode="norm"``).
        norm_type: ``p`` of the norm: any ``p > 0`` or ``float("inf")``. Used for clipping and logging.
        clip_value: ``mode="value"``: the symmetric range ``[-clip_value, clip_value]``.
        min_value: ``mode="value"``: lower bound of an asymmetric range (alone, or with ``max_value``).
        max_value: ``mode="value"``: upper bound of an asymmetric range.
        nan_policy: the remedy (:mod:`lightning_clip.remedies`) when a gradient element is NaN/Inf (or the loss,
            or a checked input): ``"skip"`` makes the optimizer step a no-op (weights and optimizer state
            untouched); ``"halve_lr"`` skips and multiplies the LR by ``lr_factor`` on top of any scheduler;
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
        rule: a clip rule object instead of ``mode`` and its flat arguments (in YAML: a ``class_path``), for
            rules with options of their own.
        skip_spikes: skip (not clip) a step whose total norm exceeds the mean + ``skip_spikes`` standard
            deviations of the last ``spike_window`` healthy norms (OLMo-core's skip-step rule), through the same
            sync-free skip as NaN steps; counted in ``grad_clip/spike_skips``. Needs ``nan_policy`` ``"skip"``
            or ``"halve_lr"`` (a spike does not lower the LR). None: off.
        spike_window: how many recent healthy norms ``skip_spikes`` compares with (the first 20 only collect).

    Logged on logging steps (``Trainer(log_every_n_steps)``) to every logger of the Trainer:
    ``grad_norm/total`` (before clipping), ``grad_norm/total_clipped`` (after), ``grad_norm_layer/<name>``
    or ``grad_norm_param/<name>``, and ``grad_clip/{steps, clipped_steps, nonfinite_steps, skipped_steps,
    amp_overflows, lr_scale, clipped, threshold}`` (``max_norm`` too in norm mode); see
    :mod:`lightning_clip.metrics`. With several optimizers, optimizer ``i > 0`` gets the suffix ``_opt<i>``.

    Example::

        import pytorch_lightning as pl          # or: import lightning.pytorch as pl
        from lightning_clip import GradientClipping

        trainer = pl.Trainer(callbacks=[GradientClipping(mode="norm", max_norm=1.0, nan_policy="skip")])
        trainer.fit(model)

        # asymmetric value range, halve the LR on NaN and recover after 100 healthy steps
        GradientClipping(mode="value", min_value=-0.5, max_value=1.0,
                         nan_policy="halve_lr", lr_recovery_steps=100)
    """

    def __init__(
        self,
        mode: str = "norm",
        max_norm: float = 1.0,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        min_value: float | None = None,
        max_value: float | None = None,
        nan_policy: str = "skip",
        lr_factor: float = 0.5,
        min_lr_scale: float | None = None,
        lr_recovery_steps: int | None = None,
        max_consecutive_nonfinite: int | None = 10,
        check_inputs: bool = False,
        log_norms: str = "layer",
        eps: float = F.EPS,
        name: str | None = None,
        rule: ClipRule | None = None,
        skip_spikes: float | None = None,
        spike_window: int = 128,
    ) -> None:
        super().__init__()
        # Checked whatever the mode and policy: a bad default-carrying setting is a mistake even where unread.
        check_positive("max_norm", max_norm)
        check_in_range("lr_factor", lr_factor, 0.0, 1.0)
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        check_optional_str("name", name)
        value_args = {"clip_value": clip_value, "min_value": min_value, "max_value": max_value}
        if rule is None:
            rule = build_rule(mode, strict=value_args, max_norm=max_norm)
            if max_norm != 1.0 and "max_norm" not in rule.options:
                # max_norm carries a default, so only a changed value shows it was set for nothing.
                raise ValueError(f"`max_norm` does not apply to mode={mode!r}; got max_norm={max_norm!r}.")
        elif mode not in ("norm", getattr(rule, "mode", None)) or any(v is not None for v in value_args.values()):
            raise ValueError(f"`rule` ({rule!r}) replaces `mode` and its bounds; got mode={mode!r} with {value_args}.")
        remedy = build_remedy(
            nan_policy,
            strict={"min_lr_scale": min_lr_scale, "lr_recovery_steps": lr_recovery_steps},
            lr_factor=lr_factor,
            max_consecutive_nonfinite=max_consecutive_nonfinite,
        )
        spikes = None if skip_spikes is None else SpikeDetector(skip_spikes, spike_window, min(20, spike_window))
        self.engine = ClipEngine(
            rule,
            remedy,
            norm_type=norm_type,
            eps=eps,
            check_inputs=check_inputs,
            log_norms=log_norms,
            spike_skip=spikes,
        )
        self.engine.warn = _warn
        self.mode = rule.mode
        self.max_norm = float(max_norm)
        self.norm_type = self.engine.norm_type
        self.min_value = getattr(rule, "min_value", None)
        self.max_value = getattr(rule, "max_value", None)
        self.clip_value = clip_value
        self.nan_policy = nan_policy
        self.lr_factor = float(lr_factor)
        self.min_lr_scale = min_lr_scale
        self.lr_recovery_steps = lr_recovery_steps
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.check_inputs = check_inputs
        self.log_norms = log_norms
        self.eps = self.engine.eps
        self.name = name

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # Not max_norm & co.: re-tuning a threshold on resume must not drop the LR scale and counters.
        return self._generate_state_key(mode=self.mode, name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)

    @property
    def lr_scales(self) -> list[float]:
        """The current LR multiplier of each optimizer (``halve_lr``)."""
        return self.engine.lr_scales

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts over all optimizers (reads the device: not for the hot path)."""
        return self.engine.counters

    def counters_of(self, optimizer_idx: int) -> dict[str, int]:
        """Counts of one optimizer, with its current run of bad steps (``nonfinite_streak``)."""
        return self.engine.counters_of(optimizer_idx)

    # ------------------------------------------------------------------ fit set-up and tear-down
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and _is_deepspeed(trainer.strategy):
            raise MisconfigurationException(
                "GradientClipping does not run under DeepSpeed: the DeepSpeed engine clips, scales and steps inside "
                "its own step, after this callback's hook, and Lightning's DeepSpeed plugin makes clipping a no-op. "
                'Configure it in DeepSpeed instead: `"gradient_clipping": <max_norm>` in the DeepSpeed config (norm '
                "clipping), and its fp16 `loss_scale` settings, which skip overflowing steps; remove GradientClipping."
            )
        sharding = getattr(getattr(trainer.strategy, "sharding_strategy", None), "name", "")
        if stage == "fit" and "HYBRID" in sharding:
            raise MisconfigurationException(
                f"GradientClipping does not support FSDP1 sharding_strategy={sharding}: the norm would have to be "
                "reduced over the shard group only. Use FSDP2 hybrid sharding (ModelParallelStrategy with a 2-D "
                "mesh), which it supports, or ClipEngine.step(optimizer, sharded=<the shard process group>)."
            )
        if stage == "fit" and trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"`Trainer(gradient_clip_val={trainer.gradient_clip_val!r})` and `GradientClipping` would both clip. "
                "Remove `gradient_clip_val` (and `gradient_clip_algorithm`) from the Trainer; configure "
                "clipping on the callback: GradientClipping(mode='norm', max_norm=...) or mode='value'."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.engine.attach(trainer.optimizers, pl_module.named_parameters())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # The sync-free path reads its counters only every so often: a run that ends first is reported here.
        self.engine.finish(trainer.global_step, trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.engine.detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.engine.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.engine.remedy.restore_lr()  # an interrupted step must not leave the scaled LR behind
        self.engine.finish(trainer.global_step, trainer.current_epoch, failed=True)

    # ------------------------------------------------------------------ per micro-batch
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._follow_optimizers(trainer, pl_module)
        self.engine.observe_batch(batch, batch_idx)

    def _follow_optimizers(self, trainer: Any, pl_module: Any) -> None:
        # Optimizers re-created during fit (strategy.setup_optimizers at an epoch start) take over their slots
        # by position: counters, LR scale and statistics carry on. Before the step begins, so its hooks see it.
        if not self.engine.attached_to(trainer.optimizers):
            self.engine.attach(trainer.optimizers, pl_module.named_parameters())

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        self.engine.observe_loss(loss)

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        self._follow_optimizers(trainer, pl_module)  # re-created inside training_step: late, but not lost
        log = bool(trainer.loggers) and self.log_norms != "none" and _should_log(trainer)
        strategy = trainer.strategy
        metrics = self.engine.step(
            optimizer,
            log=log,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            sharded=_flat_sharded(strategy, trainer.world_size),
            distributed=trainer.world_size > 1,
            # 0 = logging off (Lightning's default): read a sync-free remedy's counters every 50 steps.
            read_every=trainer.log_every_n_steps or 50,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
        )
        if metrics:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def _warn(message: str) -> None:
    # A module-level function, not a lambda: the callback must pickle (ddp_spawn, torch.save of a Trainer).
    rank_zero_warn(message, category=RuntimeWarning)


def _should_log(trainer: Any) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None:
        return bool(connector.should_update_logs)
    return bool(trainer.global_step % max(trainer.log_every_n_steps, 1) == 0)


def _is_deepspeed(strategy: Any) -> bool:
    # Both namespaces define a DeepSpeedStrategy (importable without deepspeed installed).
    classes = []
    for module in ("pytorch_lightning.strategies", "lightning.pytorch.strategies"):
        try:
            classes.append(importlib.import_module(module).DeepSpeedStrategy)
        except (ImportError, AttributeError):
            continue
    return any(isinstance(strategy, cls) for cls in classes)


def _flat_sharded(strategy: Any, world_size: int) -> bool | None:
    """FSDP1 shards flat gradients: None lets the engine detect it from the parameters; False under NO_SHARD
    (each rank holds whole gradients). DTensor gradients (FSDP2, tensor parallel) need no hint."""
    if world_size < 2:
        return False
    sharding = getattr(strategy, "sharding_strategy", None)
    return False if sharding is not None and getattr(sharding, "name", "") == "NO_SHARD" else None


__all__ = ["GradientClipping"]
