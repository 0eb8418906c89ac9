"""``GradientClipping`` inside a real Lightning ``Trainer``: what the optimizer's step actually sees.

The unclipped gradient of each optimizer step is captured in ``on_after_backward`` (which runs before
the callback's ``on_before_optimizer_step``); the gradient the optimizer applies is captured inside
``step()`` of an SGD subclass, after Lightning's closure (forward, backward, and the callbacks'
``on_before_optimizer_step``) has run. The expected result is computed from the unclipped gradient in
float64 by hand.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from faults import trainer
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping

INF = float("inf")
EPS = 1e-6  # the documented default eps, as in torch.nn.utils.clip_grad_norm_


# ----------------------------------------------------------------------------- harness
class RecordingSGD(torch.optim.SGD):
    """Plain SGD that records ``p.grad`` exactly as its update uses it (after Lightning's closure ran)."""

    def __init__(self, named_params, lr=0.01):
        named_params = list(named_params)
        self.names = [n for n, _ in named_params]
        super().__init__([p for _, p in named_params], lr=lr)
        self.seen: list[dict[str, torch.Tensor | None]] = []

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        self.seen.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in zip(self.names, params)})
        super().step()
        return loss


class Net(pl.LightningModule):
    """Tiny regression model; ``loss_scale`` makes gradients large enough to need clipping."""

    def __init__(self, loss_scale=50.0, manual=False, freeze_first=False, unused_param=False, lr=0.01, seed=0):
        super().__init__()
        torch.manual_seed(seed)  # the same weights whatever test runs first
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.head = nn.Linear(5, 1)
        if unused_param:
            self.unused = nn.Parameter(torch.ones(3))  # never used in forward: never gets a gradient
        if freeze_first:
            self.body[0].requires_grad_(False)
        self.loss_scale = loss_scale
        self.lr = lr
        self.automatic_optimization = not manual
        self.backward_grads: list[dict[str, torch.Tensor]] = []  # p.grad after each backward (unclipped)

    def forward(self, x):
        return self.head(self.body(x))

    def loss(self, batch):
        x, y = batch
        return ((self(x) - y) ** 2).mean() * self.loss_scale

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def on_after_backward(self):
        self.backward_grads.append(
            {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        )

    def configure_optimizers(self):
        # every parameter, frozen ones included, goes to the optimizer: the callback must cope
        return RecordingSGD(self.named_parameters(), lr=self.lr)


def loader(n=32, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randn(n, 1, generator=g) * 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def fit(model, callback, tmp_path, max_steps=4, **trainer_kwargs):
    t = trainer(tmp_path, [callback], max_steps=max_steps, accelerator="cpu", devices=1, **trainer_kwargs)
    t.fit(model, loader())
    return t


def flat64(grads: dict, names):
    return torch.cat([grads[n].to(torch.float64).reshape(-1) for n in names])


def vnorm(v, p):
    return torch.linalg.vector_norm(v, p).item()


def cosine(a, b):
    return (a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))).item()


def expected_norm_clip(unclipped: dict, names, max_norm, p):
    """Float64 reference of norm clipping: g * min(1, max_norm / (||g||_p + eps))."""
    v = flat64(unclipped, names)
    total = vnorm(v, p)
    return v * min(1.0, max_norm / (total + EPS)), total


def seen_and_unclipped(model):
    opt = model.trainer.optimizers[0]
    return opt.seen, model.backward_grads


# ----------------------------------------------------------------------------- norm clipping
@pytest.mark.parametrize("p", [1.0, 2.0, INF], ids=["L1", "L2", "Linf"])
def test_norm_clipping_gives_the_optimizer_the_float64_reference_gradient(p, tmp_path):
    model = Net()
    fit(model, GradientClipping(mode="norm", max_norm=0.5, norm_type=p), tmp_path, max_steps=4)
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == len(unclipped) == 4
    names = list(unclipped[0])
    for step_seen, step_raw in zip(seen, unclipped):
        expected, total = expected_norm_clip(step_raw, names, 0.5, p)
        assert total > 0.5 * 1.5, "the test needs gradients above the threshold"
        got = flat64(step_seen, names)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        assert vnorm(got, p) == pytest.approx(0.5, rel=1e-5)
        assert cosine(got, flat64(step_raw, names)) == pytest.approx(1.0, abs=1e-12)


