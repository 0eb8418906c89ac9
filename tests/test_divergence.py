"""Recovery that sees divergence (issue 21): the divergence watch, trusted snapshots, the LR back-off, what the user is
told. The sweeps that judge the recipe on real models are in benchmarks/stability.py (docs/stability.md); these tests
pin the rule and the mechanisms with real training where it runs here (CPU, real Trainer and TensorBoard files).
"""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from faults import trainer as make_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import ClipEngine, GradientClipping, NonFiniteGradientError
from lightning_clip import metrics as M
from lightning_clip.divergence import DivergenceWatch
from lightning_clip.remedies import Rollback
from lightning_clip.rules import NoClip


def fires(series, **kwargs) -> list[int]:
    watch = DivergenceWatch(**kwargs)
    return [t for t, x in enumerate(series) if watch.update(float(x))]


# ----------------------------------------------------------------------------- the watch alone
HEALTHY = {
    # batch-loss noise of several shapes around a flat or falling level, 5000 steps each
    "gaussian, 30 % noise": lambda rng, n: 1 + 0.3 * rng.standard_normal(n),
    "heavy-tailed (t, 3 dof)": lambda rng, n: 1 + 0.3 * rng.standard_t(3, n),
    "MSE of a batch of 32": lambda rng, n: rng.chisquare(32, n) / 32,
    "MSE of a batch of 8 (CV 50 %)": lambda rng, n: rng.chisquare(8, n) / 8,
    "log-normal (skewed)": lambda rng, n: rng.lognormal(0.0, 0.5, n),
    "falling, then flat": lambda rng, n: 3 * np.exp(-np.arange(n) / 500) + 0.5 + 0.1 * rng.standard_normal(n),
}


@pytest.mark.parametrize("shape", list(HEALTHY))
def test_no_divergence_on_long_healthy_noise(shape):
    for seed in range(3):
        assert fires(HEALTHY[shape](np.random.default_rng(seed), 5000)) == []


def test_an_explosion_in_the_first_steps_is_caught_with_no_warm_up():
    # The RNN LM at lr 10 (measured): finite all the way, inside any 20-step warm-up of a spike rule.
    losses = [3.19, 3.05, 3.18, 4.01, 6.61, 11.4, 20, 40, 80, 160, 346, 346, 346, 346, 346]
    assert fires(losses)[0] == 11
    # The first decision comes at the second step: a jump there and after is divergence after `patience` steps.
    assert fires([1.0] + [10.0] * 8)[0] == 5


def test_a_fall_then_a_climb_back_is_caught_and_a_climb_below_the_margin_is_not():
    rng = np.random.default_rng(0)
    fall = 4.0 - 1.5 * (1 - np.exp(-np.arange(300) / 60))
    noise = 0.02 * rng.standard_normal(600)
    for rise, caught in ((0.03, False), (0.10, True), (0.40, True)):
        level = fall[-1] * (1 + rise)
        climb = fall[-1] + (level - fall[-1]) * (1 - np.exp(-np.arange(300) / 40))
        found = fires(np.concatenate([fall, climb]) + noise)
        assert bool(found) == caught, rise
        if caught:
            assert found[0] > 300  # never on the way down


def test_one_odd_batch_is_not_a_divergence_but_a_lasting_rise_is():
    rng = np.random.default_rng(1)
    losses = 2 + 0.05 * rng.standard_normal(400)
    losses[200] = 40.0  # a dirty batch: loss_spikes' job, not this one's
    assert fires(losses) == []
    losses[200:] += 0.5  # +25 %, and it stays
    assert 200 < fires(losses)[0] <= 200 + 8  # the median of 8 crosses after 4, then 5 rising steps in a row


def test_the_margin_is_the_larger_of_the_relative_rise_and_the_noise():
    watch = DivergenceWatch(margin=0.05, noise_k=6.0)
    for x in [2.0, 2.0, 2.0]:
        watch.update(x)
    assert watch.threshold == pytest.approx(2.0 * 1.05)  # no noise: the relative margin
    rng = np.random.default_rng(2)
    for x in 2 + 0.5 * rng.standard_normal(300):
        watch.update(float(x))
    # 6 x the spread of (median of 8 losses - the best level), with the noise as it was when the best was set
    sigma = min(watch.sigma(), watch.best_sigma)
    level = math.sqrt((1 - 0.9 ** (2 * watch.best_n)) / (1 - 0.81)) / ((1 - 0.9**watch.best_n) / 0.1)
    noisy = watch.best + 6.0 * math.hypot(1.25 * sigma / math.sqrt(8), sigma * level)
    assert watch.threshold == pytest.approx(noisy) and noisy > watch.best * 1.05
    # the estimate is the batch-to-batch spread: about 0.5 here (the winsorized mean absolute residual x 1.25)
    assert 0.35 < watch.sigma() < 0.65
    assert fires([2.0] * 50 + [2.18] * 50, margin=0.1) == [] and fires([2.0] * 50 + [2.18] * 50, margin=0.05)


