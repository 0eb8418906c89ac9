"""Each clip rule (``lightning_clip.rules``) on its own: a ``ClipInput`` built by hand, no engine, no Lightning.

The total norm a rule receives is computed here, in float64, from the tensors themselves (never with
``lightning_clip.functional``), so the rules are checked against an independent reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_clip.host_reads import count_host_reads
from lightning_clip.rules import RULES, ClipInput, ClipRule, NoClip, NormClip, ValueClip, build_rule
from lightning_clip.rules.value import out_of_range

INF = float("inf")
NAN = float("nan")
EPS = 1e-6


# ----------------------------------------------------------------------------- helpers
def flat64(tensors):
    return torch.cat([t.detach().to(torch.float64).reshape(-1) for t in tensors])


def ref_norm(tensors, p):
    """||g||_p of all tensors taken as one float64 vector, by hand."""
    v = flat64(tensors).abs()
    if math.isinf(p):
        return v.max().item()
    return (v.pow(p).sum() ** (1.0 / p)).item()


def make_step(grads, p=2.0, *, total=None, log=True, bad=None, eps=EPS):
    """The ClipInput the engine would hand a rule, with the total from the float64 reference (or ``total``)."""
    params = [torch.zeros_like(g) for g in grads]
    total_t = torch.tensor(ref_norm(grads, p) if total is None else total, dtype=torch.float64)
    norms = [torch.tensor(ref_norm([g], p), dtype=torch.float64) for g in grads]
    finite = torch.isfinite(total_t)
    return ClipInput(
        params=params,
        grads=grads,
        names=[f"p{i}" for i in range(len(grads))],
        norms=norms,
        total=total_t,
        finite=finite,
        bad=~finite if bad is None else torch.tensor(bad),
        norm_type=p,
        eps=eps,
        inv_scale=None,
        log=log,
    )


def mixed_grads(scale=1.0, seed=0):
    """float32 + float64 + bfloat16 gradients of assorted shapes."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 4, generator=g) * scale,
        (torch.randn(5, generator=g) * scale).to(torch.float64),
        (torch.randn(2, 3, generator=g) * scale).to(torch.bfloat16),
        torch.tensor(-2.5 * scale),
        (torch.randn(4, 2, generator=g) * scale).to(torch.float64),
    ]


def clones(tensors):
    return [t.clone() for t in tensors]


def all_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- NormClip
@pytest.mark.parametrize("p", [1.0, 2.0, INF, 3.0])
def test_norm_clip_brings_the_float64_total_to_max_norm_on_float32_and_float64(p):
    grads = [t for t in mixed_grads(scale=10.0) if t.dtype != torch.bfloat16]
    assert ref_norm(grads, p) > 2.0
    result = NormClip(max_norm=2.0).clip_(make_step(grads, p))
    assert ref_norm(grads, p) == pytest.approx(2.0, rel=1e-5)
    assert result.total_after.item() == pytest.approx(2.0, rel=1e-5)
    assert bool(result.clipped)
    assert result.threshold == 2.0


@pytest.mark.parametrize("p", [1.0, 2.0, INF, 3.0])
def test_norm_clip_scales_every_dtype_by_one_coefficient_including_bfloat16(p):
    grads = mixed_grads(scale=10.0)
    before = clones(grads)
    total = ref_norm(grads, p)
    result = NormClip(max_norm=2.0).clip_(make_step(grads, p))
    coef = 2.0 / (total + EPS)
    for b, a in zip(before, grads):
        assert a.dtype == b.dtype
        # every tensor is its float64 ideal rounded to its own dtype (bf16 holds 8 bits: 2^-7 relative)
        rtol = 2**-7 if b.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64) * coef, rtol=rtol, atol=0.0)
    # the total of the ideal (unrounded) result is exactly max_norm; the rounded one within bfloat16 precision
    assert ref_norm([b.to(torch.float64) * coef for b in before], p) == pytest.approx(2.0, rel=1e-5)
    assert ref_norm(grads, p) == pytest.approx(2.0, rel=2**-7)
    assert result.total_after.item() == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, INF, 3.0])