def test_norm_clipping_leaves_small_gradients_bit_identical(tmp_path):
    model = Net()
    fit(model, GradientClipping(mode="norm", max_norm=1e6), tmp_path, max_steps=3)
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == 3
    for step_seen, step_raw in zip(seen, unclipped):
        assert step_seen.keys() == step_raw.keys()
        for name, g in step_raw.items():
            assert torch.equal(step_seen[name], g), name


def test_norm_clipping_result_equals_torch_clip_grad_norm_foreach(tmp_path):
    model = Net()
    fit(model, GradientClipping(mode="norm", max_norm=0.3), tmp_path, max_steps=2)
    seen, unclipped = seen_and_unclipped(model)
    for step_seen, step_raw in zip(seen, unclipped):
        params = []
        for g in step_raw.values():
            p = nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            params.append(p)
        torch.nn.utils.clip_grad_norm_(params, max_norm=0.3, foreach=True)
        for (name, _), p in zip(step_raw.items(), params):
            torch.testing.assert_close(step_seen[name], p.grad, rtol=1e-6, atol=1e-8)


def test_the_optimizer_update_uses_the_clipped_gradient(tmp_path):
    # SGD without momentum: w_after - w_before == -lr * g_clipped, so the weights themselves show the clip.
    model = Net(lr=0.1)
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    fit(model, GradientClipping(mode="norm", max_norm=0.25), tmp_path, max_steps=1)
    (step_raw,) = model.backward_grads
    names = list(step_raw)
    expected, _ = expected_norm_clip(step_raw, names, 0.25, 2.0)
    delta = torch.cat([(before[n] - dict(model.named_parameters())[n].detach().double()).reshape(-1) for n in names])
    torch.testing.assert_close(delta / 0.1, expected, rtol=1e-4, atol=1e-7)
    assert vnorm(delta / 0.1, 2.0) == pytest.approx(0.25, rel=1e-4)


class NanInFirstLayer(Net):
    def on_after_backward(self):
        self.body[0].weight.grad[0, 0] = float("nan")  # one NaN element, as a diverging layer would give
        super().on_after_backward()


def test_norm_clipping_leaves_gradients_untouched_when_the_total_norm_is_nan(tmp_path):
    # torch.nn.utils.clip_grad_norm_ would multiply every gradient by max_norm / nan; with
    # nan_policy="ignore" the optimizer must get the gradients exactly as backward left them.
    model = NanInFirstLayer()
    fit(model, GradientClipping(mode="norm", max_norm=1e-3, nan_policy="ignore"), tmp_path, max_steps=1)
    (step_seen,), (step_raw,) = seen_and_unclipped(model)
    for name, raw in step_raw.items():
        got = step_seen[name]
        finite = torch.isfinite(raw)
        assert torch.equal(got[finite], raw[finite]), name
        assert torch.equal(torch.isnan(got), torch.isnan(raw)), name
    assert torch.isnan(step_seen["body.0.weight"][0, 0])
    assert vnorm(flat64(step_raw, ["head.weight", "head.bias"]), 2.0) > 1e-3  # finite part is above max_norm


