"""The adaptive rules (``agc``, ``zscore``, ``percentile``): float64 references, the published peers, NaN
safety, no host reads, resume.

The references are written here from the papers' formulas in Python floats / float64 tensors, never with
``lightning_clip``. The peers (timm's ``adaptive_clip_grad``, ``zclip.ZClip``, ``autoclip``'s ``QuantileClip``)
are driven on the same gradients; each place where ours differs on purpose has a test named after it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import yaml
from peers import autoclip_quantile_clip, timm_agc, zclip_class

from lightning_clip import GradientClipping
from lightning_clip.engine import ClipEngine
from lightning_clip.host_reads import count_host_reads
from lightning_clip.metrics import THRESHOLD
from lightning_clip.remedies import Ignore
from lightning_clip.rules import RULES, AdaptiveGradClip, ClipInput, PercentileClip, ZScoreClip, build_rule

NAN = float("nan")
INF = float("inf")
EPS = 1e-6
CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"


# ----------------------------------------------------------------------------- helpers
def f32(x: float) -> float:
    """``x`` as the engine sees it: a float32 norm."""
    return float(torch.tensor(x, dtype=torch.float32))


def spiky_norms(n: int, spikes: dict[int, float], seed: int = 0) -> list[float]:
    """``n`` healthy norms around 1 (float32 values), with ``spikes`` (step -> norm) put in."""
    g = torch.Generator().manual_seed(seed)
    norms = (1.0 + 0.1 * torch.randn(n, generator=g)).tolist()
    for i, x in spikes.items():
        norms[i] = x
    return [f32(x) for x in norms]


class Driver:
    """One parameter with one element, whose gradient is set to each norm in turn, through a ClipEngine."""

    def __init__(self, rule, engine_state=None) -> None:
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.opt = torch.optim.SGD([self.w], lr=0.0)
        self.engine = ClipEngine(rule, Ignore(), log_norms="total")
        if engine_state is not None:
            self.engine.load_state_dict(engine_state)
        self.engine.attach([self.opt], [("w", self.w)])

    def feed(self, x: float) -> tuple[float, float | None]:
        """The gradient after the step (its norm, signed) and the logged threshold."""
        self.w.grad = torch.tensor([x])
        metrics = self.engine.step(self.opt, log=True)
        return self.w.grad.item(), metrics.get(THRESHOLD)

    def run(self, norms):
        return [self.feed(x) for x in norms]

    @property
    def rule(self):
        return self.engine.rule_of(0)


def same(a: float | None, b: float | None, rel: float = 0.0) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=rel, abs=0.0)


def hand_step(grads, params=None, *, bad=False, inv_scale=None, total=None, log=True) -> ClipInput:
    """The ClipInput the engine hands a rule (float32 total, in true units), the total from a float64 reference."""
    params = params if params is not None else [torch.zeros_like(g) for g in grads]
    dense = [g.to_dense() if g.is_sparse else g for g in grads]
    if total is None:
        scale = 1.0 if inv_scale is None else float(inv_scale)
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in dense)) * scale
    total_t = torch.tensor(total, dtype=torch.float32)
    finite = torch.isfinite(total_t)
    return ClipInput(
        params=params,
        grads=grads,
        names=[f"p{i}" for i in range(len(grads))],
        norms=[torch.linalg.vector_norm(g.float()) for g in dense],
        total=total_t,
        finite=finite,
        bad=~finite | torch.tensor(bad),
        norm_type=2.0,
        eps=EPS,
        inv_scale=None if inv_scale is None else torch.tensor(inv_scale, dtype=torch.float32),
        log=log,
    )


# ----------------------------------------------------------------------------- references (float64, by hand)
def ref_unit_norms(t: torch.Tensor, p: float) -> torch.Tensor:
    x = t.detach().double().abs().reshape(1 if t.ndim <= 1 else t.shape[0], -1)
    return x.max(1).values if math.isinf(p) else x.pow(p).sum(1).pow(1.0 / p)


def ref_agc(weights, grads, clip_factor: float, eps: float, p: float = 2.0) -> list[torch.Tensor]:
    """The paper's rule, per unit: G_i <- G_i * min(1, clip_factor * max(|W_i|, eps) / |G_i|)."""
    out = []
    for w, g in zip(weights, grads):
        cap = clip_factor * ref_unit_norms(w, p).clamp(min=eps)
        gn = ref_unit_norms(g, p)
        factor = torch.where(gn < cap, 1.0, cap / gn.clamp(min=1e-6))
        out.append(g.double() * (factor.reshape(()) if g.ndim <= 1 else factor.reshape(-1, *[1] * (g.ndim - 1))))
    return out


