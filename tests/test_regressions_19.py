"""Issue 19: defects in rollback, loss spikes and their reports, each pinned by the run that showed it.

Real Trainer on CPU. Every test here failed on 0.2.0.dev0 + issues 13-16 (commit 5d0f227).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from faults import FaultModel, all_finite, make_loader, trainer
from pytorch_lightning.callbacks import BackboneFinetuning, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_clip import ClipEngine, GradientClipping, NonFiniteGradientError
from lightning_clip.detect import SpikeDetector
from lightning_clip.remedies import Rollback
from lightning_clip.snapshot import Snapshot


def fit(t: pl.Trainer, model: pl.LightningModule, loader: DataLoader, **kwargs: Any) -> list[str]:
    """Fit and return the RuntimeWarning messages (the callback's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def loader(steps: int = 40) -> DataLoader:
    return make_loader(n=8 * steps, batch_size=8)


# ----------------------------------------------------------------------------- 1. NaN inside the skipped window
@pytest.mark.parametrize("limit", [10, 4])
def test_1_a_nan_inside_the_skipped_window_does_not_roll_back_again(tmp_path, limit):
    cb = GradientClipping(
        nan_policy="rollback", snapshot_every=3, rollback_skip_steps=6, max_consecutive_nonfinite=limit
    )
    model = FaultModel(nan_loss_at=(6, 7, 8, 9))  # a bad shard: steps 6-9, all inside the window 6..12
    fit(trainer(tmp_path, [cb], max_steps=20), model, loader(20))
    assert cb.counters["rollbacks"] == 1
    assert cb.engine.lr_scales == [0.5]
    (window,) = cb.engine.skipped_windows()
    assert window["skipped"] == [6, 12]
    assert cb.counters["nonfinite_steps"] == 4  # still counted as NaN steps
    assert all_finite(model)


# ----------------------------------------------------------------------------- 2. resume between two bad steps
def _checkpointing(tmp_path):
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")


@pytest.mark.parametrize("resume", [False, True])
def test_2_a_resume_between_two_bad_steps_rolls_back_as_a_straight_run_does(tmp_path, resume):
    def callback():
        return GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_after=2)

    straight = callback()
    fit(
        trainer(tmp_path / "a", [straight, _checkpointing(tmp_path / "a")], max_steps=12, enable_checkpointing=True),
        FaultModel(nan_loss_at=(7, 8)),
        loader(12),
    )
    assert straight.counters["rollbacks"] == 1 and straight.engine.lr_scales == [0.5]
    if not resume:
        return
    resumed = callback()
    ckpt = tmp_path / "a" / "ckpt" / "step=8.ckpt"  # saved after step 7 (the first NaN) was skipped
    assert torch.load(ckpt, weights_only=False)["callbacks"]
    fit(trainer(tmp_path / "b", [resumed], max_steps=12), FaultModel(nan_loss_at=(7, 8)), loader(12), ckpt_path=ckpt)
    assert resumed.counters["rollbacks"] == 1
    assert resumed.engine.lr_scales == [0.5]
    assert [w["global_step"] for w in resumed.engine.skipped_windows()] == [8]


def test_2_max_consecutive_nonfinite_stops_a_resumed_run_at_the_same_step(tmp_path):
    def callback():
        return GradientClipping(nan_policy="rollback", rollback_after=10, max_consecutive_nonfinite=3)

    with pytest.raises(NonFiniteGradientError) as straight:
        fit(
            trainer(
                tmp_path / "a", [callback(), _checkpointing(tmp_path / "a")], max_steps=12, enable_checkpointing=True
            ),
            FaultModel(nan_loss_at=(7, 8, 9, 10)),
            loader(12),
        )
    with pytest.raises(NonFiniteGradientError) as resumed:
        fit(
            trainer(tmp_path / "b", [callback()], max_steps=12),
            FaultModel(nan_loss_at=(7, 8, 9, 10)),
            loader(12),
            ckpt_path=tmp_path / "a" / "ckpt" / "step=8.ckpt",
        )
    assert straight.value.global_step == resumed.value.global_step == 9


