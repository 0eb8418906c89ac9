"""Checkpoints written by 0.1.0 still load.

``tests/data/v010_halve_lr.ckpt`` was written by lightning-clip 0.1.0 (commit ``cbf7ce3``) with
``tests/data/make_v010_checkpoint.py`` (its docstring says how): 4 steps of ``nan_policy="halve_lr"`` with a NaN
loss at global step 1, so it holds ``lr_scale == 0.5`` in the callback's ``version: 1`` state.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_clip import ClipEngine, GradientClipping
from lightning_clip.remedies import HalveLR, Skip
from lightning_clip.rules import NormClip

DATA = Path(__file__).parent / "data"
CKPT = DATA / "v010_halve_lr.ckpt"
STATE_KEY = "GradientClipping{'mode': 'norm', 'name': None}"

# The callback state inside v010_halve_lr.ckpt, exactly as 0.1.0 wrote it.
V1_STATE = {
    "version": 1,
    "optimizers": [
        {
            "steps": 4,
            "clipped_steps": 2,
            "nonfinite_steps": 1,
            "amp_overflows": 0,
            "nonfinite_streak": 0,
            "lr_scale": 0.5,
            "healthy_steps": 2,
        }
    ],
}
# What 0.1.0 saved, as the current counters report it (spike_skips did not exist in 0.1.0: it loads as 0).
SAVED_COUNTERS = {
    "steps": 4,
    "clipped_steps": 2,
    "nonfinite_steps": 1,
    "amp_overflows": 0,
    "spike_skips": 0,
    "requested_skips": 0,
    "skipped_steps": 1,
}


def _generator():
    spec = importlib.util.spec_from_file_location("make_v010_checkpoint", DATA / "make_v010_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


class Recorder(pl.Callback):
    """After GradientClipping: the restored state at train start, and each update's weights and gradients."""

    def __init__(self, clip: GradientClipping) -> None:
        self.clip = clip
        self.at_start: dict = {}
        self.applied_lrs: list[float] = []
        self.saved_lrs: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.at_start = {"lr_scales": self.clip.lr_scales, "counters": self.clip.counters}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = [p.detach().clone() for p in pl_module.parameters()]
        self._grads = [p.grad.detach().clone() for p in pl_module.parameters()]
        # inside the update the scaled LR is in param_groups; a state_dict taken now still holds the scheduler's
        self.saved_lrs.append(trainer.optimizers[0].state_dict()["param_groups"][0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        delta = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(self._before, pl_module.parameters())])
        grad = torch.cat([g.reshape(-1) for g in self._grads])
        self.applied_lrs.append((delta.double() @ grad.double() / (grad.double() @ grad.double())).item())


def test_the_committed_checkpoint_holds_the_v1_state_of_0_1_0():
    ckpt = torch.load(CKPT, weights_only=False)
    assert ckpt["callbacks"] == {STATE_KEY: V1_STATE}
    assert ckpt["global_step"] == 4
    assert CKPT.stat().st_size < 100_000


def test_a_0_1_0_checkpoint_resumes_with_its_lr_scale_and_counters(tmp_path):
    cb = GradientClipping(nan_policy="halve_lr", lr_recovery_steps=100)
    rec = Recorder(cb)
    trainer = resume_from(CKPT, [cb, rec], gen.TinyModule(), gen.make_loader(), max_steps=6, root=tmp_path)
    assert rec.at_start == {"lr_scales": [0.5], "counters": SAVED_COUNTERS}
    # two more steps, each applying 0.5 x lr; checkpoints and the param group keep the unscaled lr
    assert rec.applied_lrs == pytest.approx([0.5 * gen.LR] * 2, rel=1e-4)
    assert rec.saved_lrs == [gen.LR, gen.LR]
    assert trainer.optimizers[0].param_groups[0]["lr"] == gen.LR
    assert cb.lr_scales == [0.5]
    state = cb.state_dict()
    assert state["version"] == 3
    resumed = state["optimizers"][0]
    assert resumed["counters"].pop("clipped_steps") >= 2
    # 0.1.0's entries in the sections of format 3, plus what later versions added
    assert resumed == {
        "counters": {
            "steps": 6,
            "nonfinite_steps": 1,
            "amp_overflows": 0,
            "spike_skips": 0,
            "requested_skips": 0,
            "nonfinite_streak": 0,
        },
        "control": {"lr_scale": 0.5, "skip_remaining": 0, "rollbacks": 0, "windows": []},
        "remedy": {"healthy_steps": 4},
        "rule": {},
        "detectors": {},
        "reporter": {"vanishing": {"streaks": {}, "warned": [], "warnings": 0}},  # the callback's default monitor
    }


