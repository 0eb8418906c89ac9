"""Each NaN remedy (``lightning_clip.remedies``) through the ``ClipEngine`` in a plain torch loop (no Lightning).

Faults are injected by hand: a NaN loss passed to ``engine.observe_loss`` (every gradient turns NaN) or an Inf
written into one parameter's gradient after backward. Bit-identity is checked with ``torch.equal`` on the weights
and on every tensor of ``optimizer.state_dict()``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_clip import ClipEngine, NonFiniteGradientError
from lightning_clip.host_reads import count_host_reads
from lightning_clip.remedies import REMEDIES, HalveLR, Ignore, RaiseError, Skip, build_remedy
from lightning_clip.rules import NoClip, NormClip

NAN = float("nan")
INF = float("inf")

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
    "sgd_fused_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
}


# ----------------------------------------------------------------------------- a plain training loop
def make_batches(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 4, generator=g, dtype=dtype), torch.randn(6, 1, generator=g, dtype=dtype)) for _ in range(n)
    ]


class Loop:
    """A tiny MLP, a real optimizer and a ClipEngine; ``step`` is one optimizer step with an optional fault."""

    def __init__(self, remedy, optimizer="sgd", rule=None, dtype=torch.float32, read_every=50, lr=0.1, **engine_kw):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        else:
            self.opt = OPTIMIZERS[optimizer](self.model.parameters())
        self.engine = ClipEngine(rule if rule is not None else NormClip(max_norm=1e6), remedy, **engine_kw)
        self.engine.attach([self.opt], self.model.named_parameters())
        self.warnings: list[str] = []
        self.engine.warn = self.warnings.append
        self.read_every = read_every
        self.reads = -1
        self.grads: list[torch.Tensor] = []

    def weights(self):
        return [p.detach().clone() for p in self.model.parameters()]

    def step(self, batch, *, nan_loss=False, inf_grad=None, log=False):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        if nan_loss:
            loss = loss * NAN
        self.engine.observe_loss(loss)
        loss.backward()
        if inf_grad is not None:
            dict(self.model.named_parameters())[inf_grad].grad.view(-1)[0] = INF
        with count_host_reads() as reads:
            metrics = self.engine.step(self.opt, log=log, read_every=self.read_every)
        self.reads = reads.count
        # what the optimizer is about to apply (None for a parameter the remedy skipped)
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()]
        self.opt.step()
        self.opt.zero_grad()
        return metrics

    def applied_lr(self, batch):
        """One good plain-SGD step; the LR it applied, measured from the update: (w_before - w_after) / grad."""
        before = self.weights()
        self.step(batch)
        delta = torch.cat([(b - a).reshape(-1) for b, a in zip(before, self.weights())]).double()
        grad = torch.cat([g.reshape(-1) for g in self.grads]).double()
        return (delta @ grad / (grad @ grad)).item()


def state_equal(a, b) -> bool:
    """Recursive bit-identity of two (optimizer) state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def all_finite(weights) -> bool:
    return all(torch.isfinite(w).all() for w in weights)


