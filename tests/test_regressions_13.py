"""Regression tests for the defects found by using 0.2.0.dev0 as Lightning users do (issue 13).

Each test is named after its defect number and fails on the 0.2.0.dev0 code. Real Trainer, CPU.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import pytorch_lightning as pl
import torch
from faults import FaultModel, RecordingLogger, StepRecorder, all_finite, applied_lr, make_loader, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_clip import ClipEngine, GradientClipping, NonFiniteGradientError
from lightning_clip.detect import SpikeDetector
from lightning_clip.remedies import Skip
from lightning_clip.rules import NormClip, PercentileClip

NAN = float("nan")


def fit(t: pl.Trainer, model: pl.LightningModule, loader=None, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader if loader is not None else make_loader(n=160), **kwargs)


# ----------------------------------------------------------------------------- 1: pickling
CONFIGS = {
    "default": {},
    "value": dict(mode="value", min_value=-0.5, max_value=1.0),
    "monitor": dict(mode="none", name="monitor"),
    "agc": dict(mode="agc"),
    "zscore": dict(mode="zscore"),
    "percentile": dict(mode="percentile"),
    "halve_lr": dict(nan_policy="halve_lr", lr_recovery_steps=5),
    "raise": dict(nan_policy="raise"),
    "ignore": dict(nan_policy="ignore"),
    "spikes": dict(skip_spikes=3.0, spike_window=16),
    "rule": dict(rule=PercentileClip(percentile=50.0, history_size=8, warmup_steps=2)),
    "inputs": dict(check_inputs=True, log_norms="total"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
def test_1_every_configuration_pickles_and_deepcopies(config):
    cb = GradientClipping(**config)
    for clone in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb)):
        assert type(clone) is GradientClipping and clone.state_key == cb.state_key
        assert repr(clone.engine.rule) == repr(cb.engine.rule)
        assert type(clone.engine.remedy) is type(cb.engine.remedy)


class PickleMidFit(pl.Callback):
    """Pickles the GradientClipping instance after every step, hooks installed, as torch.save(trainer) would."""

    def __init__(self, target: GradientClipping) -> None:
        self.target = target
        self.copies: list[bytes] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.copies.append(pickle.dumps(self.target))


@pytest.mark.parametrize("config", [CONFIGS["halve_lr"], CONFIGS["spikes"], CONFIGS["percentile"]])
def test_1_the_callback_pickles_in_the_middle_of_fit_with_its_state(tmp_path, config):
    cb = GradientClipping(**config)
    probe = PickleMidFit(cb)
    fit(trainer(tmp_path, [cb, probe], max_steps=6), FaultModel(nan_loss_at=(2,)))
    clone = pickle.loads(probe.copies[-1])
    assert clone.counters == cb.counters and clone.counters["steps"] == 6
    assert clone.state_dict()["optimizers"][0]["rule"].keys() == cb.state_dict()["optimizers"][0]["rule"].keys()


def test_1_ddp_spawn_runs_with_two_cpu_processes_and_skips_the_nan_step(tmp_path):
    """The real launcher: the Trainer and its callbacks are pickled into two spawned processes (gloo)."""
    cb = GradientClipping(nan_policy="skip")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=5,
        callbacks=[cb, ckpt],
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = FaultModel(nan_loss_at=(2,))
    fit(t, model, make_loader(n=160))
    assert all_finite(model)  # the weights come back from rank 0
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    counts = state["optimizers"][0]["counters"]
    assert (counts["steps"], counts["nonfinite_steps"]) == (5, 1)


# ----------------------------------------------------------------------------- 2: re-created optimizers
class SwitchesOptimizers(FaultModel):
    """Re-creates its optimizer at the start of epoch 1, the usual Lightning way."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_2_a_recreated_optimizer_takes_over_its_slot(tmp_path):
    cb = GradientClipping(nan_policy="halve_lr")
    logger, rec = RecordingLogger(), StepRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [cb, rec, ckpt], max_steps=8, logger=logger, log_every_n_steps=1, enable_checkpointing=True)
    model = SwitchesOptimizers(nan_loss_at=(2,))
    fit(t, model, make_loader(n=32))  # 4 steps per epoch
    assert not any("_opt1" in tag for _, metrics in logger.records for tag in metrics)
    assert cb.counters["steps"] == 8 and cb.counters["nonfinite_steps"] == 1
    assert len(cb.state_dict()["optimizers"]) == 1 and cb.lr_scales == [0.5]
    # The halved LR still applies after the switch (steps 4..7 run on the new optimizer).
    for step in rec.steps[3:]:
        assert applied_lr(step) == pytest.approx(0.05, rel=1e-4)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert len(saved["optimizers"]) == 1 and saved["optimizers"][0]["control"]["lr_scale"] == 0.5


