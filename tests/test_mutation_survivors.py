"""Behaviour the mutation run (docs/mutation.md) found unpinned: one test per promise, in a plain torch loop.

Each test here failed on at least one mutant that survived the rest of the fast suite. They use real optimizers
(SGD, AdamW, LBFGS; fused ones with a CPU ``GradScaler`` for the fp16 paths) and the ``ClipEngine`` as a plain loop
drives it: ``observe_loss`` / ``observe_batch``, ``backward``, ``engine.step``, ``optimizer.step``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings

import pytest
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer

import lightning_clip
from lightning_clip import ClipEngine, NonFiniteGradientError
from lightning_clip import metrics as M
from lightning_clip.counters import COUNTERS, StepCounters
from lightning_clip.detect import BadStepDetector, SpikeDetector, leaf_parameters
from lightning_clip.host_reads import count_host_reads
from lightning_clip.lr_scale import StepLRScale
from lightning_clip.remedies import HalveLR, Ignore, RaiseError, Skip
from lightning_clip.rules import ClipResult, ClipRule, NoClip, NormClip, ValueClip
from lightning_clip.rules.value import out_of_range

NAN = float("nan")
INF = float("inf")
SCALE = 2.0**10  # GradScaler's initial scale in the fp16 tests: a power of two, so unscaling is exact


# ----------------------------------------------------------------------------- helpers
def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def make_engine(model, opt, rule=None, remedy=None, attach=True, named=True, **kw):
    engine = ClipEngine(rule, remedy, **kw)
    if attach:
        engine.attach([opt], model.named_parameters() if named else None)
    engine.warnings = []
    engine.warn = engine.warnings.append
    return engine


def backward(model, engine, seed=0, factor=1.0, offset=0.0, scaler=None):
    """One micro-batch: ``factor`` NaN spoils every gradient, ``offset`` NaN only the loss (gradients stay finite)."""
    x, y = batch(seed)
    loss = torch.nn.functional.mse_loss(model(x), y) * factor + offset
    engine.observe_loss(loss)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss


def pick(counts, *keys):
    """The entries ``keys`` of a counters/state dict (other counters may be added to it over time)."""
    return {k: counts[k] for k in keys}


COUNTS = ("steps", "clipped_steps", "nonfinite_steps", "amp_overflows")


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def ref_norm(tensors, p=2.0):
    v = torch.cat([t.detach().double().reshape(-1) for t in tensors]).abs()
    return v.max().item() if math.isinf(p) else (v.pow(p).sum() ** (1.0 / p)).item()


def train_step(model, opt, engine, seed=0, factor=1.0, offset=0.0, log=False, **step_kw):
    backward(model, engine, seed, factor, offset)
    out = engine.step(opt, log=log, **step_kw)
    opt.step()
    opt.zero_grad()
    return out


def applied_lr(model, opt, engine, seed=0):
    """One good plain-SGD step (no clipping); the LR it applied, measured from the update."""
    backward(model, engine, seed)
    engine.step(opt)
    grads = [p.grad.detach().clone() for p in model.parameters()]
    before = weights(model)
    opt.step()
    opt.zero_grad()
    delta = torch.cat([(b - a).reshape(-1) for b, a in zip(before, weights(model))]).double()
    grad = torch.cat([g.reshape(-1) for g in grads]).double()
    return (delta @ grad / (grad @ grad)).item()


class CountingRule(NormClip):
    """A rule with statistics (mutable, checkpointed): how many steps it clipped."""

    def __init__(self, max_norm=1e6):
        super().__init__(max_norm)
        self.seen = []

    def clip_(self, step):
        self.seen.append(1)
        return super().clip_(step)

    def state_dict(self):
        return {"seen": len(self.seen)}

    def load_state_dict(self, state):
        self.seen = [1] * state["seen"]


class BareRule(ClipRule):
    """A custom rule that reports only the flag: no norm after clipping, no threshold."""

    mode = "bare"

    def clip_(self, step):
        return ClipResult(step.bad & False)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: ClipEngine(norm_type=0.0), "norm_type"),
        (lambda: ClipEngine(eps=INF), "eps"),
        (lambda: ClipEngine(eps=-1e-3), "eps"),
        (lambda: ClipEngine(log_norms="layers"), "log_norms"),
        (lambda: ClipEngine(check_inputs=1), "check_inputs"),
        (lambda: ClipEngine(rule="norm"), "rule"),
        (lambda: ClipEngine(remedy="skip"), "remedy"),
        (lambda: Skip(max_consecutive_nonfinite=0), "max_consecutive_nonfinite"),
        (lambda: HalveLR(max_consecutive_nonfinite=0), "max_consecutive_nonfinite"),
        (lambda: HalveLR(lr_factor=1.0), "lr_factor"),
        (lambda: HalveLR(lr_factor=1.5), "lr_factor"),
        (lambda: HalveLR(min_lr_scale=1.5), "min_lr_scale"),
        (lambda: HalveLR(lr_recovery_steps=0), "lr_recovery_steps"),
    ],
)
def test_invalid_arguments_are_refused_with_a_message_naming_them(build, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        build()


def test_value_clip_without_any_bound_says_it_needs_one():
    with pytest.raises(ValueError, match=r"^mode='value' needs a bound: set `clip_value` .* got none\.$"):
        ValueClip()


def test_boundary_arguments_are_accepted():
    assert ClipEngine(eps=0.0).eps == 0.0
    assert HalveLR(min_lr_scale=1.0).min_lr_scale == 1.0
    rule = ValueClip(min_value=1.0, max_value=1.0)  # a one-point range is a range
    assert (rule.min_value, rule.max_value) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "text", "clip_value"),
    [
        (dict(clip_value=0.5), "ValueClip(value, [-0.5, 0.5])", 0.5),
        (dict(min_value=-0.25), "ValueClip(value, [-0.25, inf])", None),
        (dict(max_value=3.0), "ValueClip(value, [-inf, 3])", None),
    ],
)
def test_value_clip_repr_shows_each_bound_and_open_ends(kwargs, text, clip_value):
    rule = ValueClip(**kwargs)  # built in the test: rules built at collection would escape the mutants
    assert repr(rule) == text
    assert rule.clip_value == clip_value


# ----------------------------------------------------------------------------- defaults
def test_default_engine_clips_to_unit_norm_skips_bad_steps_and_ignores_inputs():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt)  # NormClip(max_norm=1.0), Skip()
    engine.observe_batch((torch.full((2, 4), NAN),), batch_idx=0)  # inputs are not checked by default
    backward(model, engine, factor=100.0)
    assert engine.step(opt) == {}  # no log by default
    assert ref_norm([p.grad for p in model.parameters()]) == pytest.approx(1.0, rel=1e-5)
    opt.step()
    opt.zero_grad()
    before = weights(model)
    out = train_step(model, opt, engine, seed=1, factor=NAN, log=True)
    assert same(before, weights(model))
    assert out[M.MAX_NORM] == 1.0 and out[M.THRESHOLD] == 1.0
    assert pick(engine.counters, *COUNTS, "skipped_steps") == {
        "steps": 2,
        "clipped_steps": 1,
        "nonfinite_steps": 1,
        "amp_overflows": 0,
        "skipped_steps": 1,
    }


@pytest.mark.parametrize("remedy", [Skip, HalveLR])
def test_skip_and_halve_lr_stop_at_the_tenth_consecutive_bad_step_by_default(remedy):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), remedy())
    for i in range(9):
        train_step(model, opt, engine, seed=i, factor=NAN)
    with pytest.raises(NonFiniteGradientError) as err:
        train_step(model, opt, engine, seed=9, factor=NAN)
    scale = 0.5**10 if remedy is HalveLR else 1.0
    assert err.value.consecutive == 10
    assert (
        f"Action: raised NonFiniteGradientError; 10 bad step(s) in a row, 9 skipped in total; LR scale now {scale:g}."
        in str(err.value)
    )
    assert str(err.value).startswith("10 consecutive steps with non-finite gradients (max_consecutive_nonfinite=10)")


def test_raise_policy_error_says_the_step_was_not_skipped():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), RaiseError())
    with pytest.raises(NonFiniteGradientError) as err:
        train_step(model, opt, engine, factor=NAN)
    message = str(err.value)
    assert message.startswith("Non-finite gradients at global step 0 (epoch 0, batch -1, optimizer 0)")
    assert "Action: raised NonFiniteGradientError; 1 bad step(s) in a row, 0 skipped in total; LR scale now 1." in (
        message
    )


# ----------------------------------------------------------------------------- StepLRScale
def sgd_one_weight(lr=1.0):
    w = torch.nn.Parameter(torch.zeros(1))
    return w, torch.optim.SGD([w], lr=lr)


def update_of(w, opt, closure=None):
    before = w.detach().clone()
    w.grad = torch.ones(1)
    opt.step(closure)
    return (before - w.detach()).item()


def test_step_lr_scale_default_scale_leaves_the_update_unchanged():
    w, opt = sgd_one_weight()
    hook = StepLRScale(opt)
    assert not hook.applied
    assert update_of(w, opt) == 1.0


def test_a_deferred_scale_applies_nothing_until_armed_and_an_arm_outside_a_step_waits_for_it():
    w, opt = sgd_one_weight()
    hook = StepLRScale(opt, 0.5, deferred=True)
    assert not hook.applied
    assert update_of(w, opt) == 1.0  # not armed
    fresh = StepLRScale(sgd_one_weight()[1], 0.5, deferred=True)
    fresh.arm()  # before any step
    assert fresh.optimizer.param_groups[0]["lr"] == 1.0 and not fresh.applied
    hook.arm()
    assert opt.param_groups[0]["lr"] == 1.0 and not hook.applied  # armed outside a step: applied by the step
    assert update_of(w, opt) == 0.5
    assert update_of(w, opt) == 1.0  # one update per arm
    hook.arm()
    hook.disarm()
    assert update_of(w, opt) == 1.0


def test_arming_twice_within_one_step_scales_the_update_once():
    w, opt = sgd_one_weight()
    hook = StepLRScale(opt, 0.5)

    def closure():
        hook.arm()  # a Lightning closure step arms inside step(), after the pre-hook applied the scale
        return None

    assert update_of(w, opt, closure) == 0.5
    assert opt.param_groups[0]["lr"] == 1.0


def test_a_scale_above_one_is_applied():
    w, opt = sgd_one_weight()
    StepLRScale(opt, 2.0)
    assert update_of(w, opt) == 2.0


def test_a_removed_scale_no_longer_touches_the_lr_and_remove_is_idempotent():
    w, opt = sgd_one_weight()
    hook = StepLRScale(opt, 0.5)
    hook.remove()
    hook.remove()
    hook.arm()
    assert opt.param_groups[0]["lr"] == 1.0
    assert update_of(w, opt) == 1.0


# ----------------------------------------------------------------------------- counters and checkpoints
def test_counters_are_python_ints_in_reads_state_dicts_and_after_a_resume():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e-3), Skip())
    train_step(model, opt, engine)
    train_step(model, opt, engine, seed=1, factor=NAN)
    resumed = make_engine(model, opt, NormClip(1e-3), Skip())
    resumed.load_state_dict(engine.state_dict())
    for counts in (
        engine.counters_of(0),
        engine.counters,
        engine.state_dict()["optimizers"][0]["counters"],
        resumed.counters_of(0),
        resumed.state_dict()["optimizers"][0]["counters"],
    ):
        ints = pick(counts, *COUNTS, *(k for k in ("nonfinite_streak", "skipped_steps") if k in counts))
        assert all(type(v) is int for v in ints.values()), counts
    assert resumed.counters_of(0)["nonfinite_streak"] == 1


def test_a_fresh_run_checkpoints_zero_healthy_steps_and_full_lr():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), HalveLR(lr_recovery_steps=3))
    for seed in range(2):
        train_step(model, opt, engine, seed=seed)
    (saved,) = engine.state_dict()["optimizers"]
    saved = {**saved["counters"], "lr_scale": saved["control"]["lr_scale"], **saved["remedy"], "rule": saved["rule"]}
    assert pick(saved, *COUNTS, "nonfinite_streak", "lr_scale", "healthy_steps", "rule") == {
        "steps": 2,
        "clipped_steps": 0,
        "nonfinite_steps": 0,
        "amp_overflows": 0,
        "nonfinite_streak": 0,
        "lr_scale": 1.0,
        "healthy_steps": 0,
        "rule": {},
    }


def test_a_state_with_missing_keys_loads_as_a_fresh_start():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), HalveLR())
    engine.load_state_dict({"optimizers": [{}]})
    assert pick(engine.counters_of(0), *COUNTS, "nonfinite_streak", "skipped_steps") == {
        "steps": 0,
        "clipped_steps": 0,
        "nonfinite_steps": 0,
        "amp_overflows": 0,
        "nonfinite_streak": 0,
        "skipped_steps": 0,
    }
    assert engine.lr_scales == [1.0]
    assert engine.state_dict()["optimizers"][0]["remedy"]["healthy_steps"] == 0
    engine.load_state_dict({})
    assert engine.state_dict()["optimizers"] == []


def test_a_resume_keeps_the_run_of_consecutive_bad_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip(max_consecutive_nonfinite=3))
    for seed in range(2):
        train_step(model, opt, engine, seed=seed, factor=NAN)
    resumed = make_engine(model, opt, NormClip(1e6), Skip(max_consecutive_nonfinite=3))
    resumed.load_state_dict(engine.state_dict())
    with pytest.raises(NonFiniteGradientError, match="3 consecutive steps"):
        train_step(model, opt, resumed, seed=2, factor=NAN)


def test_a_resumed_fused_run_warns_only_about_its_new_device_skips():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    train_step(model, opt, engine, read_every=1)  # the fused kernel's state exists: skips happen on the device
    for seed in (1, 2):
        train_step(model, opt, engine, seed=seed, factor=NAN, read_every=1)
    assert len(engine.warnings) == 2
    resumed = make_engine(model, opt, NormClip(1e6), Skip())
    resumed.load_state_dict(engine.state_dict())
    train_step(model, opt, resumed, seed=3, factor=NAN, read_every=1)
    assert resumed.warnings == [
        "1 step(s) with non-finite gradients were skipped on the device (fused optimizer) up to global step 3; "
        "3 in total, 3 in a row now."
    ]


def test_counters_moved_to_another_device_keep_their_loaded_values():
    state = {"steps": 7, "clipped_steps": 2, "nonfinite_steps": 3, "amp_overflows": 1, "nonfinite_streak": 2}
    counters = StepCounters.restore(state)
    other = torch.device("cpu", 0)  # a device other than the tensors' own: the host-values path of on()
    assert counters.on(other) is counters
    assert counters.counts.dtype == torch.int64 and counters.counts.shape == (len(COUNTERS),)
    assert counters.streak.dtype == torch.int64 and counters.streak.shape == ()
    assert counters.false.dtype == torch.bool and counters.false.shape == () and not counters.false
    assert pick(counters.totals(), *state) == state
    counters.update(torch.tensor(True), torch.tensor(True), torch.tensor(False))
    assert pick(counters.totals(), *state) == {
        **state,
        "steps": 8,
        "clipped_steps": 3,
        "nonfinite_steps": 4,
        "nonfinite_streak": 3,
    }


def test_loading_a_halve_lr_checkpoint_under_another_policy_resets_the_lr_state():
    state = {"version": 2, "optimizers": [{"steps": 9, "nonfinite_steps": 1, "lr_scale": 0.5, "healthy_steps": 3}]}
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    engine.load_state_dict(state)
    saved = engine.state_dict()["optimizers"][0]
    assert saved["control"]["lr_scale"] == 1.0  # skip keeps no LR state
    assert saved["remedy"] == {"reported_nonfinite": 1}  # nor a recovery count: only what it has reported


def test_attaching_fewer_optimizers_than_the_checkpoint_drops_the_extra_counters():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip(), attach=False)
    engine.load_state_dict({"version": 2, "optimizers": [{"steps": 4}, {"steps": 5}]})
    engine.attach([opt], model.named_parameters())
    assert [o["counters"]["steps"] for o in engine.state_dict()["optimizers"]] == [4]
    assert engine.counters["steps"] == 4


def test_rule_statistics_are_kept_per_optimizer_and_checkpointed():
    model = mlp()
    opt0 = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt1 = torch.optim.SGD(model[2].parameters(), lr=0.1)
    engine = ClipEngine(CountingRule(), Skip())
    engine.attach([opt0, opt1], model.named_parameters())
    for seed in range(3):
        backward(model, engine, seed)
        engine.step(opt0)
        if seed:
            engine.step(opt1)
        opt0.step()
        opt1.step()
        opt0.zero_grad()
        opt1.zero_grad()
    assert [o["rule"] for o in engine.state_dict()["optimizers"]] == [{"seen": 3}, {"seen": 2}]
    resumed = ClipEngine(CountingRule(), Skip())
    resumed.load_state_dict(engine.state_dict())
    assert [len(resumed.rule_of(i).seen) for i in range(2)] == [3, 2]


# ----------------------------------------------------------------------------- binding optimizers
@pytest.mark.parametrize("attach_wrapped", [False, True], ids=["attach_raw", "attach_wrapped"])
def test_a_lightning_wrapped_optimizer_and_its_torch_optimizer_share_one_slot(attach_wrapped):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = LightningOptimizer(opt)
    engine = make_engine(model, opt, NormClip(1e6), Skip(), attach=False)
    engine.attach([wrapped if attach_wrapped else opt], model.named_parameters())
    backward(model, engine)
    engine.step(opt if attach_wrapped else wrapped)
    assert len(engine.state_dict()["optimizers"]) == 1
    assert engine.counters_of(0)["steps"] == 1


def test_an_unattached_optimizer_takes_the_loaded_slot_and_its_lr_scale():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), HalveLR(), attach=False)
    engine.load_state_dict({"version": 2, "optimizers": [{"steps": 4, "nonfinite_steps": 1, "lr_scale": 0.5}]})
    assert applied_lr(model, opt, engine) == pytest.approx(0.05, rel=1e-4)
    assert engine.counters_of(0)["steps"] == 5 and len(engine.state_dict()["optimizers"]) == 1


def test_halve_lr_without_attach_halves_the_next_update():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), HalveLR(), attach=False)
    train_step(model, opt, engine, factor=NAN)
    assert applied_lr(model, opt, engine, seed=1) == pytest.approx(0.05, rel=1e-4)


def test_a_model_with_a_single_parameter_is_clipped():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e-3), Skip())
    out = train_step(model, opt, engine, log=True)
    assert out[M.CLIPPED] == 1.0 and out[M.TOTAL_CLIPPED] == pytest.approx(1e-3, rel=1e-4)


# ----------------------------------------------------------------------------- loss and input evidence
@pytest.mark.parametrize("remedy", [Skip, Ignore])
def test_observe_loss_accepts_a_missing_loss(remedy):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), remedy(), check_inputs=True)
    engine.observe_loss(None)  # a training_step that returned None
    train_step(model, opt, engine)
    assert engine.counters["nonfinite_steps"] == 0


def test_ignore_with_check_inputs_does_not_count_a_nan_loss_with_finite_gradients():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Ignore(), check_inputs=True)
    engine.observe_batch(batch(0), batch_idx=0)
    train_step(model, opt, engine, offset=NAN)
    assert engine.counters["nonfinite_steps"] == 0


def test_with_one_optimizer_a_nan_loss_spoils_its_step_even_if_it_reaches_no_parameter_of_it():
    model = mlp()
    aux = torch.nn.Parameter(torch.ones(3))  # trained by no optimizer of this engine
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    backward(model, engine)
    loss = aux.sum() * NAN
    engine.observe_loss(loss)
    loss.backward()
    before = weights(model)
    engine.step(opt)
    opt.step()
    assert same(before, weights(model))
    assert engine.counters["nonfinite_steps"] == 1


def test_a_nan_loss_belongs_to_the_next_step_only_even_one_without_gradients():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    engine.observe_loss(torch.tensor(NAN))  # its step has no gradient at all
    assert engine.step(opt) == {}
    train_step(model, opt, engine)
    assert engine.counters["nonfinite_steps"] == 0 and engine.counters["steps"] == 1


@pytest.mark.parametrize("distributed", [False, True])
def test_a_step_of_an_optimizer_without_gradients_leaves_the_loss_owed_to_another(distributed):
    # found by the mutation run (a bug under distributed=True, fixed in f5b2038)
    model = mlp()
    opt0 = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt1 = torch.optim.SGD(model[2].parameters(), lr=0.1)
    engine = ClipEngine(NormClip(1e6), Skip())
    engine.attach([opt0, opt1], model.named_parameters())
    engine.warn = lambda message: None
    hidden = torch.tanh(model[0](batch(0)[0])).detach()  # the loss reaches only opt1's layer
    loss = model[2](hidden).pow(2).mean() + NAN  # NaN loss, finite gradients
    engine.observe_loss(loss)
    loss.backward()
    kw = dict(distributed=True) if distributed else {}  # the default is a single process
    assert engine.step(opt0, **kw) == {}
    engine.step(opt1, **kw)
    assert engine.counters_of(1)["nonfinite_steps"] == 1


@pytest.mark.parametrize(
    "distributed",
    [False, True],
)
def test_a_nan_loss_of_an_optimizer_whose_step_had_no_gradients_does_not_spoil_its_next_step(distributed):
    model = mlp()
    opt0 = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt1 = torch.optim.SGD(model[2].parameters(), lr=0.1)
    engine = ClipEngine(NormClip(1e6), Skip())
    engine.attach([opt0, opt1], model.named_parameters())
    engine.warn = lambda message: None
    engine.observe_loss(model[0](batch(0)[0]).sum() * NAN)  # observed, never back-propagated
    for opt in (opt0, opt1):
        assert engine.step(opt, distributed=distributed) == {}
    backward(model, engine, seed=1)  # the next window: a clean loss
    for opt in (opt0, opt1):
        engine.step(opt, distributed=distributed)
    assert engine.counters_of(0)["nonfinite_steps"] == 0


def test_distributed_steps_in_a_single_process_still_check_the_loss():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    before = weights(model)
    train_step(model, opt, engine, offset=NAN, distributed=True)
    assert same(before, weights(model)) and engine.counters["nonfinite_steps"] == 1


def test_every_dirty_micro_batch_of_a_window_spoils_the_step_and_is_named():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip(), check_inputs=True)
    engine.observe_batch(batch(9), batch_idx=9)
    train_step(model, opt, engine, seed=9)  # a clean window before: the next micro-batch opens a new one
    for i in range(3):
        x, y = batch(i)
        if i < 2:
            x = x.clone()
            x[i, i] = NAN
        engine.observe_batch((x, y), batch_idx=i)
        loss = torch.nn.functional.mse_loss(model(torch.nan_to_num(x)), y) + (NAN if i == 0 else 0.0)
        engine.observe_loss(loss)
        loss.backward()
    before = weights(model)
    engine.step(opt)
    opt.step()
    assert same(before, weights(model))
    (message,) = engine.warnings
    assert "Input check: batch 0: " in message and "Input check: batch 1: " in message


def test_messages_name_the_given_step_and_epoch_and_number_unnamed_parameters():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip(), named=False)
    backward(model, engine)
    model[2].weight.grad[0, 0] = INF
    engine.step(opt, global_step=123, epoch=4)
    opt.zero_grad()
    backward(model, engine, seed=1)
    model[2].weight.grad[0, 1] = INF
    engine.step(opt)  # default: the optimizer's own step count
    first, second = engine.warnings
    assert "Action: step skipped; 1 bad step(s) in a row, 1 skipped in total; LR scale now 1." in first
    assert "Action: step skipped; 2 bad step(s) in a row, 2 skipped in total; LR scale now 1." in second
    assert first.startswith(
        "Non-finite gradients at global step 123 (epoch 4, batch -1, optimizer 0): 1 of 4 parameters: param2."
    )
    assert second.startswith("Non-finite gradients at global step 1 (epoch 0, batch -1, optimizer 0)")


@pytest.mark.parametrize("observed", [True, False], ids=["loss_observed", "loss_not_observed"])
def test_a_finite_loss_with_every_gradient_infinite_is_diagnosed_as_a_diverged_backward(observed):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    x, y = batch(0)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if observed:
        engine.observe_loss(loss)
    loss.backward()
    for p in model.parameters():
        p.grad.view(-1)[0] = INF
    engine.step(opt)
    assert "every gradient is NaN/Inf (the loss was finite)" in engine.warnings[0]


def test_the_detector_checks_the_loss_but_not_the_inputs_by_default():
    detector = BadStepDetector()
    detector.observe_batch(torch.tensor([NAN]), batch_idx=0)
    assert not detector.flag(torch.device("cpu"))
    detector.observe_loss(torch.tensor(NAN))
    assert detector.flag(torch.device("cpu"))


def test_leaf_parameters_walks_a_deep_residual_graph_once_per_node():
    w = torch.nn.Parameter(torch.ones(2))
    x = w
    for _ in range(26):  # every block feeds two paths into the next: 2**26 paths, 26 blocks
        x = x + torch.tanh(x)
    start = time.perf_counter()
    assert leaf_parameters(x.sum()) == {id(w)}
    assert time.perf_counter() - start < 2.0


def feed(detector, norms):
    return [bool(detector.flag(torch.tensor(x, dtype=torch.float64), torch.tensor(False))) for x in norms]


def test_spike_detector_defaults_warm_up_on_twenty_healthy_norms_and_flag_beyond_six_sigma():
    assert SpikeDetector().state_dict() == {}  # nothing seen: nothing to checkpoint
    early = SpikeDetector()
    assert feed(early, [1.0, 3.0] * 9 + [1.0, 100.0]) == [False] * 20  # 19 known: still warming up
    detector = SpikeDetector()
    assert feed(detector, [1.0, 3.0] * 10) == [False] * 20  # mean 2, standard deviation 1
    assert feed(detector, [8.5, 7.5]) == [True, False]  # 2 + 6 sigma = 8: a spike is not recorded
    state = detector.state_dict()
    assert (state["history"].numel(), state["count"]) == (21, 21)  # the recorded norms, oldest first


def test_spike_detector_keeps_its_history_in_float64_on_the_cpu():
    # Norms near 1e6 with a spread of 1: float32 cannot hold their squares, float64 can.
    quiet, loud = SpikeDetector(warmup=4, window=8), SpikeDetector(warmup=4, window=8)
    history = [1e6 + 1, 1e6 - 1] * 2
    assert feed(quiet, [*history, 1e6 + 3]) == [False] * 5
    assert feed(loud, [*history, 1e6 + 10]) == [False] * 4 + [True]


@pytest.mark.parametrize("kwargs", [dict(warmup=0), dict(warmup=None), dict(window=4, warmup=5)])
def test_spike_detector_refuses_a_warmup_it_cannot_reach(kwargs):
    with pytest.raises(ValueError, match="`warmup`"):
        SpikeDetector(**kwargs)


def test_spike_detector_accepts_a_warmup_equal_to_its_window():
    assert SpikeDetector(window=8, warmup=8).warmup == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=0.0), "`skip_spikes`"),
        (dict(window=0), "`spike_window`"),
        (dict(window=None), "`spike_window`"),
        (dict(window=4, warmup=5), r"^`warmup` \(5\) must be <= `spike_window` \(4\)\.$"),
    ],
)
def test_spike_detector_errors_name_the_callback_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpikeDetector(**kwargs)


def test_a_norm_exactly_k_sigma_above_the_mean_is_not_a_spike():
    detector = SpikeDetector()
    feed(detector, [1.0, 3.0] * 10)
    assert feed(detector, [8.5, 8.0]) == [True, False]  # 8.0 == 2 + 6 * 1: recorded
    assert detector.state_dict()["count"] == 21


def test_counters_updated_without_a_spike_flag_count_no_spike_skip():
    counters = StepCounters()
    counters.update(torch.tensor(False), torch.tensor(True), torch.tensor(False))
    counters.update(torch.tensor(False), torch.tensor(False), torch.tensor(False))
    assert pick(counters.totals(), "nonfinite_steps", "spike_skips") == {"nonfinite_steps": 1, "spike_skips": 0}


def spike_engine(model, opt, rule=None, **kw):
    detector = SpikeDetector(k=4.0, window=8, warmup=4)
    return make_engine(model, opt, rule if rule is not None else NormClip(1e6), Skip(), spike_skip=detector, **kw)


def test_a_nan_loss_step_with_finite_gradients_stays_out_of_the_spike_history():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = spike_engine(model, opt)
    train_step(model, opt, engine)
    train_step(model, opt, engine, seed=1, offset=NAN)
    assert engine.state_dict()["optimizers"][0]["detectors"]["spikes"]["count"] == 1


def test_the_spike_history_resumes_with_the_engine_and_a_state_without_one_loads():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = spike_engine(model, opt)
    for seed in range(3):
        train_step(model, opt, engine, seed=seed)
    saved = engine.state_dict()["optimizers"][0]["detectors"]["spikes"]
    resumed = spike_engine(model, opt)
    resumed.load_state_dict(engine.state_dict())
    again = resumed.state_dict()["optimizers"][0]["detectors"]["spikes"]
    assert again["count"] == saved["count"] == 3
    assert torch.equal(again["history"], saved["history"]) and again["history"].numel() == 3
    fresh = spike_engine(model, opt)
    fresh.load_state_dict({"version": 2, "optimizers": [{"steps": 3}]})  # a state from before spike skipping
    assert "spikes" not in fresh.state_dict()["optimizers"][0]["detectors"]
    plain = make_engine(model, opt, NormClip(1e6), Skip())
    plain.load_state_dict(engine.state_dict())  # a spike history with nothing to restore it into
    assert plain.counters_of(0)["steps"] == 3


@pytest.mark.parametrize(
    ("layers", "monitor_only", "log_norms"),
    [(5, False, "layer"), (5, True, "parameter"), (1, False, "parameter")],
    ids=["five_layers", "five_parameters_no_threshold", "one_parameter"],
)
def test_a_logged_spike_warning_names_the_three_largest_layers_with_their_share(layers, monitor_only, log_norms):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = spike_engine(model, opt, NoClip() if monitor_only else None, log_norms=log_norms)
    for _ in range(4):  # a flat history: anything above it is a spike
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        engine.step(opt)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 0.1 * (i + 2) ** 3)
    out = engine.step(opt, log=True)
    group = M.LAYER_GROUP if log_norms == "layer" else M.PARAM_GROUP
    norms = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(group + "/")}
    ranked = sorted(norms.items(), key=lambda kv: -kv[1])
    squares = sum(v * v for v in norms.values())
    listed = ", ".join(f"{n} ({v:.3g}, {100 * v * v / squares:.0f}%)" for n, v in ranked[:3])
    # the spike threshold (mean + k sigma of a flat history: the flat norm), not the clip threshold (issue 19)
    flat = math.sqrt(sum(p.numel() for p in model.parameters()) * 0.1**2)
    threshold = f", threshold {flat:.4g}"
    what = "layers" if log_norms == "layer" else "parameters"
    assert engine.warnings == [
        f"Gradient spike skipped at global step 4 (optimizer 0): total norm {out[M.TOTAL]:.4g}{threshold}. "
        f"Largest {what} (norm, share of the squared norm): {listed}."
    ]
    assert out[M.TOP_LAYER_SHARE] == pytest.approx(ranked[0][1] ** 2 / squares)
    assert out[M.SKIPPED_STEPS] == 1.0


# ----------------------------------------------------------------------------- closures (LBFGS)
def lbfgs_run(remedy, max_iter, nan_at=None, model=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1) if model is None else model
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=max_iter)
    engine = make_engine(model, opt, NormClip(1e6), remedy)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        loss = torch.nn.functional.mse_loss(model(x), y) * (NAN if calls[0] == nan_at else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt)
        return loss

    opt.step(closure)
    return engine, calls[0]


class TwiceSGD(torch.optim.Optimizer):
    """A closure optimizer that evaluates twice per step and moves in between, declaring neither max_iter nor a
    line search: the engine cannot know it in advance."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        closure()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        return closure()


