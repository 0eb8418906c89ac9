"""NaN/Inf remedies by fault injection on a real Trainer: skip, halve_lr, raise, ignore."""

from __future__ import annotations

import warnings

import pytest
import torch
from faults import FaultModel, StepRecorder, make_loader, states_equal, trainer

from lightning_clip import GradientClipping, NonFiniteGradientError
from lightning_clip.host_reads import count_host_reads

OPTIMIZERS = ["sgd_momentum", "adam", "adamw", "adamw_fused", "sgd_fused"]


def all_finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def fit(tmp_path, cb, model, loader=None, max_steps=8, **kw):
    rec = StepRecorder()
    t = trainer(tmp_path, [cb, rec], max_steps=max_steps, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader if loader is not None else make_loader())
    return t, rec


def assert_untouched_on(rec: StepRecorder, bad_steps: set[int]) -> None:
    for s in rec.steps:
        same_w = all(torch.equal(a, b) for a, b in zip(s["weights_before"], s["weights_after"]))
        same_opt = states_equal(s["opt_before"], s["opt_after"])
        if s["global_step"] in bad_steps:
            assert same_w, f"weights moved on bad step {s['global_step']}"
            assert same_opt, f"optimizer state changed on bad step {s['global_step']}"
        else:
            assert not same_w, f"weights did not move on good step {s['global_step']}"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("policy", ["skip", "halve_lr"])
def test_nan_loss_step_is_a_true_noop(tmp_path, optimizer, policy):
    bad = {2, 5}
    t, rec = fit(
        tmp_path,
        GradientClipping(max_norm=1.0, nan_policy=policy),
        FaultModel(optimizer=optimizer, lr=0.05, nan_loss_at=tuple(bad)),
    )
    assert_untouched_on(rec, bad)
    cb = t.callbacks[0]
    assert cb.counters["skipped_steps"] == 2
    assert cb.counters["nonfinite_steps"] == 2
    assert all_finite(t.lightning_module)
    if policy == "halve_lr":
        assert cb.lr_scales == [0.25]


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw", "adamw_fused"])
def test_inf_in_one_layer_is_skipped_and_named(tmp_path, optimizer):
    cb = GradientClipping(max_norm=1.0, nan_policy="skip")
    with pytest.warns(RuntimeWarning) as record:
        t = trainer(tmp_path, [cb, rec := StepRecorder()], max_steps=6, log_every_n_steps=1, logger=True)
        t.fit(FaultModel(optimizer=optimizer, inf_grad_at=(3,)), make_loader())
    assert_untouched_on(rec, {3})
    assert cb.counters["skipped_steps"] == 1
    text = "\n".join(str(w.message) for w in record if issubclass(w.category, RuntimeWarning))
    if optimizer.endswith("fused"):
        assert "skipped on the device" in text  # fused: decided on the device, reported at the next logging step
    else:
        assert "net.2.weight" in text and "1 of 4 parameters" in text
        assert "only 1 of 4 parameters" in text  # the mode of failure: a few layers, not the whole backward


def test_zeroing_is_not_a_skip_but_ours_is(tmp_path):
    """Reference point for the design: zero gradients still move weights through momentum and weight decay."""
    model = FaultModel(optimizer="sgd_momentum")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x, y, _ = next(iter(make_loader()))
    torch.nn.functional.mse_loss(model.net(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.zero_()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_raise_policy_stops_at_first_bad_step_with_weights_untouched(tmp_path):
    cb = GradientClipping(nan_policy="raise")
    model = FaultModel(optimizer="adam", nan_loss_at=(3,))
    rec = StepRecorder()
    t = trainer(tmp_path, [cb, rec], max_steps=8)
    with pytest.raises(NonFiniteGradientError) as info:
        t.fit(model, make_loader())
    err = info.value
    assert err.global_step == 3
    msg = str(err)
    assert "global step 3" in msg and "epoch 0" in msg and "batch 3" in msg
    assert "every gradient is NaN/Inf (the loss itself was NaN/Inf)" in msg
    for remedy in ("lower the learning rate", "normalization", "clip gradients", "input data", "check the model"):
        assert remedy in msg
    assert sorted(err.parameter_names) == sorted(n for n, _ in model.named_parameters())
    # weights equal those before the bad step, and finite
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(rec.steps[-1]["weights_before"], model.parameters()))
    assert all_finite(model)


def test_max_consecutive_nonfinite_raises_with_finite_weights(tmp_path):
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=3)
    model = FaultModel(optimizer="sgd_momentum", nan_loss_at=(2, 3, 4, 5, 6))
    t = trainer(tmp_path, [cb], max_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteGradientError, match="3 consecutive steps") as info:
            t.fit(model, make_loader())
    assert info.value.global_step == 4 and info.value.consecutive == 3
    assert all_finite(model)


