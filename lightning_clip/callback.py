"""The Lightning wiring: :class:`GradientClipping` hands what the Trainer knows to the engine.

The engine does the work (measure, detect, clip, remedy, report); this module only adapts Lightning: it hooks
``on_before_optimizer_step`` and the micro-batch hooks, tells the engine the precision plugin's GradScaler,
whether the strategy shards or replicates, whether this step logs, and writes the metrics to
``trainer.loggers``. The class derives from the ``Callback`` of ``pytorch_lightning`` and, when installed,
of ``lightning.pytorch``, so either Trainer and either ``LightningCLI`` accepts it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import metrics as M
from lightning_clip import tensorboard as TB
from lightning_clip._namespaces import CallbackBase
from lightning_clip.remedies import Remedy
from lightning_clip.rules import ClipRule
from lightning_clip.settings import Settings, declared_default


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
            ``"raise"`` raises :class:`~lightning_clip.NonFiniteGradientError`; ``"ignore"`` does nothing;
            ``"rollback"`` restores the newest healthy in-memory snapshot, skips a data window and lowers the LR
            (:class:`~lightning_clip.remedies.Rollback`). Or a :class:`~lightning_clip.remedies.Remedy` object with
            its own settings (in YAML: a ``class_path``).
        lr_factor: ``halve_lr``: the factor applied per bad step, in (0, 1) (refused, when changed, under a policy
            that does not read it).
        min_lr_scale: ``halve_lr``/``rollback``: the LR scale never goes below this (in (0, 1]); None for no floor.
        lr_recovery_steps: ``halve_lr``/``rollback``: after this many healthy steps in a row, undo one reduction
            (never above 1.0). None never recovers.
        max_consecutive_nonfinite: ``skip``/``halve_lr``/``rollback``: raise after this many bad steps in a row of one
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
            sync-free skip as NaN steps; counted in ``grad_clip/spike_skips``. Needs a ``nan_policy`` that skips
            (``"skip"``, ``"halve_lr"``: a spike does not lower the LR; ``"rollback"``: a spike is a bad step). None:
            off.
        spike_window: how many recent healthy norms ``skip_spikes`` (and losses ``loss_spikes``) compare with
            (the first 20 only collect).
        loss_spikes: a step whose loss (the mean over its micro-batches) exceeds the mean + ``loss_spikes``
            standard deviations of the losses of the last ``spike_window`` healthy steps is a spike: skipped
            under ``skip``/``halve_lr``, a bad step towards ``rollback_after`` under ``rollback``. On the device,
            NaN-safe, kept in checkpoints; counted in ``grad_clip/spike_skips``. None: off.
        snapshot_every: ``rollback``: keep an in-memory snapshot after every ``snapshot_every``-th step when the
            steps since the last one were healthy and the loss is near its best; trusted once the next
            ``snapshot_every`` steps are healthy too (at most three are kept).
        rollback_after: ``rollback``: this many bad steps in a row trigger a rollback; fewer are skipped.
        rollback_skip_steps: ``rollback``: after a rollback, skip the bad step and this many more steps (the
            data window).
        rollback_lr_factor: ``rollback``: multiply the LR by this at each rollback, in (0, 1] (1.0 keeps it).
        divergence_margin: ``rollback``: also roll back when the loss has risen more than this fraction above the
            best smoothed loss of the run (and above its own noise) for a few steps: a too-high LR drifts up or
            collapses to a plateau without turning NaN (:mod:`lightning_clip.divergence`). None: off.
        rollbacks_per_snapshot: ``rollback``: at most this many LR reductions from one snapshot; then an older
            trusted one, and with none left the run stops with a diagnosis.
        vanishing_ratio: on logging steps, warn about layers whose ``||grad W|| / ||W||`` stays below this (and
            below 1e-3 of the largest layer's) on ``vanishing_patience`` logging steps in a row: the article's
            vanishing gradients, named shallowest first (at most 3 warnings a run); counted in
            ``grad_health/vanishing_layers``. The default 1e-8 sits between a 20-layer sigmoid MLP's first layers
            (~1e-18) and healthy or converged models (7e-6 and above, measured). None: off (no weight norms measured).
        vanishing_patience: logging steps in a row below ``vanishing_ratio`` before a layer is named.
        update_ratio_every: with ``vanishing_ratio`` set and ``log_norms="layer"``, log each layer's update-to-weight
            ratio ``grad_health/update_ratio/<layer>`` (``||dW|| / ||W||`` of the update applied after a logging
            step, read at the next) for the 1st and then every ``update_ratio_every``-th logging step. On the CPU
            the weights before the update are copied into buffers kept between logging steps: one copy of the
            parameters (elsewhere the copy is freed after each measure). None: off (no copy, no update-ratio tags).

    Logged on logging steps (``Trainer(log_every_n_steps)``) to every logger of the Trainer (to a
    ``TensorBoardLogger`` as one event per step: one ``Summary`` holding every tag):
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
        max_norm: float = declared_default("max_norm"),
        norm_type: float = declared_default("norm_type"),
        clip_value: float | None = declared_default("clip_value"),
        min_value: float | None = declared_default("min_value"),
        max_value: float | None = declared_default("max_value"),
        nan_policy: str | Remedy = "skip",
        lr_factor: float = declared_default("lr_factor"),
        min_lr_scale: float | None = declared_default("min_lr_scale"),
        lr_recovery_steps: int | None = declared_default("lr_recovery_steps"),
        max_consecutive_nonfinite: int | None = declared_default("max_consecutive_nonfinite"),
        check_inputs: bool = declared_default("check_inputs"),
        log_norms: str = declared_default("log_norms"),
        eps: float = declared_default("eps"),
        name: str | None = None,
        rule: ClipRule | None = None,
        skip_spikes: float | None = None,
        spike_window: int = 128,
        loss_spikes: float | None = None,
        snapshot_every: int = declared_default("snapshot_every"),
        rollback_after: int = declared_default("rollback_after"),
        rollback_skip_steps: int = declared_default("rollback_skip_steps"),
        rollback_lr_factor: float = declared_default("rollback_lr_factor"),
        divergence_margin: float | None = declared_default("divergence_margin"),
        rollbacks_per_snapshot: int = declared_default("rollbacks_per_snapshot"),
        vanishing_ratio: float | None = 1e-8,
        vanishing_patience: int = 3,
        update_ratio_every: int | None = declared_default("update_ratio_every"),
    ) -> None:
        super().__init__()
        values = dict(locals())
        del values["self"], values["__class__"]
        self.__dict__["_settings"] = Settings(values, GradientClipping.__init__)
        self.engine = self._settings.engine
        self._windows_written: list[dict[str, Any]] = []
        self.engine.warn = _warn

    # ------------------------------------------------------------------ settings, live after construction
    # Each argument reads as the value in force (``clip.max_norm``); assigning one (``clip.max_norm = 0.01``) is
    # checked as in __init__ and takes effect from the next step, or is refused with the reason (settings.py):
    # any option a registered rule or remedy declares is live, with no edit here.
    _settings: Settings

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("_settings")  # absent while unpickling: a plain AttributeError
        if settings is None or name.startswith("__") or not settings.knows(name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return settings.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        settings = self.__dict__.get("_settings")
        if settings is not None and settings.knows(name):
            settings.assign(name, value)
        else:
            super().__setattr__(name, value)

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
        if stage == "fit" and trainer.loggers and self.log_norms != "none":
            for other in trainer.callbacks:
                clash = isinstance(other, GradientClipping) and other.log_norms != "none" and other.name == self.name
                if clash and other is not self:
                    raise MisconfigurationException(
                        f"Two GradientClipping callbacks (mode={self.mode!r} and mode={other.mode!r}) would log "
                        f"the same tags (name={self.name!r}): give each a distinct `name` (its tags get the "
                        "suffix /<name>), or log_norms='none' to one of them."
                    )
        if stage == "fit" and trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"`Trainer(gradient_clip_val={trainer.gradient_clip_val!r})` and `GradientClipping` would both clip. "
                "Remove `gradient_clip_val` (and `gradient_clip_algorithm`) from the Trainer; configure "
                "clipping on the callback: GradientClipping(mode='norm', max_norm=...) or mode='value'."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.engine.attach(trainer.optimizers, pl_module.named_parameters())
        TB.add_layout(trainer, self.engine)  # the Custom Scalars charts of this callback's tags

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # The sync-free path reads its counters only every so often: a run that ends first is reported here.
        self.engine.finish(trainer.global_step, trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.engine.detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.engine.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.engine.on_exception()  # an interrupted step must not leave the scaled LR behind
        self.engine.finish(trainer.global_step, trainer.current_epoch, failed=True)

    # ------------------------------------------------------------------ per micro-batch
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._follow_optimizers(trainer, pl_module)
        self.engine.observe_batch(batch, batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        windows = self.engine.skipped_windows()
        if windows != self._windows_written:  # a rollback skipped (more of) a data window: keep it beside the logs
            self._windows_written = windows
            path = self.windows_path(trainer)  # on every rank: trainer.log_dir is a collective under DDP
            if trainer.is_global_zero:
                path.write_text(json.dumps(windows, indent=1))

    def windows_path(self, trainer: Any) -> Path:
        """Where the skipped data windows of this run are written (JSON): a restart from an older checkpoint can
        skip the same batches. Call it on every rank: ``trainer.log_dir`` broadcasts under DDP."""
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / M.windows_file(self.name)  # the name `lightning-clip report` looks for

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
        # Rollback markers: only a remedy that restores adds windows (others would pay two copies a step for nothing).
        marks = bool(trainer.loggers) and self.log_norms != "none" and bool(self.engine.remedy.keeps_snapshots)
        windows = len(self.engine.skipped_windows()) if marks else 0  # a few records: a rollback adds one
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
        if marks and len(self.engine.skipped_windows()) > windows:
            metrics = {**metrics, **self._rollback_markers(trainer.global_step)}  # logging step or not
        if metrics:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                # A TensorBoardLogger gets one event holding every tag (its log_metrics writes one per tag, and
                # its writer's queue blocks); any other logger its log_metrics.
                if not TB.write_scalars(logger, metrics, step, trainer.is_global_zero):
                    logger.log_metrics(metrics, step=step)

    def _rollback_markers(self, global_step: int) -> dict[str, float]:
        """The ``grad_clip/rollback`` marker of this step's rollback: the LR scale it left."""
        windows = [w for w in self.engine.skipped_windows() if w["global_step"] == global_step and "lr_scale" in w]
        return {M.tag(M.ROLLBACK, w["optimizer"], self.name): w["lr_scale"] for w in windows}


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
