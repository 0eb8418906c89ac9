"""The functional forms of the adaptive rules (``F.adaptive_clip_``, ``F.zscore_clip_``) and what a rule sees.

The functions are checked as the classes are in ``test_adaptive_rules.py``: against the published peers (timm's
``adaptive_clip_grad``, ``zclip.ZClip``) and against float64 references written here from the papers' formulas,
never with ``lightning_clip``. Then: the classes give bit-identical results to the functions (one implementation),
a plain loop calls the functions with neither Lightning nor the engine loaded, and the record/rules dependency runs
one way (a rule gets a read-only ``ClipInput``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peers import timm_agc, zclip_class
from test_adaptive_rules import ref_zscore  # ZClip in Python floats, the reference of both files

from lightning_clip import functional as F
from lightning_clip.engine import ClipEngine
from lightning_clip.record import ClipInput, StepRecord
from lightning_clip.remedies import Ignore
from lightning_clip.rules import AdaptiveGradClip, NormClip, ZScoreClip

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_clip"
NAN = float("nan")
INF = float("inf")
EPS = 1e-6


# ----------------------------------------------------------------------------- inputs
def agc_tensors(seed: int, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights and gradients of every kind of unit (Linear rows, Conv filters, a bias, a 0-dim gain, a wide
    matrix), the gradients spread over ~3 decades around 0.05 x the weights: some units clipped, some not."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 6), (5,), (4, 3, 3, 3), (), (7, 2), (3, 11)]
    weights, grads = [], []
    for shape in shapes:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        units = 1 if len(shape) <= 1 else shape[0]
        spread = torch.exp(2.0 * torch.randn(units, generator=g, dtype=torch.float64))
        spread = spread.reshape(()) if len(shape) <= 1 else spread.reshape(-1, *[1] * (len(shape) - 1))
        grads.append((0.05 * torch.randn(shape, generator=g, dtype=torch.float64) * spread).to(dtype))
        weights.append(w.to(dtype))
    return weights, grads


def params_with_grads(weights, grads) -> list[torch.nn.Parameter]:
    params = []
    for w, gr in zip(weights, grads):
        p = torch.nn.Parameter(w.clone())
        p.grad = gr.clone()
        params.append(p)
    return params


def spiky_norms(n: int, spikes: dict[int, float], seed: int) -> list[float]:
    """``n`` healthy norms around 1 (float32 values), with ``spikes`` (step -> norm) put in."""
    g = torch.Generator().manual_seed(seed)
    norms = (1.0 + 0.1 * torch.randn(n, generator=g)).tolist()
    for i, x in spikes.items():
        norms[i] = x
    return [float(torch.tensor(x, dtype=torch.float32)) for x in norms]


def grads_of_norm(x: float, seed: int) -> list[torch.Tensor]:
    """Three float32 tensors of random direction whose total 2-norm is ``x`` (NaN/Inf: the first element)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g), torch.randn((), generator=g)]
    if not math.isfinite(x):
        tensors[0][0, 0] = x
        return tensors
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    return [t * (x / norm) for t in tensors]


# ----------------------------------------------------------------------------- float64 references (by hand)
def ref_unit_norms(t: torch.Tensor, p: float) -> torch.Tensor:
    x = t.detach().double().abs().reshape(1 if t.ndim <= 1 else t.shape[0], -1)
    return x.max(1).values if math.isinf(p) else x.pow(p).sum(1).pow(1.0 / p)


def ref_agc(weights, grads, clip_factor: float, eps: float, p: float = 2.0) -> list[torch.Tensor]:
    """The paper's rule, per unit: G_i <- G_i * min(1, clip_factor * max(|W_i|, eps) / |G_i|)."""
    out = []
    for w, g in zip(weights, grads):
        cap = clip_factor * ref_unit_norms(w, p).clamp(min=eps)
        gn = ref_unit_norms(g, p)
        factor = torch.where(gn < cap, 1.0, cap / gn)
        out.append(g.double() * (factor.reshape(()) if g.ndim <= 1 else factor.reshape(-1, *[1] * (g.ndim - 1))))
    return out