def test_a_closure_evaluated_again_by_an_undeclared_optimizer_is_refused_under_skip_with_the_fix():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = TwiceSGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(8, 3)).pow(2).mean()
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt)
        return loss

    with pytest.raises(ValueError) as err:
        opt.step(closure)
    message = str(err.value)
    assert message.startswith("TwiceSGD evaluated its closure more than once in one step()")
    assert "nan_policy='skip' cannot undo a move made before a bad evaluation." in message
    assert "declares neither `max_iter` nor `line_search_fn`" in message
    assert message.endswith("Use nan_policy='raise' or 'ignore' with it, or declare `max_iter` in its defaults.")


@pytest.mark.parametrize("nan_at", [1, 2, 3])
def test_lbfgs_with_several_evaluations_skips_the_whole_step_on_a_bad_one(nan_at):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    engine, calls = lbfgs_run(Skip(), max_iter=5, nan_at=nan_at, model=model)
    assert calls >= nan_at  # the bad evaluation happened inside the step
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step is a no-op
    assert engine.counters_of(0)["steps"] == 1


def test_raise_policy_stops_at_a_bad_closure_re_evaluation():
    with pytest.raises(NonFiniteGradientError):
        lbfgs_run(RaiseError(), max_iter=3, nan_at=2)


def test_engine_steps_between_two_optimizer_steps_are_not_closure_re_evaluations():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    train_step(model, opt, engine)
    backward(model, engine, seed=1)
    engine.step(opt)  # a step the loop then discards
    engine.step(opt)
    assert engine.counters["steps"] == 3