def test_the_watch_state_round_trips_exactly():
    rng = np.random.default_rng(3)
    losses = (2 + 0.1 * rng.standard_normal(200)).tolist() + [3.0] * 20
    straight, first = DivergenceWatch(), DivergenceWatch()
    a = [straight.update(x) for x in losses]
    b = [first.update(x) for x in losses[:150]]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # plain Python values: torch.save / JSON friendly
    resumed = DivergenceWatch()
    resumed.load_state_dict(state)
    b += [resumed.update(x) for x in losses[150:]]
    assert a == b and straight.state_dict() == resumed.state_dict()


def test_a_non_finite_loss_is_refused_by_the_watch():
    with pytest.raises(ValueError, match="finite losses only, got nan"):
        DivergenceWatch().update(float("nan"))


# ----------------------------------------------------------------------------- the remedy, on real training
def regression(seed: int, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * torch.linspace(0.5, 2.0, 8)  # largest curvature 4: SGD diverges above 0.5
    return x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def train_plain_loop(lr: float, seed: int, remedy: Rollback | None, steps: int = 150):
    """Linear regression with SGD (momentum 0.9), batches of 32: a too-high LR diverges smoothly, with no NaN for
    a long while. Returns the final full-data loss (inf when it overflowed), the engine and each step's loss."""
    torch.manual_seed(seed)
    x, y = regression(seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    engine = ClipEngine(NoClip(), remedy if remedy is not None else Rollback(divergence_margin=None))
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    losses = []
    for step in range(steps):
        rows = torch.arange(32) + 32 * (step % 16)
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        losses.append(float(loss.detach()))
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt, global_step=step)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(model(x), y))
    return (final if math.isfinite(final) else math.inf), engine, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollback_rescues_a_too_high_lr_that_diverges_without_nan(seed):
    start = train_plain_loop(0.05, seed, None, steps=1)[2][0]
    plain, _, plain_losses = train_plain_loop(0.2, seed, None)
    assert plain > 5 * start and all(math.isfinite(v) for v in plain_losses[:40])  # worse than untrained; finite
    rescued, engine, _ = train_plain_loop(0.2, seed, Rollback(snapshot_every=10))
    assert rescued < 0.1 * start  # trains: an order of magnitude below the untrained model
    assert engine.counters["rollbacks"] >= 1 and engine.lr_scales[0] <= 0.25  # a divergence cuts by factor**2
    # The healthy LR: the same rule never fires (0 false positives), and the result is the plain run's, bit for bit.
    healthy, engine, _ = train_plain_loop(0.02, seed, Rollback(snapshot_every=10))
    assert engine.counters["rollbacks"] == 0 and healthy == train_plain_loop(0.02, seed, None)[0]


