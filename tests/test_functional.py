"""The pure gradient math in ``lightning_clip.functional``, checked against independent float64 references.

Every reference here concatenates the tensors into one float64 vector and uses
``torch.linalg.vector_norm`` or a hand-written formula; no library function is used as a reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_clip import functional as F

INF = float("inf")
NORM_TYPES = [1.0, 2.0, INF, 0.5, 3.0]


# ----------------------------------------------------------------------------- references
def flat64(tensors):
    """All elements of ``tensors`` as one float64 vector (the reference's view of the gradient)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().to(torch.float64).reshape(-1) for t in tensors])


def ref_norm(tensors, p):
    """||g||_p of all tensors taken as one vector, by hand, in float64."""
    v = flat64(tensors).abs()
    if v.numel() == 0:
        return 0.0
    if math.isinf(p):
        return v.max().item()
    return (v.pow(p).sum() ** (1.0 / p)).item()


def mixed_tensors(seed=0):
    """float32 + float16 + bfloat16 tensors of assorted shapes (0-dim, 1-D, 2-D, 3-D, 4-D)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 4, generator=g),  # float32, 2-D
        (torch.randn(5, generator=g) * 3).to(torch.float16),  # float16, 1-D
        torch.randn(2, 3, 2, generator=g).to(torch.bfloat16),  # bfloat16, 3-D
        torch.tensor(-2.5),  # float32, 0-dim
        (torch.randn(7, generator=g) * 0.01).to(torch.float16),  # float16, small values
        torch.randn(2, 1, 3, 2, generator=g) * 10,  # float32, 4-D
        torch.randn(4, 4, generator=g).to(torch.bfloat16),  # bfloat16, 2-D
    ]


def cosine64(a, b):
    a, b = flat64(a), flat64(b)
    return (a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))).item()


# ----------------------------------------------------------------------------- grad_norms / total_norm
@pytest.mark.parametrize("p", NORM_TYPES)
def test_grad_norms_match_float64_reference_per_tensor_on_mixed_dtypes_and_shapes(p):
    tensors = mixed_tensors()
    norms = F.grad_norms(tensors, p)
    assert len(norms) == len(tensors)
    for t, n in zip(tensors, norms):
        assert n.dim() == 0
        assert n.dtype == torch.float32, "reduced-precision norms must be accumulated in float32"
        assert n.item() == pytest.approx(ref_norm([t], p), rel=1e-5)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_total_norm_equals_norm_of_all_tensors_as_one_float64_vector(p):
    tensors = mixed_tensors(seed=1)
    total = F.total_norm(F.grad_norms(tensors, p), p)
    assert total.dim() == 0
    expected = torch.linalg.vector_norm(flat64(tensors), p).item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # the hand formula and torch's float64 vector norm agree (the reference itself is sound)
    assert expected == pytest.approx(ref_norm(tensors, p), rel=1e-12)


def test_grad_norms_of_float16_accumulate_in_float32_and_do_not_overflow():
    # sum of squares = 10000 * 100^2 = 1e8 overflows float16 (max 65504); the norm itself (1e4) does not.
    t = torch.full((10000,), 100.0, dtype=torch.float16)
    (n,) = F.grad_norms([t], 2.0)
    assert torch.isfinite(n)
    assert n.item() == pytest.approx(1e4, rel=1e-6)


def test_grad_norms_of_bfloat16_accumulate_in_float32_and_do_not_stall():
    # bfloat16 has 8 mantissa bits: summing 10000 ones in bfloat16 stalls at 256.
    t = torch.ones(10000, dtype=torch.bfloat16)
    (n,) = F.grad_norms([t], 1.0)
    assert n.item() == pytest.approx(10000.0, rel=1e-6)


def test_grad_norms_keep_the_input_order_across_dtype_groups():
    tensors = [
        torch.tensor([1.0]),
        torch.tensor([2.0], dtype=torch.float16),
        torch.tensor([3.0]),
        torch.tensor([4.0], dtype=torch.bfloat16),
        torch.tensor([5.0], dtype=torch.float16),
    ]
    assert [n.item() for n in F.grad_norms(tensors, 2.0)] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_grad_norms_of_float64_tensors_stay_float64():
    t = torch.tensor([1e-200, 1e-200], dtype=torch.float64)  # would underflow to 0 in float32
    (n,) = F.grad_norms([t], 2.0)
    assert n.dtype == torch.float64
    assert n.item() == pytest.approx(math.sqrt(2) * 1e-200, rel=1e-12)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_total_norm_of_empty_list_is_zero(p):
    total = F.total_norm([], p)
    assert total.dim() == 0
    assert total.item() == 0.0
    assert F.grad_norms([], p) == []


# ----------------------------------------------------------------------------- all_reduce (sharded)
def _two_shards():
    """A vector split into two shards of several pieces each, like FSDP's flat shards."""
    g = torch.Generator().manual_seed(3)
    full = torch.randn(40, generator=g) * 4
    full[17] = -25.0  # the inf-norm lives in shard B
    pieces_a = [full[:5], full[5:12].reshape(7, 1)]
    pieces_b = [full[12:30].reshape(3, 6), full[30:]]
    return full, pieces_a, pieces_b


@pytest.mark.parametrize("p", [1.0, 2.0, INF])
def test_total_norm_with_all_reduce_over_two_shards_equals_full_vector_norm(p):
    full, pieces_a, pieces_b = _two_shards()
    expected = torch.linalg.vector_norm(full.double(), p).item()

    # What each rank contributes to the collective, computed independently in float64.
    def contribution(pieces):
        v = flat64(pieces).abs()
        return v.max().item() if math.isinf(p) else v.pow(p).sum().item()

    for local, other in ((pieces_a, pieces_b), (pieces_a, pieces_b)[::-1]):
        other_part = contribution(other)
        ops = []

        def reducer(t, op, other_part=other_part, ops=ops):
            # A plain two-rank reduction: this rank's partial result combined with the other rank's.
            ops.append(op)
            other_t = torch.tensor(other_part, dtype=t.dtype)
            return torch.maximum(t, other_t) if op == "max" else t + other_t

        total = F.total_norm(F.grad_norms(local, p), p, all_reduce=reducer)
        assert ops == (["max"] if math.isinf(p) else ["sum"]), "all_reduce must be called exactly once"
        assert total.item() == pytest.approx(expected, rel=1e-5)
        # without the reduction the shard's own norm is different (the test would notice a skipped reduce)
        local_only = F.total_norm(F.grad_norms(local, p), p).item()
        if not (math.isinf(p) and local is pieces_b):
            assert local_only != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("p", [0.5, 3.0])
def test_total_norm_with_all_reduce_reduces_the_sum_of_pth_powers_for_other_p(p):
    full, pieces_a, pieces_b = _two_shards()
    other = flat64(pieces_b).abs().pow(p).sum().item()
    total = F.total_norm(F.grad_norms(pieces_a, p), p, all_reduce=lambda t, op: t + other)
    assert total.item() == pytest.approx(torch.linalg.vector_norm(full.double(), p).item(), rel=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, INF])