# ----------------------------------------------------------------------------- 3. the skipped-windows record
class TwoOptimizers(pl.LightningModule):
    """GAN-style manual optimization: two optimizers step one after the other on every batch."""

    def __init__(self, nan_for_second_at_batch: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a = torch.nn.Linear(8, 1)
        self.b = torch.nn.Linear(8, 1)
        self.nan_batch = nan_for_second_at_batch
        self.second_steps: list[int] = []  # global steps at which the second optimizer's hook ran

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        opt_a, opt_b = self.optimizers()
        loss_a = torch.nn.functional.mse_loss(self.a(x), y)
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = torch.nn.functional.mse_loss(self.b(x), y) * (float("nan") if batch_idx == self.nan_batch else 1.0)
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        self.second_steps.append(self.trainer.global_step)
        opt_b.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def test_3_two_optimizers_record_the_global_steps_actually_skipped(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_skip_steps=2)
    model = TwoOptimizers(nan_for_second_at_batch=6)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    t = trainer(tmp_path, [cb], max_steps=30, logger=logger)
    messages = fit(t, model, loader(15))
    first = model.second_steps[6]
    expected = [first, model.second_steps[8]]  # the bad step and the optimizer's next two steps
    assert model.second_steps[7] != first + 1  # the other optimizer's steps lie in between
    (window,) = cb.engine.skipped_windows()
    assert window["optimizer"] == 1 and window["skipped"] == expected
    written = json.loads(cb.windows_path(t).read_text())
    assert written[0]["skipped"] == expected
    (warning,) = [m for m in messages if m.startswith("Rolled back")]
    assert f"global steps {first}..{first + 2}" not in warning


@pytest.mark.parametrize("before", ["no callback", "skip"])
def test_3_rollback_added_on_resume_labels_its_snapshot_with_the_resumed_step(tmp_path, before):
    callbacks = [] if before == "no callback" else [GradientClipping(nan_policy="skip")]
    first = trainer(tmp_path / "a", callbacks, max_steps=15)
    fit(first, FaultModel(), loader(20))
    ckpt = tmp_path / "skip.ckpt"
    first.save_checkpoint(ckpt)
    cb = GradientClipping(nan_policy="rollback", snapshot_every=5)
    fit(trainer(tmp_path / "b", [cb], max_steps=20), FaultModel(nan_loss_at=(17,)), loader(20), ckpt_path=ckpt)
    (window,) = cb.engine.skipped_windows()
    assert window["global_step"] == 17
    assert window["snapshot_step"] == 15  # the state the run resumed from: nothing before it was undone


# ----------------------------------------------------------------------------- 4. parameters added mid-run
class Finetuned(pl.LightningModule):
    def __init__(self, nan_at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.head(self.backbone(x)), y)
        return loss * (float("nan") if self.global_step == self.nan_at else 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def test_4_rollback_survives_a_backbone_unfreeze_after_its_newest_snapshot(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=100)  # the only snapshot predates the unfreeze
    model = Finetuned(nan_at=13)  # epoch 1 (5 batches an epoch): the backbone is in the optimizer by then
    ft = BackboneFinetuning(unfreeze_backbone_at_epoch=2, lambda_func=lambda epoch: 1.0)
    messages = fit(trainer(tmp_path, [ft, cb], max_steps=16), model, make_loader(n=40, batch_size=8))
    assert len(model.trainer.optimizers[0].param_groups) == 2
    assert cb.counters["rollbacks"] == 1
    (window,) = cb.engine.skipped_windows()
    assert window["snapshot_step"] == 10  # a fresh snapshot when the parameters changed (epoch 2 starts at 10)
    assert all_finite(model)
    assert any(m.startswith("Rolled back at global step 13") for m in messages)


def test_4_a_snapshot_restores_the_parameters_it_holds_and_drops_the_state_of_later_ones():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a], lr=0.5, momentum=0.9)
    snap = Snapshot()
    snap.take(opt, step=0)
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    snap.restore(opt)
    assert torch.equal(a.detach(), torch.ones(2)) and a not in opt.state  # as at the snapshot
    assert torch.equal(b.detach(), torch.full((3,), 0.5)) and b not in opt.state  # not held: its state is new