# ----------------------------------------------------------------------------- what a logging step returns
def test_a_custom_rule_without_a_norm_after_clipping_logs_the_total_and_no_threshold():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, BareRule(), Skip())
    out = train_step(model, opt, engine, log=True)
    assert out[M.TOTAL_CLIPPED] == out[M.TOTAL] > 0
    assert M.THRESHOLD not in out and M.MAX_NORM not in out


def test_monitoring_only_logs_no_threshold():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NoClip(), Skip())
    out = train_step(model, opt, engine, log=True)
    assert M.THRESHOLD not in out and M.MAX_NORM not in out and out[M.CLIPPED] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "threshold"),
    [(dict(clip_value=1e-3), 1e-3), (dict(min_value=-1e-3), -1e-3), (dict(max_value=1e-3), 1e-3)],
)
def test_value_mode_logs_its_threshold_and_the_norm_after_clamping_in_the_chosen_p(kwargs, threshold):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, ValueClip(**kwargs), Skip(), norm_type=1.0)
    backward(model, engine)
    before = ref_norm([p.grad for p in model.parameters()], 1.0)
    out = engine.step(opt, log=True)
    assert out[M.TOTAL] == pytest.approx(before, rel=1e-5)  # a logging step measures the norm before clamping
    assert out[M.THRESHOLD] == pytest.approx(threshold)
    assert M.MAX_NORM not in out
    assert out[M.TOTAL_CLIPPED] == pytest.approx(ref_norm([p.grad for p in model.parameters()], 1.0), rel=1e-5)