def test_norm_clip_leaves_gradients_below_max_norm_bit_identical_and_not_clipped(p):
    grads = mixed_grads(scale=0.01)
    before = clones(grads)
    assert ref_norm(grads, p) < 1.0
    result = NormClip(max_norm=1.0).clip_(make_step(grads, p))
    assert all_equal(before, grads)
    assert not bool(result.clipped)
    assert result.total_after.item() == pytest.approx(ref_norm(grads, p), rel=1e-6)


@pytest.mark.parametrize("total", [NAN, INF])
def test_norm_clip_with_a_non_finite_total_leaves_finite_gradients_bit_identical(total):
    # The coefficient is exactly 1 (not max_norm / nan): even huge gradients are not touched.
    grads = mixed_grads(scale=1e3)
    before = clones(grads)
    result = NormClip(max_norm=1.0).clip_(make_step(grads, total=total))
    assert all_equal(before, grads)
    assert not bool(result.clipped)


def test_norm_clip_with_a_nan_gradient_keeps_the_nan_and_leaves_the_other_tensors_bit_identical():
    grads = mixed_grads(scale=1e3)
    grads[1][2] = NAN
    before = clones(grads)
    step = make_step(grads)
    assert math.isnan(step.total.item())
    result = NormClip(max_norm=1.0).clip_(step)
    for i, (b, a) in enumerate(zip(before, grads)):
        if i == 1:
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            assert torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
        else:
            assert torch.equal(a, b)
    assert not bool(result.clipped)


def test_norm_clip_flag_is_true_exactly_when_the_gradients_were_scaled():
    for scale, expect in ((0.01, False), (100.0, True)):
        grads = mixed_grads(scale=scale)
        before = clones(grads)
        result = NormClip(max_norm=1.0).clip_(make_step(grads))
        assert bool(result.clipped) is expect
        assert (not all_equal(before, grads)) is expect


def test_norm_clip_skips_total_after_on_non_logging_steps():
    result = NormClip(max_norm=1.0).clip_(make_step(mixed_grads(scale=10.0), log=False))
    assert result.total_after is None and bool(result.clipped)


def test_norm_clip_refuses_a_non_positive_or_infinite_max_norm_naming_it():
    for bad in (0.0, -1.0, INF, NAN):
        with pytest.raises(ValueError, match="`max_norm`"):
            NormClip(max_norm=bad)


# ----------------------------------------------------------------------------- ValueClip
@pytest.mark.parametrize(
    ("kwargs", "lo", "hi"),
    [
        (dict(clip_value=0.5), -0.5, 0.5),
        (dict(min_value=-0.5, max_value=0.5), -0.5, 0.5),
        (dict(min_value=-0.25, max_value=1.0), -0.25, 1.0),
        (dict(min_value=-0.25), -0.25, INF),
        (dict(max_value=0.75), -INF, 0.75),
    ],
)
def test_value_clip_clamps_out_of_range_elements_and_keeps_in_range_elements_bit_identical(kwargs, lo, hi):
    grads = mixed_grads(scale=2.0)
    before = clones(grads)
    result = ValueClip(**kwargs).clip_(make_step(grads))
    for b, a in zip(before, grads):
        inside = (b >= lo) & (b <= hi)
        assert torch.equal(a[inside], b[inside])
        assert torch.equal(a[b > hi], torch.full_like(b[b > hi], hi))
        assert torch.equal(a[b < lo], torch.full_like(b[b < lo], lo))
    assert bool(result.clipped)
    assert result.total_after.item() == pytest.approx(ref_norm(grads, 2.0), rel=1e-5)