def ref_zscore(norms, z_t=2.5, alpha=0.97, warmup=25, max_norm=None, option="adaptive_scaling", eps=EPS):
    """ZClip's algorithm in Python floats, with our NaN rule (a non-finite norm is skipped): per step the norm
    after clipping and (mean, var) after the step (None during warm-up)."""
    buf: list[float] = []
    mean = var = None
    out = []
    for x in norms:
        if not math.isfinite(x):
            out.append((x, mean, var))
            continue
        if mean is None or var is None:
            y = x if max_norm is None else x * min(1.0, max_norm / (x + eps))
            buf.append(x)
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((b - mean) ** 2 for b in buf) / warmup
        else:
            std = math.sqrt(var)
            z = (x - mean) / (std + eps)
            if option == "fixed":
                spike, target = x > mean + z_t * std, mean + z_t * std
            else:
                spike, target = z > z_t, (mean + z_t * z_t * std / z) if option == "adaptive_scaling" else mean
            v = target if spike else x
            cap = v if max_norm is None else min(v, max_norm)
            y = x * cap / (x + eps) if x > cap else x
            mean = alpha * mean + (1 - alpha) * v
            var = alpha * var + (1 - alpha) * (v - mean) ** 2
        out.append((y, mean, var))
    return out


def ref_percentile_value(values, pct: float) -> float:
    """Linear interpolation between order statistics (numpy's default, torch.quantile's 'linear')."""
    s = sorted(values)
    r = pct / 100.0 * (len(s) - 1)
    lo, hi = math.floor(r), math.ceil(r)
    return s[lo] + (s[hi] - s[lo]) * (r - lo)


def ref_percentile(norms, pct=10.0, size=1000, warmup=25, eps=EPS):
    """AutoClip: threshold from the previous healthy norms; per step (norm after clipping, threshold or None)."""
    history: list[float] = []
    seen = 0
    out = []
    for x in norms:
        thr = ref_percentile_value(history, pct) if seen >= warmup else None
        finite = math.isfinite(x)
        y = x * min(1.0, thr / (x + eps)) if thr is not None and finite else x
        if finite:
            history = [*history, x][-size:]
            seen += 1
        out.append((y, thr))
    return out