# ----------------------------------------------------------------------------- Skip
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_skip_leaves_weights_and_optimizer_state_bit_identical_on_a_bad_step(optimizer, fault):
    loop = Loop(Skip(), optimizer)
    batches = make_batches(4)
    loop.step(batches[0])
    loop.step(batches[1])  # every optimizer now has its state (momentum, moments, step)
    weights, state = loop.weights(), copy.deepcopy(loop.opt.state_dict())
    loop.step(batches[2], nan_loss=fault == "nan_loss", inf_grad="2.weight" if fault == "inf_grad" else None)
    assert weights_equal(weights, loop.weights())
    assert state_equal(state, loop.opt.state_dict())
    loop.step(batches[3])
    assert not weights_equal(weights, loop.weights())  # a good step does move them
    assert all_finite(loop.weights())
    assert loop.engine.counters["skipped_steps"] == loop.engine.counters["nonfinite_steps"] == 1


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_skip_of_the_very_first_step_matches_a_run_that_never_saw_the_bad_batch(optimizer):
    # torch's fused SGD allocates its momentum buffer with empty_like even on a found_inf step: a device-side
    # skip of step one would leave garbage in the state that the next good steps write into the weights.
    batches = make_batches(4)
    faulty, clean = Loop(Skip(), optimizer), Loop(Skip(), optimizer)
    assert weights_equal(faulty.weights(), clean.weights())
    faulty.step(batches[0], nan_loss=True)
    assert weights_equal(faulty.weights(), clean.weights())
    for batch in batches[1:]:
        faulty.step(batch)
        clean.step(batch)
        assert all_finite(faulty.weights())
        assert weights_equal(faulty.weights(), clean.weights())
    assert state_equal(faulty.opt.state_dict()["state"], clean.opt.state_dict()["state"])


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw_fused"])
def test_skip_raises_at_the_max_consecutive_nonfinite_th_bad_step_not_before(optimizer):
    loop = Loop(Skip(max_consecutive_nonfinite=3), optimizer, read_every=1)
    batches = make_batches(4)
    loop.step(batches[0])
    weights = loop.weights()
    loop.step(batches[1], nan_loss=True)
    loop.step(batches[2], nan_loss=True)  # 2 in a row: still skipping
    assert loop.engine.counters_of(0)["nonfinite_streak"] == 2
    with pytest.raises(NonFiniteGradientError, match="3 consecutive") as info:
        loop.step(batches[3], nan_loss=True)
    assert info.value.consecutive == 3
    assert weights_equal(weights, loop.weights())


def test_a_good_step_resets_the_streak_of_skip():
    loop = Loop(Skip(max_consecutive_nonfinite=3))
    batches = make_batches(7)
    for i, bad in enumerate([True, True, False, True, True]):
        loop.step(batches[i], nan_loss=bad)
    assert loop.engine.counters_of(0)["nonfinite_streak"] == 2
    assert loop.engine.counters["nonfinite_steps"] == 4
    with pytest.raises(NonFiniteGradientError):
        loop.step(batches[5], nan_loss=True)


def test_skip_with_no_limit_never_raises_and_warns_at_powers_of_two():
    loop = Loop(Skip(max_consecutive_nonfinite=None))
    for batch in make_batches(5):
        loop.step(batch, nan_loss=True)
    assert loop.engine.counters["skipped_steps"] == 5
    assert len(loop.warnings) == 3  # 1st, 2nd, 4th bad step


# ----------------------------------------------------------------------------- HalveLR
@pytest.mark.parametrize("factor", [0.1, 0.8])
def test_halve_lr_applies_lr_factor_exactly(factor):
    loop = Loop(HalveLR(lr_factor=factor, max_consecutive_nonfinite=None), rule=NoClip(), dtype=torch.float64)
    b = make_batches(6, dtype=torch.float64)
    assert loop.applied_lr(b[0]) == pytest.approx(0.1, rel=1e-9)
    loop.step(b[1], nan_loss=True)
    assert loop.engine.lr_scales == [factor]
    assert loop.applied_lr(b[2]) == pytest.approx(0.1 * factor, rel=1e-9)
    loop.step(b[3], inf_grad="0.bias")
    assert loop.engine.lr_scales == [pytest.approx(factor**2, rel=1e-12)]
    assert loop.applied_lr(b[4]) == pytest.approx(0.1 * factor**2, rel=1e-9)


def test_halve_lr_never_goes_below_min_lr_scale():
    loop = Loop(HalveLR(min_lr_scale=0.3), rule=NoClip(), dtype=torch.float64)
    b = make_batches(5, dtype=torch.float64)
    scales = []
    for batch in b[:3]:
        loop.step(batch, nan_loss=True)
        scales.append(loop.engine.lr_scales[0])
    assert scales == [0.5, 0.3, 0.3]
    assert loop.applied_lr(b[3]) == pytest.approx(0.1 * 0.3, rel=1e-9)