def test_total_norm_with_all_reduce_on_a_rank_without_local_gradients_still_joins_the_reduction(p):
    # A rank whose shard holds no gradient must still take part in the collective (or the other
    # ranks hang) and must end up with the same global norm as every other rank.
    full, _, _ = _two_shards()
    v = full.double().abs()
    other = v.max().item() if math.isinf(p) else v.pow(p).sum().item()
    calls = []

    def reducer(t, op):
        calls.append(op)
        other_t = torch.tensor(other, dtype=t.dtype)
        return torch.maximum(t, other_t) if op == "max" else t + other_t

    total = F.total_norm([], p, all_reduce=reducer)
    assert calls, "the rank with no local norms skipped the all_reduce"
    assert total.item() == pytest.approx(torch.linalg.vector_norm(full.double(), p).item(), rel=1e-5)


# ----------------------------------------------------------------------------- clip_by_norm_
@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_by_norm_brings_the_norm_to_max_norm_and_keeps_the_direction(p):
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(6, 5, generator=g) * 3, torch.randn(5, generator=g), torch.randn(2, 2, 2, generator=g) * 7]
    original = [t.clone() for t in grads]
    before = ref_norm(original, p)
    max_norm = before / 10
    coef = F.clip_by_norm_(grads, max_norm, F.total_norm(F.grad_norms(grads, p), p))

    assert coef.item() == pytest.approx(max_norm / (before + F.EPS), rel=1e-5)
    assert ref_norm(grads, p) == pytest.approx(max_norm, rel=1e-5)
    assert cosine64(grads, original) == pytest.approx(1.0, abs=1e-12)
    # every element scaled by the same factor
    expected = flat64(original) * (max_norm / (before + F.EPS))
    torch.testing.assert_close(flat64(grads), expected, rtol=1e-6, atol=1e-12)


