"""Rollback to an in-memory healthy snapshot with a data-window skip, loss spikes, and a true skip for LBFGS (issue 15).

The central promise: a run that rolls back ends bit-identical (weights, optimizer state, rule statistics) to a run
that never saw the discarded window. Real Trainer (and a plain loop), CPU.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import pytorch_lightning as pl
import torch
from faults import FaultModel, RecordingLogger, StepRecorder, all_finite, applied_lr, states_equal, trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import ClipEngine, GradientClipping, NonFiniteGradientError
from lightning_clip.remedies import HalveLR, Rollback, Skip
from lightning_clip.rules import PercentileClip

NAN = float("nan")
BATCH = 8
STEPS = 12
SNAPSHOT_EVERY = 4
BAD = 6  # global step of the NaN: rolls back to the snapshot after 4 steps, discarding steps 4 and 5
WINDOW = 2  # then skips steps 6 (the bad one), 7 and 8
KEPT_BATCHES = [0, 1, 2, 3, 9, 10, 11]  # what the rolled-back run learned from


def data(batches: list[int] | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(STEPS * BATCH, 8, generator=g), torch.randn(STEPS * BATCH, 1, generator=g)
    rows = [r for b in (batches if batches is not None else range(STEPS)) for r in range(b * BATCH, (b + 1) * BATCH)]
    return DataLoader(TensorDataset(x[rows], y[rows], torch.zeros(len(rows), 2)), batch_size=BATCH, shuffle=False)


def rule() -> PercentileClip:
    # Clips from step 3 on (its threshold depends on the history): the statistics shape the weights.
    return PercentileClip(percentile=50.0, history_size=16, warmup_steps=2)


def fit(t: pl.Trainer, model: pl.LightningModule, loader: DataLoader) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader)


def optimizer_state(model: pl.LightningModule) -> dict:
    return model.trainer.optimizers[0].state_dict()["state"]


# ----------------------------------------------------------------------------- the bit-identical promise
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw", "adamw_fused"])
def test_a_rolled_back_run_is_bit_identical_to_one_that_never_saw_the_window(tmp_path, optimizer):
    rolled = GradientClipping(
        rule=rule(),
        nan_policy="rollback",
        snapshot_every=SNAPSHOT_EVERY,
        rollback_skip_steps=WINDOW,
        rollback_lr_factor=1.0,
    )
    a = FaultModel(optimizer=optimizer, lr=0.05, nan_loss_at=(BAD,))
    fit(trainer(tmp_path / "a", [rolled], max_steps=STEPS), a, data())
    clean = GradientClipping(rule=rule(), nan_policy="rollback", snapshot_every=SNAPSHOT_EVERY)
    b = FaultModel(optimizer=optimizer, lr=0.05)
    fit(trainer(tmp_path / "b", [clean], max_steps=len(KEPT_BATCHES)), b, data(KEPT_BATCHES))

    assert rolled.counters["rollbacks"] == 1 and rolled.counters["requested_skips"] == WINDOW
    assert rolled.engine.skipped_windows()[0]["snapshot_step"] == SNAPSHOT_EVERY
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert states_equal(optimizer_state(a), optimizer_state(b))
    assert states_equal(rolled.engine.rule_of(0).state_dict(), clean.engine.rule_of(0).state_dict())
    assert rolled.engine.rule_of(0).state_dict()["count"] == len(KEPT_BATCHES)  # the statistics were restored too


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=0.05),
        lambda p: torch.optim.AdamW(p, lr=0.05, fused=True),
    ],
    ids=["sgd_momentum", "adamw", "adamw_fused"],
)
def test_the_same_holds_in_a_plain_loop_with_nothing_more_to_call(make_opt):
    def run(batches, nan_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = make_opt(model.parameters())
        remedy = Rollback(snapshot_every=SNAPSHOT_EVERY, rollback_skip_steps=WINDOW, rollback_lr_factor=1.0)
        engine = ClipEngine(rule(), remedy)
        engine.attach([opt], model.named_parameters())
        engine.warn = lambda message: None
        for step, (x, y, _) in enumerate(data(batches)):
            loss = torch.nn.functional.mse_loss(model(x), y) * (NAN if step == nan_at else 1.0)
            engine.observe_loss(loss)
            loss.backward()
            engine.step(opt)
            opt.step()
            opt.zero_grad()
        return model, opt, engine

    a, opt_a, engine_a = run(None, nan_at=BAD)
    b, opt_b, engine_b = run(KEPT_BATCHES)
    assert engine_a.counters["rollbacks"] == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert states_equal(opt_a.state_dict()["state"], opt_b.state_dict()["state"])
    assert states_equal(engine_a.rule_of(0).state_dict(), engine_b.rule_of(0).state_dict())


# ----------------------------------------------------------------------------- when to roll back, and the LR
def test_fewer_bad_steps_than_rollback_after_are_skipped_and_a_run_of_them_rolls_back(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_after=2)
    rec = StepRecorder()
    fit(trainer(tmp_path, [cb, rec], max_steps=10), FaultModel(nan_loss_at=(3, 6, 7)), data())
    assert cb.counters["rollbacks"] == 1 and cb.counters["nonfinite_steps"] == 3
    (window,) = cb.engine.skipped_windows()
    assert window["global_step"] == 7 and window["snapshot_step"] == 6  # 3 alone was skipped; 6+7 rolled back
    # Step 3 was skipped in place (a no-op), not rolled back.
    assert all(torch.equal(a, b) for a, b in zip(rec.steps[3]["weights_before"], rec.steps[3]["weights_after"]))


def test_the_lr_is_scaled_on_top_of_the_schedule_and_recovers(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_lr_factor=0.5, lr_recovery_steps=3)
    rec = StepRecorder()
    model = FaultModel(lr=0.1, nan_loss_at=(4,))
    fit(trainer(tmp_path, [cb, rec], max_steps=10), model, data())
    lrs = [round(applied_lr(s), 6) if i != 4 else None for i, s in enumerate(rec.steps)]
    assert lrs == [0.1] * 4 + [None] + [0.05] * 3 + [0.1] * 2  # halved for 3 healthy steps, then recovered
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 0.1  # the scheduler's value is untouched


def test_a_run_that_stays_bad_raises_across_rollbacks(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, max_consecutive_nonfinite=4)
    model = FaultModel(nan_loss_at=tuple(range(3, 12)))
    with pytest.raises(NonFiniteGradientError, match=r"4 bad steps without a healthy one in between, 3 rollback"):
        fit(trainer(tmp_path, [cb], max_steps=12), model, data())
    assert all_finite(model)


def test_no_snapshot_has_been_lost_at_the_first_step(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=50)
    rec = StepRecorder()
    fit(trainer(tmp_path, [cb, rec], max_steps=4), FaultModel(nan_loss_at=(2,)), data())
    (window,) = cb.engine.skipped_windows()
    assert window["snapshot_step"] == 0  # the state training started from
    start = rec.steps[0]["weights_before"]
    assert all(torch.equal(a, b) for a, b in zip(start, rec.steps[3]["weights_before"]))


# ----------------------------------------------------------------------------- what is kept
def test_windows_are_written_beside_the_logs_and_kept_in_the_checkpoint(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_skip_steps=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [cb, ckpt], max_steps=8, enable_checkpointing=True, logger=RecordingLogger())
    fit(t, FaultModel(nan_loss_at=(5,)), data())
    written = json.loads(cb.windows_path(t).read_text())
    assert written == [
        {"optimizer": 0, "global_step": 5, "epoch": 0, "batch_idx": 5, "snapshot_step": 4, "skipped": [5, 6]}
        | {"undone": 1, "lr_scale": 0.5}  # the update it threw away (step 4), and the LR scale it left
    ]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    entry = state["optimizers"][0]["control"]  # the engine's section: it restores and keeps the windows
    assert entry["rollbacks"] == 1 and entry["windows"] == [{k: v for k, v in written[0].items() if k != "optimizer"}]
    resumed = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_skip_steps=1)
    fit(trainer(tmp_path, [resumed], max_steps=9), FaultModel(), data())  # no checkpoint: a fresh run
    assert resumed.counters["rollbacks"] == 0
    resumed.load_state_dict(state)
    assert resumed.counters["rollbacks"] == 1 and resumed.engine.skipped_windows() == written


@pytest.mark.parametrize("setting", ["snapshot_every", "rollback_after", "rollback_skip_steps", "rollback_lr_factor"])
def test_rollback_settings_are_refused_under_another_policy(setting):
    value = {"rollback_lr_factor": 0.25}.get(setting, 3)
    with pytest.raises(ValueError, match=f"`{setting}` does not apply to nan_policy='skip'"):
        GradientClipping(**{setting: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(snapshot_every=0), "`snapshot_every` must be a positive integer"),
        (dict(rollback_after=0), "`rollback_after` must be a positive integer"),
        (dict(rollback_skip_steps=-1), "`rollback_skip_steps` must be an integer >= 0"),
        (dict(rollback_lr_factor=0.0), r"`rollback_lr_factor` must be in \(0, 1\]"),
        (dict(rollback_lr_factor=1.5), r"`rollback_lr_factor` must be in \(0, 1\]"),
    ],
)
def test_rollback_arguments_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientClipping(nan_policy="rollback", **kwargs)


# ----------------------------------------------------------------------------- loss spikes
class SpikyLoss(FaultModel):
    """The loss times 1000 at chosen steps: finite, but far above the recent losses."""

    def __init__(self, spike_at=(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.spike_at = set(spike_at)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.global_step in self.spike_at else loss


def test_a_loss_spike_is_skipped_under_skip_and_kept_out_of_the_statistics(tmp_path):
    cb = GradientClipping(max_norm=1e9, loss_spikes=3.0, spike_window=8)
    rec = StepRecorder()
    g = torch.Generator().manual_seed(1)
    steady = DataLoader(
        TensorDataset(*(torch.randn(8, 8, generator=g),) * 1, torch.zeros(8, 1), torch.zeros(8, 2)), batch_size=BATCH
    )
    model = SpikyLoss(spike_at=(25,), lr=0.0)  # lr 0: the same loss every step but the spike
    fit(trainer(tmp_path, [cb, rec], max_steps=30, max_epochs=-1), model, steady)
    assert cb.counters["spike_skips"] == 1 and cb.counters["nonfinite_steps"] == 0
    state = cb.state_dict()["optimizers"][0]["detectors"]["loss_spikes"]
    assert state["count"] == 29 and torch.isfinite(state["history"]).all()  # the spike never entered


def test_a_loss_spike_counts_towards_a_rollback(tmp_path):
    cb = GradientClipping(nan_policy="rollback", snapshot_every=5, loss_spikes=3.0, spike_window=8)
    g = torch.Generator().manual_seed(1)
    steady = DataLoader(
        TensorDataset(torch.randn(8, 8, generator=g), torch.zeros(8, 1), torch.zeros(8, 2)), batch_size=BATCH
    )
    fit(trainer(tmp_path, [cb], max_steps=30, max_epochs=-1), SpikyLoss(spike_at=(27,), lr=0.0), steady)
    assert cb.counters["rollbacks"] == 1 and cb.counters["spike_skips"] == 1
    assert cb.engine.skipped_windows()[0]["snapshot_step"] == 25


def test_loss_spikes_needs_a_policy_that_skips():
    with pytest.raises(ValueError, match="`loss_spikes` needs a nan_policy that skips steps"):
        GradientClipping(nan_policy="raise", loss_spikes=3.0)
    with pytest.raises(ValueError, match="`loss_spikes` must be a finite positive number"):
        GradientClipping(loss_spikes=-1.0)


# ----------------------------------------------------------------------------- plain loops: skip windows as asked
def test_a_plain_loop_rollback_needs_no_extra_call_and_restores_the_snapshot_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = ClipEngine(remedy=Rollback(snapshot_every=3))
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    after: list[list[torch.Tensor]] = []
    for step in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean() * (NAN if step == 4 else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt)
        opt.step()
        opt.zero_grad()
        after.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(after[2], after[4]))  # back to the state after 3 steps
    assert engine.lr_scales == [0.5]


def test_skip_keeps_its_behaviour_beside_rollback(tmp_path):
    assert Skip.keeps_snapshots == 0 and Rollback.keeps_snapshots == 3
    cb = GradientClipping(nan_policy="skip")
    fit(trainer(tmp_path, [cb], max_steps=4), FaultModel(nan_loss_at=(2,)), data())
    assert "rollbacks" not in cb.counters and cb.engine.snapshot_nbytes(0) == 0


# ----------------------------------------------------------------------------- distributed: every rank together
def test_ddp_ranks_roll_back_at_the_same_step_when_one_rank_sees_the_nan(tmp_path):
    """Two spawned processes (gloo): the NaN loss is on rank 1 only; the flags are agreed, both ranks roll back."""
    from faults import DumpPerRank

    cb = GradientClipping(nan_policy="rollback", snapshot_every=2, rollback_skip_steps=1)
    t = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=8,
        callbacks=[cb, DumpPerRank(str(tmp_path))],
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    fit(t, FaultModel(nan_loss_at=(5,), nan_rank=1), data())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["counters"]["rollbacks"] == ranks[1]["counters"]["rollbacks"] == 1
    assert ranks[0]["windows"] == ranks[1]["windows"] and ranks[0]["windows"][0]["global_step"] == 5
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the replicas stayed equal


# ----------------------------------------------------------------------------- LBFGS: a true skip of the whole step
@pytest.mark.parametrize("policy", ["skip", "halve_lr", "rollback"])
@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_with_a_line_search_skips_a_step_with_a_bad_evaluation_as_a_whole(policy, line_search):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # not solved in 20
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=20, line_search_fn=line_search)
    remedy = {"skip": Skip(), "halve_lr": HalveLR(), "rollback": Rollback(snapshot_every=1)}[policy]
    engine = ClipEngine(remedy=remedy)
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    calls = [0]

    def closure(nan_at):
        def evaluate():
            opt.zero_grad()
            calls[0] += 1
            loss = torch.nn.functional.mse_loss(model(x), y) * (NAN if calls[0] == nan_at else 1.0)
            engine.observe_loss(loss)
            loss.backward()
            engine.step(opt)
            return loss

        return evaluate

    opt.step(closure(nan_at=None))  # a good step: LBFGS state and history exist
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[opt._params[0]].items()}
    start = calls[0]
    if line_search is None:
        opt.step(closure(nan_at=start + 3))  # the third evaluation of this step is bad
    else:
        # torch's strong-Wolfe search itself fails on a NaN loss inside the step (IndexError in lbfgs.py): the
        # exception path (the callback's on_exception) puts the step's start back.
        with pytest.raises(IndexError):
            opt.step(closure(nan_at=start + 3))
        engine.on_exception()
    assert calls[0] >= start + 3
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert states_equal(dict(opt.state[opt._params[0]]), state)
    opt.step(closure(nan_at=None))  # and training goes on from there
    assert not all(torch.equal(a, p) for a, p in zip(weights, model.parameters())) and all_finite(model)


def lbfgs_loop(remedy, steps: int, bad_step: int, bad_evaluation: int = 3):
    """LBFGS(max_iter=5) on a small tanh net; the given evaluation of ``bad_step`` is NaN. Weights after each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5)
    engine = ClipEngine(remedy=remedy)
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    after = []
    for step in range(steps):
        evaluations = [0]

        def closure(step=step, evaluations=evaluations):
            opt.zero_grad()
            evaluations[0] += 1
            bad = step == bad_step and evaluations[0] == bad_evaluation
            loss = torch.nn.functional.mse_loss(model(x), y) * (NAN if bad else 1.0)
            engine.observe_loss(loss)
            loss.backward()
            engine.step(opt)
            return loss

        opt.step(closure)
        after.append([p.detach().clone() for p in model.parameters()])
    return engine, after