# ----------------------------------------------------------------------------- value clipping
@pytest.mark.parametrize(
    "kwargs,lo,hi",
    [
        (dict(clip_value=0.3), -0.3, 0.3),
        (dict(min_value=-0.2), -0.2, None),
        (dict(max_value=0.1), None, 0.1),
        (dict(min_value=-0.05, max_value=0.4), -0.05, 0.4),
    ],
    ids=["symmetric", "only-min", "only-max", "asymmetric"],
)
def test_value_clipping_clamps_to_the_bounds_and_keeps_in_range_elements_bit_identical(kwargs, lo, hi, tmp_path):
    model = Net(loss_scale=5.0)
    fit(model, GradientClipping(mode="value", **kwargs), tmp_path, max_steps=3)
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == 3
    n_below = n_above = n_inside = 0
    for step_seen, step_raw in zip(seen, unclipped):
        for name, raw in step_raw.items():
            got = step_seen[name]
            below = raw < lo if lo is not None else torch.zeros_like(raw, dtype=torch.bool)
            above = raw > hi if hi is not None else torch.zeros_like(raw, dtype=torch.bool)
            inside = ~below & ~above
            assert torch.equal(got[inside], raw[inside]), name
            if lo is not None:
                assert torch.equal(got[below], torch.full_like(raw[below], lo)), name
            if hi is not None:
                assert torch.equal(got[above], torch.full_like(raw[above], hi)), name
            n_below += int(below.sum())
            n_above += int(above.sum())
            n_inside += int(inside.sum())
    assert n_inside > 0 and (lo is None or n_below > 0) and (hi is None or n_above > 0)


# ----------------------------------------------------------------------------- accumulation
def test_with_gradient_accumulation_norm_clipping_applies_once_to_the_accumulated_gradient(tmp_path):
    model = Net(loss_scale=50.0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook_calls = []

    class CountingClip(GradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            hook_calls.append(trainer.global_step)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    max_norm = 0.5
    fit(model, CountingClip(mode="norm", max_norm=max_norm), tmp_path, max_steps=1, accumulate_grad_batches=2)
    seen, unclipped = seen_and_unclipped(model)
    assert hook_calls == [0], "one optimizer step over two micro-batches: the hook runs once"
    assert len(seen) == 1 and len(unclipped) == 2

    # Independent float64 reference: the gradient of the mean of the two micro-batch losses
    # (Lightning divides each loss by accumulate_grad_batches), at the initial weights.
    ref_model = Net(loss_scale=50.0).double()
    ref_model.load_state_dict({n: t.double() for n, t in init.items()})
    batches = list(loader())[:2]
    per_batch = []
    for x, y in batches:
        ref_model.zero_grad()
        ref_model.loss((x.double(), y.double())).backward()
        per_batch.append(torch.cat([p.grad.reshape(-1).clone() for p in ref_model.parameters()]))
    names = [n for n, _ in ref_model.named_parameters()]
    accumulated = (per_batch[0] + per_batch[1]) / 2
    torch.testing.assert_close(flat64(unclipped[-1], names), accumulated, rtol=1e-4, atol=1e-6)
    assert min(vnorm(g / 2, 2.0) for g in per_batch) > max_norm, "each micro-batch would be clipped on its own"

    expected = accumulated * min(1.0, max_norm / (vnorm(accumulated, 2.0) + EPS))
    got = flat64(seen[0], names)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert vnorm(got, 2.0) == pytest.approx(max_norm, rel=1e-5)
    # clipping each micro-batch and summing would give something else
    per_micro = sum(g / 2 * min(1.0, max_norm / (vnorm(g / 2, 2.0) + EPS)) for g in per_batch)
    assert not torch.allclose(got, per_micro, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- frozen / unused / no grad
def test_frozen_and_unused_parameters_are_ignored_and_the_rest_is_clipped(tmp_path):
    model = Net(freeze_first=True, unused_param=True)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("body.0")}
    unused_before = model.unused.detach().clone()
    fit(
        model,
        GradientClipping(mode="norm", max_norm=0.2),
        tmp_path,
        max_steps=3,
        log_every_n_steps=1,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb"),
    )
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == 3
    trainable = ["body.2.weight", "body.2.bias", "head.weight", "head.bias"]
    for step_seen, step_raw in zip(seen, unclipped):
        assert sorted(step_raw) == sorted(trainable)
        for n in ("body.0.weight", "body.0.bias", "unused"):
            assert step_seen[n] is None
        expected, total = expected_norm_clip(step_raw, trainable, 0.2, 2.0)
        assert total > 0.2
        torch.testing.assert_close(flat64(step_seen, trainable), expected, rtol=1e-6, atol=1e-9)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n])
    assert torch.equal(model.unused.detach(), unused_before)