@pytest.mark.parametrize(("remedy", "skipped"), [(Ignore, 0), (Skip, 1)])
def test_skipped_steps_follow_the_policy_in_metrics_and_counters(remedy, skipped):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), remedy())
    train_step(model, opt, engine)
    assert engine.counters_of(0)["skipped_steps"] == 0
    out = train_step(model, opt, engine, seed=1, factor=NAN, log=True)
    assert out[M.SKIPPED_STEPS] == skipped and out[M.NONFINITE_STEPS] == 1
    assert engine.counters_of(0)["skipped_steps"] == skipped == engine.counters["skipped_steps"]


def test_layer_norms_group_parameters_by_their_parent_module_path():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model = torch.nn.Sequential(inner)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    out = train_step(model, opt, engine, log=True)
    assert sorted(k for k in out if k.startswith(M.LAYER_GROUP)) == ["grad_norm_layer/0.0", "grad_norm_layer/0.2"]


def test_the_engine_eps_enters_the_clip_coefficient():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, NormClip(1e-3), Skip(), eps=0.5)
    out = train_step(model, opt, engine, log=True)
    assert out[M.TOTAL_CLIPPED] == pytest.approx(out[M.TOTAL] * 1e-3 / (out[M.TOTAL] + 0.5), rel=1e-5)