@pytest.mark.parametrize(
    ("where", "expect"),
    [("below_min", True), ("above_max", True), ("at_bounds", False), ("inside", False)],
)
def test_value_clip_flag_on_each_side_of_an_asymmetric_range(where, expect):
    value = {"below_min": -0.3, "above_max": 1.2, "at_bounds": -0.25, "inside": 0.9}[where]
    grads = [torch.tensor([0.1, -0.2, value, 1.0]), torch.tensor([0.5, -0.1], dtype=torch.float64)]
    before = clones(grads)
    result = ValueClip(min_value=-0.25, max_value=1.0).clip_(make_step(grads))
    assert bool(result.clipped) is expect
    assert (not all_equal(before, grads)) is expect


@pytest.mark.parametrize(
    "kwargs", [dict(min_value=-0.25, max_value=1.0), dict(clip_value=1.0), dict(min_value=-0.25), dict(max_value=1.0)]
)
@pytest.mark.parametrize("culprit", [0, 1, 2])
@pytest.mark.parametrize("side", ["low", "high"])
def test_value_clip_flag_when_only_one_tensor_of_several_is_out_of_range(kwargs, culprit, side):
    lo, hi = (
        kwargs.get("min_value", -kwargs.get("clip_value", INF)),
        kwargs.get("max_value", kwargs.get("clip_value", INF)),
    )
    grads = [torch.full((3,), 0.1), torch.full((2, 2), -0.1, dtype=torch.float64), torch.full((4,), 0.2).bfloat16()]
    out = (lo - 1.0) if side == "low" else (hi + 1.0)
    grads[culprit].view(-1)[1] = out
    before = clones(grads)
    result = ValueClip(**kwargs).clip_(make_step(grads))
    expect = math.isfinite(out)  # an infinite missing bound: nothing is out of range
    assert bool(result.clipped) is expect
    for i, (b, a) in enumerate(zip(before, grads)):
        assert torch.equal(a, b) is not (expect and i == culprit)


def test_value_clip_flag_is_false_when_every_tensor_is_in_range():
    grads = [torch.full((3,), 0.5), torch.full((2,), -0.5, dtype=torch.float64), torch.zeros(0)]
    before = clones(grads)
    for rule in (ValueClip(clip_value=0.5), ValueClip(min_value=-0.5, max_value=0.75)):
        assert not bool(rule.clip_(make_step(grads)).clipped)
    assert all_equal(before, grads)


@pytest.mark.parametrize("kwargs", [dict(clip_value=0.5), dict(min_value=-0.25, max_value=1.0)])
def test_value_clip_keeps_nan_as_nan(kwargs):
    grads = [torch.tensor([NAN, 0.1, 3.0, -3.0])]
    ValueClip(**kwargs).clip_(make_step(grads))
    assert math.isnan(grads[0][0].item())
    assert grads[0][1].item() == pytest.approx(0.1)
    assert grads[0][2].item() == kwargs.get("max_value", kwargs.get("clip_value"))


def test_value_clip_flag_agrees_between_symmetric_and_asymmetric_range_at_a_bfloat16_bound():
    edge = torch.tensor([0.1, -0.05]).bfloat16()  # 0.1 rounds up to 0.10009765625 in bfloat16
    flags = {}
    for label, rule in (
        ("symmetric", ValueClip(clip_value=0.1)),
        ("asymmetric", ValueClip(min_value=-1.0, max_value=0.1)),
    ):
        grads = [edge.clone()]
        flags[label] = bool(rule.clip_(make_step(grads)).clipped)
        assert torch.equal(grads[0], edge)  # the clamp changed nothing
    assert flags == {"symmetric": False, "asymmetric": False}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(max_value=-INF), "max_value"),
        (dict(max_value=INF), "max_value"),
        (dict(min_value=INF), "min_value"),
        (dict(min_value=-INF), "min_value"),
        (dict(min_value=-INF, max_value=INF), "min_value"),
        (dict(min_value=-1.0, max_value=INF), "max_value"),
        (dict(min_value=INF, max_value=-INF), "min_value"),
        (dict(clip_value=INF), "clip_value"),
        (dict(min_value=NAN), "min_value"),
    ],
)
def test_value_clip_refuses_infinite_or_nan_bounds_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ValueClip(**kwargs)