def test_clip_by_norm_on_mixed_dtypes_scales_every_tensor_by_one_factor():
    grads = mixed_tensors(seed=5)
    original = [t.clone() for t in grads]
    before = ref_norm(original, 2.0)
    max_norm = before / 4
    F.clip_by_norm_(grads, max_norm, F.total_norm(F.grad_norms(grads, 2.0), 2.0))
    for t, o in zip(grads, original):
        assert t.dtype == o.dtype and t.shape == o.shape
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[t.dtype]
        torch.testing.assert_close(t.double(), o.double() * (max_norm / before), rtol=tol, atol=1e-6)
    assert ref_norm(grads, 2.0) == pytest.approx(max_norm, rel=1e-2)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_by_norm_leaves_gradients_under_the_threshold_bit_identical(p):
    grads = mixed_tensors(seed=6)
    original = [t.clone() for t in grads]
    coef = F.clip_by_norm_(grads, ref_norm(original, p) * 2, F.total_norm(F.grad_norms(grads, p), p))
    assert coef.item() == 1.0
    for t, o in zip(grads, original):
        assert torch.equal(t, o)


@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
def test_clip_by_norm_with_non_finite_total_leaves_gradients_untouched(bad):
    grads = [torch.tensor([3.0, bad, -4.0]), torch.tensor([[100.0, -200.0]])]
    original = [t.clone() for t in grads]
    total = F.total_norm(F.grad_norms(grads, 2.0), 2.0)
    assert not torch.isfinite(total)
    coef = F.clip_by_norm_(grads, 1.0, total)
    assert coef.item() == 1.0
    for t, o in zip(grads, original):
        finite = torch.isfinite(o)
        assert torch.equal(t[finite], o[finite])
        assert torch.equal(torch.isnan(t), torch.isnan(o))
        assert torch.equal(torch.isinf(t), torch.isinf(o))


@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_torch_clip_grad_norm_destroys_every_gradient_on_non_finite_norm_unlike_ours(bad):
    # The defect the library fixes: torch multiplies every gradient by max_norm / nan (or / inf).
    values = [torch.tensor([3.0, bad, -4.0]), torch.tensor([[100.0, -200.0]])]
    torch_params = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
    our_params = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
    for tp, op, v in zip(torch_params, our_params, values):
        tp.grad, op.grad = v.clone(), v.clone()

    torch.nn.utils.clip_grad_norm_(torch_params, max_norm=1.0, foreach=True)
    second = torch_params[1].grad
    if math.isnan(bad):
        assert all(torch.isnan(p.grad).all() for p in torch_params)
    else:  # inf norm: coefficient 0, finite gradients zeroed, inf * 0 = nan
        assert torch.equal(second, torch.zeros_like(second))
        assert torch.isnan(torch_params[0].grad[1])

    total = F.clip_grad_norm_(our_params, max_norm=1.0)
    assert not torch.isfinite(total)
    assert torch.equal(our_params[1].grad, values[1])
    assert torch.equal(our_params[0].grad[[0, 2]], values[0][[0, 2]])