def test_max_consecutive_counts_only_consecutive(tmp_path):
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=2)
    t, _ = fit(tmp_path, cb, FaultModel(nan_loss_at=(1, 3, 5, 7)), max_steps=9)
    assert t.global_step == 9 and cb.counters["skipped_steps"] == 4


def test_ignore_lets_nan_through(tmp_path):
    cb = GradientClipping(nan_policy="ignore")
    t, _ = fit(tmp_path, cb, FaultModel(optimizer="sgd", nan_loss_at=(2,)))
    assert not all_finite(t.lightning_module)  # the user chose ignore
    assert cb.counters["skipped_steps"] == 0


def test_warnings_are_rate_limited(tmp_path):
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=None)
    bad = tuple(range(0, 20, 2))  # 10 isolated bad steps
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=20).fit(FaultModel(nan_loss_at=bad), make_loader(n=160))
    ours = [w for w in record if "Non-finite gradients at global step" in str(w.message)]
    assert [int(str(w.message).split("global step ")[1].split(" ")[0]) for w in ours] == [
        0,
        2,
        6,
        14,
    ]  # bad steps 1, 2, 4, 8
    assert cb.counters["skipped_steps"] == 10


def test_check_inputs_names_batch_and_position(tmp_path):
    cb = GradientClipping(nan_policy="raise", check_inputs=True)
    with pytest.raises(NonFiniteGradientError) as info:
        trainer(tmp_path, [cb], max_steps=8).fit(FaultModel(), make_loader(nan_batches=(4,)))
    msg = str(info.value)
    assert "batch 4: batch[0] at position (1, 2) (1 of 64 elements NaN/Inf)" in msg
    assert "dirty data" in msg


def test_check_inputs_skips_a_dirty_batch_even_when_gradients_are_finite(tmp_path):
    # NaN only in a tensor the model ignores: gradients stay finite, the input check still skips the step.
    cb = GradientClipping(nan_policy="skip", check_inputs=True)
    _t, rec = fit(tmp_path, cb, FaultModel(optimizer="adamw"), loader=make_loader(nan_batches=(2,), extra_nan=True))
    assert_untouched_on(rec, {2})
    assert cb.counters["skipped_steps"] == 1
    # without the check, that step trains normally
    cb2 = GradientClipping(nan_policy="skip")
    fit(tmp_path, cb2, FaultModel(optimizer="adamw"), loader=make_loader(nan_batches=(2,), extra_nan=True))
    assert cb2.counters["skipped_steps"] == 0


def test_accumulation_window_with_one_nan_micro_batch_skips_once(tmp_path):
    cb = GradientClipping(nan_policy="skip", check_inputs=True)
    t, _rec = fit(
        tmp_path,
        cb,
        FaultModel(optimizer="sgd_momentum"),
        loader=make_loader(nan_batches=(3,)),
        max_steps=4,
        accumulate_grad_batches=2,
    )
    # micro-batch 3 belongs to optimizer step 1
    assert cb.counters["skipped_steps"] == 1 and cb.counters["steps"] == 4
    assert all_finite(t.lightning_module)