def test_value_clip_refuses_inverted_mixed_or_missing_bounds():
    with pytest.raises(ValueError, match=r"`min_value`.*`max_value`"):
        ValueClip(min_value=1.0, max_value=-1.0)
    with pytest.raises(ValueError, match="clip_value"):
        ValueClip(clip_value=1.0, min_value=-1.0)
    with pytest.raises(ValueError, match="needs a bound"):
        ValueClip()


@pytest.mark.parametrize(
    "bounds", [(-0.5, 0.5), (-0.25, 1.0), (None, 1.0), (-0.25, None)], ids=["symmetric", "asymmetric", "max", "min"]
)
def test_out_of_range_makes_no_host_read(bounds):
    grads = [*mixed_grads(scale=2.0), torch.zeros(0)]
    with count_host_reads() as reads:
        flag = out_of_range(grads, *bounds)
    assert reads.count == 0, reads.calls
    assert flag.dtype == torch.bool and flag.dim() == 0
    assert bool(flag)


# ----------------------------------------------------------------------------- NoClip
@pytest.mark.parametrize("scale", [1e-3, 1e6])
def test_no_clip_never_changes_gradients_and_never_reports_clipped(scale):
    grads = mixed_grads(scale=scale)
    grads[0][0, 0] = INF
    before = clones(grads)
    for total in (None, INF):
        result = NoClip().clip_(make_step(grads, total=total))
        assert all_equal(before, grads)
        assert not bool(result.clipped)
        assert result.threshold is None


def test_no_clip_reports_the_total_as_the_norm_after_clipping():
    grads = mixed_grads(scale=100.0)
    result = NoClip().clip_(make_step(grads))
    assert result.total_after.item() == pytest.approx(ref_norm(grads, 2.0), rel=1e-12)


# ----------------------------------------------------------------------------- registry and state
def test_registry_holds_every_mode_and_build_rule_builds_each():
    assert set(RULES) == {"norm", "value", "none", "agc", "zscore", "percentile"}
    built = {mode: build_rule(mode, max_norm=3.0, **({"clip_value": 0.5} if mode == "value" else {})) for mode in RULES}
    for mode, rule in built.items():
        assert isinstance(rule, RULES[mode]) and rule.mode == mode
    assert built["norm"].max_norm == 3.0
    assert (built["value"].min_value, built["value"].max_value) == (-0.5, 0.5)


def test_build_rule_passes_strict_options_the_mode_reads_and_accepts_unset_ones():
    rule = build_rule("value", strict={"clip_value": None, "min_value": -0.2, "max_value": 0.4}, max_norm=1.0)
    assert (rule.min_value, rule.max_value) == (-0.2, 0.4)
    rule = build_rule("norm", strict={"clip_value": None, "min_value": None, "max_value": None}, max_norm=2.0)
    assert isinstance(rule, NormClip) and rule.max_norm == 2.0


def test_build_rule_refuses_an_unknown_mode_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="`mode`") as info:
        build_rule("clamp")
    for mode in RULES:
        assert repr(mode) in str(info.value)
    assert "'clamp'" in str(info.value)


@pytest.mark.parametrize(("mode", "option"), [("norm", "clip_value"), ("norm", "min_value"), ("none", "max_value")])
def test_build_rule_refuses_a_strict_option_the_mode_would_ignore(mode, option):
    with pytest.raises(ValueError, match=f"`{option}` does not apply to mode={mode!r}"):
        build_rule(mode, strict={option: 0.5})


@pytest.mark.parametrize("rule", [NormClip(1.0), ValueClip(clip_value=1.0), ValueClip(min_value=-1.0), NoClip()])
def test_stateless_rules_have_an_empty_state_dict(rule):
    assert isinstance(rule, ClipRule)
    assert rule.state_dict() == {}
    rule.load_state_dict({})  # and accept one back
    assert rule.state_dict() == {}