# ----------------------------------------------------------------------------- value mode
def test_value_mode_refuses_complex_and_sparse_gradients_naming_the_parameter():
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = torch.optim.SGD([z], lr=0.1)
    engine = ClipEngine(ValueClip(clip_value=1.0), Skip())
    engine.attach([opt], [("z", z)])
    z.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(
        ValueError, match=r"cannot clamp the complex gradient of parameter `z` \(torch.complex64\); use"
    ):
        engine.step(opt)

    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    engine = ClipEngine(ValueClip(clip_value=1.0), Skip())
    engine.attach([opt], emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    engine.step(opt)  # a range holding 0: the dense values are clamped
    assert emb.weight.grad.to_dense().abs().max() <= 1.0
    engine = ClipEngine(ValueClip(min_value=0.5, max_value=1.0), Skip())
    engine.attach([opt], emb.named_parameters())
    refused = r"cannot clamp the sparse \(torch.sparse_coo\) gradient of parameter `weight`"
    with pytest.raises(ValueError, match=refused):
        engine.step(opt)  # a range without 0: the unstored zeros would have to move


def test_value_mode_flags_a_single_element_gradient_out_of_range():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, ValueClip(clip_value=1.0), Skip())
    backward(model, engine)
    for p in model.parameters():
        p.grad.clamp_(-0.5, 0.5)
    model[2].bias.grad.fill_(3.0)  # the only element out of range, in a one-element tensor
    out = engine.step(opt, log=True)
    assert out[M.CLIPPED] == 1.0 and model[2].bias.grad.item() == 1.0


