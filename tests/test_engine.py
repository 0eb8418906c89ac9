"""The ``ClipEngine``'s own promises, in a plain torch loop: what ``step`` returns, how often it reads the device,
per-optimizer counters, and the loss/input evidence kept per accumulation window.

Metric tags come from ``lightning_clip.metrics``; norms are checked against float64 references computed here.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_clip import ClipEngine
from lightning_clip import metrics as M
from lightning_clip.host_reads import count_host_reads
from lightning_clip.remedies import HalveLR, Ignore, Skip
from lightning_clip.rules import NormClip

NAN = float("nan")
INF = float("inf")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Linear(3, 1))


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def backward(model, engine=None, seed=0, scale=1.0):
    x, y = batch(seed)
    loss = torch.nn.functional.mse_loss(model(x), y) * scale
    if engine is not None:
        engine.observe_loss(loss)
    loss.backward()


def ref_norm(tensors, p=2.0):
    v = torch.cat([t.detach().double().reshape(-1) for t in tensors]).abs()
    return v.max().item() if math.isinf(p) else (v.pow(p).sum() ** (1.0 / p)).item()


def engine_for(model, opt, rule=None, remedy=None, **kw):
    engine = ClipEngine(rule, remedy, **kw)
    engine.attach([opt], model.named_parameters())
    engine.warn = lambda message: None
    return engine


# ----------------------------------------------------------------------------- log=False
@pytest.mark.parametrize(
    ("remedy", "optimizer"), [(Ignore, "sgd"), (Skip, "adamw_fused")], ids=["ignore", "fused_skip"]
)
def test_step_without_log_returns_an_empty_dict_and_reads_nothing(remedy, optimizer):
    model = make_model()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = engine_for(model, opt, NormClip(0.1), remedy())
    # A fused optimizer's first step, before its state exists, is decided on the host (a device-side skip would
    # leave state behind): one read. Then none (read_every=50: no later step of these is a read step).
    expected = [0, 0, 0] if optimizer == "sgd" else [1, 0, 0]
    for seed in range(3):
        backward(model, engine, seed)
        with count_host_reads() as reads:
            out = engine.step(opt, log=False)
        assert out == {}
        assert reads.count == expected[seed], reads.calls
        opt.step()
        opt.zero_grad()
    assert engine.counters["steps"] == 3 and engine.counters["clipped_steps"] == 3


def test_step_without_log_returns_an_empty_dict_even_when_the_remedy_reads():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(0.1), Skip())
    backward(model, engine)
    assert engine.step(opt, log=False) == {}


# ----------------------------------------------------------------------------- log=True
@pytest.mark.parametrize("remedy", [Ignore, Skip, HalveLR])
@pytest.mark.parametrize("p", [2.0, INF])
def test_logging_step_makes_one_host_read_and_returns_float64_reference_norms_per_layer(remedy, p):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=0.05), remedy(), norm_type=p, log_norms="layer")
    backward(model, engine)
    before = {n: q.grad.clone() for n, q in model.named_parameters()}
    with count_host_reads() as reads:
        out = engine.step(opt, log=True)
    assert reads.count == 1, reads.calls
    after = [q.grad for q in model.parameters()]

    total = ref_norm(before.values(), p)
    assert total > 0.05
    layers = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "3": ["3.weight", "3.bias"]}
    expected = {
        M.TOTAL: total,
        M.TOTAL_CLIPPED: ref_norm(after, p),
        M.CLIPPED: 1.0,
        M.LR_SCALE: 1.0,
        M.THRESHOLD: 0.05,
        M.MAX_NORM: 0.05,
        M.STEPS: 1.0,
        M.CLIPPED_STEPS: 1.0,
        M.NONFINITE_STEPS: 0.0,
        M.SKIPPED_STEPS: 0.0,
        M.AMP_OVERFLOWS: 0.0,
        M.SPIKE_SKIPS: 0.0,
        M.REQUESTED_SKIPS: 0.0,
        **{
            M.norm_tag(M.LAYER_GROUP, layer, 0): ref_norm([before[n] for n in names], p)
            for layer, names in layers.items()
        },
    }
    assert out.keys() == expected.keys()
    assert out == {k: pytest.approx(v, rel=1e-5) for k, v in expected.items()}
    assert out[M.TOTAL_CLIPPED] == pytest.approx(0.05, rel=1e-5)


def test_logging_step_with_log_norms_parameter_returns_each_parameter_norm_before_clipping():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=0.05), Skip(), log_norms="parameter", norm_type=1.0)
    backward(model, engine)
    before = {n: q.grad.clone() for n, q in model.named_parameters()}
    with count_host_reads() as reads:
        out = engine.step(opt, log=True)
    assert reads.count == 1
    params = {k: v for k, v in out.items() if k.startswith(M.PARAM_GROUP + "/")}
    assert params == {
        M.norm_tag(M.PARAM_GROUP, n, 0): pytest.approx(ref_norm([g], 1.0), rel=1e-5) for n, g in before.items()
    }
    assert not any(k.startswith(M.LAYER_GROUP + "/") for k in out)
    assert out[M.TOTAL] == pytest.approx(ref_norm(before.values(), 1.0), rel=1e-5)


@pytest.mark.parametrize("log_norms", ["total", "none"])
def test_logging_step_with_log_norms_total_or_none_returns_no_per_layer_or_parameter_norm(log_norms):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=100.0), Skip(), log_norms=log_norms)
    backward(model, engine)
    out = engine.step(opt, log=True)
    assert M.TOTAL in out and out[M.CLIPPED] == 0.0 and out[M.TOTAL_CLIPPED] == out[M.TOTAL]
    assert not any(k.startswith((M.LAYER_GROUP, M.PARAM_GROUP)) for k in out)


# ----------------------------------------------------------------------------- several optimizers
def test_two_optimizers_keep_independent_counters_and_the_second_logs_with_the_opt1_suffix():
    model = make_model()
    first = list(model[0].parameters()) + list(model[2].parameters())
    opt0 = torch.optim.SGD(first, lr=0.1)
    opt1 = torch.optim.SGD(model[3].parameters(), lr=0.1)
    engine = ClipEngine(NormClip(max_norm=1e-3), Skip())
    engine.attach([opt0, opt1], model.named_parameters())
    engine.warn = lambda message: None
    outs = []
    for seed in range(2):
        backward(model, engine, seed)
        # opt1 (the last layer): a gradient too small to clip, then one with an Inf
        model[3].weight.grad.copy_(torch.tensor([[1e-4, 0.0, 0.0]]) if seed == 0 else torch.tensor([[INF, 1.0, 1.0]]))
        model[3].bias.grad.zero_()
        outs.append((engine.step(opt0, log=True), engine.step(opt1, log=True)))
        opt0.step()
        opt1.step()
        opt0.zero_grad()
        opt1.zero_grad()
    out0, out1 = outs[-1]
    assert M.TOTAL in out0 and not any(k.endswith("_opt1") for k in out0)
    assert out1 and all(k.endswith("_opt1") for k in out1)
    assert out1[M.tag(M.NONFINITE_STEPS, 1)] == 1.0 and out1[M.tag(M.CLIPPED_STEPS, 1)] == 0.0
    assert out0[M.NONFINITE_STEPS] == 0.0 and out0[M.CLIPPED_STEPS] == 2.0
    assert M.norm_tag(M.LAYER_GROUP, "3", 1) in out1 and M.norm_tag(M.LAYER_GROUP, "0", 0) in out0
    assert engine.counters_of(0) == {
        "steps": 2,
        "clipped_steps": 2,
        "nonfinite_steps": 0,
        "amp_overflows": 0,
        "spike_skips": 0,
        "requested_skips": 0,
        "nonfinite_streak": 0,
        "skipped_steps": 0,
    }
    assert engine.counters_of(1) == {
        "steps": 2,
        "clipped_steps": 0,
        "nonfinite_steps": 1,
        "amp_overflows": 0,
        "spike_skips": 0,
        "requested_skips": 0,
        "nonfinite_streak": 1,
        "skipped_steps": 1,
    }
    assert engine.counters["steps"] == 4 and engine.counters["nonfinite_steps"] == 1


def test_an_optimizer_without_gradients_returns_an_empty_dict_and_counts_nothing():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=1e-3), Skip())
    backward(model, engine)
    engine.step(opt)
    opt.step()
    opt.zero_grad()  # set_to_none: no parameter has a gradient now
    counts = engine.counters_of(0)
    assert counts["steps"] == 1
    with count_host_reads() as reads:
        assert engine.step(opt, log=True) == {}
    assert reads.count == 0
    assert engine.counters_of(0) == counts


# ----------------------------------------------------------------------------- loss and input evidence
def test_check_inputs_flags_a_window_whose_early_micro_batch_held_a_nan_and_not_the_next_window():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=1e6), Skip(), check_inputs=True)
    warnings: list[str] = []
    engine.warn = warnings.append
    dirty = (torch.tensor([[1.0, NAN, 0.0, 0.0]]), torch.zeros(1, 1))

    # window 1: micro-batch 0 is dirty (the model never sees it: gradients stay finite), micro-batch 1 is clean
    engine.observe_batch(dirty, batch_idx=0)
    engine.observe_batch(batch(0), batch_idx=1)
    backward(model, engine, seed=0)
    weights = [q.detach().clone() for q in model.parameters()]
    engine.step(opt)
    opt.step()
    opt.zero_grad()
    assert engine.counters_of(0)["nonfinite_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # skipped
    assert len(warnings) == 1 and "batch 0:" in warnings[0]

    # window 2: two clean micro-batches
    engine.observe_batch(batch(1), batch_idx=2)
    engine.observe_batch(batch(2), batch_idx=3)
    backward(model, engine, seed=1)
    engine.step(opt)
    opt.step()
    assert engine.counters_of(0)["nonfinite_steps"] == 1 and engine.counters_of(0)["nonfinite_streak"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_a_nan_loss_makes_only_the_next_step_bad():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=1e6), Skip())
    engine.observe_loss(torch.tensor(NAN))  # a NaN loss whose gradient happens to be finite
    backward(model, None)
    assert all(torch.isfinite(q.grad).all() for q in model.parameters())
    engine.step(opt)
    assert engine.counters_of(0)["nonfinite_steps"] == 1
    assert all(q.grad is None for q in model.parameters())  # skipped
    backward(model, None)  # the loss is not observed again: the flag was consumed by the step
    engine.step(opt)
    assert engine.counters_of(0)["nonfinite_steps"] == 1 and engine.counters_of(0)["steps"] == 2
    assert all(q.grad is not None for q in model.parameters())


def two_optimizer_engine(model):
    opt0 = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.1)
    opt1 = torch.optim.SGD(model[3].parameters(), lr=0.1)
    engine = ClipEngine(NormClip(max_norm=1e6), Skip())
    engine.attach([opt0, opt1], model.named_parameters())
    engine.warn = lambda message: None
    return engine, opt0, opt1


@pytest.mark.parametrize(("reach", "bad"), [("last_layer", [0, 1]), ("whole_model", [1, 1])])
def test_with_two_optimizers_a_nan_loss_spoils_the_steps_of_the_optimizers_it_reaches(reach, bad):
    model = make_model()
    engine, opt0, opt1 = two_optimizer_engine(model)
    x, _ = batch()
    nan_loss = (model[3](torch.randn(6, 3)) if reach == "last_layer" else model(x)).sum() * NAN
    engine.observe_loss(nan_loss)  # observed, never back-propagated: only its evidence counts
    backward(model, None)  # finite gradients for every parameter
    engine.step(opt0)
    engine.step(opt1)
    assert [engine.counters_of(i)["nonfinite_steps"] for i in (0, 1)] == bad
    # consumed: the next steps of both optimizers are clean
    opt0.zero_grad()
    opt1.zero_grad()
    backward(model, engine, seed=1)
    engine.step(opt0)
    engine.step(opt1)
    assert [engine.counters_of(i)["nonfinite_steps"] for i in (0, 1)] == bad


def test_ignore_does_not_watch_the_loss():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=1e6), Ignore())
    engine.observe_loss(torch.tensor(NAN))
    backward(model, None)
    engine.step(opt)
    assert engine.counters_of(0)["nonfinite_steps"] == 0  # only the gradient itself counts under ignore


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trips_counters_and_lr_scale_per_optimizer():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = engine_for(model, opt, NormClip(max_norm=1e-3), HalveLR(lr_recovery_steps=5))
    for seed, scale in enumerate([1.0, NAN, 1.0]):
        backward(model, engine, seed, scale)
        engine.step(opt)
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    assert state == {  # format 3: one section per unit
        "version": 3,
        "optimizers": [
            {
                "counters": {
                    "steps": 3,
                    "clipped_steps": 2,
                    "nonfinite_steps": 1,
                    "amp_overflows": 0,
                    "spike_skips": 0,
                    "requested_skips": 0,
                    "nonfinite_streak": 0,
                },
                "control": {"lr_scale": 0.5, "skip_remaining": 0, "rollbacks": 0, "windows": []},
                "remedy": {"healthy_steps": 1},
                "rule": {},
                "detectors": {},
                "reporter": {},
            }
        ],
    }
    fresh = ClipEngine(NormClip(max_norm=1e-3), HalveLR(lr_recovery_steps=5))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and fresh.lr_scales == [0.5]
    other_policy = ClipEngine(NormClip(max_norm=1e-3), Skip())
    other_policy.load_state_dict(state)
    assert other_policy.lr_scales == [1.0]  # no scale is applied under skip, so none is kept
    assert other_policy.counters["nonfinite_steps"] == 1


# ----------------------------------------------------------------------------- value mode measures finiteness itself
@pytest.mark.parametrize(
    "bounds", [dict(clip_value=0.01), dict(min_value=-0.01, max_value=0.02)], ids=["symmetric", "asymmetric"]
)
def test_value_mode_without_the_norm_pass_still_skips_an_inf_that_clamping_would_hide(bounds):
    # On non-logging steps value mode skips the p-norm pass: the NaN/Inf check comes from its own range pass,
    # taken before clamping (which would turn +-Inf into the bound).
    from lightning_clip.rules import ValueClip

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = engine_for(model, opt, ValueClip(**bounds), Skip())
    messages: list[str] = []
    engine.warn = messages.append
    for step in range(3):
        backward(model, engine, step)
        if step == 1:
            next(iter(model.parameters())).grad[0, 0] = float("-inf")
        before = [p.detach().clone() for p in model.parameters()]
        with count_host_reads() as reads:
            engine.step(opt, log=False)
        opt.step()
        opt.zero_grad()
        moved = not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert moved is (step != 1), step
        assert reads.count == (1 if step != 1 else reads.count)  # Skip's one read; a warned bad step reads more
    assert engine.counters["nonfinite_steps"] == 1 and engine.counters["clipped_steps"] == 2
    first = next(iter(model.named_parameters()))[0]
    assert first in messages[0] and "1 of" in messages[0]  # the diagnosis names the parameter with the Inf
