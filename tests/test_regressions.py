"""One regression test per defect of issue 8 (items 1-12), on a real Trainer except where a plain loop is the point.

Each test fails on lightning-clip 0.1.0 (commit cbf7ce3) for the reason its item describes; the item-12 tests
each catch one mutant that the rest of the suite let through (see their docstrings).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from faults import (
    FaultModel,
    RecordingLogger,
    StepRecorder,
    all_finite,
    applied_lr,
    make_loader,
    states_equal,
    trainer,
)
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_clip import GradientClipping, NonFiniteGradientError
from lightning_clip import functional as F
from lightning_clip.host_reads import count_host_reads
from lightning_clip.inputs import describe_nonfinite, nonfinite_flag

NAN = float("nan")
INF = float("inf")


# ----------------------------------------------------------------------------- helpers
def fit(tmp_path, callbacks, model, loader=None, max_steps=6, ckpt_path=None, **kwargs) -> pl.Trainer:
    t = trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader if loader is not None else make_loader(), ckpt_path=ckpt_path)
    return t


def fit_recorded(tmp_path, cb, model, loader=None, max_steps=6, **kwargs) -> tuple[pl.Trainer, StepRecorder]:
    rec = StepRecorder()  # after the callback: sees the gradients the optimizer gets
    return fit(tmp_path, [cb, rec], model, loader, max_steps, **kwargs), rec


def moved(step: dict) -> bool:
    return not all(torch.equal(a, b) for a, b in zip(step["weights_before"], step["weights_after"]))


def norm64(grads) -> float:
    """The total 2-norm in float64 (complex128), sparse gradients through their dense view."""
    sq = 0.0
    for g in grads:
        if g is None:
            continue
        g = g.to_dense() if g.layout != torch.strided else g
        g = g.to(torch.complex128 if g.is_complex() else torch.float64)
        sq += float(g.abs().pow(2).sum())
    return math.sqrt(sq)


class NormProbe(pl.Callback):
    """The float64 total gradient norm after backward (before clipping) and as the optimizer gets it (after)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    def on_after_backward(self, trainer, pl_module):
        self.before.append(norm64(p.grad for p in pl_module.parameters()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.after.append(norm64(p.grad for p in pl_module.parameters()))


class TinyLinear(pl.LightningModule):
    """Linear(8, 1) with an optimizer given as a factory; the loss is NaN at chosen global steps."""

    def __init__(self, make_optimizer, nan_loss_at=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 1)
        self.make_optimizer = make_optimizer
        self.nan_loss_at = set(nan_loss_at)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        return loss * NAN if self.global_step in self.nan_loss_at else loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, two independent linear models: both backwards, then both steps.

    ``loss_b`` is NaN on the batches in ``nan_b_at``; optimizer 0 (model ``a``) never sees a NaN.
    """

    def __init__(self, nan_b_at=()) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 1)
        self.b = torch.nn.Linear(8, 1)
        self.nan_b_at = set(nan_b_at)
        self.a_moved: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss_a = torch.nn.functional.mse_loss(self.a(x), y)
        loss_b = torch.nn.functional.mse_loss(self.b(x) * 3.0, y)
        if batch_idx in self.nan_b_at:
            loss_b = loss_b * NAN
        self.manual_backward(loss_a)
        self.manual_backward(loss_b)
        before = self.a.weight.detach().clone()
        opt_a.step()
        opt_b.step()
        self.a_moved.append(not torch.equal(before, self.a.weight))

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


# ----------------------------------------------------------------------------- item 1
def test_item1_fused_sgd_momentum_bad_first_step_leaves_no_uninitialised_momentum(tmp_path):
    """Fused SGD with momentum, skip, NaN at global step 0: torch's fused step creates the momentum buffers with
    empty_like even when found_inf=1; 0.1.0 skipped through found_inf and left that memory in the state."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True)
    model = TinyLinear(sgd, nan_loss_at=(0,))
    _t, rec = fit_recorded(tmp_path, GradientClipping(max_norm=1e6, nan_policy="skip"), model, max_steps=6)
    first = rec.steps[0]
    assert not moved(first)
    assert states_equal(first["opt_before"], first["opt_after"]), "the skipped first step created optimizer state"
    # The run equals one that never saw batch 0 (max_norm 1e6: the clip coefficient is exactly 1).
    ref = TinyLinear(sgd)
    opt = ref.configure_optimizers()
    for i, (x, y, _) in enumerate(make_loader()):
        if i == 0:
            continue
        if i == 6:
            break
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref.lin(x), y).backward()
        opt.step()
    assert all_finite(model)
    for ours, theirs in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- item 2
class RaisesAt(FaultModel):
    def __init__(self, raise_at: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.raise_at = raise_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.raise_at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_item2_crash_checkpoint_stores_the_schedulers_lr_and_resume_applies_the_scale_once(tmp_path):
    """halve_lr, NaN at step 1, a crash inside training_step at step 4 saved by OnExceptionCheckpoint: 0.1.0 saved
    the halved LR (0.05 for a base of 0.1) and the resumed run applied 0.025."""
    ckpt_dir = tmp_path / "ckpt"
    crash = trainer(
        tmp_path,
        [
            GradientClipping(max_norm=1e6, nan_policy="halve_lr"),
            OnExceptionCheckpoint(dirpath=str(ckpt_dir), filename="crash"),
        ],
        max_steps=10,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="boom"):
            crash.fit(RaisesAt(raise_at=4, optimizer="sgd", lr=0.1, nan_loss_at=(1,)), make_loader())
    path = ckpt_dir / "crash.ckpt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.1)

    cb = GradientClipping(max_norm=1e6, nan_policy="halve_lr")
    model = RaisesAt(optimizer="sgd", lr=0.1)
    t, rec = fit_recorded(tmp_path, cb, model, max_steps=7, ckpt_path=str(path))
    assert cb.lr_scales == [0.5]
    assert len(rec.steps) >= 2
    for step in rec.steps:
        assert applied_lr(step) == pytest.approx(0.05, rel=1e-4)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- item 3
@pytest.mark.parametrize(
    "bounds",
    [
        {"max_value": -INF},
        {"min_value": INF},
        {"min_value": -INF, "max_value": -INF},
        {"min_value": INF, "max_value": INF},
    ],
    ids=["max=-inf", "min=inf", "both=-inf", "both=inf"],
)
def test_item3_infinite_value_bounds_are_refused(bounds):
    """0.1.0 accepted them and clamped every gradient element to +-inf: inf weights after one step."""
    with pytest.raises(ValueError, match=r"`(min|max)_value`"):
        GradientClipping(mode="value", **bounds)


# ----------------------------------------------------------------------------- item 4
def test_item4_manual_two_backwards_then_two_steps_blames_only_the_nan_optimizer(tmp_path):
    """manual_backward(loss_a), manual_backward(loss_b * nan), opt_a.step(), opt_b.step(): optimizer 0 is healthy."""
    cb = GradientClipping(max_norm=1e6, nan_policy="halve_lr")
    model = TwoOptimizers(nan_b_at=(1,))
    fit(tmp_path, [cb], model, max_steps=8)  # 4 batches, 2 optimizer steps each
    assert cb.lr_scales == [1.0, 0.5]
    assert cb.counters_of(0)["nonfinite_steps"] == 0 and cb.counters_of(1)["nonfinite_steps"] == 1
    assert model.a_moved == [True] * 4


# ----------------------------------------------------------------------------- item 5
class LBFGSModel(pl.LightningModule):
    """LBFGS evaluates the closure several times per step; the loss is NaN at chosen closure evaluations."""

    def __init__(self, nan_at_evaluation=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 1)
        self.nan_at_evaluation = set(nan_at_evaluation)
        self.evaluations = 0

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.evaluations += 1
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        return loss * NAN if self.evaluations in self.nan_at_evaluation else loss

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_item5_lbfgs_counts_optimizer_steps_not_closure_evaluations(tmp_path):
    """LBFGS (max_iter > 1) evaluates the closure several times per step: 0.1.0 counted 21 steps for 5."""
    cb = GradientClipping(max_norm=1e6, nan_policy="raise")
    model = LBFGSModel()
    fit(tmp_path, [cb], model, max_steps=5)
    assert model.evaluations > 5, "LBFGS should evaluate the closure several times per step"
    assert cb.counters["steps"] == 5 and cb.counters["nonfinite_steps"] == 0
    assert all_finite(model)


def test_item5_lbfgs_bad_later_evaluation_never_reaches_the_weights_or_is_refused(tmp_path):
    """A NaN loss at a later closure evaluation of LBFGS: 0.1.0's grad=None could not undo LBFGS's earlier move.
    Either outcome is a fix: skip works per optimizer step (counted once, no NaN in the weights), or the
    combination is refused (at fit start, or at the first re-evaluation, before any step completes) by a
    message naming LBFGS."""
    cb = GradientClipping(max_norm=1e6, nan_policy="skip")
    model = LBFGSModel(nan_at_evaluation=(3,))  # a later evaluation inside the first optimizer step
    t = trainer(tmp_path, [cb], max_steps=5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, make_loader())
    except (ValueError, MisconfigurationException) as err:
        assert "LBFGS" in str(err)
        assert t.global_step == 0 and model.evaluations <= 2, "refused only after a bad evaluation was used"
        assert all_finite(model)
    else:
        assert model.evaluations > 5
        assert cb.counters["steps"] == 5 and cb.counters["nonfinite_steps"] <= 1
        assert all_finite(model)


# ----------------------------------------------------------------------------- item 6
class SchedulerInStep(FaultModel):
    """ExponentialLR(0.9) stepped inside every training_step (automatic optimization)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        return opt

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.sched.step()
        return loss


def test_item6_scheduler_stepped_in_training_step_survives_a_halving(tmp_path):
    """0.1.0 put back the LR saved before the closure, undoing the scheduler's step: 0.09 instead of 0.1 * 0.9**6."""
    cb = GradientClipping(max_norm=1e6, nan_policy="halve_lr")
    t, rec = fit_recorded(tmp_path, cb, SchedulerInStep(nan_loss_at=(0,)), max_steps=6)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**6)
    assert cb.lr_scales == [0.5]
    for k, step in enumerate(rec.steps[1:], start=1):  # the scheduler stepped before this update: 0.1 * 0.9**(k+1)
        assert applied_lr(step) == pytest.approx(0.1 * 0.9 ** (k + 1) * 0.5, rel=1e-4)


# ----------------------------------------------------------------------------- item 7a: sparse gradients
class SparseEmbedding(pl.LightningModule):
    def __init__(self, nan_loss_at=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.head = torch.nn.Linear(4, 1)
        self.nan_loss_at = set(nan_loss_at)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        loss = torch.nn.functional.mse_loss(self.head(self.emb(ids).mean(1)), y) * 50.0
        return loss * NAN if self.global_step in self.nan_loss_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def id_loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (n, 5), generator=g)  # repeated ids: uncoalesced sparse gradients
    return DataLoader(TensorDataset(ids, torch.randn(n, 1, generator=g)), batch_size=batch_size)


def test_item7a_sparse_embedding_gradients_are_clipped_like_their_dense_view(tmp_path):
    """nn.Embedding(sparse=True): 0.1.0 failed in torch's norm kernel. The norm of a sparse gradient is that of its
    dense view; clipping brings the total to max_norm; a NaN step is still skipped."""
    cb = GradientClipping(max_norm=1e-3, nan_policy="skip")
    logger = RecordingLogger()
    model = SparseEmbedding(nan_loss_at=(2,))
    _t, rec = fit_recorded(tmp_path, cb, model, id_loader(), max_steps=5, logger=logger, log_every_n_steps=1)
    assert not moved(rec.steps[2]) and all(moved(s) for i, s in enumerate(rec.steps) if i != 2)
    assert cb.counters["steps"] == 5 and cb.counters["skipped_steps"] == 1
    assert all_finite(model)
    logged = logger.series("grad_norm/total")
    assert len(logged) == 5 and math.isnan(logged[2])

    # Against float64 references: the logged norm is the dense view's, the clipped total is max_norm.
    probe, logger = NormProbe(), RecordingLogger()
    fit(
        tmp_path,
        [GradientClipping(max_norm=1e-3), probe],
        SparseEmbedding(),
        id_loader(),
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
    )
    assert logger.series("grad_norm/total") == pytest.approx(probe.before, rel=1e-5)
    assert all(b > 1e-3 for b in probe.before)
    assert probe.after == pytest.approx([1e-3] * 4, rel=1e-4)


def test_item7a_sparse_embedding_trains_under_mode_none(tmp_path):
    """0.1.0 failed even when only monitoring."""
    cb = GradientClipping(mode="none", nan_policy="skip")
    model = SparseEmbedding()
    fit(tmp_path, [cb], model, id_loader(), max_steps=3)
    assert cb.counters["steps"] == 3 and all_finite(model)


def test_item7a_value_mode_clamps_sparse_gradients_or_refuses_them_by_name(tmp_path):
    """0.1.0 failed inside torch. Clamping the stored values is one fix, a ValueError naming the parameter another."""
    cb = GradientClipping(mode="value", clip_value=1e-3, nan_policy="skip")
    model = SparseEmbedding()
    rec = StepRecorder()
    try:
        fit(tmp_path, [cb, rec], model, id_loader(), max_steps=3)
    except ValueError as err:
        assert "`emb.weight`" in str(err) and "sparse" in str(err)
        assert all_finite(model)
        return
    assert cb.counters["steps"] == 3 and all_finite(model)
    for step in rec.steps:
        for g in step["grads"]:
            values = g.coalesce().values() if g.layout != torch.strided else g
            assert float(values.abs().max()) <= torch.tensor(1e-3).item()  # the bound as float32 holds it


# ----------------------------------------------------------------------------- item 7b: complex parameters
class ComplexModel(pl.LightningModule):
    def __init__(self, nan_loss_at=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64))
        self.head = torch.nn.Linear(1, 1)
        self.nan_loss_at = set(nan_loss_at)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        z = (x.to(torch.complex64) @ self.w).abs().unsqueeze(1)
        loss = torch.nn.functional.mse_loss(self.head(z), y)
        return loss * NAN if self.global_step in self.nan_loss_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_item7b_complex_parameters_are_clipped_by_the_norm_of_their_magnitudes(tmp_path):
    """0.1.0 failed with `linalg.vector_norm: dtype should be complex`; torch's clip_grad_norm_ handles them."""
    probe, logger = NormProbe(), RecordingLogger()
    fit(
        tmp_path,
        [GradientClipping(max_norm=1e-3), probe],
        ComplexModel(),
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
    )
    assert all(b > 1e-3 for b in probe.before)
    assert logger.series("grad_norm/total") == pytest.approx(probe.before, rel=1e-5)
    assert probe.after == pytest.approx([1e-3] * 4, rel=1e-4)

    cb = GradientClipping(max_norm=1e-3, nan_policy="skip")
    model = ComplexModel(nan_loss_at=(1,))
    _, rec = fit_recorded(tmp_path, cb, model, max_steps=4)
    assert not moved(rec.steps[1]) and moved(rec.steps[2])
    assert cb.counters["skipped_steps"] == 1 and all_finite(model)


