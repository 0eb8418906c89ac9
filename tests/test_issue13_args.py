"""Issue 13: numpy scalars as arguments, and value clipping of sparse gradients.

Numerics are checked against float64 references computed here from the dense view of each gradient.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from lightning_clip import ClipEngine, GradientClipping, NonFiniteGradientError
from lightning_clip import functional as F
from lightning_clip import metrics as M
from lightning_clip.remedies import Ignore, Skip
from lightning_clip.rules import NormClip, PercentileClip, ValueClip, ZScoreClip

NAN = float("nan")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def attached(cb_or_engine, model, opt):
    engine = cb_or_engine.engine if isinstance(cb_or_engine, GradientClipping) else cb_or_engine
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    return engine


def set_grads(model, scale):
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


# ----------------------------------------------------------------------------- numpy scalars are numbers
@pytest.mark.parametrize("np_float", [np.float16, np.float32, np.float64])
def test_numpy_float_thresholds_are_accepted_and_stored_as_the_same_python_float(np_float):
    cb = GradientClipping(max_norm=np_float(0.5), lr_factor=np_float(0.25), eps=np_float(0.0), nan_policy="halve_lr")
    assert type(cb.engine.rule.max_norm) is float and cb.engine.rule.max_norm == 0.5
    assert cb.max_norm == 0.5 and cb.lr_factor == 0.25 and cb.engine.eps == 0.0
    rule = GradientClipping(mode="value", clip_value=np_float(0.125)).engine.rule
    assert (rule.min_value, rule.max_value) == (-0.125, 0.125)
    rule = GradientClipping(mode="value", min_value=np_float(-0.5), max_value=np_float(0.25)).engine.rule
    assert (rule.min_value, rule.max_value) == (-0.5, 0.25)
    for value, threshold in [(np_float(2.0), 2.0), (np_float(math.inf), math.inf)]:
        assert GradientClipping(norm_type=value).engine.norm_type == threshold
    # Stored as Python floats, so the rule pickles without numpy's types.
    assert b"numpy" not in pickle.dumps(cb.engine.rule) and pickle.loads(pickle.dumps(cb.engine.rule)).max_norm == 0.5


def test_numpy_float_max_norm_clips_the_total_norm_to_that_value():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = attached(GradientClipping(max_norm=np.float32(0.5)), model, opt)
    set_grads(model, 3.0)
    before = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]).norm().item()
    engine.step(opt)
    after = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]).norm().item()
    assert before > 1.0 and after == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("np_int", [np.int64, np.int32, np.uint8])
def test_numpy_integer_counts_are_accepted(np_int):
    cb = GradientClipping(max_consecutive_nonfinite=np_int(5), skip_spikes=np.float32(4.0), spike_window=np_int(64))
    assert cb.engine.remedy.max_consecutive_nonfinite == 5
    cb = GradientClipping(nan_policy="halve_lr", lr_recovery_steps=np_int(3), min_lr_scale=np.float32(0.25))
    assert cb.engine.remedy.lr_recovery_steps == 3 and cb.engine.remedy.min_lr_scale == 0.25
    assert PercentileClip(history_size=np_int(50), warmup_steps=np_int(5)).history_size == 50
    assert ZScoreClip(warmup_steps=np_int(7)).warmup_steps == 7


def test_numpy_max_consecutive_nonfinite_raises_on_that_streak_and_not_before():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = attached(GradientClipping(max_consecutive_nonfinite=np.int64(2)), model, opt)
    set_grads(model, NAN)
    engine.step(opt)  # first bad step: skipped
    assert engine.counters["nonfinite_steps"] == 1
    set_grads(model, NAN)
    with pytest.raises(NonFiniteGradientError, match="2 consecutive steps"):
        engine.step(opt)


def test_numpy_lr_recovery_steps_restores_the_lr_after_that_many_healthy_steps():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = attached(GradientClipping(nan_policy="halve_lr", lr_recovery_steps=np.int64(3)), model, opt)
    scales = []
    for scale in [NAN, 1.0, 1.0, 1.0]:
        set_grads(model, scale)
        engine.step(opt)
        scales.append(engine.lr_scales[0])
    assert scales == [0.5, 0.5, 0.5, 1.0]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(max_norm=True), "max_norm"),
        (dict(max_norm=np.bool_(True)), "max_norm"),
        (dict(max_norm="0.5"), "max_norm"),
        (dict(max_norm=np.float32("nan")), "max_norm"),
        (dict(max_norm=np.complex64(1.0)), "max_norm"),
        (dict(mode="value", clip_value=np.float64("nan")), "clip_value"),
        (dict(max_consecutive_nonfinite=True), "max_consecutive_nonfinite"),
        (dict(max_consecutive_nonfinite=np.bool_(True)), "max_consecutive_nonfinite"),
        (dict(max_consecutive_nonfinite=np.float64(5.0)), "max_consecutive_nonfinite"),
        (dict(max_consecutive_nonfinite=np.int64(0)), "max_consecutive_nonfinite"),
        (dict(nan_policy="halve_lr", lr_recovery_steps="3"), "lr_recovery_steps"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v!r}" for k, v in v.items()),
)
def test_bools_strings_nan_complex_and_non_integral_counts_are_still_refused(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        GradientClipping(**kwargs)


# ----------------------------------------------------------------------------- value clipping of sparse gradients
LO, HI = -0.5, 1.0


def uncoalesced_embedding_grad():
    """Rows of a (6, 3) gradient, stored with repeated indices; every stored entry is inside [LO, HI] but the
    sums of rows 1 and 4 are not (as nn.Embedding(sparse=True) gives for a repeated id)."""
    indices = torch.tensor([[1, 4, 1, 2, 4, 1, 5]])
    values = torch.tensor(
        [
            [0.6, 0.2, -0.3],
            [-0.4, 0.9, 0.1],
            [0.7, -0.1, -0.4],
            [0.3, -0.2, 0.8],
            [-0.3, 0.5, 0.2],
            [0.1, 0.1, 0.1],
            [-0.45, 0.95, 0.0],
        ]
    )
    grad = torch.sparse_coo_tensor(indices, values, (6, 3))
    assert not grad.is_coalesced() and float(values.abs().max()) < 1.0
    return grad


def reference(grad, lo, hi):
    return torch.clamp(grad.to_dense().double(), lo, hi)


@pytest.mark.parametrize("lo,hi", [(LO, HI), (-0.5, None), (None, 1.0)], ids=["both", "only-min", "only-max"])
def test_clip_by_value_clamps_an_uncoalesced_sparse_gradient_on_its_summed_value_in_place(lo, hi):
    grad = uncoalesced_embedding_grad()
    expected = reference(grad, lo, hi)
    assert not torch.equal(expected, grad.to_dense().double())  # the sums do exceed the bounds
    F.clip_by_value_([grad], lo, hi)
    assert grad.layout == torch.sparse_coo
    torch.testing.assert_close(grad.to_dense().double(), expected, rtol=1e-6, atol=0.0)


def test_clip_by_value_clamps_sparse_and_dense_gradients_together_with_a_precomputed_plan():
    sparse = uncoalesced_embedding_grad()
    dense = torch.tensor([[2.0, -3.0], [0.25, -0.25]])
    coalesced = uncoalesced_embedding_grad().coalesce() * 2.0
    tensors = [dense, sparse, coalesced]
    expected = [reference(t, LO, HI) if t.is_sparse else torch.clamp(t.double(), LO, HI) for t in tensors]
    ids = [id(t) for t in tensors]
    F.clip_by_value_(tensors, LO, HI, groups=F.plan(tensors))
    assert [id(t) for t in tensors] == ids
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t.to_dense().double(), e, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "convert",
    [lambda d: d.to_sparse_csr(), lambda d: d.to_sparse_csc(), lambda d: d.to_sparse_bsr((2, 1))],
    ids=["csr", "csc", "bsr"],
)
def test_clip_by_value_clamps_compressed_sparse_gradients_in_place(convert):
    dense = torch.tensor([[3.0, 0.0, 0.5], [0.0, -4.0, 0.0], [0.0, 0.0, 0.0], [0.7, 0.0, -0.2]])
    grad = convert(dense)
    F.clip_by_value_([grad], LO, HI)
    torch.testing.assert_close(grad.to_dense().double(), torch.clamp(dense.double(), LO, HI), rtol=0.0, atol=0.0)
    # The norms of compressed gradients are those of their dense view too.
    (norm,) = F.grad_norms([grad], 2.0)
    assert norm.item() == pytest.approx(torch.clamp(dense.double(), LO, HI).norm().item(), rel=1e-6)


@pytest.mark.parametrize("lo,hi", [(0.1, 1.0), (-1.0, -0.1)], ids=["above-zero", "below-zero"])
def test_clip_by_value_refuses_a_sparse_gradient_when_the_range_excludes_zero(lo, hi):
    # The unstored zeros would have to become `lo`/`hi`: a sparse tensor cannot hold that in place.
    grad, dense = uncoalesced_embedding_grad(), torch.tensor([5.0])
    before = grad.to_dense().clone()
    with pytest.raises(ValueError, match="sparse_coo"):
        F.clip_by_value_([dense, grad], lo, hi)
    assert torch.equal(grad.to_dense(), before) and dense.item() == 5.0  # nothing was changed


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_norm_of_a_sparse_gradient_with_no_stored_entries_is_zero(p):
    # Embedding(sparse=True, padding_idx=0) on a batch of padding ids: nnz = 0; the inf-norm kernel refuses empty.
    emb = torch.nn.Embedding(5, 3, sparse=True, padding_idx=0)
    emb(torch.tensor([0, 0])).sum().backward()
    assert emb.weight.grad._nnz() == 0
    (norm,) = F.grad_norms([emb.weight.grad], p)
    assert norm.item() == 0.0


def test_clip_grad_norm_of_an_uncoalesced_sparse_gradient_matches_its_dense_view():
    w = torch.nn.Parameter(torch.zeros(6, 3))
    w.grad = uncoalesced_embedding_grad()
    dense = w.grad.to_dense().double()
    total = F.clip_grad_norm_([w], max_norm=0.5)
    assert total.item() == pytest.approx(dense.norm().item(), rel=1e-6)
    torch.testing.assert_close(w.grad.to_dense().double(), dense * 0.5 / (dense.norm() + F.EPS), rtol=1e-5, atol=0.0)


def sparse_embedding_setup():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(8, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    ids = torch.tensor([1, 1, 1, 2, 5, 5])
    weights = torch.tensor(
        [[0.6, -0.2, 0.1], [0.5, -0.2, 0.1], [0.4, -0.3, 0.1], [0.2, 0.3, -0.4], [-0.3, 0.2, 0.4], [-0.4, 0.1, 0.4]]
    )
    (emb(ids) * weights).sum().backward()
    assert not emb.weight.grad.is_coalesced()
    return emb, opt


def test_value_rule_clamps_a_sparse_embedding_gradient_through_the_engine():
    emb, opt = sparse_embedding_setup()
    lo, hi = -0.5, 0.75  # exact in float32: the bound check below compares float32 values
    grad = emb.weight.grad
    expected = reference(grad, lo, hi)
    assert not torch.equal(expected, grad.to_dense().double())
    engine = ClipEngine(ValueClip(min_value=lo, max_value=hi), Ignore())
    engine.attach([opt], emb.named_parameters())
    out = engine.step(opt, log=True)
    assert emb.weight.grad is grad  # clamped in the tensor the optimizer reads
    dense = grad.to_dense().double()
    assert dense.min() >= lo and dense.max() <= hi
    torch.testing.assert_close(dense, expected, rtol=1e-6, atol=0.0)
    assert engine.counters["clipped_steps"] == 1
    assert out[M.TOTAL_CLIPPED] == pytest.approx(expected.norm().item(), rel=1e-5)
    weight = emb.weight.detach().double().clone()
    opt.step()
    torch.testing.assert_close(emb.weight.detach().double(), weight - 0.1 * expected, rtol=1e-6, atol=1e-7)


def test_norm_rule_clips_a_sparse_embedding_gradient_through_the_engine_like_its_dense_view():
    # Guard: the norm path stays correct for the same uncoalesced gradient.
    emb, opt = sparse_embedding_setup()
    dense = emb.weight.grad.to_dense().double()
    engine = ClipEngine(NormClip(max_norm=0.5), Skip())
    engine.attach([opt], emb.named_parameters())
    engine.step(opt)
    torch.testing.assert_close(
        emb.weight.grad.to_dense().double(), dense * 0.5 / (dense.norm() + F.EPS), rtol=1e-5, atol=0.0
    )