# ============================================================================= AGC
class AgcNet(torch.nn.Module):
    """Every kind of unit: Conv filters, Linear rows, biases, a LayerNorm scale, a 0-dim gain, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.gain = torch.nn.Parameter(torch.tensor(0.5))
        self.head = torch.nn.Linear(5, 2)


def agc_net(seed: int = 0, grad_scale: float = 1.0) -> AgcNet:
    """An AgcNet with gradients whose units span ~3 decades around 0.05 x their weights: some clipped, some not."""
    torch.manual_seed(seed)
    net = AgcNet()
    g = torch.Generator().manual_seed(seed + 1)
    for p in net.parameters():
        units = 1 if p.ndim <= 1 else p.shape[0]
        spread = torch.exp(2.0 * torch.randn(units, generator=g)).reshape(-1, *[1] * max(p.ndim - 1, 0))
        grad = 0.05 * torch.randn(p.shape, generator=g) * (spread.reshape(()) if p.ndim <= 1 else spread)
        p.grad = grad * grad_scale
    return net


def agc_engine_step(net, rule, *, log=True):
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = ClipEngine(rule, Ignore())
    engine.attach([opt], net.named_parameters())
    return engine.step(opt, log=log)


@pytest.mark.parametrize("p", [2.0, 1.0, INF])
def test_agc_equals_the_float64_reference_per_unit(p):
    net = agc_net()
    weights = [w.detach().clone() for w in net.parameters()]
    before = [w.grad.clone() for w in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = ClipEngine(AdaptiveGradClip(clip_factor=0.05), Ignore(), norm_type=p)
    engine.attach([opt], net.named_parameters())
    engine.step(opt)
    expected = ref_agc(weights, before, 0.05, 1e-3, p)
    clipped_units = 0
    for w, b, e in zip(net.parameters(), before, expected):
        torch.testing.assert_close(w.grad.double(), e, rtol=1e-6, atol=1e-12)
        clipped_units += int((ref_unit_norms(b, p) != ref_unit_norms(e, p)).sum())
    assert clipped_units > 3  # the data clips some units and keeps others
    assert clipped_units < sum(1 if b.ndim <= 1 else b.shape[0] for b in before)


def test_agc_equals_timm_adaptive_clip_grad():
    timm = timm_agc()
    ours, theirs = agc_net(), agc_net()
    metrics = agc_engine_step(ours, AdaptiveGradClip(clip_factor=0.05, eps=1e-3))
    timm.adaptive_clip_grad(list(theirs.parameters()), clip_factor=0.05, eps=1e-3)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)
    assert metrics["grad_clip/clipped"] == 1.0
    assert metrics[THRESHOLD] == pytest.approx(0.05)


def test_agc_exclude_leaves_the_matched_parameters_bit_identical_and_clips_the_rest_as_timm():
    timm = timm_agc()
    ours, theirs = agc_net(), agc_net()
    head = [p.grad.clone() for p in ours.head.parameters()]
    agc_engine_step(ours, AdaptiveGradClip(clip_factor=0.05, exclude=["head.*", "gain"]))
    rest = [p for n, p in theirs.named_parameters() if not n.startswith("head.") and n != "gain"]
    timm.adaptive_clip_grad(rest, clip_factor=0.05)
    assert all(torch.equal(p.grad, h) for p, h in zip(ours.head.parameters(), head))
    assert torch.equal(ours.gain.grad, theirs.gain.grad)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12, msg=name)


def test_agc_compares_scaled_fp16_fused_gradients_in_true_units():
    scale = 2.0**12
    plain, scaled = agc_net(), agc_net(grad_scale=scale)
    rule = AdaptiveGradClip(clip_factor=0.05)
    for net, inv in ((plain, None), (scaled, 1.0 / scale)):
        params = list(net.parameters())
        grads = [p.grad for p in params]
        result = rule.clip_(hand_step(grads, params, inv_scale=inv))
        assert bool(result.clipped)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(b.grad, a.grad * scale, rtol=1e-6, atol=0.0)


def test_agc_reports_nothing_clipped_when_every_unit_is_under_its_cap():
    net = agc_net()
    before = [p.grad.clone() for p in net.parameters()]
    metrics = agc_engine_step(net, AdaptiveGradClip(clip_factor=1e6))
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))
    assert metrics["grad_clip/clipped"] == 0.0
    assert metrics["grad_norm/total_clipped"] == pytest.approx(metrics["grad_norm/total"], rel=1e-6)


def test_agc_leaves_a_non_finite_step_bit_identical_where_timm_turns_inf_into_nan():
    # Deliberate difference: the NaN policy must see the raw gradient; timm multiplies Inf by 0.
    timm = timm_agc()
    ours, theirs = agc_net(), agc_net()
    for net in (ours, theirs):
        net.fc.weight.grad[0, 0] = INF
    before = [p.grad.clone() for p in ours.parameters()]
    metrics = agc_engine_step(ours, AdaptiveGradClip(clip_factor=0.05))
    assert all(torch.equal(p.grad, b) for p, b in zip(ours.parameters(), before))
    assert metrics["grad_clip/clipped"] == 0.0
    timm.adaptive_clip_grad(list(theirs.parameters()), clip_factor=0.05)
    assert torch.isnan(theirs.fc.weight.grad[0, 0])


def test_agc_refuses_a_sparse_gradient_unless_excluded():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    step = hand_step([emb.weight.grad], [emb.weight])
    with pytest.raises(ValueError, match="`p0` has a sparse one"):
        AdaptiveGradClip().clip_(step)
    assert not bool(AdaptiveGradClip(exclude="p0").clip_(step).clipped)


# ============================================================================= z-score
ZSCORE_CASES = {
    "adaptive": dict(option="adaptive_scaling", max_norm=None),
    "adaptive_capped": dict(option="adaptive_scaling", max_norm=1.15),
    "mean": dict(option="mean", max_norm=None),
    "fixed": dict(option="fixed", max_norm=None),
}


@pytest.mark.parametrize("case", list(ZSCORE_CASES))
def test_zscore_equals_the_float64_reference(case):
    option, max_norm = ZSCORE_CASES[case]["option"], ZSCORE_CASES[case]["max_norm"]
    norms = spiky_norms(40, {12: 9.0, 20: 30.0, 21: 25.0, 33: 4.0})
    driver = Driver(ZScoreClip(warmup_steps=8, max_norm=max_norm, clip_option=option))
    expected = ref_zscore(norms, warmup=8, max_norm=max_norm, option=option)
    for i, (x, (y, mean, var)) in enumerate(zip(norms, expected)):
        got, threshold = driver.feed(x)
        assert got == pytest.approx(y, rel=1e-6), i
        rule = driver.rule
        if mean is None:
            assert threshold == max_norm and not bool(rule.stats.initialized)
            continue
        assert (rule.mean.item(), rule.var.item()) == pytest.approx((mean, var), rel=1e-12), i
    assert sum(abs(y) < x for x, (y, _, _) in zip(norms, expected)) >= 3  # the spikes were clipped


@pytest.mark.parametrize("case", list(ZSCORE_CASES))
def test_zscore_equals_the_zclip_package(case):
    ZClip = zclip_class()
    option, max_norm = ZSCORE_CASES[case]["option"], ZSCORE_CASES[case]["max_norm"]
    norms = spiky_norms(40, {12: 9.0, 20: 30.0, 21: 25.0, 33: 4.0}, seed=1)
    theirs_model = torch.nn.Linear(1, 1, bias=False)
    zmode, zoption = ("percentile", "adaptive_scaling") if option == "fixed" else ("zscore", option)
    theirs = ZClip(warmup_steps=8, max_grad_norm=max_norm, mode=zmode, clip_option=zoption)
    driver = Driver(ZScoreClip(warmup_steps=8, max_norm=max_norm, clip_option=option))
    clipped = 0
    for i, x in enumerate(norms):
        # ZClip's threshold before the step: the largest norm it lets through.
        if theirs.initialized:
            std = theirs.var**0.5
            bound = theirs.mean + 2.5 * (std if option == "fixed" else std + 1e-6)
            expected_threshold = bound if max_norm is None else min(bound, max_norm)
        else:
            expected_threshold = max_norm
        theirs_model.weight.grad = torch.tensor([[x]])
        theirs.step(theirs_model)
        got, threshold = driver.feed(x)
        assert got == pytest.approx(theirs_model.weight.grad.item(), rel=1e-6), i
        assert same(threshold, expected_threshold, rel=1e-12), i
        if theirs.initialized:
            assert (driver.rule.mean.item(), driver.rule.var.item()) == pytest.approx(
                (theirs.mean, theirs.var), rel=1e-12
            ), i
        clipped += got < x
    assert clipped >= 3


def test_zscore_nan_poisons_zclip_for_good_but_not_ours():
    # Deliberate difference: ZClip's EMA takes the NaN norm and never clips again.
    ZClip = zclip_class()
    norms = [*spiky_norms(10, {}), NAN, 40.0]
    model = torch.nn.Linear(1, 1, bias=False)
    theirs = ZClip(warmup_steps=8, max_grad_norm=None)
    for x in norms:
        model.weight.grad = torch.tensor([[x]])
        theirs.step(model)
    assert math.isnan(theirs.mean)
    assert model.weight.grad.item() == 40.0  # the spike went through
    got, _ = Driver(ZScoreClip(warmup_steps=8)).run(norms)[-1]
    assert got < 2.0


# ============================================================================= percentile
@pytest.mark.parametrize(("pct", "size", "warmup"), [(10.0, 1000, 25), (50.0, 7, 3), (90.0, 5, 1), (0.0, 4, 2)])
def test_percentile_equals_the_float64_reference(pct, size, warmup):
    norms = spiky_norms(40, {5: 8.0, 17: 20.0, 30: 3.0}, seed=2)
    results = Driver(PercentileClip(percentile=pct, history_size=size, warmup_steps=warmup)).run(norms)
    for i, ((got, threshold), (y, thr)) in enumerate(zip(results, ref_percentile(norms, pct, size, warmup))):
        assert got == pytest.approx(y, rel=1e-6), i
        assert (threshold is None) == (thr is None), i
        if thr is not None:
            assert threshold == pytest.approx(thr, rel=1e-6), i


@pytest.mark.parametrize(("pct", "size"), [(10.0, 1000), (50.0, 7), (90.0, 5)])
def test_percentile_equals_autoclip_quantile_clip(pct, size):
    # AutoClip computes the threshold from the norms before this step, then records this step's (unclipped)
    # norm; it has no warm-up beyond its first step, which warmup_steps=1 matches.
    QuantileClip = autoclip_quantile_clip()
    norms = spiky_norms(30, {5: 8.0, 17: 20.0}, seed=3)
    w = torch.nn.Parameter(torch.zeros(1))
    theirs = QuantileClip([w], quantile=pct / 100.0, history_length=size, global_threshold=True)
    driver = Driver(PercentileClip(percentile=pct, history_size=size, warmup_steps=1))
    for i, x in enumerate(norms):
        history = theirs.state["global_history"]
        expected_threshold = None if len(history) == 0 else torch.quantile(history, pct / 100.0).item()
        w.grad = torch.tensor([x])
        theirs.step()
        got, threshold = driver.feed(x)
        assert got == pytest.approx(w.grad.item(), rel=1e-6), i
        assert same(threshold, expected_threshold, rel=1e-6), i


def test_percentile_nan_poisons_autoclip_for_good_but_not_ours():
    # Deliberate difference: AutoClip records the NaN norm; every later threshold, and gradient, is NaN.
    QuantileClip = autoclip_quantile_clip()
    norms = [*spiky_norms(5, {}), NAN, 1.0, 40.0]
    w = torch.nn.Parameter(torch.zeros(1))
    theirs = QuantileClip([w], quantile=0.5, history_length=100, global_threshold=True)
    for x in norms:
        w.grad = torch.tensor([x])
        theirs.step()
    assert math.isnan(w.grad.item())
    got, threshold = Driver(PercentileClip(percentile=50.0, warmup_steps=1)).run(norms)[-1]
    assert got == pytest.approx(threshold, rel=1e-5) and threshold < 2.0


def test_percentile_state_dict_lists_the_history_oldest_first_and_a_smaller_buffer_keeps_the_newest():
    norms = [float(i) for i in range(1, 12)]
    driver = Driver(PercentileClip(history_size=4, warmup_steps=1))
    driver.run(norms)
    state = driver.rule.state_dict()
    assert state["history"].tolist() == [8.0, 9.0, 10.0, 11.0] and state["count"] == 11
    smaller = PercentileClip(history_size=3)
    smaller.load_state_dict(state)
    assert smaller.state_dict()["history"].tolist() == [9.0, 10.0, 11.0]


# ============================================================================= all three: NaN safety
def adaptive(mode: str):
    return {
        "zscore": lambda: ZScoreClip(warmup_steps=6),
        "percentile": lambda: PercentileClip(percentile=50.0, history_size=8, warmup_steps=6),
    }[mode]()


def stats_of(rule) -> dict[str, torch.Tensor]:
    stats = dict((rule.stats if isinstance(rule, ZScoreClip) else rule.norms).named_buffers())
    return {k: v.clone() for k, v in stats.items()}


def same_stats(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical statistics (NaN marks an empty history slot, and equals NaN here)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].nan_to_num(-1.0), b[k].nan_to_num(-1.0)) for k in a
    )


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
@pytest.mark.parametrize("where", ["after_warmup", "in_warmup"])
def test_nan_steps_change_no_statistic_and_the_spike_after_them_is_clipped(mode, where):
    healthy = spiky_norms(10, {}, seed=4)
    at = 8 if where == "after_warmup" else 3
    bad = [NAN, INF, NAN]
    with_nan, without = Driver(adaptive(mode)), Driver(adaptive(mode))
    with_nan.run(healthy[:at])
    without.run(healthy[:at])
    before = stats_of(with_nan.rule)
    for x, (got, _) in zip(bad, with_nan.run(bad)):
        assert same(got, x)  # left as it was, for the NaN policy
    assert same_stats(before, stats_of(with_nan.rule))
    tail = [*healthy[at:], 40.0]
    a, b = with_nan.run(tail), without.run(tail)
    assert a == b
    assert a[-1][0] < 2.0  # the spike
    assert same_stats(stats_of(without.rule), stats_of(with_nan.rule))


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_a_bad_step_with_a_finite_norm_changes_no_statistic(mode):
    # e.g. a NaN loss or input flagged by the detector: the gradients may look fine, the step is skipped.
    rule = adaptive(mode)
    for x in spiky_norms(8, {}, seed=5):
        rule.clip_(hand_step([torch.tensor([x])]))
    before = stats_of(rule)
    rule.clip_(hand_step([torch.tensor([1.3])], bad=True))
    assert same_stats(before, stats_of(rule))


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_scaled_fp16_fused_gradients_are_clipped_by_the_true_norm(mode):
    plain, scaled = adaptive(mode), adaptive(mode)
    scale = 2.0**10
    for x in [*spiky_norms(8, {}, seed=6), 30.0]:
        a, b = torch.tensor([x]), torch.tensor([x * scale])
        ra = plain.clip_(hand_step([a]))
        rb = scaled.clip_(hand_step([b], inv_scale=1.0 / scale))
        assert torch.equal(b, a * scale)
        assert same(float(ra.threshold), float(rb.threshold))
    assert a.item() < 2.0


# ============================================================================= all three: no host reads
def reads_rule(mode):
    return {
        "agc": lambda: AdaptiveGradClip(clip_factor=0.05),
        "zscore": lambda: ZScoreClip(warmup_steps=3, max_norm=5.0),
        "percentile": lambda: PercentileClip(history_size=4, warmup_steps=3),
    }[mode]()


@pytest.mark.parametrize("mode", ["agc", "zscore", "percentile"])
def test_no_host_read_in_the_rule_or_the_engine_warm_up_and_nan_steps_included(mode):
    norms = [1.0, 1.1, 0.9, 1.0, NAN, INF, 1.05, 30.0, 1.0]
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = ClipEngine(reads_rule(mode), Ignore())
    engine.attach([opt], net.named_parameters())
    rule = reads_rule(mode)
    engine_reads, rule_reads = [], []
    for x in norms:
        for p in net.parameters():
            p.grad = torch.full_like(p, x)
        with count_host_reads() as reads:
            engine.step(opt, log=False)
        engine_reads.append(reads.count)
        grads = [torch.full_like(p, x) for p in net.parameters()]
        step = hand_step(grads, list(net.parameters()), log=False)
        with count_host_reads() as reads:
            rule.clip_(step)
        rule_reads.append(reads.count)
    assert engine_reads == [0] * len(norms)
    assert rule_reads == [0] * len(norms)


# ============================================================================= resume
def resume_case(mode):
    return {
        "zscore": lambda: ZScoreClip(warmup_steps=6, max_norm=3.0),
        "zscore_mean": lambda: ZScoreClip(warmup_steps=6, clip_option="mean"),
        "percentile": lambda: PercentileClip(percentile=25.0, history_size=5, warmup_steps=6),
    }[mode]()


@pytest.mark.parametrize("mode", ["zscore", "zscore_mean", "percentile"])
@pytest.mark.parametrize("split", [3, 12])
def test_a_resumed_engine_clips_the_first_spike_and_continues_bit_identically(mode, split):
    norms = spiky_norms(20, {split: 25.0, split + 4: NAN, split + 5: 12.0}, seed=7)
    uninterrupted = Driver(resume_case(mode)).run(norms)
    first = Driver(resume_case(mode))
    first.run(norms[:split])
    buffer = io.BytesIO()
    torch.save(first.engine.state_dict(), buffer)  # through a checkpoint file: plain values and CPU tensors
    buffer.seek(0)
    resumed = Driver(resume_case(mode), engine_state=torch.load(buffer))
    after = resumed.run(norms[split:])
    for (g_resumed, t_resumed), (g_full, t_full) in zip(after, uninterrupted[split:]):
        assert same(g_resumed, g_full) and same(t_resumed, t_full)  # bit-identical gradients and thresholds
    if split > 6:  # past warm-up: the very first step after resume is a clipped spike
        assert after[0][0] < 25.0 / 4


def test_zclip_keeps_no_state_so_a_restart_warms_up_again_and_lets_the_spike_through():
    # Deliberate difference: ZClip has no state_dict; a restarted run lets the first spike through.
    ZClip = zclip_class()
    assert not hasattr(ZClip(), "state_dict")
    model = torch.nn.Linear(1, 1, bias=False)
    restarted = ZClip(warmup_steps=6, max_grad_norm=None)
    model.weight.grad = torch.tensor([[25.0]])
    restarted.step(model)
    assert model.weight.grad.item() == 25.0


# ============================================================================= per optimizer, registry, options
def test_each_optimizer_keeps_its_own_statistics():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt_a, opt_b = torch.optim.SGD([a], lr=0.0), torch.optim.SGD([b], lr=0.0)
    engine = ClipEngine(ZScoreClip(warmup_steps=4), Ignore())
    engine.attach([opt_a, opt_b])
    alone = Driver(ZScoreClip(warmup_steps=4))
    for x in spiky_norms(8, {}, seed=8):
        a.grad, b.grad = torch.tensor([x]), torch.tensor([100.0 * x])
        engine.step(opt_a)
        engine.step(opt_b)
        alone.feed(x)
    assert torch.equal(engine.rule_of(0).mean, alone.rule.mean)
    assert engine.rule_of(1).mean.item() == pytest.approx(100.0 * alone.rule.mean.item(), rel=1e-6)


def test_the_three_modes_are_registered_and_build_with_their_defaults():
    for mode, cls in (("agc", AdaptiveGradClip), ("zscore", ZScoreClip), ("percentile", PercentileClip)):
        assert RULES[mode] is cls
        rule = build_rule(mode, max_norm=1.0)
        assert type(rule) is cls and rule.describe() == cls().describe()
        assert GradientClipping(mode=mode).engine.rule.mode == mode
    assert build_rule("zscore", max_norm=1.0).max_norm is None  # the callback's max_norm is norm mode's
    assert GradientClipping(rule=ZScoreClip(max_norm=2.0)).mode == "zscore"
    with pytest.raises(ValueError, match="replaces `mode`"):
        GradientClipping(mode="agc", rule=ZScoreClip())


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: AdaptiveGradClip(clip_factor=0.0), "clip_factor"),
        (lambda: AdaptiveGradClip(eps=-1.0), "eps"),
        (lambda: AdaptiveGradClip(exclude=[1]), "exclude"),
        (lambda: ZScoreClip(z_threshold=-1.0), "z_threshold"),
        (lambda: ZScoreClip(ema_decay=1.0), "ema_decay"),
        (lambda: ZScoreClip(warmup_steps=0), "warmup_steps"),
        (lambda: ZScoreClip(max_norm=0.0), "max_norm"),
        (lambda: ZScoreClip(clip_option="median"), "clip_option"),
        (lambda: PercentileClip(percentile=101.0), "percentile"),
        (lambda: PercentileClip(history_size=0), "history_size"),
        (lambda: PercentileClip(warmup_steps=2.5), "warmup_steps"),
    ],
)
def test_a_bad_option_is_refused_naming_it(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()


@pytest.mark.parametrize("mode", ["agc", "zscore", "percentile"])
def test_the_example_config_builds_its_rule_through_the_callback(mode):
    config = yaml.safe_load((CONFIGS / f"{mode}.yaml").read_text())
    args = dict(config["trainer"]["callbacks"][0]["init_args"])
    spec = args.pop("rule")
    module, _, name = spec["class_path"].rpartition(".")
    rule = getattr(__import__(module, fromlist=[name]), name)(**spec.get("init_args", {}))
    callback = GradientClipping(rule=rule, **args)
    assert callback.mode == mode == args["mode"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["agc", "zscore", "percentile"])
def test_no_device_sync_on_cuda_warm_up_and_nan_steps_included(mode):
    # count_host_reads sees Python-level reads; sync debug mode also catches any inside ATen (sort, quantile).
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = ClipEngine(reads_rule(mode), Ignore())
    engine.attach([opt], net.named_parameters())
    for x in [1.0, 1.1, 0.9, 1.0, NAN, INF, 1.05, 30.0, 1.0]:
        for p in net.parameters():
            p.grad = torch.full_like(p, x)
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.step(opt, log=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert engine.counters["clipped_steps"] >= 1  # the spike, at least


def test_agc_refuses_sharded_gradients_instead_of_clipping_by_partial_unit_norms():
    w = torch.nn.Parameter(torch.ones(3, 4))
    g = torch.full((3, 4), 5.0)
    step = ClipInput(
        params=[w],
        grads=[g],
        names=["w"],
        norms=[g.norm()],
        total=g.norm(),
        finite=torch.tensor(True),
        bad=torch.tensor(False),
        norm_type=2.0,
        eps=1e-6,
        inv_scale=None,
        log=False,
        sharded=True,
    )
    with pytest.raises(ValueError, match=r"agc.*sharded"):
        AdaptiveGradClip().clip_(step)
    assert torch.equal(g, torch.full((3, 4), 5.0))  # nothing clipped by a partial norm