def norm64(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


# ============================================================================= F.adaptive_clip_
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("clip_factor", [0.01, 0.05, 0.3])
@pytest.mark.parametrize("p", [2.0, 1.0, INF])
def test_adaptive_clip_equals_timm_adaptive_clip_grad(seed, clip_factor, p):
    timm = timm_agc()
    weights, grads = agc_tensors(seed)
    theirs = params_with_grads(weights, grads)
    ours = [g.clone() for g in grads]
    clipped = F.adaptive_clip_(ours, weights, clip_factor, eps=1e-3, norm_type=p)
    timm.adaptive_clip_grad(theirs, clip_factor=clip_factor, eps=1e-3, norm_type=p)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=1e-12)
    assert bool(clipped) == any(not torch.equal(a, g) for a, g in zip(ours, grads))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 3.0])
def test_adaptive_clip_equals_the_float64_reference_per_unit(seed, dtype, p):
    weights, grads = agc_tensors(seed, dtype)
    ours = [g.clone() for g in grads]
    F.adaptive_clip_(ours, weights, 0.05, 1e-3, p)
    expected = ref_agc(weights, grads, 0.05, 1e-3, p)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    clipped_units = 0
    for a, e, g in zip(ours, expected, grads):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=1e-15)
        clipped_units += int((ref_unit_norms(a, p) < ref_unit_norms(g, p) * (1 - 1e-6)).sum())
    assert 3 < clipped_units < sum(1 if g.ndim <= 1 else g.shape[0] for g in grads)


def test_adaptive_clip_caps_every_clipped_unit_at_its_bound_and_keeps_the_others_bit_identical():
    weights, grads = agc_tensors(5, torch.float64)
    ours = [g.clone() for g in grads]
    F.adaptive_clip_(ours, weights, 0.05, 1e-3)
    for w, g, a in zip(weights, grads, ours):
        cap, before, after = (
            0.05 * ref_unit_norms(w, 2.0).clamp(min=1e-3),
            ref_unit_norms(g, 2.0),
            ref_unit_norms(a, 2.0),
        )
        kept = before < cap
        assert torch.equal(after[kept], before[kept])
        torch.testing.assert_close(after[~kept], cap[~kept], rtol=1e-12, atol=0.0)


def test_adaptive_clip_leaves_a_non_finite_gradient_bit_identical_where_timm_turns_inf_into_nan():
    timm = timm_agc()
    weights, grads = agc_tensors(0)
    grads[0][0, 0] = INF
    theirs = params_with_grads(weights, grads)
    ours = [g.clone() for g in grads]
    clipped = F.adaptive_clip_(ours, weights, 0.05)
    assert not bool(clipped) and all(torch.equal(a, g) for a, g in zip(ours, grads))
    timm.adaptive_clip_grad(theirs, clip_factor=0.05)
    assert torch.isnan(theirs[0].grad[0, 0])


def test_adaptive_clip_with_finite_false_changes_nothing_and_says_so():
    weights, grads = agc_tensors(1)
    ours = [g.clone() for g in grads]
    assert not bool(F.adaptive_clip_(ours, weights, 0.01, finite=torch.tensor(False)))
    assert all(torch.equal(a, g) for a, g in zip(ours, grads))


def test_adaptive_clip_compares_scaled_gradients_in_true_units():
    scale = 2.0**12
    weights, grads = agc_tensors(2)
    plain = [g.clone() for g in grads]
    scaled = [g * scale for g in grads]
    F.adaptive_clip_(plain, weights, 0.05)
    F.adaptive_clip_(scaled, weights, 0.05, inv_scale=torch.tensor(1.0 / scale))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, a * scale, rtol=1e-6, atol=0.0)


def test_adaptive_clip_refuses_a_sparse_gradient_before_changing_anything():
    dense = torch.full((2, 3), 5.0)
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(ValueError, match=r"dense gradients; tensor 1 is torch.sparse_coo"):
        F.adaptive_clip_([dense, sparse], [torch.ones(2, 3), torch.ones(3, 3)])
    assert torch.equal(dense, torch.full((2, 3), 5.0))


def test_adaptive_clip_of_no_tensor_clips_nothing():
    assert not bool(F.adaptive_clip_([], []))