class NoGradSteps(Net):
    """Manual optimization that steps the optimizer without any backward on odd batches."""

    def __init__(self):
        super().__init__(manual=True)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        if batch_idx % 2 == 0:
            self.manual_backward(self.loss(batch))
        opt.step()


def test_an_optimizer_step_where_no_parameter_has_a_gradient_is_a_no_op(tmp_path):
    model = NoGradSteps()
    callback = GradientClipping(mode="norm", max_norm=0.1)
    fit(
        model,
        callback,
        tmp_path,
        max_steps=4,
        log_every_n_steps=1,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb"),
    )
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == 4 and len(unclipped) == 2
    names = list(unclipped[0])
    for i, step_seen in enumerate(seen):
        if i % 2:
            assert all(g is None for g in step_seen.values())
        else:
            expected, _ = expected_norm_clip(unclipped[i // 2], names, 0.1, 2.0)
            torch.testing.assert_close(flat64(step_seen, names), expected, rtol=1e-6, atol=1e-9)


def test_a_model_whose_parameters_all_lack_gradients_trains_without_crash(tmp_path):
    class AllFrozen(Net):
        def __init__(self):
            super().__init__()
            self.requires_grad_(False)
            self.free = nn.Parameter(torch.ones(1))  # not in the optimizer, makes the loss differentiable

        def loss(self, batch):
            return super().loss(batch) * self.free

        def configure_optimizers(self):
            return RecordingSGD([(n, p) for n, p in self.named_parameters() if n != "free"])

    model = AllFrozen()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n != "free"}
    fit(
        model,
        GradientClipping(mode="norm", max_norm=0.1),
        tmp_path,
        max_steps=2,
        log_every_n_steps=1,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb"),
    )
    seen, _ = seen_and_unclipped(model)
    assert len(seen) == 2 and all(g is None for step in seen for g in step.values())
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n])


# ----------------------------------------------------------------------------- mode none / manual
def test_mode_none_leaves_gradients_bit_identical(tmp_path):
    model = Net()
    fit(model, GradientClipping(mode="none"), tmp_path, max_steps=3)
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == 3
    for step_seen, step_raw in zip(seen, unclipped):
        assert vnorm(flat64(step_raw, list(step_raw)), 2.0) > 1e-3  # mode="norm" would have clipped
        for name, g in step_raw.items():
            assert torch.equal(step_seen[name], g), name


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_manual_optimization_is_clipped_too(mode, tmp_path):
    model = Net(manual=True)
    kwargs = dict(max_norm=0.4) if mode == "norm" else dict(clip_value=0.05)
    fit(model, GradientClipping(mode=mode, **kwargs), tmp_path, max_steps=3)
    seen, unclipped = seen_and_unclipped(model)
    assert len(seen) == len(unclipped) == 3
    names = list(unclipped[0])
    for step_seen, step_raw in zip(seen, unclipped):
        raw = flat64(step_raw, names)
        got = flat64(step_seen, names)
        if mode == "norm":
            expected, total = expected_norm_clip(step_raw, names, 0.4, 2.0)
            assert total > 0.4
        else:
            expected = raw.clamp(-0.05, 0.05)
            assert (raw.abs() > 0.05).any()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_lightning_own_gradient_clip_val_refuses_manual_optimization_but_the_callback_does_not(tmp_path):
    # The contrast that motivates the callback: Lightning rejects clipping under manual optimization.
    with pytest.raises(MisconfigurationException, match="gradient clipping is not supported for manual optimization"):
        fit(Net(manual=True), pl.Callback(), tmp_path, max_steps=1, gradient_clip_val=0.5)
    model = Net(manual=True)
    fit(model, GradientClipping(max_norm=0.4), tmp_path, max_steps=1)
    (got,), (raw,) = seen_and_unclipped(model)
    names = list(raw)
    assert vnorm(flat64(raw, names), 2.0) > 0.4
    assert vnorm(flat64(got, names), 2.0) == pytest.approx(0.4, rel=1e-5)