def test_2_a_plain_loop_optimizer_recreated_for_the_same_parameters_keeps_its_slot():
    model = torch.nn.Linear(4, 1)
    engine = ClipEngine(NormClip(1.0), Skip())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach([opt], model.named_parameters())
    for step in range(4):
        if step == 2:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)  # re-created, never attached
        model(torch.randn(8, 4)).pow(2).mean().backward()
        metrics = engine.step(opt, log=True)
        opt.step()
        opt.zero_grad()
    assert "grad_norm/total" in metrics and not any("_opt1" in tag for tag in metrics)
    assert engine.counters["steps"] == 4 and len(engine.state_dict()["optimizers"]) == 1


# ----------------------------------------------------------------------------- 3: re-tuned spike_window
@pytest.mark.parametrize("new_window", [8, 64])
def test_3_resuming_with_another_spike_window_keeps_the_newest_norms_and_the_counters(tmp_path, new_window):
    cb = GradientClipping(skip_spikes=3.0, spike_window=32, nan_policy="halve_lr")
    t = trainer(tmp_path, [cb], max_steps=30, enable_checkpointing=True)
    fit(t, FaultModel(nan_loss_at=(3,)))
    saved = t.checkpoint_callback.best_model_path or str(tmp_path / "last.ckpt")
    t.save_checkpoint(saved)
    old = cb.state_dict()["optimizers"][0]
    retuned = GradientClipping(skip_spikes=3.0, spike_window=new_window, nan_policy="halve_lr")
    t2 = trainer(tmp_path, [retuned], max_steps=31)
    fit(t2, FaultModel(), ckpt_path=saved)
    new = retuned.state_dict()["optimizers"][0]
    assert new["counters"]["steps"] == 31 and new["counters"]["nonfinite_steps"] == 1
    assert new["control"]["lr_scale"] == 0.5
    # The norms recorded before the resume are the oldest of the resized history; one step has run since.
    old, new = old["detectors"], new["detectors"]
    before, after = old["spikes"]["history"], new["spikes"]["history"]
    assert new["spikes"]["count"] == old["spikes"]["count"] + 1
    if len(before) < new_window:
        assert torch.equal(after[:-1], before)
    else:  # the newest new_window norms were kept; the step after the resume pushed out the oldest
        assert torch.equal(after[:-1], before[-new_window + 1 :])


def test_3_the_detector_loads_the_ring_layout_of_0_2_0_dev0():
    ring = torch.full((8,), NAN, dtype=torch.float64)
    ring[:] = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0])  # a full ring; pos 1 is written next
    detector = SpikeDetector(k=3.0, window=4, warmup=2)
    detector.load_state_dict({"history": ring, "pos": 1, "count": 40})
    # Oldest first the ring reads 1, 2, 3, 4, 6, 7, 8, 5: a window of 4 keeps the newest four.
    assert detector.state_dict()["history"].tolist() == [6.0, 7.0, 8.0, 5.0]
    assert detector.state_dict()["count"] == 40


# ----------------------------------------------------------------------------- 5: fused streak at fit end
def test_5_a_fused_streak_that_outlasts_the_run_raises_at_fit_end(tmp_path):
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=5)
    model = FaultModel(optimizer="adamw_fused", nan_loss_at=tuple(range(3, 20)))
    t = trainer(tmp_path, [cb], max_steps=20, logger=RecordingLogger(), log_every_n_steps=50)
    with pytest.raises(NonFiniteGradientError, match="skipped on the device") as info:
        fit(t, model)
    assert info.value.consecutive == 17
    assert all_finite(model)


def test_5_fused_skips_the_run_never_read_are_warned_about_at_fit_end(tmp_path):
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=None)
    model = FaultModel(optimizer="adamw_fused", nan_loss_at=(3, 4))
    t = trainer(tmp_path, [cb], max_steps=20, logger=RecordingLogger(), log_every_n_steps=50)
    with pytest.warns(RuntimeWarning, match=r"2 step\(s\) with non-finite gradients were skipped on the device"):
        t.fit(model, make_loader(n=160))
    assert cb.counters["skipped_steps"] == 2