def test_clip_engine_loads_the_literal_version_1_dict():
    engine = ClipEngine(NormClip(max_norm=1.0), HalveLR(lr_recovery_steps=100))
    engine.load_state_dict(copy.deepcopy(V1_STATE))
    assert engine.lr_scales == [0.5]
    assert engine.counters == SAVED_COUNTERS
    assert engine.counters_of(0)["nonfinite_streak"] == 0
    counters = {k: v for k, v in V1_STATE["optimizers"][0].items() if k not in ("lr_scale", "healthy_steps")}
    assert engine.state_dict() == {
        "version": 3,
        "optimizers": [
            {
                "counters": {**counters, "spike_skips": 0, "requested_skips": 0},  # counters added since 0.1.0
                "control": {"lr_scale": 0.5, "skip_remaining": 0, "rollbacks": 0, "windows": []},
                "remedy": {"healthy_steps": 2},
                "rule": {},
                "detectors": {},
                "reporter": {},
            }
        ],
    }

    # and the restored scale is applied by a plain loop's next update
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.2)
    engine.attach([opt], [("w", w)])
    w.grad = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    engine.step(opt)
    opt.step()
    torch.testing.assert_close(
        w.detach(),
        torch.ones(3, dtype=torch.float64) - 0.5 * 0.2 * torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )
    assert engine.state_dict()["optimizers"][0]["remedy"]["healthy_steps"] == 3


def test_a_version_1_dict_resumed_under_skip_drops_the_lr_scale_but_keeps_the_counters():
    engine = ClipEngine(NormClip(max_norm=1.0), Skip())
    engine.load_state_dict(copy.deepcopy(V1_STATE))
    assert engine.lr_scales == [1.0]
    assert engine.counters == SAVED_COUNTERS


# ----------------------------------------------------------------------------- 0.2.0.dev0 and main before format 3
def _fixture_state(rev: str) -> dict:
    """The callback state of ``tests/data/v<rev>.ckpt`` (written by ``tests/data/make_checkpoints.py``)."""
    (state,) = torch.load(DATA / f"v{rev}.ckpt", weights_only=False)["callbacks"].values()
    return state


def _resume(tmp_path, rev: str, callback: GradientClipping, steps: int = 2) -> pl.Trainer:
    spec = importlib.util.spec_from_file_location("make_checkpoints", DATA / "make_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path, max_steps = DATA / f"v{rev}.ckpt", module.SAVED_STEPS + steps
    return resume_from(path, [callback], module.Faulty(), module.make_loader(), max_steps=max_steps, root=tmp_path)


def resume_from(path: Path, callbacks: list, model: pl.LightningModule, loader, max_steps: int, root) -> pl.Trainer:
    """Fit ``model`` from the checkpoint at ``path`` up to ``max_steps``, quietly; return the trainer."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, ckpt_path=str(path))
    return trainer


def test_a_0_2_0_dev0_checkpoint_resumes_with_its_ring_history_lr_scale_and_counters(tmp_path):
    saved = _fixture_state("3e6e454")["optimizers"][0]
    assert saved["spikes"]["pos"] == 28  # the ring layout of 0.2.0.dev0
    cb = GradientClipping(mode="percentile", skip_spikes=3.0, nan_policy="halve_lr")
    _resume(tmp_path, "3e6e454", cb)
    state = cb.state_dict()["optimizers"][0]
    assert state["counters"]["steps"] == 32 and state["counters"]["nonfinite_steps"] == 1
    assert state["counters"]["spike_skips"] == saved["spike_skips"] == 1
    assert state["control"]["lr_scale"] == 0.5
    kept = saved["spikes"]["history"][:28]  # the ring's values, oldest first, then the two resumed steps
    assert torch.equal(state["detectors"]["spikes"]["history"][:28], kept)
    assert state["detectors"]["spikes"]["count"] == saved["spikes"]["count"] + 2
    assert state["rule"]["count"] == saved["rule"]["count"] + 2


def test_a_checkpoint_of_main_before_format_3_resumes_with_its_windows_and_rollbacks(tmp_path):
    saved = _fixture_state("5d0f227")["optimizers"][0]
    assert saved["rollbacks"] == 2 and len(saved["windows"]) == 2  # the flat entry of version 2
    cb = GradientClipping(
        mode="percentile",
        skip_spikes=3.0,
        loss_spikes=3.0,
        nan_policy="rollback",
        snapshot_every=5,
        rollback_skip_steps=2,
    )
    _resume(tmp_path, "5d0f227", cb)
    state = cb.state_dict()["optimizers"][0]
    assert state["control"]["rollbacks"] == 2 and state["control"]["lr_scale"] == saved["lr_scale"] == 0.25
    assert state["control"]["windows"] == saved["windows"]
    assert [w["snapshot_step"] for w in cb.engine.skipped_windows()] == [10, 25]
    assert state["counters"]["requested_skips"] == saved["requested_skips"] == 4
    assert state["detectors"]["loss_spikes"]["count"] == saved["loss_spikes"]["count"] + 2
    assert torch.equal(state["detectors"]["loss_spikes"]["history"][:-2], saved["loss_spikes"]["history"])
    counts = ("healthy_steps", "bad_run", "unhealthy", "run_from_clean")
    assert {k: state["remedy"][k] for k in counts} == dict.fromkeys(counts[:3], 0) | {"run_from_clean": True}
    watch = state["remedy"]["watch"]
    assert watch["n"] == 2  # the divergence watch starts at the resume: its two steps since
    assert state["remedy"]["clean"] == (watch["rising_steps"] == 0)  # no bad step: only a rising loss unsettles it