def test_halve_lr_recovers_after_exactly_lr_recovery_steps_healthy_steps():
    loop = Loop(HalveLR(lr_recovery_steps=3), rule=NoClip(), dtype=torch.float64)
    b = make_batches(6, dtype=torch.float64)
    loop.step(b[0], nan_loss=True)
    lrs, scales = [], []
    for batch in b[1:5]:
        lrs.append(loop.applied_lr(batch))
        scales.append(loop.engine.lr_scales[0])
    # three healthy updates at 0.5 x lr; the scale is back to 1.0 after the third, for the fourth
    assert lrs == pytest.approx([0.05, 0.05, 0.05, 0.1], rel=1e-9)
    assert scales == [0.5, 0.5, 1.0, 1.0]


def test_halve_lr_bad_step_during_recovery_restarts_the_healthy_count():
    loop = Loop(HalveLR(lr_recovery_steps=3), rule=NoClip(), dtype=torch.float64)
    b = make_batches(8, dtype=torch.float64)
    scales = []
    for i, bad in enumerate([True, False, False, True, False, False, False]):
        loop.step(b[i], nan_loss=bad)
        scales.append(loop.engine.lr_scales[0])
    # 2 healthy steps, then a bad one (0.25): recovery waits 3 new healthy steps, undoing one reduction
    assert scales == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.5]
    assert loop.applied_lr(b[7]) == pytest.approx(0.05, rel=1e-9)


def test_halve_lr_tiny_factor_never_reaches_zero_and_recovers_to_one():
    loop = Loop(HalveLR(lr_factor=1e-200, lr_recovery_steps=1, max_consecutive_nonfinite=None), rule=NoClip())
    b = make_batches(12)
    for batch in b[:5]:
        loop.step(batch, nan_loss=True)
        assert loop.engine.lr_scales[0] > 0.0
    for batch in b[5:]:
        loop.step(batch)
        assert 0.0 < loop.engine.lr_scales[0] <= 1.0
    assert loop.engine.lr_scales == [1.0]