def test_out_of_range_checks_every_dtype_group_and_answers_a_bool():
    empty64 = torch.zeros(0, dtype=torch.float64)
    assert out_of_range([empty64, torch.tensor([5.0])], -1.0, 1.0)
    flag = out_of_range([torch.zeros(0)], -1.0, 1.0)
    assert flag.dtype == torch.bool and flag.shape == () and not flag


def test_value_mode_with_zero_size_gradients_names_the_bad_parameter_and_passes_an_empty_step():
    model = mlp()
    empty = torch.nn.Parameter(torch.zeros(0))
    opt = torch.optim.SGD([empty, *model.parameters()], lr=0.1)  # the empty one first: names stay aligned
    engine = make_engine(model, opt, ValueClip(clip_value=1.0), Skip())
    backward(model, engine)
    empty.grad = torch.zeros(0)
    model[2].weight.grad[0, 0] = INF
    engine.step(opt)  # no logging: value mode checks finiteness in its own pass
    assert "1 of 5 parameters: 2.weight." in engine.warnings[0]
    only_empty = torch.optim.SGD([empty], lr=0.1)
    engine = make_engine(model, only_empty, ValueClip(clip_value=1.0), Skip())
    empty.grad = torch.zeros(0)
    engine.step(only_empty)
    assert engine.counters["nonfinite_steps"] == 0


class SilentRule(ClipRule):
    """Claims to measure finiteness but returns only half of it (no per-tensor norms)."""

    mode = "silent"
    measures_finite = True

    def clip_(self, step):
        return ClipResult(step.bad & False, finite=step.bad | True)  # no per-tensor norms


def test_a_rule_that_claims_to_measure_finiteness_but_returns_no_tensor_norms_is_refused_by_name():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, SilentRule(), Skip())
    backward(model, engine)
    with pytest.raises(RuntimeError, match=r"^SilentRule\(silent\) measures finiteness but returned none$"):
        engine.step(opt)


def test_a_one_point_value_range_flags_elements_on_either_side():
    assert out_of_range([torch.tensor([-0.5])], 1.0, 1.0)
    assert not out_of_range([torch.tensor([1.0])], 1.0, 1.0)


