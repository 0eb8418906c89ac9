"""halve_lr: the LR applied to a step equals the user's schedule x lr_factor^k, for any scheduler.

The applied LR is measured from the plain-SGD update itself: w_after = w_before - lr * g.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from faults import FaultModel, StepRecorder, make_loader, make_scheduler, trainer

from lightning_clip import GradientClipping, StepLRScale


def applied_lr(step: dict, index: int = 0) -> float:
    g = step["grads"][index]
    dw = step["weights_after"][index] - step["weights_before"][index]
    mask = g.abs() > 1e-4
    return float((-dw[mask].double() / g[mask].double()).median())


def expected_scales(n_steps, bad, factor, floor=None, recovery=None):
    """Independent model of the LR scale in force for each step (the step itself applies it)."""
    scale, healthy, out = 1.0, 0, []
    for t in range(n_steps):
        out.append(scale)
        if t in bad:
            scale = scale * factor if floor is None else max(scale * factor, floor)
            healthy = 0
        elif recovery is not None and scale < 1.0:
            healthy += 1
            if healthy >= recovery:
                scale, healthy = min(1.0, scale / factor), 0
    return out


class PlateauModel(FaultModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", torch.nan_to_num(loss, nan=1e6).detach() + 10.0 * self.global_step)  # never improves
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss", "interval": "step"}}


def run(tmp_path, model, cb, steps):
    rec = StepRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [cb, rec], max_steps=steps).fit(model, make_loader(n=8 * steps))
    return rec


def shadow_schedule(name, lr, steps):
    """The LRs the user's scheduler gives with no callback at all."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(name, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("scheduler", [None, "step", "lambda", "onecycle", "cosine", "plateau"])
def test_applied_lr_is_schedule_times_factor_power_k(tmp_path, scheduler):
    steps, bad, factor = 14, {2, 6}, 0.5
    cb = GradientClipping(mode="none", nan_policy="halve_lr", lr_factor=factor)
    model_cls = PlateauModel if scheduler == "plateau" else FaultModel
    model = model_cls(
        optimizer="sgd", lr=0.1, nan_loss_at=tuple(bad), scheduler=None if scheduler == "plateau" else scheduler
    )
    rec = run(tmp_path, model, cb, steps)
    scales = expected_scales(steps, bad, factor)
    for t, s in enumerate(rec.steps):
        if t in bad:
            continue
        assert applied_lr(s) == pytest.approx(s["group_lr"] * scales[t], rel=1e-4), f"step {t}"
    group_lrs = [s["group_lr"] for s in rec.steps]
    if scheduler in (None, "step", "lambda", "onecycle", "cosine"):
        # The schedule itself is undisturbed: the group LR outside the step is the scheduler's own.
        assert group_lrs == pytest.approx(shadow_schedule(scheduler, 0.1, steps) if scheduler else [0.1] * steps)
    else:
        assert min(group_lrs) < 0.1  # the plateau scheduler did reduce on its own
    assert cb.lr_scales == [0.25]
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        group_lrs[-1] if scheduler in (None, "plateau") else shadow_schedule(scheduler, 0.1, steps + 1)[-1]
    )


def test_floor_and_recovery(tmp_path):
    steps, bad = 16, {1, 2, 3, 10}
    cb = GradientClipping(mode="none", nan_policy="halve_lr", lr_factor=0.5, min_lr_scale=0.3, lr_recovery_steps=3)
    rec = run(tmp_path, FaultModel(optimizer="sgd", nan_loss_at=tuple(bad)), cb, steps)
    scales = expected_scales(steps, bad, 0.5, floor=0.3, recovery=3)
    assert min(scales) == 0.3 and scales[-1] > scales[11]  # the model really floors and recovers
    for t, s in enumerate(rec.steps):
        if t not in bad:
            assert applied_lr(s) == pytest.approx(0.1 * scales[t], rel=1e-4), f"step {t}"
    assert cb.lr_scales[0] == pytest.approx(expected_scales(steps + 1, bad, 0.5, 0.3, 3)[-1])


def test_recovery_never_exceeds_one(tmp_path):
    cb = GradientClipping(mode="none", nan_policy="halve_lr", lr_recovery_steps=1)
    run(tmp_path, FaultModel(optimizer="sgd", nan_loss_at=(1,)), cb, 8)
    assert cb.lr_scales == [1.0]


class TwoGroups(FaultModel):
    def configure_optimizers(self):
        opt = torch.optim.SGD(
            [{"params": self.net[0].parameters(), "lr": 0.1}, {"params": self.net[2].parameters(), "lr": 0.01}]
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0 / (1 + t), lambda t: 0.9**t])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_each_param_group_keeps_its_own_schedule(tmp_path):
    steps, bad = 8, {3}
    cb = GradientClipping(mode="none", nan_policy="halve_lr")
    rec = run(tmp_path, TwoGroups(optimizer="sgd", nan_loss_at=tuple(bad)), cb, steps)
    scales = expected_scales(steps, bad, 0.5)
    for t, s in enumerate(rec.steps):
        if t in bad:
            continue
        assert applied_lr(s, 0) == pytest.approx(0.1 / (1 + t) * scales[t], rel=1e-4)
        assert applied_lr(s, 2) == pytest.approx(0.01 * 0.9**t * scales[t], rel=1e-4)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers; optimizer 1's gradients turn NaN at one step."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a = torch.nn.Linear(8, 1)
        self.b = torch.nn.Linear(8, 1)
        self.bad_step = bad_step
        self.calls = 0
        self.lrs: list[tuple[float, float]] = []

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        opt_a, opt_b = self.optimizers()
        for i, (opt, layer) in enumerate(((opt_a, self.a), (opt_b, self.b))):
            loss = torch.nn.functional.mse_loss(layer(x), y)
            if i == 1 and batch_idx == self.bad_step:
                loss = loss * float("nan")
            before = layer.weight.detach().clone()
            opt.zero_grad()
            self.manual_backward(loss)
            g = layer.weight.grad.detach().clone()
            opt.step()
            if torch.isfinite(g).all() and not torch.equal(before, layer.weight):
                self.lrs.append((i, float(((before - layer.weight.detach()) / g).median())))

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.2)


def test_several_optimizers_each_keep_their_own_scale(tmp_path):
    cb = GradientClipping(mode="none", nan_policy="halve_lr")
    model = TwoOptimizers(bad_step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [cb], max_steps=10).fit(model, make_loader(n=40))
    assert cb.lr_scales == [1.0, 0.5]
    a = [lr for i, lr in model.lrs if i == 0]
    b = [lr for i, lr in model.lrs if i == 1]
    assert a == pytest.approx([0.1] * 5, rel=1e-4)
    assert b == pytest.approx([0.2, 0.2, 0.1, 0.1], rel=1e-4)  # step 2 skipped, then halved


def test_step_lr_scale_standalone_restores_on_exception():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    hook = StepLRScale(opt, 0.5)

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        opt.step(closure)
    assert opt.param_groups[0]["lr"] == 0.5  # the post-hook did not run...
    w.grad = torch.ones(2)
    opt.step()  # ...but the next step's pre-hook restores before applying again
    assert torch.equal(w.detach(), torch.full((2,), -0.5)) and opt.param_groups[0]["lr"] == 1.0
    hook.remove()
    opt.step()
    assert torch.equal(w.detach(), torch.full((2,), -1.5))