# ----------------------------------------------------------------------------- item 7c: sparse tensors in a batch
def sparse_rows(dense: torch.Tensor) -> torch.Tensor:
    """A COO tensor with the entries of ``dense`` stored twice, half each time (uncoalesced)."""
    coo = dense.to_sparse()
    idx, val = coo.indices(), coo.values()
    return torch.sparse_coo_tensor(torch.cat([idx, idx], 1), torch.cat([val / 2, val / 2]), dense.shape)


class SparseBatches(Dataset):
    """Pre-built batches (used with batch_size=None): a sparse input, a target, and a sparse tensor the model
    never reads, NaN in the batches ``nan_in_extra``."""

    def __init__(self, n_batches: int = 6, nan_in_extra=()) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for i in range(n_batches):
            x = torch.randn(8, 8, generator=g) * (torch.rand(8, 8, generator=g) > 0.5)
            extra = torch.zeros(8, 3)
            extra[1, 2] = 1.0
            if i in nan_in_extra:
                extra[5, 1] = NAN
            self.batches.append({"x": sparse_rows(x), "y": torch.randn(8, 1, generator=g), "extra": sparse_rows(extra)})

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class SparseInputModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.lin(batch["x"].to_dense()), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_item7c_sparse_batch_tensors_are_checked_by_check_inputs(tmp_path):
    """check_inputs=True with a sparse tensor in the batch: 0.1.0 failed with aten::ne.Scalar (SparseCPU)."""
    cb = GradientClipping(nan_policy="skip", check_inputs=True)
    rec = StepRecorder()
    t = trainer(tmp_path, [cb, rec], max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(SparseInputModel(), DataLoader(SparseBatches(nan_in_extra=(2,)), batch_size=None))
    assert cb.counters["steps"] == 6 and cb.counters["skipped_steps"] == 1
    assert not moved(rec.steps[2]) and moved(rec.steps[3])
    text = "\n".join(str(w.message) for w in caught)
    assert 'batch 2: batch["extra"] at position (5, 1) (1 of 24 elements NaN/Inf)' in text


def test_item7c_nonfinite_flag_reads_sparse_values_without_host_reads():
    clean = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    dirty = clean.clone()
    dirty[1, 2] = INF
    for convert in (sparse_rows, lambda d: d.to_sparse(), lambda d: d.to_sparse_csr()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CSR is a beta feature
            good, bad = convert(clean), convert(dirty)
        with count_host_reads() as reads:
            flags = (nonfinite_flag({"a": good}), nonfinite_flag([good, bad]))
        assert reads.count == 0
        assert [bool(f) for f in flags] == [False, True]
        assert describe_nonfinite({"a": good, "b": bad}) == ['batch["b"] at position (1, 2) (1 of 6 elements NaN/Inf)']


# ----------------------------------------------------------------------------- item 8
@pytest.mark.parametrize(
    "kwargs", [{"nan_policy": "halve_lr", "min_lr_scale": True}, {"eps": True}], ids=["min_lr_scale=True", "eps=True"]
)
def test_item8_booleans_are_not_numbers(kwargs):
    """0.1.0 accepted True as 1.0."""
    with pytest.raises(ValueError, match=f"`{next(k for k in kwargs if k != 'nan_policy')}`"):
        GradientClipping(**kwargs)


class ScaleProbe(pl.Callback):
    def __init__(self, cb: GradientClipping) -> None:
        self.cb = cb
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(self.cb.lr_scales[0])


def test_item8_a_tiny_lr_factor_never_underflows_the_scale_and_recovery_brings_it_back(tmp_path):
    """lr_factor=1e-200 and two bad steps: 0.1.0's scale underflowed to 0.0, which recovery (x 1e200) never left."""
    cb = GradientClipping(nan_policy="halve_lr", lr_factor=1e-200, lr_recovery_steps=1)
    probe = ScaleProbe(cb)
    fit(tmp_path, [cb, probe], FaultModel(nan_loss_at=(1, 2)), max_steps=7)
    assert all(s > 0.0 for s in probe.scales)
    assert probe.scales[2] < 1e-300
    assert cb.lr_scales == [1.0]


def test_item8_a_halve_lr_checkpoint_resumed_under_skip_reports_the_scale_it_applies(tmp_path):
    """0.1.0 reported lr_scales == [0.5] after the resume while applying 1.0."""
    first = GradientClipping(max_norm=1e6, nan_policy="halve_lr")
    t = fit(tmp_path, [first], FaultModel(optimizer="sgd", lr=0.1, nan_loss_at=(1,)), max_steps=3)
    assert first.lr_scales == [0.5]
    path = tmp_path / "halved.ckpt"
    t.save_checkpoint(path)

    cb = GradientClipping(max_norm=1e6, nan_policy="skip")
    _, rec = fit_recorded(tmp_path, cb, FaultModel(optimizer="sgd", lr=0.1), max_steps=5, ckpt_path=str(path))
    assert cb.lr_scales == [1.0]
    assert [applied_lr(s) for s in rec.steps] == pytest.approx([0.1] * len(rec.steps), rel=1e-4)


# ----------------------------------------------------------------------------- item 9 (a plain loop: functional API)
def grads_of(seed: int, nan: bool = False) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (5,), (2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0
    if nan:
        params[1].grad[2] = NAN
    return params


def test_item9_clip_grad_norm_has_torchs_signature():
    ours, theirs = inspect.signature(F.clip_grad_norm_), inspect.signature(torch.nn.utils.clip_grad_norm_)
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.default, p.kind) for p in theirs.parameters.values()
    ]


def test_item9_clip_grad_norm_positional_arguments_mean_what_they_mean_in_torch():
    """clip_grad_norm_(ps, 1.0, 2.0, True): 0.1.0 took True as eps=1 and silently clipped to a smaller norm."""
    ours, theirs = grads_of(0), grads_of(0)
    total = F.clip_grad_norm_(ours, 1.0, 2.0, True)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, 2.0, True)
    torch.testing.assert_close(total, expected)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert norm64(p.grad for p in ours) == pytest.approx(1.0, rel=1e-5)

    bad = grads_of(0, nan=True)
    kept = [p.grad.clone() for p in bad]
    with pytest.raises(RuntimeError, match="non-finite"):
        F.clip_grad_norm_(bad, 1.0, 2.0, True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(grads_of(0, nan=True), 1.0, 2.0, True)
    for p, k in zip(bad, kept):  # nothing clipped
        torch.testing.assert_close(p.grad, k, equal_nan=True, rtol=0, atol=0)
    # The one documented difference: without the error, a NaN total leaves the gradients alone (torch NaNs them).
    assert math.isnan(float(F.clip_grad_norm_(bad, 1.0, 2.0, False)))
    for p, k in zip(bad, kept):
        torch.testing.assert_close(p.grad, k, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_item9_clip_grad_norm_accepts_foreach_and_matches_torch(foreach, norm_type):
    """foreach= raised TypeError in 0.1.0."""
    ours, theirs = grads_of(1), grads_of(1)
    total = F.clip_grad_norm_(ours, 0.5, norm_type=norm_type, foreach=foreach)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type=norm_type, foreach=foreach))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_item9_clip_grad_norm_warns_on_an_exhausted_generator_like_torch():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for fn in (torch.nn.utils.clip_grad_norm_, F.clip_grad_norm_):
        params = model.parameters()
        list(params)  # consumed once: nothing left for clipping
        with pytest.warns(UserWarning, match="`parameters` is an empty generator, no gradient clipping will occur"):
            assert float(fn(params, 1.0)) == 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert float(fn(iter([]), 1.0)) == 0.0  # an empty iterator that is not a generator: no warning (torch)
            assert float(fn([], 1.0)) == 0.0