# ============================================================================= F.zscore_clip_
ZSCORE_CASES = {
    "adaptive": dict(option="adaptive_scaling", max_norm=None),
    "adaptive_capped": dict(option="adaptive_scaling", max_norm=1.15),
    "mean": dict(option="mean", max_norm=None),
    "fixed": dict(option="fixed", max_norm=None),
}
SPIKES = {12: 9.0, 20: 30.0, 21: 25.0, 33: 4.0}


def zclip_total(grads) -> torch.Tensor:
    """The total norm as ``ZClip._compute_grad_norm`` computes it (float32), so both see the same input."""
    return torch.sqrt(torch.sum(torch.pow(torch.stack([g.norm(2) for g in grads]), 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(ZSCORE_CASES))
def test_zscore_clip_equals_the_zclip_package(case, seed):
    ZClip = zclip_class()
    option, max_norm = ZSCORE_CASES[case]["option"], ZSCORE_CASES[case]["max_norm"]
    zmode, zoption = ("percentile", "adaptive_scaling") if option == "fixed" else ("zscore", option)
    theirs = ZClip(warmup_steps=8, max_grad_norm=max_norm, mode=zmode, clip_option=zoption)
    model = torch.nn.Module()
    model.a, model.b, model.c = (torch.nn.Parameter(torch.zeros(s)) for s in [(3, 2), (4,), ()])
    state = F.zscore_init(warmup_steps=8)
    clipped = 0
    for i, x in enumerate(spiky_norms(40, SPIKES, seed)):
        grads = grads_of_norm(x, seed * 100 + i)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        theirs.step(model)
        out = F.zscore_clip_(grads, zclip_total(grads), state, max_norm=max_norm, clip_option=option)
        state = out.state
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9, msg=f"step {i}")
        assert bool(state.initialized) == theirs.initialized, i
        if theirs.initialized:
            assert (state.mean.item(), state.var.item()) == pytest.approx((theirs.mean, theirs.var), rel=1e-12), i
        clipped += bool(out.coef < 1.0)
    assert clipped >= 3


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("case", list(ZSCORE_CASES))
def test_zscore_clip_equals_the_float64_reference(case, seed):
    option, max_norm = ZSCORE_CASES[case]["option"], ZSCORE_CASES[case]["max_norm"]
    norms = spiky_norms(40, SPIKES, seed)
    norms[5], norms[26] = NAN, INF  # left out, by both
    state = F.zscore_init(warmup_steps=8)
    for i, (x, (y, mean, var)) in enumerate(zip(norms, ref_zscore(norms, warmup=8, max_norm=max_norm, option=option))):
        grads = grads_of_norm(x, i)
        out = F.zscore_clip_(grads, torch.tensor(x), state, max_norm=max_norm, clip_option=option)
        state = out.state
        if math.isfinite(x):
            assert norm64(grads) == pytest.approx(y, rel=1e-6), i
        if mean is None:
            assert not bool(state.initialized), i
            assert math.isnan(out.threshold.item()) if max_norm is None else out.threshold.item() == max_norm, i
            continue
        assert (state.mean.item(), state.var.item()) == pytest.approx((mean, var), rel=1e-12), i


def zscore_warm_state(seed: int = 0) -> F.ZScoreState:
    state = F.zscore_init(warmup_steps=6)
    for i, x in enumerate(spiky_norms(10, {}, seed)):
        state = F.zscore_clip_(grads_of_norm(x, i), torch.tensor(x), state).state
    return state


def same_state(a: F.ZScoreState, b: F.ZScoreState) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("x", [NAN, INF])
def test_zscore_clip_leaves_a_non_finite_step_bit_identical_and_out_of_the_statistics(x):
    for state in (F.zscore_init(warmup_steps=6), zscore_warm_state()):
        grads = grads_of_norm(x, 7)
        before = [g.clone() for g in grads]
        out = F.zscore_clip_(grads, torch.tensor(x), state, max_norm=0.5)
        assert all(torch.equal(g.nan_to_num(-1.0), b.nan_to_num(-1.0)) for g, b in zip(grads, before))
        assert out.coef.item() == 1.0 and same_state(out.state, state)


def test_zscore_clip_with_healthy_false_still_clips_a_spike_but_learns_nothing_from_it():
    state = zscore_warm_state()
    grads = grads_of_norm(40.0, 8)
    out = F.zscore_clip_(grads, torch.tensor(40.0), state, healthy=torch.tensor(False))
    assert out.coef.item() < 0.1 and norm64(grads) < 2.0
    assert same_state(out.state, state)


def test_zscore_clip_returns_new_statistics_and_leaves_the_given_ones_as_they_were():
    # The state is explicit (optax-like): a caller may keep the old one (a snapshot) and it stays valid.
    state = F.zscore_init(warmup_steps=3)
    kept = copy.deepcopy(state)
    new = F.zscore_clip_(grads_of_norm(1.0, 0), torch.tensor(1.0), state).state
    assert same_state(state, kept)
    assert int(new.collected) == 1 and new.warmup_norms[0].item() == pytest.approx(1.0)


def test_zscore_clip_refuses_an_unknown_clip_option_by_name():
    with pytest.raises(ValueError, match=r"`clip_option` must be one of .*'fixed'.*got 'median'"):
        F.zscore_clip_([torch.ones(1)], torch.tensor(1.0), F.zscore_init(), clip_option="median")


# ============================================================================= the classes call the functions
def train_grads(seed: int, steps: int, spikes: dict[int, float], bad: dict[int, float]):
    """Gradient sets of a two-layer net, one per step: some scaled up (spikes), some with a NaN/Inf element."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    out = []
    for i in range(steps):
        grads = [torch.randn(s, generator=g) * 0.1 * spikes.get(i, 1.0) for s in shapes]
        if i in bad:
            grads[2][1, 1] = bad[i]
        out.append(grads)
    return out


def engine_for(rule, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, ClipEngine]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    engine = ClipEngine(rule, Ignore(), log_norms="total")
    engine.attach([opt], net.named_parameters())
    return net, opt, engine


@pytest.mark.parametrize("seed", [0, 1])
def test_the_agc_class_and_the_function_give_bit_identical_gradients(seed):
    net, opt, engine = engine_for(AdaptiveGradClip(clip_factor=0.02, eps=1e-3), seed)
    weights = [p.detach().clone() for p in net.parameters()]
    flags = []
    for grads in train_grads(seed, 12, {3: 50.0, 7: 0.01}, {5: INF, 9: NAN}):
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        metrics = engine.step(opt, log=True)
        mine = [g.clone() for g in grads]
        clipped = F.adaptive_clip_(mine, weights, 0.02, 1e-3)
        assert all(torch.equal(p.grad.nan_to_num(-1.0), m.nan_to_num(-1.0)) for p, m in zip(net.parameters(), mine))
        assert metrics["grad_clip/clipped"] == float(clipped)
        flags.append(bool(clipped))
    assert any(flags) and not all(flags)


@pytest.mark.parametrize("case", list(ZSCORE_CASES))
def test_the_zscore_class_and_the_function_give_bit_identical_gradients_and_statistics(case):
    option, max_norm = ZSCORE_CASES[case]["option"], ZSCORE_CASES[case]["max_norm"]
    net, opt, engine = engine_for(ZScoreClip(warmup_steps=5, max_norm=max_norm, clip_option=option), 0)
    state = F.zscore_init(warmup_steps=5)
    clipped = 0
    for grads in train_grads(0, 30, {9: 30.0, 17: 8.0, 18: 12.0, 26: 4.0}, {3: NAN, 12: INF}):
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        metrics = engine.step(opt, log=True)
        mine = [g.clone() for g in grads]
        out = F.zscore_clip_(mine, F.total_norm(F.grad_norms(mine)), state, max_norm=max_norm, clip_option=option)
        state = out.state
        assert all(torch.equal(p.grad.nan_to_num(-1.0), m.nan_to_num(-1.0)) for p, m in zip(net.parameters(), mine))
        assert same_state(engine.rule_of(0).stats.current(), state)
        threshold = metrics.get("grad_clip/threshold", NAN)
        assert threshold == pytest.approx(out.threshold.item(), rel=1e-6, nan_ok=True)
        clipped += bool(out.coef < 1.0)
    assert clipped >= 3


# ============================================================================= a plain loop, alone
# A fresh interpreter that knows the package only as a directory: ``lightning_clip/__init__.py`` (which imports the
# callback, hence Lightning) is never run, so what loads is exactly what the imported module imports.
_BARE_PACKAGE = (
    "import json, sys, types\n"
    f"pkg = types.ModuleType('lightning_clip'); pkg.__path__ = [{str(PACKAGE)!r}]\n"
    "sys.modules['lightning_clip'] = pkg\n"
)


def _run_bare(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _BARE_PACKAGE + code], capture_output=True, text=True, timeout=180, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PLAIN_LOOP = """
import torch
from lightning_clip import functional as F

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(64, 4), torch.randn(64, 1)
state = F.zscore_init(warmup_steps=5)
losses, coefs, agc = [], [], []
for step in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y) * (1000.0 if step == 20 else 1.0)  # one spike
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    total = F.total_norm(F.grad_norms(grads))
    out = F.zscore_clip_(grads, total, state)  # a spike of the total norm first, then each unit against its weights
    state = out.state
    agc.append(bool(F.adaptive_clip_(grads, params, clip_factor=0.5)))
    coefs.append(out.coef.item())
    losses.append(loss.item())
    opt.step()