def count_reads_per_step(tmp_path, cb_kwargs, optimizer, log_every=1000, nan_loss_at=()):
    reads: list[int] = []

    class Counting(GradientClipping):
        def on_before_optimizer_step(self, trainer, pl_module, opt):
            with count_host_reads() as r:
                super().on_before_optimizer_step(trainer, pl_module, opt)
            reads.append(r.count)

    cb = Counting(**cb_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [cb], max_steps=6, logger=True, log_every_n_steps=log_every).fit(
            FaultModel(optimizer=optimizer, nan_loss_at=nan_loss_at), make_loader()
        )
    return reads


@pytest.mark.parametrize(
    "policy,optimizer,expected",
    [
        ("ignore", "sgd_momentum", 0),
        ("ignore", "adamw_fused", 0),
        # fused: the first step, before the optimizer has state, is decided on the host; then on the device
        ("skip", "adamw_fused", [1, 0, 0, 0, 0, 0]),
        ("skip", "sgd_momentum", 1),
        ("skip", "adamw", 1),
        ("halve_lr", "adamw", 1),
        ("halve_lr", "adamw_fused", 1),
        ("raise", "adam", 1),
    ],
)
def test_host_reads_per_step(tmp_path, policy, optimizer, expected):
    reads = count_reads_per_step(tmp_path, {"nan_policy": policy}, optimizer)
    assert reads == (expected if isinstance(expected, list) else [expected] * 6)


def test_host_reads_on_logging_steps_stay_one(tmp_path):
    assert count_reads_per_step(tmp_path, {"nan_policy": "skip"}, "sgd_momentum", log_every=1) == [1] * 6
    assert count_reads_per_step(tmp_path, {"nan_policy": "skip"}, "adamw_fused", log_every=1) == [1] * 6


class TwoOptimizersNaN(FaultModel):
    """Manual optimization: optimizer 1's loss is NaN on every step, optimizer 0's never."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.other = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        opt0, opt1 = self.optimizers()
        for opt, loss in (
            (opt0, torch.nn.functional.mse_loss(self.net(x), y)),
            (opt1, torch.nn.functional.mse_loss(self.other(x), y) * float("nan")),
        ):
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)


def test_each_optimizer_has_its_own_streak(tmp_path):
    # optimizer 0's good steps must not reset optimizer 1's run of bad steps
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=3)
    t = trainer(tmp_path, [cb], max_steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteGradientError, match="optimizer 1"):
            t.fit(TwoOptimizersNaN(), make_loader(n=80))
    assert cb.counters_of(0)["nonfinite_steps"] == 0 and cb.counters_of(0)["steps"] == 3
    assert cb.counters_of(1)["nonfinite_streak"] == 3


@pytest.mark.parametrize("logger,limit", [(True, 2), (False, 3)], ids=["at-logging-steps", "without-any-logger"])
def test_fused_device_skip_enforces_the_limit(tmp_path, logger, limit):
    # Skips are decided on the device; the streak is read at a logging step, or every log_every_n_steps.
    cb = GradientClipping(nan_policy="skip", max_consecutive_nonfinite=limit)
    t = trainer(tmp_path, [cb], max_steps=40, logger=logger, log_every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteGradientError, match="skipped on the device"):
            t.fit(FaultModel(optimizer="adamw_fused", nan_loss_at=tuple(range(1, 40))), make_loader(n=320))
    assert t.global_step <= 10
    assert all_finite(t.lightning_module)


def test_a_bad_step_is_not_counted_as_clipped(tmp_path):
    # finite, large gradients but a dirty input: the step is skipped, not clipped
    cb = GradientClipping(max_norm=1e-6, nan_policy="skip", check_inputs=True)
    fit(tmp_path, cb, FaultModel(), loader=make_loader(nan_batches=(2,), extra_nan=True), max_steps=5)
    assert cb.counters == {
        "steps": 5,
        "clipped_steps": 4,
        "nonfinite_steps": 1,
        "amp_overflows": 0,
        "spike_skips": 0,
        "requested_skips": 0,
        "skipped_steps": 1,
    }