# ----------------------------------------------------------------------------- item 10
def test_item10_value_mode_counts_clipped_steps(tmp_path):
    """0.1.0 left counters["clipped_steps"] at 0 in value mode while every step was clamped."""
    tight = GradientClipping(mode="value", clip_value=1e-4)
    fit(tmp_path, [tight], FaultModel(), max_steps=5)
    assert tight.counters["clipped_steps"] == tight.counters["steps"] == 5
    loose = GradientClipping(mode="value", min_value=-1e6, max_value=1e6)
    fit(tmp_path, [loose], FaultModel(), max_steps=5)
    assert loose.counters["clipped_steps"] == 0 and loose.counters["steps"] == 5
    upper = GradientClipping(mode="value", max_value=1e-4)  # one bound: clamps the positive elements only
    fit(tmp_path, [upper], FaultModel(), max_steps=5)
    assert upper.counters["clipped_steps"] == 5


# ----------------------------------------------------------------------------- item 11
def test_item11_report_labels_a_run_at_logdir_with_its_directory_name(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_clip.app.report import format_table, load_runs

    run = tmp_path / "version_0"
    writer = SummaryWriter(str(run))
    for step, value in enumerate([3.0, 1.0, 2.0]):
        writer.add_scalar("grad_norm/total", value, step)
    writer.close()
    assert [r.run for r in load_runs(run)] == ["version_0"]
    assert [r.run for r in load_runs(tmp_path)] == ["version_0"]  # below LOGDIR: the relative path, as before
    rows = format_table(load_runs(run)).splitlines()
    assert rows[-1].split()[0] == "version_0"


# ----------------------------------------------------------------------------- item 12: surviving mutants
def test_item12_nan_in_the_first_micro_batch_of_an_accumulation_window_is_not_forgotten(tmp_path):
    """Mutant: the input check's flags reset on every micro-batch. The NaN is in a tensor the model never reads, in
    micro-batch 3: the first of optimizer step 1's window of 3."""
    cb = GradientClipping(nan_policy="skip", check_inputs=True)
    loader = make_loader(n=72, nan_batches=(3,), extra_nan=True)
    fit(tmp_path, [cb], FaultModel(), loader, max_steps=3, accumulate_grad_batches=3)
    assert cb.counters["steps"] == 3 and cb.counters["skipped_steps"] == 1


def test_item12_the_callbacks_eps_reaches_the_clipping(tmp_path):
    """Mutant: GradientClipping(eps=...) never reaches the clip coefficient (the default 1e-6 is used)."""
    probe = NormProbe()
    fit(tmp_path, [GradientClipping(max_norm=1e-3, eps=10.0), probe], FaultModel(), max_steps=3)
    for before, after in zip(probe.before, probe.after):
        assert after == pytest.approx(before * 1e-3 / (before + 10.0), rel=1e-4)
        assert after < 0.5e-3  # without eps it would be max_norm itself


def test_item12_clip_coefficient_includes_eps():
    """Mutant (caught only by a doctest's printed digits before): eps dropped from the coefficient."""
    assert float(F.clip_coefficient(torch.tensor(3.0), max_norm=1.0, eps=1.0)) == 0.25
    grads = [torch.tensor([3.0, 4.0])]
    coef = F.clip_by_norm_(grads, max_norm=1.0, total_norm=torch.tensor(5.0), eps=3.0)
    assert float(coef) == 0.125
    torch.testing.assert_close(grads[0], torch.tensor([0.375, 0.5]))


def test_item12_fused_device_skip_raises_at_exactly_the_streak_limit(tmp_path):
    """Mutant: `>=` turned into `>` in the streak limit of the fused on-device skip path (raised one step late)."""
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=3)
    model = FaultModel(optimizer="adamw_fused", nan_loss_at=tuple(range(2, 20)))
    t = trainer(tmp_path, [cb], max_steps=20, log_every_n_steps=1)  # counters read every step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteGradientError, match="skipped on the device") as info:
            t.fit(model, make_loader(n=160))
    assert info.value.consecutive == 3 and info.value.global_step == 4
    assert all_finite(model)


