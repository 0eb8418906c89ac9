"""Checkpoint resume continuity and mixed precision (16-mixed with GradScaler, bf16-mixed) on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from faults import FaultModel, StepRecorder, make_loader, trainer
from pytorch_lightning.plugins import MixedPrecision

from lightning_clip import GradientClipping


def fit_quiet(t, model, loader, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader, **kw)


def make_cb():
    return GradientClipping(max_norm=0.5, nan_policy="halve_lr", lr_recovery_steps=4)


def test_resume_continues_exactly(tmp_path):
    bad = (2, 8)
    # Identical batches: Lightning restarts a non-stateful loader on resume, so the data order must not matter.
    loader = lambda: make_loader(n=48, repeat=True)
    full_cb = make_cb()
    full = FaultModel(optimizer="sgd_momentum", nan_loss_at=bad, scheduler="step")
    fit_quiet(trainer(tmp_path / "full", [full_cb], max_steps=12), full, loader())

    first_cb = make_cb()
    first = FaultModel(optimizer="sgd_momentum", nan_loss_at=bad, scheduler="step")
    t1 = trainer(tmp_path / "a", [first_cb], max_steps=6)
    fit_quiet(t1, first, loader())
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    state = saved["callbacks"][first_cb.state_key]["optimizers"][0]
    # mid-run: one reduction (step 2), three healthy steps towards recovery (3, 4, 5)
    assert state["control"]["lr_scale"] == 0.5 and state["remedy"]["healthy_steps"] == 3
    assert state["counters"]["nonfinite_steps"] == 1 and state["counters"]["steps"] == 6
    # the optimizer's own state stores the scheduler's LR, not the scaled one: the two never double up
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.7**2)

    resumed_cb = make_cb()
    resumed = FaultModel(optimizer="sgd_momentum", nan_loss_at=bad, scheduler="step")
    t2 = trainer(tmp_path / "b", [resumed_cb], max_steps=12)
    fit_quiet(t2, resumed, loader(), ckpt_path=str(ckpt))

    assert resumed_cb.state_dict() == full_cb.state_dict()
    assert resumed_cb.lr_scales == full_cb.lr_scales == [0.5]  # recovered at step 6, halved again at step 8
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert t2.optimizers[0].param_groups[0]["lr"] == full.trainer.optimizers[0].param_groups[0]["lr"]


def test_two_instances_keep_separate_state(tmp_path):
    a = GradientClipping(mode="norm", max_norm=1e-4)
    b = GradientClipping(mode="value", clip_value=0.01, nan_policy="ignore")
    assert a.state_key != b.state_key
    t = trainer(tmp_path, [b, a], max_steps=4)  # b (ignore) first: it sees the NaN before a skips the step
    fit_quiet(t, FaultModel(nan_loss_at=(1,)), make_loader())
    t.save_checkpoint(tmp_path / "x.ckpt")
    states = torch.load(tmp_path / "x.ckpt", weights_only=False)["callbacks"]
    a_state, b_state = states[a.state_key]["optimizers"][0], states[b.state_key]["optimizers"][0]
    a_state, b_state = a_state["counters"], b_state["counters"]
    assert a_state["nonfinite_steps"] == 1 and b_state["nonfinite_steps"] == 1
    assert a_state["clipped_steps"] == 3  # every good step: a sees b's clamped gradients
    assert b_state["clipped_steps"] == 3  # value mode counts the good steps on which clamping changed an element


def fp16(init_scale: float = 2.0**16):
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_fp16_overflows_are_not_divergence(tmp_path):
    # A huge initial scale overflows the fp16 backward for several steps in a row: GradScaler's normal start.
    cb = GradientClipping(max_norm=1.0, nan_policy="halve_lr", max_consecutive_nonfinite=2)
    model = FaultModel(optimizer="sgd_momentum", loss_scale=100.0)
    t = trainer(tmp_path, [cb], max_steps=20, plugins=[fp16(init_scale=2.0**40)])
    fit_quiet(t, model, make_loader(n=160))
    counts = cb.counters
    assert counts["amp_overflows"] >= 3
    assert counts["nonfinite_steps"] == 0 and counts["skipped_steps"] == 0
    assert cb.lr_scales == [1.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw_fused"])
def test_fp16_nan_loss_is_divergence(tmp_path, optimizer):
    cb = GradientClipping(max_norm=1.0, nan_policy="halve_lr")
    rec = StepRecorder()
    t = trainer(tmp_path, [cb, rec], max_steps=8, plugins=[fp16(2.0**8)])
    fit_quiet(t, FaultModel(optimizer=optimizer, nan_loss_at=(4,)), make_loader())
    assert cb.counters["nonfinite_steps"] == 1 and cb.counters["amp_overflows"] == 0
    assert cb.lr_scales == [0.5]
    s = rec.steps[4]
    assert all(torch.equal(a, b) for a, b in zip(s["weights_before"], s["weights_after"]))


def test_fp16_fused_norm_clipping_uses_true_gradient_units(tmp_path):
    """Fused optimizers under fp16 see scaled gradients in the hook; the clip must be in unscaled units."""
    max_norm, lr = 0.05, 0.1
    rec = StepRecorder()
    cb = GradientClipping(max_norm=max_norm)
    model = FaultModel(optimizer="sgd", lr=lr, loss_scale=50.0)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=lr, fused=True)
    t = trainer(tmp_path, [cb, rec], max_steps=3, plugins=[fp16(2.0**10)])
    fit_quiet(t, model, make_loader())
    for s in rec.steps:
        update = torch.cat([(a - b).double().flatten() for a, b in zip(s["weights_before"], s["weights_after"])])
        # plain SGD: the update is lr * (unscaled, clipped) gradient
        assert float(update.norm()) / lr == pytest.approx(max_norm, rel=1e-2)


def test_bf16_nan_step_skipped(tmp_path):
    cb = GradientClipping(max_norm=1.0, nan_policy="skip")
    rec = StepRecorder()
    t = trainer(tmp_path, [cb, rec], max_steps=6, plugins=[MixedPrecision("bf16-mixed", "cpu")])
    fit_quiet(t, FaultModel(optimizer="adamw", nan_loss_at=(3,)), make_loader())
    s = rec.steps[3]
    assert all(torch.equal(a, b) for a, b in zip(s["weights_before"], s["weights_after"]))
    assert cb.counters["skipped_steps"] == 1 and cb.counters["amp_overflows"] == 0


def test_retuned_threshold_keeps_state_on_resume(tmp_path):
    # Measure-then-tune: resuming with another max_norm must not drop the LR scale and counters.
    first = GradientClipping(max_norm=1.0, nan_policy="halve_lr")
    t1 = trainer(tmp_path / "a", [first], max_steps=4)
    fit_quiet(t1, FaultModel(nan_loss_at=(1, 2)), make_loader(n=32))
    t1.save_checkpoint(tmp_path / "x.ckpt")
    retuned = GradientClipping(max_norm=0.3, nan_policy="halve_lr")
    assert retuned.state_key == first.state_key
    t2 = trainer(tmp_path / "b", [retuned], max_steps=6)
    fit_quiet(t2, FaultModel(), make_loader(n=48), ckpt_path=str(tmp_path / "x.ckpt"))
    assert retuned.lr_scales == [0.25]
    assert retuned.counters["nonfinite_steps"] == 2 and retuned.counters["steps"] == 6


class Watch(StepRecorder):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.steps[-1]["overflows"] = trainer.callbacks[0].counters["amp_overflows"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused"])
def test_fp16_value_clipping_never_applies_an_overflowed_step(tmp_path, optimizer):
    # Clamping turns +-Inf into finite values; a fused optimizer's GradScaler check comes after the hook.
    cb = GradientClipping(mode="value", clip_value=0.01)
    rec = Watch()
    # Settings where some overflows give +-Inf gradients (not only NaN), which clamping makes finite.
    t = trainer(tmp_path, [cb, rec], max_steps=40, plugins=[fp16(init_scale=2.0**16)])
    fit_quiet(t, FaultModel(optimizer=optimizer, lr=0.01, loss_scale=10.0), make_loader(n=320))
    previous = 0
    overflow_steps = 0
    for s in rec.steps:
        moved = not all(torch.equal(a, b) for a, b in zip(s["weights_before"], s["weights_after"]))
        overflowed = s["overflows"] > previous
        previous = s["overflows"]
        overflow_steps += overflowed
        assert moved != overflowed, f"step {s['global_step']}: overflowed={overflowed}, weights moved={moved}"
    assert overflow_steps >= 3


def test_fp16_overflow_steps_do_not_count_towards_lr_recovery(tmp_path):
    class Scales(Watch):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.steps[-1]["lr_scale"] = trainer.callbacks[0].lr_scales[0]

    cb = GradientClipping(nan_policy="halve_lr", lr_recovery_steps=2)
    rec = Scales()
    # step 0: NaN loss (divergence: halve); then GradScaler overflows from the huge initial scale
    t = trainer(tmp_path, [cb, rec], max_steps=20, plugins=[fp16(init_scale=2.0**20)])
    fit_quiet(t, FaultModel(optimizer="sgd_momentum", loss_scale=100.0, nan_loss_at=(0,)), make_loader(n=160))
    overflow_flags = [b["overflows"] > a["overflows"] for a, b in zip(rec.steps, rec.steps[1:])]
    assert sum(overflow_flags) >= 3 and rec.steps[0]["lr_scale"] == 0.5
    recovered_at = next(i for i, s in enumerate(rec.steps) if s["lr_scale"] == 1.0)
    healthy = [not f for f in overflow_flags[:recovered_at]]
    assert sum(healthy) == 2 and healthy[-1]  # exactly two non-overflow steps, the last one recovers