# ----------------------------------------------------------------------------- 5./6. finite spikes
class Shifted(FaultModel):
    """The loss is multiplied by ``factor`` from ``at`` on: harder data, or a loss that diverges while finite."""

    def __init__(self, at: int, factor: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at, self.factor = at, factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (self.factor if self.global_step >= self.at else 1.0)


def test_5_a_stop_on_loss_spikes_says_spikes_with_values_and_true_counts(tmp_path):
    cb = GradientClipping(nan_policy="rollback", loss_spikes=3.0, snapshot_every=5, max_consecutive_nonfinite=4)
    with pytest.raises(NonFiniteGradientError) as raised:
        fit(trainer(tmp_path, [cb], max_steps=60), Shifted(at=30, factor=50.0), make_loader(n=480))
    message = str(raised.value)
    assert "Non-finite" not in message and "NaN/Inf but no gradient" not in message
    assert "4 bad steps without a healthy one in between" in message
    assert "loss spike" in message.lower() and "threshold" in message
    assert "-1" not in message
    assert raised.value.global_step == 33 and raised.value.consecutive == 4


def test_6_skip_with_loss_spikes_warns_and_stops_instead_of_stalling_silently(tmp_path):
    cb = GradientClipping(nan_policy="skip", loss_spikes=3.0, max_consecutive_nonfinite=10)
    with pytest.raises(NonFiniteGradientError) as raised:
        messages = fit(trainer(tmp_path, [cb], max_steps=90), Shifted(at=30, factor=20.0), make_loader(n=720))
    assert raised.value.global_step == 39  # the 10th spike in a row
    assert "loss spike" in str(raised.value).lower() and "10 bad steps" in str(raised.value)
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb2 = GradientClipping(nan_policy="skip", loss_spikes=3.0, max_consecutive_nonfinite=None)
        trainer(tmp_path / "b", [cb2], max_steps=40).fit(Shifted(at=30, factor=20.0), make_loader(n=320))
    messages = [str(w.message) for w in caught]
    assert any("loss spike" in m.lower() and "global step 30" in m for m in messages)  # no logger, still told


# ----------------------------------------------------------------------------- 9. smaller ones
def test_9_a_loss_spike_on_a_logging_step_is_reported_as_a_loss_spike(tmp_path):
    from faults import RecordingLogger

    cb = GradientClipping(nan_policy="skip", loss_spikes=3.0, max_consecutive_nonfinite=None)
    messages = fit(
        trainer(tmp_path, [cb], max_steps=31, logger=RecordingLogger(), log_every_n_steps=1),
        Shifted(at=30, factor=50.0),
        make_loader(n=320),
    )
    spikes = [m for m in messages if "global step 30" in m]
    assert spikes and all("Gradient spike" not in m for m in spikes)
    assert any(m.startswith("Loss spike skipped at global step 30") and "threshold" in m for m in spikes)


def test_9_snapshots_are_freed_when_fit_ends(tmp_path):
    held: list[int] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            held.append(cb.engine.snapshot_nbytes(0))

    cb = GradientClipping(nan_policy="rollback", snapshot_every=2)
    fit(trainer(tmp_path, [cb, Probe()], max_steps=6), FaultModel(), loader(6))
    assert held and min(held) > 0
    assert cb.engine.snapshot_nbytes(0) == 0


def test_9_the_float32_spike_statistics_see_a_tiny_spread_without_false_spikes():
    g = torch.Generator().manual_seed(0)
    losses = 5.0 + 5e-4 * torch.randn(200, generator=g)
    d = SpikeDetector(k=6.0, window=128, warmup=20, dtype=torch.float32)
    flags = [bool(d.flag(x.float(), torch.tensor(False))) for x in losses]
    assert d.history.values.dtype == torch.float32
    assert sum(flags) == 0
    assert bool(d.flag(torch.tensor(5.05), torch.tensor(False)))  # a real spike (100 sigma) is still one


def test_9_the_rollback_warning_quoted_in_the_docs_is_the_one_printed(tmp_path):
    from pathlib import Path

    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_skip_steps=2)
    messages = fit(trainer(tmp_path, [cb], max_steps=8), FaultModel(nan_loss_at=(5,)), loader(8))
    (warning,) = [m for m in messages if m.startswith("Rolled back")]
    docs = Path(__file__).parents[1] / "docs"
    quoted = [line for f in docs.glob("*.md") for line in f.read_text().splitlines() if line.startswith("Rolled back")]
    # A divergence's warning (issue 21) names its cause instead of NaN/Inf: printed by a plain loop whose loss climbs.
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = ClipEngine(remedy=Rollback(snapshot_every=5))
    engine.attach([opt], model.named_parameters())
    printed: list[str] = []
    engine.warn = printed.append
    for step in range(40):
        loss = model(torch.ones(1, 2)).sum() * 1e-6 + (1.0 if step < 20 else 1.0 + 0.2 * (step - 19))
        engine.observe_batch((), batch_idx=step)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt, global_step=step)
        opt.step()
        opt.zero_grad()
    divergence = next(m for m in printed if "divergence:" in m)
    templates = {_template(warning), _template(divergence)}
    assert quoted and all(_template(line) in templates for line in quoted)
    assert {_template(line) for line in quoted} == templates  # both kinds are quoted


def _template(message: str) -> str:
    """The message with its numbers and its layer list masked: what stays is the wording."""
    import re

    return re.sub(r"\d+(\.\d+)?", "N", message.split(" of the step: ")[0])


def test_9_the_engine_reports_a_plain_loop_rollback_the_same_way():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(remedy=Rollback(snapshot_every=2, rollback_skip_steps=1))
    engine.attach([opt], model.named_parameters())
    messages: list[str] = []
    engine.warn = messages.append
    for step in range(6):
        loss = model(torch.ones(1, 2)).sum() * (math.nan if step == 3 else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt)
        opt.step()
        opt.zero_grad()
    (window,) = engine.skipped_windows()
    assert window["skipped"] == [3, 4]  # the step counts of a plain loop
    engine.finish()
    assert engine.snapshot_nbytes(0) > 0  # finish() reports; only detach() frees
    engine.detach()
    assert engine.snapshot_nbytes(0) == 0