def test_item12_a_bad_step_resets_the_run_of_healthy_steps_before_recovery(tmp_path):
    """Mutant: a bad step no longer resets the healthy run. Bad at 1 and 4, recovery after 3 healthy steps: steps 2
    and 3 must not count towards undoing the second halving."""
    cb = GradientClipping(nan_policy="halve_lr", lr_recovery_steps=3)
    probe = ScaleProbe(cb)
    fit(tmp_path, [cb, probe], FaultModel(nan_loss_at=(1, 4)), max_steps=8)
    assert probe.scales == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.5]


def test_item12_lr_factor_is_applied_exactly(tmp_path):
    """Mutant: lr_factor ignored (always 0.5), unseen while every test used 0.5."""
    cb = GradientClipping(max_norm=1e6, nan_policy="halve_lr", lr_factor=0.1)
    _, rec = fit_recorded(tmp_path, cb, FaultModel(optimizer="sgd", lr=0.1, nan_loss_at=(1,)), max_steps=4)
    assert cb.lr_scales == [pytest.approx(0.1)]
    assert applied_lr(rec.steps[0]) == pytest.approx(0.1, rel=1e-4)
    assert [applied_lr(s) for s in rec.steps[2:]] == pytest.approx([0.01, 0.01], rel=1e-4)