modules = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning_clip', 'lightning', 'pytorch_lightning'))
print(json.dumps({'losses': losses, 'coefs': coefs, 'agc': agc, 'modules': modules,
                  'initialized': bool(state.initialized)}))
"""


def test_a_plain_loop_calls_agc_and_the_zscore_clip_with_neither_lightning_nor_the_engine():
    run = _run_bare(PLAIN_LOOP)
    assert run["modules"] == ["lightning_clip", "lightning_clip.functional"]
    assert run["initialized"]
    coefs = run["coefs"]
    assert coefs[20] < 0.01  # the spike (x1000) cut back to about the usual norm
    assert all(c == 1.0 for i, c in enumerate(coefs) if i != 20)
    assert any(run["agc"]) and not all(run["agc"])
    assert run["losses"][-1] < run["losses"][0]  # it trained, the spike step included


# ============================================================================= record -> rules: one way
def test_the_record_module_imports_no_rule_even_for_type_hints():
    run = _run_bare(
        "import lightning_clip.record\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lightning_clip'))))"
    )
    assert run == ["lightning_clip", "lightning_clip.functional", "lightning_clip.record"]
    tree = ast.parse((PACKAGE / "record.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith("lightning_clip.rules")}


def test_the_step_record_has_no_dead_rule_field_and_its_view_copies_every_field_a_rule_sees():
    record_fields = {f.name for f in dataclasses.fields(StepRecord)}
    assert "rule" not in record_fields
    view_fields = [f.name for f in dataclasses.fields(ClipInput)]
    assert set(view_fields) <= record_fields
    values = {name: object() for name in view_fields}
    step = StepRecord(**values)  # type: ignore[arg-type]  # sentinels: the view must pass each one on as it is
    view = step.clip_input()
    assert all(getattr(view, name) is values[name] for name in view_fields)


class SeeingRule(NormClip):
    """Keeps what the engine hands it."""

    def __init__(self) -> None:
        super().__init__(1e6)
        self.seen: list[ClipInput] = []

    def clip_(self, step):
        self.seen.append(step)
        return super().clip_(step)


def test_a_rule_gets_a_read_only_view_of_the_step_not_the_record():
    net, opt, engine = engine_for(SeeingRule(), 0)
    net(torch.randn(5, 3)).sum().backward()
    engine.step(opt, log=True)
    (view,) = engine.rule_of(0).seen
    assert type(view) is ClipInput
    assert list(view.names) == ["0.weight", "0.bias", "1.weight", "1.bias"] and view.log
    assert view.total.item() == pytest.approx(norm64([p.grad for p in net.parameters()]), rel=1e-6)
    assert not hasattr(view, "optimizer") and not hasattr(view, "counters")
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.total = torch.tensor(0.0)  # type: ignore[misc]