@pytest.mark.parametrize("p", [1.0, 2.0, INF])
def test_clip_grad_norm_matches_torch_clip_grad_norm_on_finite_gradients(p):
    g = torch.Generator().manual_seed(7)
    values = [torch.randn(4, 3, generator=g) * 5, torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    ours = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
    theirs = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
    for a, b, v in zip(ours, theirs, values):
        a.grad, b.grad = v.clone(), v.clone()
    t_ours = F.clip_grad_norm_(ours, 0.5, norm_type=p)
    t_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type=p, foreach=True)
    assert t_ours.item() == pytest.approx(ref_norm(values, p), rel=1e-6)
    torch.testing.assert_close(t_ours, t_theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_skips_parameters_without_gradient_and_accepts_a_single_tensor():
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([6.0, 8.0])
    no_grad = torch.nn.Parameter(torch.ones(3))
    assert F.clip_grad_norm_([w, no_grad], max_norm=5.0).item() == pytest.approx(10.0)
    assert no_grad.grad is None
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]), rtol=1e-6, atol=0)
    single = torch.nn.Parameter(torch.ones(1))
    single.grad = torch.tensor([-7.0])
    assert F.clip_grad_norm_(single, max_norm=1.0).item() == 7.0
    assert single.grad.item() == pytest.approx(-1.0, rel=1e-6)


# ----------------------------------------------------------------------------- clip_by_value_
def _value_grads():
    g = torch.Generator().manual_seed(8)
    return [
        torch.randn(5, 6, generator=g) * 2,
        (torch.randn(9, generator=g) * 2).to(torch.float16),
        (torch.randn(3, 3, generator=g) * 2).to(torch.bfloat16),
    ]


@pytest.mark.parametrize(
    "lo,hi",
    [(-1.0, 1.0), (-0.5, None), (None, 0.75), (-0.25, 1.5)],
    ids=["symmetric", "only-min", "only-max", "asymmetric-both"],
)
def test_clip_by_value_clamps_out_of_range_to_the_bound_and_keeps_in_range_bit_identical(lo, hi):
    grads = _value_grads()
    original = [t.clone() for t in grads]
    F.clip_by_value_(grads, min_value=lo, max_value=hi)
    saw_low = saw_high = saw_in = False
    for t, o in zip(grads, original):
        assert t.dtype == o.dtype and t.shape == o.shape
        below = o < lo if lo is not None else torch.zeros_like(o, dtype=torch.bool)
        above = o > hi if hi is not None else torch.zeros_like(o, dtype=torch.bool)
        inside = ~below & ~above
        assert torch.equal(t[inside], o[inside])
        if lo is not None:
            assert torch.equal(t[below], torch.full_like(o[below], lo))
        if hi is not None:
            assert torch.equal(t[above], torch.full_like(o[above], hi))
        saw_low |= bool(below.any())
        saw_high |= bool(above.any())
        saw_in |= bool(inside.any())
    # the data exercises each branch the bounds define
    assert saw_in and (lo is None or saw_low) and (hi is None or saw_high)


def test_clip_by_value_with_no_bound_changes_nothing_and_keeps_nan():
    grads = [torch.tensor([-5.0, float("nan"), 5.0])]
    F.clip_by_value_(grads)
    assert grads[0][0].item() == -5.0 and grads[0][2].item() == 5.0
    F.clip_by_value_(grads, -1.0, 1.0)
    assert grads[0][0].item() == -1.0 and grads[0][2].item() == 1.0
    assert torch.isnan(grads[0][1])


@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf")])
def test_empty_tensors_have_norm_zero_for_every_norm_type(norm_type):
    # torch._foreach_norm refuses the inf-norm of an empty tensor; zero-size parameters and empty shards exist.
    tensors = [torch.zeros(0), torch.tensor([3.0, -4.0]), torch.zeros(0, 5)]
    norms = F.grad_norms(tensors, norm_type)
    assert [float(n) for n in norms] == [
        0.0,
        float(torch.linalg.vector_norm(torch.tensor([3.0, -4.0]).double(), norm_type)),
        0.0,
    ]
