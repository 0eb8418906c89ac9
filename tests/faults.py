"""Fault-injection models and recorders shared by the NaN-policy tests (real Trainer, CPU)."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger
from torch.utils.data import DataLoader, TensorDataset


def make_loader(
    n: int = 64,
    batch_size: int = 8,
    nan_batches: tuple[int, ...] = (),
    extra_nan: bool = False,
    seed: int = 0,
    repeat: bool = False,
):
    """Deterministic regression data; NaN put into the inputs of the chosen batch indices.

    With ``repeat`` every batch holds the same rows, so results do not depend on where an epoch starts.
    With ``extra_nan`` the NaN goes into a third tensor the model never reads (the gradients stay finite).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randn(n, 1, generator=g)
    if repeat:
        x, y = x[:batch_size].repeat(n // batch_size, 1), y[:batch_size].repeat(n // batch_size, 1)
    extra = torch.zeros(n, 2)
    for b in nan_batches:
        if extra_nan:
            extra[b * batch_size + 1, 1] = float("nan")
        else:
            x[b * batch_size + 1, 2] = float("nan")
    return DataLoader(TensorDataset(x, y, extra), batch_size=batch_size, shuffle=False)


class FaultModel(pl.LightningModule):
    """Small MLP whose loss or one layer's gradient turns non-finite at chosen global steps."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        nan_loss_at: tuple[int, ...] = (),
        inf_grad_at: tuple[int, ...] = (),
        scheduler: str | None = None,
        loss_scale: float = 1.0,
        nan_rank: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.optimizer_name = optimizer
        self.lr = lr
        self.nan_loss_at = set(nan_loss_at)
        self.inf_grad_at = set(inf_grad_at)
        self.scheduler_name = scheduler
        self.loss_scale = loss_scale
        self.nan_rank = nan_rank  # the NaN loss on this rank only (None: every rank)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y) * self.loss_scale
        if self.global_step in self.nan_loss_at and self.nan_rank in (None, self.global_rank):
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_grad_at:
            self.net[2].weight.grad[0, 3] = float("inf")  # one layer only

    def configure_optimizers(self):
        p = self.parameters()
        name = self.optimizer_name
        if name == "sgd":
            opt = torch.optim.SGD(p, lr=self.lr)
        elif name == "sgd_momentum":
            opt = torch.optim.SGD(p, lr=self.lr, momentum=0.9, weight_decay=0.01)
        elif name == "sgd_fused":
            opt = torch.optim.SGD(p, lr=self.lr, momentum=0.9, fused=True)
        elif name == "adam":
            opt = torch.optim.Adam(p, lr=self.lr, foreach=True)
        elif name == "adamw":
            opt = torch.optim.AdamW(p, lr=self.lr, weight_decay=0.1, foreach=True)
        elif name == "adamw_fused":
            opt = torch.optim.AdamW(p, lr=self.lr, weight_decay=0.1, fused=True)
        elif name == "adam_fused":
            opt = torch.optim.Adam(p, lr=self.lr, fused=True)
        else:
            raise ValueError(name)
        if self.scheduler_name is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": make_scheduler(self.scheduler_name, opt), "interval": "step"},
        }


def make_scheduler(name: str, opt: torch.optim.Optimizer):
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    if name == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=200, cycle_momentum=False)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    raise ValueError(name)


def snapshot_optimizer(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict()["state"])


def states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


class StepRecorder(pl.Callback):
    """Records, per optimizer step: weights and optimizer state before/after, the gradient the optimizer
    saw (after every callback ran), and the param group's LR before the step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.steps.append(
            {
                "global_step": trainer.global_step,
                "weights_before": [p.detach().clone() for p in pl_module.parameters()],
                "opt_before": snapshot_optimizer(opt),
                "group_lr": opt.param_groups[0]["lr"],
            }
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Registered after GradientClipping, so this sees what the optimizer will see.
        self.steps[-1]["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.steps[-1]["weights_after"] = [p.detach().clone() for p in pl_module.parameters()]
        self.steps[-1]["opt_after"] = snapshot_optimizer(opt)


def trainer(tmp_path, callbacks, max_steps: int = 10, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        logger=kwargs.pop("logger", False),
        **kwargs,
    )


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def applied_lr(step: dict) -> float:
    """The LR plain SGD applied in one recorded step: ``w_after = w_before - lr * grad``."""
    num = den = 0.0
    for before, after, g in zip(step["weights_before"], step["weights_after"], step["grads"]):
        if g is None:
            continue
        g64 = g.double()
        num += float(((before.double() - after.double()) * g64).sum())
        den += float((g64 * g64).sum())
    return num / den


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def series(self, tag: str) -> list[float]:
        return [m[tag] for _, m in self.records if tag in m]


class DumpPerRank(pl.Callback):
    """At the end of fit, each rank writes its GradientClipping counters, skipped windows and a weights checksum to
    ``<dirpath>/rank<r>.json`` (for multi-process tests: the callbacks run in spawned processes)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        import json
        from pathlib import Path

        from lightning_clip import GradientClipping

        (cb,) = [c for c in trainer.callbacks if isinstance(c, GradientClipping)]
        weights = [p.detach().double() for p in pl_module.parameters()]
        record = {
            "counters": cb.counters,
            "windows": cb.engine.skipped_windows(),
            "checksum": float(sum(w.sum() for w in weights)),
        }
        Path(self.dirpath, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