def scripted_engine(losses: list[float], **options):
    """A plain loop whose loss value is scripted (the weights still step, on a tiny gradient): the remedy's decisions
    on a known loss curve. Returns the engine and the exception that stopped it, if any."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = ClipEngine(NoClip(), Rollback(**options))
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    for step, value in enumerate(losses):
        loss = model(torch.ones(1, 2)).sum() * 1e-6 + value
        engine.observe_loss(loss)
        loss.backward()
        try:
            engine.step(opt, global_step=step)
        except NonFiniteGradientError as error:
            return engine, error
        opt.step()
        opt.zero_grad()
    return engine, None


def test_a_divergence_restores_a_confirmed_snapshot_falls_back_once_and_stops_when_cut_out():
    # Flat at 1.0 for 20 steps, then a climb the script keeps whatever the state (as if each snapshot were spoilt).
    rng = np.random.default_rng(0)
    losses = (1 + 0.01 * rng.standard_normal(20)).tolist() + [1.0 + 0.2 * t for t in range(1, 200)]
    engine, error = scripted_engine(losses, snapshot_every=5, rollbacks_per_snapshot=2, rollback_lr_factor=0.5)
    windows = engine.skipped_windows()
    # 1st: the newest snapshot, 20 (after a clean 15..19), is a candidate: its period was not clean, so it is not
    # restored; 15 is (confirmed by 15..19). The LR is cut by factor**2 (a divergence).
    # 2nd: 15 went bad again at once: fall back to the older trusted snapshot (10), the LR kept.
    # 3rd, 4th: 10 went bad at once too, but nothing older is kept (3 at most): cut again from 10, the k-th cut
    # since the last clean period by factor**(2 k) (exponential back-off).
    assert [w["snapshot_step"] for w in windows] == [15, 10, 10, 10]
    assert [w["lr_scale"] for w in windows] == [0.25, 0.25, 0.25 * 0.5**4, 0.25 * 0.5**4 * 0.5**6]
    # then a third cut from snapshot 10 would pass rollbacks_per_snapshot=2: the run stops, saying why
    assert isinstance(error, NonFiniteGradientError) and "rollbacks_per_snapshot=2" in str(error)
    assert "the LR alone does not explain it" in str(error) and "divergence: the loss" in str(error)
    assert "NaN" not in str(error)  # a divergence's diagnosis, not the non-finite one


def test_divergence_margin_none_keeps_the_nan_only_rollback():
    losses = [1.0] * 20 + [1.0 + 0.2 * t for t in range(1, 60)]
    engine, error = scripted_engine(losses, snapshot_every=5, divergence_margin=None)
    assert error is None and engine.counters["rollbacks"] == 0 and not engine.remedy_of(0).reads_loss


def test_the_remedy_checkpoint_keeps_the_watch():
    losses = [2.0 + 0.01 * math.sin(t) for t in range(30)]
    engine, _ = scripted_engine(losses, snapshot_every=5)
    state = engine.state_dict()
    watch = state["optimizers"][0]["remedy"]["watch"]
    assert watch["n"] == 30 and watch["best"] == pytest.approx(2.0, abs=0.01)
    fresh = ClipEngine(NoClip(), Rollback(snapshot_every=5))
    fresh.load_state_dict(state)
    assert fresh.remedy_of(0).watch.state_dict() == engine.remedy_of(0).watch.state_dict()


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), "0.05", True])
def test_a_bad_divergence_margin_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="divergence_margin"):
        GradientClipping(nan_policy="rollback", divergence_margin=bad)


def test_divergence_settings_are_refused_under_another_policy():
    with pytest.raises(ValueError, match="`divergence_margin` does not apply to nan_policy='skip'"):
        GradientClipping(divergence_margin=0.1)
    with pytest.raises(ValueError, match="`rollbacks_per_snapshot` must be a positive integer"):
        GradientClipping(nan_policy="rollback", rollbacks_per_snapshot=0)


# ----------------------------------------------------------------------------- Lightning: what the user is told
class Regression(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(8, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit_regression(tmp_path, lr: float, callback: GradientClipping, log_every: int = 50, steps: int = 120):
    x, y = regression(0)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [callback], max_steps=steps, logger=logger, log_every_n_steps=log_every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regression(lr), DataLoader(TensorDataset(x, y), batch_size=32))
    return trainer, [str(w.message) for w in caught], logger.log_dir


def test_fit_end_says_what_the_rollbacks_found_and_tensorboard_marks_them(tmp_path):
    cb = GradientClipping(mode="none", nan_policy="rollback", snapshot_every=10, log_norms="total")
    _, messages, log_dir = fit_regression(tmp_path, 0.2, cb)
    windows = cb.engine.skipped_windows()
    assert windows and cb.counters["rollbacks"] == len(windows)
    scale = cb.lr_scales[0]
    lost = sum(w["global_step"] - w["snapshot_step"] + w["skipped"][1] - w["skipped"][0] + 1 for w in windows)
    summary = [m for m in messages if m.startswith("lightning-clip: optimizer 0:")]
    assert summary == [
        f"lightning-clip: optimizer 0: {len(windows)} rollback(s), {lost} step(s) lost; lr 0.2 was too high: "
        f"training settled at {scale:.4g}x."
    ]
    assert any("divergence: the loss" in m and "rose above" in m for m in messages)  # each rollback says why
    # A marker on the step of each rollback (logging step or not: log_every_n_steps=50), valued at the LR scale
    # it left; the layout shows it in its own chart.
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    marks = [(e.step, e.value) for e in acc.Scalars(M.ROLLBACK)]
    assert marks == [(w["global_step"], pytest.approx(w["lr_scale"])) for w in windows]
    assert not any(step % 50 == 49 for step, _ in marks)  # not on logging steps: written where it happened


def test_a_healthy_run_says_nothing_and_marks_nothing(tmp_path):
    cb = GradientClipping(mode="none", nan_policy="rollback", snapshot_every=10, log_norms="total")
    _, messages, log_dir = fit_regression(tmp_path, 0.02, cb, log_every=10)
    assert cb.counters["rollbacks"] == 0 and not any("lightning-clip:" in m for m in messages)
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert M.ROLLBACK not in acc.Tags()["scalars"] and M.ROLLBACKS in acc.Tags()["scalars"]
