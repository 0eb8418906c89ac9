"""GPU-only checks (skipped without CUDA): no host sync in the hook, numerics, AMP on the device.

`torch.cuda.set_sync_debug_mode("error")` turns any device-to-host sync inside the hook into an error.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from faults import FaultModel, StepRecorder, make_loader

from lightning_clip import GradientClipping
from lightning_clip import functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_trainer(tmp_path, callbacks, max_steps=8, **kw):
    return pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


class SyncChecked(GradientClipping):
    """Runs the hook with sync debug mode "error" on steps that do not log."""

    checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        logs = bool(trainer.loggers) and trainer._logger_connector.should_update_logs
        # A fused optimizer's first step, before it has state, is decided on the host (documented: one read).
        first_fused = self.nan_policy == "skip" and not optimizer.state
        allowed = logs or first_fused
        torch.cuda.set_sync_debug_mode(0 if allowed else "error")
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        self.checked += 0 if allowed else 1


@pytest.mark.parametrize(
    "kwargs,optimizer",
    [
        ({"nan_policy": "ignore"}, "sgd_momentum"),
        ({"nan_policy": "ignore", "mode": "value", "clip_value": 0.01}, "adamw"),
        ({"nan_policy": "skip"}, "adamw_fused"),
        ({"nan_policy": "skip", "check_inputs": True}, "adam_fused"),
    ],
)
def test_hook_never_syncs_on_non_logging_steps(tmp_path, kwargs, optimizer):
    cb = SyncChecked(**kwargs)
    rec = StepRecorder()
    model = FaultModel(optimizer=optimizer, nan_loss_at=(3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu_trainer(tmp_path, [cb, rec], max_steps=10, log_every_n_steps=5).fit(model, make_loader(n=80))
    assert cb.checked >= 7
    if kwargs["nan_policy"] == "skip":
        s = rec.steps[3]
        assert all(torch.equal(a, b) for a, b in zip(s["weights_before"], s["weights_after"]))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert cb.counters["skipped_steps"] == 1


def test_norms_and_clipping_on_gpu_match_float64():
    torch.manual_seed(0)
    shapes = [(512, 256), (256,), (1000,), (3, 5, 7)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float32]
    grads = [torch.randn(s, device="cuda").to(d) * 3 for s, d in zip(shapes, dtypes)]
    ref = torch.cat([g.double().cpu().flatten() for g in grads])
    for p in (1.0, 2.0, float("inf")):
        total = F.total_norm(F.grad_norms(grads, p), p)
        assert total.device.type == "cuda"
        assert float(total) == pytest.approx(float(torch.linalg.vector_norm(ref, p)), rel=1e-5)
    grads32 = [g.float() for g in grads]
    before = torch.cat([g.double().cpu().flatten() for g in grads32])
    F.clip_by_norm_(grads32, 1.0, F.total_norm(F.grad_norms(grads32, 2.0), 2.0))
    after = torch.cat([g.double().cpu().flatten() for g in grads32])
    assert float(after.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(torch.nn.functional.cosine_similarity(before, after, dim=0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw"])
def test_fp16_on_gpu_skips_nan_step_and_counts_overflows_apart(tmp_path, optimizer):
    cb = GradientClipping(max_norm=1.0, nan_policy="halve_lr")
    rec = StepRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu_trainer(tmp_path, [cb, rec], max_steps=10, precision="16-mixed", logger=False).fit(
            FaultModel(optimizer=optimizer, nan_loss_at=(6,)), make_loader(n=80)
        )
    s = rec.steps[6]
    assert all(torch.equal(a, b) for a, b in zip(s["weights_before"], s["weights_after"]))
    assert cb.counters["nonfinite_steps"] == 1 and cb.lr_scales == [0.5]


def test_bf16_on_gpu(tmp_path):
    cb = GradientClipping(max_norm=0.1, nan_policy="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu_trainer(tmp_path, [cb], max_steps=6, precision="bf16-mixed", logger=False).fit(
            FaultModel(optimizer="adamw_fused", nan_loss_at=(2,)), make_loader()
        )
    assert cb.counters["skipped_steps"] == 1