def test_5_a_plain_loop_calls_finish_and_gets_the_same_error():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    engine = ClipEngine(NormClip(1.0), Skip(max_consecutive_nonfinite=3))
    engine.attach([opt], model.named_parameters())
    for step in range(8):
        loss = model(torch.randn(8, 4)).pow(2).mean() * (NAN if step >= 2 else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt, read_every=100)
        opt.step()
        opt.zero_grad()
    with pytest.raises(NonFiniteGradientError, match="6 consecutive"):
        engine.finish()
    engine.finish()  # reported once: a second call has nothing new


# ----------------------------------------------------------------------------- 4: nested-tensor batches
class NestedBatches(torch.utils.data.Dataset):
    """Whole batches of variable-length sequences as one nested tensor; NaN in batch ``nan_at``."""

    def __init__(self, layout: torch.layout, nan_at: int | None = None, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for i in range(n):
            seqs = [torch.randn(length, 4, generator=g) for length in (2, 3, 5)]
            if i == nan_at:
                seqs[1][2, 3] = NAN
            self.batches.append((torch.nested.nested_tensor(seqs, layout=layout), torch.randn(3, 1, generator=g)))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class PoolsSequences(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        pooled = torch.stack([seq.mean(0) for seq in x.unbind()])
        return torch.nn.functional.mse_loss(self.lin(pooled), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def nested_loader(layout, nan_at=None):
    return torch.utils.data.DataLoader(NestedBatches(layout, nan_at), batch_size=None)


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_4_clean_nested_batches_train_under_check_inputs(tmp_path, layout):
    cb = GradientClipping(check_inputs=True)
    model = PoolsSequences()
    fit(trainer(tmp_path, [cb], max_steps=8), model, nested_loader(layout))
    assert cb.counters["steps"] == 8 and cb.counters["skipped_steps"] == 0


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
def test_4_a_dirty_nested_batch_is_skipped_with_its_position(tmp_path, layout):
    cb = GradientClipping(check_inputs=True, nan_policy="skip")
    model = PoolsSequences()
    t = trainer(tmp_path, [cb], max_steps=8)
    with pytest.warns(RuntimeWarning, match=r"batch 3: batch\[0\] at position \(1, 2, 3\) \(1 of 40 elements"):
        t.fit(model, nested_loader(layout, nan_at=3))
    assert cb.counters["skipped_steps"] == 1 and all_finite(model)


def test_4_a_dirty_nested_batch_under_raise_stops_with_the_diagnosis(tmp_path):
    cb = GradientClipping(check_inputs=True, nan_policy="raise")
    with pytest.raises(NonFiniteGradientError, match=r"batch\[0\] at position \(1, 2, 3\)"):
        fit(trainer(tmp_path, [cb], max_steps=8), PoolsSequences(), nested_loader(torch.jagged, nan_at=3))


# ----------------------------------------------------------------------------- 6: two named instances' tags
def test_6_named_instances_log_distinct_tags_and_report_reads_both(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_clip.app.report import format_table, load_runs

    monitor = GradientClipping(mode="none", name="monitor")  # first: sees the gradient before clipping
    clipper = GradientClipping(mode="norm", max_norm=0.05)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit(trainer(tmp_path, [monitor, clipper], max_steps=6, logger=logger, log_every_n_steps=1), FaultModel(lr=0.05))
    runs = load_runs(tmp_path / "tb")
    assert [(r.optimizer, r.instance) for r in runs] == [(0, None), (0, "monitor")]
    mine, theirs = runs
    # The same gradient measured by both; only the clipper's clipped total is capped.
    assert [v for _, v in mine.series["total"]] == pytest.approx([v for _, v in theirs.series["total"]], rel=1e-6)
    assert all(v <= 0.05 * (1 + 1e-5) for _, v in mine.series["total_clipped"])
    assert theirs.series["total_clipped"] == theirs.series["total"]
    assert mine.clipped_steps == 6 and theirs.clipped_steps == 0
    table = format_table(runs, "tb")
    assert "(1 run, 2 series)" in table and "version_0 [monitor]" in table


def test_6_two_logging_instances_with_the_same_name_are_refused_at_fit_start(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    both = [GradientClipping(mode="none"), GradientClipping(mode="norm")]
    t = trainer(tmp_path, both, max_steps=2, logger=RecordingLogger())
    with pytest.raises(MisconfigurationException, match="distinct `name`"):
        fit(t, FaultModel())
    quiet = [GradientClipping(mode="none", log_norms="none"), GradientClipping(mode="norm")]
    fit(trainer(tmp_path, quiet, max_steps=2, logger=RecordingLogger()), FaultModel())  # one logs nothing
    fit(trainer(tmp_path, both, max_steps=2), FaultModel())  # no logger: nothing to clash


def test_6_report_counts_runs_not_optimizers():
    from lightning_clip.app.report import RunReport, format_table

    rows = [RunReport("a", i, 1, 1.0, 1.0, 1.0, 0, None, 1, 0, 0, 0, 1.0) for i in (0, 1)]
    assert "(1 run, 2 series)" in format_table(rows, "logs")
    assert "(2 runs)" in format_table([rows[0], RunReport("b", 0, 1, 1.0, 1.0, 1.0, 0, None, 1, 0, 0, 0, 1.0)], "x")


@pytest.mark.parametrize("name", ["", "a/b", " x", 3])
def test_6_a_name_that_cannot_be_a_tag_segment_is_refused(name):
    with pytest.raises(ValueError, match="`name` must be None or a non-empty string"):
        GradientClipping(name=name)


# ----------------------------------------------------------------------------- 7: settings after construction
class NormAfter(pl.Callback):
    """The float64 total norm the optimizer gets (registered after GradientClipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))))


def test_7_max_norm_assigned_between_fits_reaches_every_optimizers_rule(tmp_path):
    cb = GradientClipping(max_norm=1.0)
    fit(trainer(tmp_path, [cb], max_steps=2), FaultModel())  # the per-optimizer rule copies exist now
    cb.max_norm = 0.01
    probe = NormAfter()
    fit(trainer(tmp_path, [cb, probe], max_steps=3), FaultModel())
    assert cb.max_norm == 0.01 and cb.engine.rule_of(0).max_norm == 0.01
    assert probe.norms and all(n <= 0.01 * (1 + 1e-5) for n in probe.norms)
    assert cb.counters["steps"] == 5  # state kept


def test_7_log_norms_assigned_after_construction_is_what_gets_logged(tmp_path):
    cb = GradientClipping()
    cb.log_norms = "total"
    logger = RecordingLogger()
    fit(trainer(tmp_path, [cb], max_steps=2, logger=logger, log_every_n_steps=1), FaultModel())
    tags = {tag for _, metrics in logger.records for tag in metrics}
    assert "grad_norm/total" in tags and not any(t.startswith("grad_norm_layer/") for t in tags)


def test_7_value_bounds_and_remedy_settings_are_live_and_checked():
    cb = GradientClipping(mode="value", clip_value=0.5, nan_policy="halve_lr")
    cb.clip_value = 0.2
    assert (cb.min_value, cb.max_value) == (-0.2, 0.2) and repr(cb.engine.rule) == "ValueClip(value, [-0.2, 0.2])"
    cb.lr_factor = 0.25
    assert cb.engine.remedy.lr_factor == 0.25 and cb.lr_factor == 0.25
    with pytest.raises(ValueError, match=r"`lr_factor` must be in \(0, 1\), got 2"):
        cb.lr_factor = 2
    assert cb.engine.remedy.lr_factor == 0.25  # a refused value changes nothing
    with pytest.raises(ValueError, match="`max_norm` does not apply to mode='value'"):
        cb.max_norm = 3.0
    with pytest.raises(ValueError, match="`check_inputs` must be True or False"):
        cb.check_inputs = "yes"


@pytest.mark.parametrize(
    ("setting", "value"), [("mode", "value"), ("nan_policy", "raise"), ("name", "x"), ("spike_window", 8)]
)
def test_7_settings_fixed_at_construction_refuse_assignment_by_name(setting, value):
    cb = GradientClipping()
    with pytest.raises(AttributeError, match=f"`{setting}` cannot be changed after GradientClipping is built"):
        setattr(cb, setting, value)


def test_7_a_rule_object_refuses_flat_rule_settings():
    cb = GradientClipping(rule=NormClip(max_norm=2.0))
    with pytest.raises(ValueError, match="`max_norm` does not apply: this GradientClipping was built with rule="):
        cb.max_norm = 0.5
    assert cb.engine.rule.max_norm == 2.0


# ----------------------------------------------------------------------------- 8: argument edge cases
@pytest.mark.parametrize("window", [0, -3, True, 2.5, None])
def test_8_spike_window_is_checked_without_skip_spikes(window):
    with pytest.raises(ValueError, match="`spike_window` must be a positive integer"):
        GradientClipping(spike_window=window)