def test_halve_lr_param_groups_and_optimizer_state_dict_show_the_unscaled_lr():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.02}])
    engine = ClipEngine(NoClip(), HalveLR())
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    x, y = make_batches(1)[0]

    def backward(nan=False):
        loss = torch.nn.functional.mse_loss(model(x), y) * (NAN if nan else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        return loss

    def lrs():
        return [g["lr"] for g in opt.param_groups], [g["lr"] for g in opt.state_dict()["param_groups"]]

    backward(nan=True)
    engine.step(opt)
    opt.step()
    opt.zero_grad()
    assert engine.lr_scales == [0.5]

    backward()
    engine.step(opt)  # armed: the 0.5 scale is due for this update
    assert lrs() == ([0.1, 0.02], [0.1, 0.02])
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert lrs() == ([0.1, 0.02], [0.1, 0.02])
    for (b, g, p), lr in zip(zip(before, grads, model.parameters()), [0.1, 0.1, 0.02, 0.02]):
        torch.testing.assert_close(b - p.detach(), 0.5 * lr * g)  # the update did use the scaled LR
    opt.zero_grad()

    # Lightning's closure step: the engine runs inside opt.step(), the scaled LR is in place during the update,
    # but a state_dict taken there (a checkpoint written by an exception handler) still holds the unscaled LR.
    seen = []

    def closure():
        loss = backward()
        engine.step(opt)
        seen.append([g["lr"] for g in opt.state_dict()["param_groups"]])
        return loss

    opt.step(closure)
    assert seen == [[0.1, 0.02]]
    assert lrs() == ([0.1, 0.02], [0.1, 0.02])


# ----------------------------------------------------------------------------- RaiseError
def test_raise_error_names_the_parameter_with_the_nan_gradient_and_leaves_the_weights_untouched():
    loop = Loop(RaiseError())
    batches = make_batches(2)
    loop.step(batches[0])
    weights, state = loop.weights(), copy.deepcopy(loop.opt.state_dict())
    x, y = batches[1]
    torch.nn.functional.mse_loss(loop.model(x), y).backward()
    loop.model[2].weight.grad[0, 3] = NAN
    with pytest.raises(NonFiniteGradientError) as info:
        loop.engine.step(loop.opt)
    assert info.value.parameter_names == ["2.weight"]
    assert "2.weight" in str(info.value)
    assert weights_equal(weights, loop.weights())
    assert state_equal(state, loop.opt.state_dict())
    assert torch.isfinite(loop.model[0].weight.grad).all()  # the other gradients were not touched either


def test_raise_error_does_not_raise_on_healthy_steps():
    loop = Loop(RaiseError())
    for batch in make_batches(3):
        loop.step(batch)
    assert loop.engine.counters["steps"] == 3 and loop.engine.counters["nonfinite_steps"] == 0


# ----------------------------------------------------------------------------- Ignore
@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_ignore_lets_bad_steps_through_with_zero_host_reads(fault):
    loop = Loop(Ignore())
    batches = make_batches(3)
    loop.step(batches[0])
    assert loop.reads == 0
    weights = loop.weights()
    loop.step(batches[1], nan_loss=fault == "nan_loss", inf_grad="2.weight" if fault == "inf_grad" else None)
    assert loop.reads == 0
    after = loop.weights()
    assert not weights_equal(weights, after)
    assert not all_finite(after)  # the user chose ignore: the NaN/Inf reached the weights
    assert loop.engine.counters["skipped_steps"] == 0


# ----------------------------------------------------------------------------- host reads per step
@pytest.mark.parametrize(("policy", "reads"), [("skip", 1), ("halve_lr", 1), ("raise", 1), ("ignore", 0)])
def test_host_reads_per_healthy_step_with_a_non_fused_optimizer(policy, reads):
    loop = Loop(build_remedy(policy))
    counted = []
    for batch in make_batches(3):
        loop.step(batch)
        counted.append(loop.reads)
    assert counted == [reads] * 3


def test_fused_skip_reads_the_host_only_every_read_every_steps():
    loop = Loop(Skip(), "adamw_fused", read_every=4)
    batches = make_batches(9)
    counted = []
    for i, batch in enumerate(batches[:8]):
        before = loop.weights()
        loop.step(batch, nan_loss=i == 5)
        counted.append(loop.reads)
        assert weights_equal(before, loop.weights()) is (i == 5)  # skipped on the device, with no read
    # The first step reads (no optimizer state yet: decided on the host), then only when
    # counters.steps % read_every == 0, at steps 4 and 8.
    assert counted == [1, 0, 0, 1, 0, 0, 0, 1]
    assert len(loop.warnings) == 1 and "skipped on the device" in loop.warnings[0]  # reported at step 8


def test_after_detach_a_fused_optimizer_steps_normally_again():
    loop = Loop(Skip(), "adamw_fused")
    batches = make_batches(3)
    loop.step(batches[0])
    loop.step(batches[1], nan_loss=True)  # skipped on the device through found_inf
    loop.engine.detach()
    x, y = batches[2]
    torch.nn.functional.mse_loss(loop.model(x), y).backward()
    before = loop.weights()
    loop.opt.step()  # a plain step, no engine any more
    assert not weights_equal(before, loop.weights())


def test_remedy_registry_and_build_remedy():
    assert set(REMEDIES) == {"skip", "halve_lr", "raise", "ignore", "rollback"}
    assert isinstance(build_remedy("halve_lr", lr_factor=0.25), HalveLR)
    assert build_remedy("halve_lr", lr_factor=0.25).lr_factor == 0.25
    with pytest.raises(ValueError, match="`nan_policy`"):
        build_remedy("retry")
    with pytest.raises(ValueError, match="`lr_recovery_steps` does not apply to nan_policy='skip'"):
        build_remedy("skip", strict={"lr_recovery_steps": 10})