# ----------------------------------------------------------------------------- fp16 (GradScaler) with fused optimizers
def fp16_step(model, opt, engine, scaler, seed=0, factor=1.0, offset=0.0, inf_grad=False, log=False, **kw):
    backward(model, engine, seed, factor, offset, scaler=scaler)
    if inf_grad:
        model[2].weight.grad[0, 0] = INF
    out = engine.step(opt, scaler=scaler, log=log, **kw)
    scaled = [p.grad.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return out, scaled


def fp16_setup(remedy, rule=None, optimizer="adamw", **kw):
    model = mlp()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    engine = make_engine(model, opt, rule if rule is not None else NormClip(1e6), remedy, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    return model, opt, engine, scaler


def true_grads(seed=0):
    model = mlp()
    x, y = batch(seed)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_fp16_fused_norms_are_logged_in_true_units():
    model, opt, engine, scaler = fp16_setup(Skip())
    out, _ = fp16_step(model, opt, engine, scaler, log=True)
    ref = true_grads()
    assert out[M.TOTAL] == pytest.approx(ref_norm(ref.values()), rel=1e-5)
    assert out[M.norm_tag(M.LAYER_GROUP, "0", 0)] == pytest.approx(ref_norm([ref["0.weight"], ref["0.bias"]]), rel=1e-5)


def test_fp16_overflow_counts_as_an_amp_overflow_and_a_nan_loss_as_a_bad_step():
    model, opt, engine, scaler = fp16_setup(Skip())
    fp16_step(model, opt, engine, scaler, inf_grad=True)
    assert (engine.counters["amp_overflows"], engine.counters["nonfinite_steps"]) == (1, 0)
    fp16_step(model, opt, engine, scaler, seed=1, factor=NAN)
    assert (engine.counters["amp_overflows"], engine.counters["nonfinite_steps"]) == (1, 1)


def test_fp16_fused_skip_of_a_dirty_batch_leaves_weights_untouched_and_applies_good_steps_exactly():
    model, opt, engine, scaler = fp16_setup(Skip(), optimizer="sgd", check_inputs=True)
    engine.observe_batch((torch.full((1, 4), NAN),), batch_idx=0)
    before = weights(model)
    fp16_step(model, opt, engine, scaler)  # finite gradients, dirty inputs: the scaler must skip it
    assert same(before, weights(model)) and engine.counters["nonfinite_steps"] == 1
    scale = scaler.get_scale()
    engine.observe_batch(batch(1), batch_idx=1)
    _, scaled = fp16_step(model, opt, engine, scaler, seed=1)
    expected = [w - 0.1 * g / scale for w, g in zip(before, scaled)]
    assert all(torch.allclose(w, e, rtol=1e-6, atol=1e-8) for w, e in zip(weights(model), expected))
    assert not same(before, weights(model))


def test_halve_lr_under_fp16_fused_skips_a_nan_loss_step_through_the_scaler():
    model, opt, engine, scaler = fp16_setup(HalveLR())
    before = weights(model)
    fp16_step(model, opt, engine, scaler, offset=NAN)  # finite gradients, NaN loss
    assert same(before, weights(model))
    assert engine.lr_scales == [0.5] and scaler.get_scale() < SCALE


def test_halve_lr_recovery_does_not_count_amp_overflows_as_healthy_steps():
    model, opt, engine, scaler = fp16_setup(HalveLR(lr_recovery_steps=2))
    fp16_step(model, opt, engine, scaler, factor=NAN)
    for seed in (1, 2):
        fp16_step(model, opt, engine, scaler, seed=seed, inf_grad=True)
    assert engine.lr_scales == [0.5] and engine.state_dict()["optimizers"][0]["remedy"]["healthy_steps"] == 0


def test_fp16_value_mode_clamps_in_true_units_and_hands_the_scaler_nan_on_an_overflow():
    model, opt, engine, scaler = fp16_setup(Skip(), ValueClip(clip_value=0.05), optimizer="sgd")
    _, scaled = fp16_step(model, opt, engine, scaler)
    ref = [g.clamp(-0.05, 0.05) for g in true_grads().values()]
    assert all(torch.allclose(s / SCALE, r, rtol=1e-6, atol=1e-9) for s, r in zip(scaled, ref))
    before = weights(model)
    _, scaled = fp16_step(model, opt, engine, scaler, seed=1, inf_grad=True)
    assert all(torch.isnan(s).all() for s in scaled)
    assert same(before, weights(model)) and engine.counters["amp_overflows"] == 1


# ----------------------------------------------------------------------------- fused skip on the device
def fused_sgd_reads(momentum):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    reads = []
    for seed in range(3):
        backward(model, engine, seed)
        with count_host_reads() as r:
            engine.step(opt)
        reads.append(r.count)
        opt.step()
        opt.zero_grad()
    return reads


def test_fused_sgd_skips_on_the_device_once_its_momentum_buffers_exist():
    assert fused_sgd_reads(momentum=0.0) == [0, 0, 0]
    assert fused_sgd_reads(momentum=0.9) == [1, 0, 0]  # the first step takes the host path


def test_fused_skip_with_read_every_one_warns_at_the_bad_step():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    train_step(model, opt, engine, read_every=1)
    train_step(model, opt, engine, seed=1, factor=NAN, read_every=1)
    assert engine.warnings == [
        "1 step(s) with non-finite gradients were skipped on the device (fused optimizer) up to global step 1; "
        "1 in total, 1 in a row now."
    ]


def test_fused_skip_reports_device_skips_within_fifty_steps_by_default():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    for step in range(1, 51):
        backward(model, engine, factor=NAN if step == 2 else 1.0)
        engine.step(opt)
        opt.step()
        opt.zero_grad()
        assert len(engine.warnings) == (1 if step == 50 else 0)


def test_fused_device_stop_reports_its_global_step():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip(max_consecutive_nonfinite=2))
    train_step(model, opt, engine, read_every=1, global_step=39)
    train_step(model, opt, engine, seed=1, factor=NAN, read_every=1, global_step=40)
    with pytest.raises(NonFiniteGradientError) as err:
        train_step(model, opt, engine, seed=2, factor=NAN, read_every=1, global_step=41)
    assert err.value.global_step == 41 and err.value.consecutive == 2
    assert "all were skipped on the device (fused optimizer)" in str(err.value)


def test_a_host_path_step_after_a_device_skip_is_applied():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    train_step(model, opt, engine)  # host path: creates the momentum buffers
    train_step(model, opt, engine, seed=1, factor=NAN)  # device path: found_inf = 1
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "fused": True})  # no buffer yet: back to the host path
    before = weights(model)
    backward(model, engine, seed=2)
    extra.grad = torch.ones(2)
    engine.step(opt)
    opt.step()
    assert not same(before, weights(model)) and not torch.equal(extra.detach(), torch.zeros(2))


def test_detach_clears_the_skip_flag_of_every_fused_optimizer():
    model = mlp()
    opts = [torch.optim.AdamW(model[i].parameters(), lr=0.01, fused=True) for i in (0, 2)]
    engine = ClipEngine(NormClip(1e6), Skip())
    engine.attach(opts, model.named_parameters())
    engine.warn = lambda message: None
    for factor in (1.0, NAN):  # a good step creates the fused state; the bad one is skipped on the device
        backward(model, engine, factor=factor)
        for opt in opts:
            engine.step(opt)
            assert factor == 1.0 or opt.found_inf.item() == 1.0
            opt.step()
            opt.zero_grad()
    engine.detach()
    before = weights(model)
    loss = torch.nn.functional.mse_loss(model(batch(1)[0]), batch(1)[1])
    loss.backward()
    for opt in opts:
        opt.step()
    after = weights(model)
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[2], after[2])


