"""Spike skipping (``skip_spikes``, OLMo-core's rule) and spike attribution (which layers carried a spike)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from faults import FaultModel, make_loader, states_equal, trainer

from lightning_clip import ClipEngine, GradientClipping
from lightning_clip import metrics as M
from lightning_clip.detect import SpikeDetector
from lightning_clip.host_reads import count_host_reads
from lightning_clip.remedies import HalveLR, Ignore, Skip
from lightning_clip.rules import NoClip, NormClip, ZScoreClip

# A healthy sequence around 1, then a spike, then healthy again.
NORMS = [1.0, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 40.0, 1.0]
SPIKE_AT = 7


def reference_flags(norms, k, window, warmup, bad=()):
    """float64 reference of the rule: x > mean + k * std (population) of the kept healthy norms."""
    kept, flags = [], []
    for i, x in enumerate(norms):
        hist = kept[-window:]
        spike = False
        if i not in bad and math.isfinite(x) and len(hist) >= warmup:
            mean = sum(hist) / len(hist)
            std = math.sqrt(max(sum(h * h for h in hist) / len(hist) - mean * mean, 0.0))
            spike = x > mean + k * std
        flags.append(spike)
        if i not in bad and math.isfinite(x) and not spike:
            kept.append(x)
    return flags


def run_detector(detector, norms, bad=()):
    return [
        bool(detector.flag(torch.tensor(x, dtype=torch.float64), torch.tensor(i in bad))) for i, x in enumerate(norms)
    ]


@pytest.mark.parametrize("k,window,warmup", [(4.0, 8, 4), (3.0, 4, 3), (6.0, 16, 5)])
def test_detector_flags_exactly_the_float64_reference(k, window, warmup):
    norms = [*NORMS, 1.1, 60.0, 0.9, 1.0, 3.5, 1.0]
    assert run_detector(SpikeDetector(k, window, warmup), norms) == reference_flags(norms, k, window, warmup)
    assert run_detector(SpikeDetector(k, window, warmup), norms)[SPIKE_AT]


def test_bad_steps_never_enter_the_history_and_a_spike_after_them_is_still_flagged():
    with_nan = [1.0, 1.2, float("nan"), 0.9, 1.1, float("inf"), 1.0, 1e6, 1.0, 40.0]
    clean = [x for x in with_nan if math.isfinite(x) and x < 1e5]
    a, b = SpikeDetector(4.0, 8, 4), SpikeDetector(4.0, 8, 4)
    flags = run_detector(a, with_nan, bad={7})  # step 7 is flagged bad by the loss: left out too
    run_detector(b, clean[:-1])
    torch.testing.assert_close(a.state_dict()["history"], b.state_dict()["history"], rtol=0, atol=0, equal_nan=True)
    assert a.state_dict()["count"] == b.state_dict()["count"] == len(clean) - 1
    assert flags[-1] is True


def test_state_dict_resumes_the_history_so_the_first_step_after_resume_catches_a_spike():
    first = SpikeDetector(4.0, 8, 4)
    run_detector(first, NORMS[:SPIKE_AT])
    resumed = SpikeDetector(4.0, 8, 4)
    resumed.load_state_dict(first.state_dict())
    assert bool(resumed.flag(torch.tensor(40.0), torch.tensor(False)))


@pytest.mark.parametrize("kwargs", [dict(k=0.0), dict(k=-1.0), dict(window=0), dict(window=4, warmup=5)])
def test_detector_arguments_are_checked(kwargs):
    with pytest.raises(ValueError):
        SpikeDetector(**kwargs)


# ----------------------------------------------------------------------------- through the engine
def spiky_loop(remedy, optimizer="sgd_momentum", log_every=1000, rule=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if optimizer == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    engine = ClipEngine(rule or NoClip(), remedy, spike_skip=SpikeDetector(4.0, 16, 4))
    engine.attach([opt], model.named_parameters())
    messages: list[str] = []
    engine.warn = messages.append
    g = torch.Generator().manual_seed(1)
    records = []
    for i in range(10):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y) * (300.0 if i == SPIKE_AT else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        before = ([p.detach().clone() for p in model.parameters()], states(opt))
        with count_host_reads() as reads:
            metrics = engine.step(opt, log=i % log_every == 0, read_every=1000)
        opt.step()
        opt.zero_grad()
        after = ([p.detach().clone() for p in model.parameters()], states(opt))
        records.append((before, after, reads.count, metrics))
    return engine, records, messages


def states(opt):
    import copy

    return copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw_fused"])
def test_a_spike_step_is_skipped_as_a_true_noop_and_counted_apart_from_nan_steps(optimizer):
    engine, records, _ = spiky_loop(Skip(), optimizer)
    for i, ((w0, s0), (w1, s1), _, _) in enumerate(records):
        same = all(torch.equal(a, b) for a, b in zip(w0, w1)) and states_equal(s0, s1)
        assert same is (i == SPIKE_AT), i
    counts = engine.counters
    assert (counts["spike_skips"], counts["nonfinite_steps"], counts["skipped_steps"]) == (1, 0, 1)


def test_fused_spike_skip_makes_no_host_read_after_the_first_step():
    _, records, _ = spiky_loop(Skip(), "adamw_fused")
    assert [r[2] for r in records] == [1] + [0] * 9  # first step: no optimizer state yet, decided on the host


def test_a_spike_does_not_lower_the_lr_under_halve_lr():
    engine, _records, _ = spiky_loop(HalveLR())
    assert engine.lr_scales == [1.0] and engine.counters["spike_skips"] == 1


def test_skipping_spikes_needs_a_remedy_that_skips():
    with pytest.raises(ValueError, match="skip_spikes"):
        ClipEngine(NormClip(), Ignore(), spike_skip=SpikeDetector())
    with pytest.raises(ValueError, match="nan_policy='ignore'"):
        GradientClipping(nan_policy="ignore", skip_spikes=5.0)


# ----------------------------------------------------------------------------- attribution
def test_a_logged_spike_names_the_layers_that_carried_it_and_logs_their_share():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = ClipEngine(ZScoreClip(warmup_steps=4), Ignore())
    engine.attach([opt], model.named_parameters())
    messages: list[str] = []
    engine.warn = messages.append
    out = {}
    for i in range(7):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        if i == 6:
            model[2].weight.grad.fill_(50.0)  # the spike lives in the last layer
        out = engine.step(opt, log=True)
        if i < 6:
            assert messages == [], f"healthy step {i} warned"
    assert len(messages) == 1 and "Gradient spike clipped" in messages[0]
    assert messages[0].split("share of the squared norm): ")[1].startswith("2 (")  # layer "2" named first
    norms = {name: float(p.grad.double().norm()) for name, p in model.named_parameters()}  # after clipping
    layer2 = 50.0**2 * 4
    others = 0.1**2 * (16 + 4 + 1)
    assert out[M.TOP_LAYER_SHARE] == pytest.approx(layer2 / (layer2 + others), rel=1e-5)
    assert norms["2.weight"] < 50.0 * 2  # and it was clipped


def test_healthy_logging_steps_of_a_fixed_rule_never_warn():
    _, records, messages = spiky_loop(Skip(), rule=NormClip(1e-3), log_every=1)
    assert len(messages) == 1 and "Gradient spike skipped" in messages[0]  # only the spike, not 9 clipped steps
    assert M.TOP_LAYER_SHARE in records[SPIKE_AT][3]
    assert all(M.TOP_LAYER_SHARE not in r[3] for i, r in enumerate(records) if i != SPIKE_AT)


# ----------------------------------------------------------------------------- the callback
def test_callback_skip_spikes_skips_a_spike_batch_in_a_real_trainer(tmp_path):
    class Spiky(FaultModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (500.0 if self.global_step == 25 else 1.0)

    cb = GradientClipping(mode="none", nan_policy="skip", skip_spikes=5.0, spike_window=32)
    t = trainer(tmp_path, [cb], max_steps=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Spiky(optimizer="sgd_momentum", lr=0.01), make_loader(n=240, repeat=True))
    assert cb.counters["spike_skips"] == 1 and cb.counters["skipped_steps"] == 1
    state = cb.state_dict()["optimizers"][0]
    assert state["counters"]["spike_skips"] == 1
    assert state["detectors"]["spikes"]["count"] == 29  # 5 warm-up + healthy ones, not the spike