def test_lbfgs_under_rollback_ends_the_step_in_the_snapshot_not_at_its_own_start():
    engine, after = lbfgs_loop(Rollback(snapshot_every=5), steps=8, bad_step=6)
    assert engine.counters["rollbacks"] == 1 and engine.skipped_windows()[0]["snapshot_step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(after[4], after[6]))  # back to 5 steps done
    assert not all(torch.equal(a, b) for a, b in zip(after[5], after[6]))


def test_a_later_bad_lbfgs_evaluation_counts_the_step_as_bad_once():
    engine, after = lbfgs_loop(Skip(), steps=3, bad_step=1, bad_evaluation=3)
    counts = engine.counters
    assert (counts["steps"], counts["nonfinite_steps"], counts["skipped_steps"]) == (3, 1, 1)
    assert engine.counters_of(0)["nonfinite_streak"] == 0  # step 2 was fine again
    assert all(torch.equal(a, b) for a, b in zip(after[0], after[1]))


def test_a_rollback_right_after_a_resume_restores_the_resumed_optimizer_state(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = GradientClipping(nan_policy="rollback", snapshot_every=50)
    fit(trainer(tmp_path, [first, ckpt], max_steps=4, enable_checkpointing=True), FaultModel(optimizer="adamw"), data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    resumed = GradientClipping(nan_policy="rollback", snapshot_every=50)
    rec = StepRecorder()
    t = trainer(tmp_path, [resumed, rec], max_steps=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(FaultModel(optimizer="adamw", nan_loss_at=(5,)), data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.counters["rollbacks"] == 1 and resumed.engine.skipped_windows()[0]["snapshot_step"] == 4
    bad = next(s for s in rec.steps if s["global_step"] == 5)
    assert states_equal(bad["opt_after"], saved)  # Adam's moments of the resume point, not an empty state