def test_a_resume_from_a_state_without_counts_reports_its_first_device_skip():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    engine.load_state_dict({"optimizers": [{}]})
    train_step(model, opt, engine, read_every=1)
    train_step(model, opt, engine, seed=1, factor=NAN, read_every=1)
    assert len(engine.warnings) == 1 and engine.warnings[0].startswith("1 step(s) with non-finite gradients")


def test_a_pending_skip_that_the_scaler_never_ran_does_not_undo_the_next_step():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)  # not fused: the scaler skips step() on an overflow
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for seed, factor in ((0, NAN), (1, 1.0)):
        backward(model, engine, seed, factor, scaler=scaler)
        scaler.unscale_(opt)
        engine.step(opt, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if factor != 1.0:
            assert not opt.state  # the skipped step never ran
    assert len(opt.state) == 4 and all(opt.state[p]["step"].item() == 1.0 for p in model.parameters())


# ----------------------------------------------------------------------------- optimizer state of a skipped step
def test_a_skipped_lbfgs_step_leaves_the_optimizer_state_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=1)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def step(bad):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) * (NAN if bad else 1.0)
            engine.observe_loss(loss)
            loss.backward()
            engine.step(opt)
            return loss

        opt.step(closure)
        return copy.deepcopy(opt.state_dict()["state"])

    assert step(bad=True) == {}  # the state LBFGS created for the skipped first step is dropped
    good = step(bad=False)
    assert good[0]["func_evals"] == 1 and good[0]["n_iter"] == 1
    after_bad = step(bad=True)
    assert {k: after_bad[0][k] for k in ("func_evals", "n_iter")} == {"func_evals": 1, "n_iter": 1}


def test_a_bad_step_right_after_the_first_keeps_the_momentum_buffers():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = make_engine(model, opt, NormClip(1e6), Skip())
    train_step(model, opt, engine)
    state = copy.deepcopy(opt.state_dict()["state"])
    train_step(model, opt, engine, seed=1, factor=NAN)
    after = opt.state_dict()["state"]
    assert state.keys() == after.keys() and len(after) == 4
    assert all(torch.equal(state[k]["momentum_buffer"], after[k]["momentum_buffer"]) for k in state)


class RecordingRule(NormClip):
    """Records what the engine hands a rule: the parameters, their norms, whether to update statistics."""

    def __init__(self):
        super().__init__(1e6)
        self.seen = []

    def clip_(self, step):
        self.seen.append((len(step.params), [n.item() for n in step.norms], step.update_statistics))
        return super().clip_(step)


def test_a_rule_sees_the_parameters_their_norms_and_no_statistics_update_on_closure_re_evaluations():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    engine = make_engine(model, opt, RecordingRule(), Ignore())
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    grads = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        engine.observe_loss(loss)
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        engine.step(opt)
        return loss

    opt.step(closure)
    seen = engine.rule_of(0).seen
    assert len(seen) == len(grads) > 1
    assert [update for _, _, update in seen] == [True] + [False] * (len(seen) - 1)
    for (n_params, norms, _), g in zip(seen, grads):
        assert n_params == 2 and norms == pytest.approx([ref_norm([t]) for t in g], rel=1e-5)


# ----------------------------------------------------------------------------- where warnings point
def test_a_plain_loop_warning_points_at_the_callers_engine_step_line():
    # found by the mutation run (the warning pointed inside engine.py; fixed in f5b2038)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(NormClip(1e6), Skip())
    engine.attach([opt], model.named_parameters())
    backward(model, engine, factor=NAN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.step(opt)
    (warning,) = caught
    package = os.path.dirname(os.path.abspath(lightning_clip.__file__))
    assert not os.path.abspath(warning.filename).startswith(package + os.sep), warning.filename
    if "mutmut" not in sys.modules:  # under mutmut the call goes through its trampoline, outside the package
        assert warning.filename == __file__


def test_the_rule_given_to_the_engine_keeps_no_statistics_of_any_optimizer():
    rule = CountingRule()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, rule, Skip())
    train_step(model, opt, engine)
    assert rule.seen == [] and engine.rule_of(0).seen == [1]


# ----------------------------------------------------------------------------- the step record and device state
def test_a_hand_built_record_defaults_to_a_healthy_unmeasured_step():
    from lightning_clip.record import StepRecord

    g = [torch.ones(2)]
    step = StepRecord(params=[torch.zeros(2)], grads=g)
    assert step.skip.dtype == torch.bool and not bool(step.skip) and not step.requested
    assert math.isnan(float(step.total)) and step.loss_nonfinite() is False and step.input_problems() == []
    with pytest.warns(RuntimeWarning, match="^a message$"):
        step.warn("a message")
    requested = StepRecord(params=[torch.zeros(2)], grads=g, requested=True)
    assert bool(requested.skip)
    spiking = StepRecord(params=[torch.zeros(2)], grads=g, spike=torch.tensor(True))
    assert bool(spiking.skip)


def test_the_host_read_returns_floats_of_every_added_value_in_float64():
    from lightning_clip.record import HostRead

    read = HostRead(torch.device("cpu"))
    read.add("big", torch.tensor(2**40 + 1))  # exact in float64, not in float32
    read.add("flag", torch.tensor(True))
    read.add_all("none", [])
    read.add_all("halves", torch.tensor([0.5, 1.5], dtype=torch.float16))
    values = read.read()
    assert values == {"big": 2.0**40 + 1, "flag": 1.0, "none": [], "halves": [0.5, 1.5]}
    assert all(type(v) is float for v in (values["big"], values["flag"], *values["halves"]))
    assert HostRead(torch.device("cpu")).read() == {}


def test_device_state_is_moved_and_cast_once_and_keeps_integer_buffers():
    from lightning_clip.state import NormHistory

    history = NormHistory(4)
    assert history.on(torch.device("cpu"), torch.float32) is history
    assert history.values.dtype == torch.float32 and history.pos.dtype == torch.long
    history.record(torch.tensor(2.0), torch.tensor(True))
    assert history.on(torch.device("cpu"), torch.float32).values[0] == 2.0  # placed: left as it is
    assert history.on(torch.device("cpu"), torch.float64).values.dtype == torch.float64
    assert history.count.dtype == torch.long and int(history.count) == 1


def test_norm_history_keeps_the_newest_values_when_a_checkpoint_does_not_fit():
    from lightning_clip.state import NormHistory

    big = NormHistory(6)
    for x in range(1, 9):  # 8 values through a ring of 6: 3..8 kept, 7 is in slot 0
        big.record(torch.tensor(float(x)), torch.tensor(True))
    small = NormHistory(4)
    small.restore(big.export())
    assert small.values.tolist() == [5.0, 6.0, 7.0, 8.0] and int(small.pos) == 0 and int(small.count) == 8
    roomy = NormHistory(10)
    roomy.restore(big.export())
    assert roomy.values[:6].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0] and int(roomy.pos) == 6