def test_item12_optimizer_one_logs_with_its_suffix(tmp_path):
    """Mutant: optimizer i > 0 logs without its `_opt<i>` suffix (over optimizer 0's tags)."""
    logger = RecordingLogger()
    fit(tmp_path, [GradientClipping(max_norm=1e6)], TwoOptimizers(), max_steps=6, logger=logger, log_every_n_steps=1)
    tags = set().union(*(m for _, m in logger.records))
    for name in ("grad_norm/total", "grad_clip/steps", "grad_clip/lr_scale"):
        assert name in tags and f"{name}_opt1" in tags
    assert logger.series("grad_clip/steps") == [1.0, 2.0, 3.0]
    assert logger.series("grad_clip/steps_opt1") == [1.0, 2.0, 3.0]
    # each optimizer logs its own model's norm: model b's loss is scaled, so its norm differs
    assert all(a != b for a, b in zip(logger.series("grad_norm/total"), logger.series("grad_norm/total_opt1")))


class DictBatches(Dataset):
    def __init__(self, n: int = 48, nan_rows=()) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.extra = torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g), torch.zeros(n, 2)
        for r in nan_rows:
            self.extra[r, 1] = NAN

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "extra": self.extra[i]}


class DictModel(FaultModel):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])


def test_item12_check_inputs_looks_into_dict_batches(tmp_path):
    """Mutant (caught only by a doctest's printed output before): check_inputs ignoring dict batches."""
    cb = GradientClipping(nan_policy="skip", check_inputs=True)
    t = trainer(tmp_path, [cb], max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(DictModel(), DataLoader(DictBatches(nan_rows=(8 * 2 + 3,)), batch_size=8))
    assert cb.counters["steps"] == 5 and cb.counters["skipped_steps"] == 1
    assert any('batch 2: batch["extra"] at position (3, 1)' in str(w.message) for w in caught)
