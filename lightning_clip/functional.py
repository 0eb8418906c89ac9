"""Pure gradient math: norms, clipping and non-finite checks over lists of tensors.

Nothing here imports Lightning. Every function works on plain lists of tensors (usually gradients),
groups them by ``(device, dtype)`` so each group is one foreach kernel launch, and never reads a
device value back to the host: results stay as 0-dim tensors on the device.

The two clipping methods from the article:

* value clipping clamps every element into ``[min_value, max_value]``;
* norm clipping rescales the whole gradient ``g`` so that ``||g||_p <= max_norm``:
  ``g <- g * min(1, max_norm / (||g||_p + eps))``, where the total norm over tensors ``g_1 .. g_n``
  is ``||g||_p = (sum_i ||g_i||_p^p)^(1/p)`` (``max_i ||g_i||_inf`` for ``p = inf``).

and the adaptive rules as functions, which the rule classes call (:mod:`lightning_clip.rules`):

* :func:`adaptive_clip_` (AGC) clips each unit of each gradient against the norm of its weights;
* :func:`zscore_clip_` (ZClip) clips a spike of the total norm against EMA statistics kept in an explicit
  :class:`ZScoreState` (:func:`zscore_init`), returned anew each step rather than changed in place.

Example::

    >>> import torch
    >>> from lightning_clip import functional as F
    >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    >>> norms = F.grad_norms(grads, norm_type=2.0)
    >>> total = F.total_norm(norms, norm_type=2.0)
    >>> total
    tensor(13.)
    >>> F.clip_by_norm_(grads, max_norm=1.0, total_norm=total)
    tensor(0.0769)
    >>> F.total_norm(F.grad_norms(grads, 2.0), 2.0)
    tensor(1.0000)
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

__all__ = [
    "Group",
    "group_by_device_and_dtype",
    "plan",
    "grad_norms",
    "total_norm",
    "combine_norms",
    "stack_norms",
    "whole_norms",
    "clip_coefficient",
    "clip_by_norm_",
    "clip_by_value_",
    "scale_",
    "sparse_values",
    "unitwise_norms",
    "adaptive_clip_",
    "ZSCORE_OPTIONS",
    "ZScoreState",
    "ZScoreStep",
    "zscore_init",
    "zscore_clip_",
    "clip_grad_norm_",
    "distributed_all_reduce",
    "ShardSpec",
    "local_shards",
    "reduce_sharded_norms",
]

# Same default as torch.nn.utils.clip_grad_norm_: keeps max_norm / (total + eps) finite for a zero gradient.
EPS = 1e-6


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, order kept inside each group.

    Foreach kernels need every tensor of one call on one device with one dtype.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


# Sparse layouts the math handles one tensor at a time (foreach kernels take none of them for a norm or a clamp).
_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
_SPARSE = (torch.sparse_coo, *_COMPRESSED)


@dataclass(frozen=True)
class Group:
    """Tensors of one ``(device, dtype)``: the indices a foreach kernel takes (``dense``) and those it does not
    (``empty``: zero-size; ``sparse``: COO, CSR, CSC, BSR, BSC)."""

    device: torch.device
    dtype: torch.dtype
    dense: list[int]
    empty: list[int]
    sparse: list[int]


def plan(tensors: Sequence[Tensor]) -> list[Group]:
    """The foreach groups of ``tensors``. A caller that steps the same parameters every time (the engine) computes
    this once and passes it back as ``groups=``, which saves a Python loop over the tensors per call.

    Example::

        >>> [(g.dtype, g.dense) for g in plan([torch.ones(2), torch.ones(3).double(), torch.ones(1)])]
        [(torch.float32, [0, 2]), (torch.float64, [1])]
    """
    out = []
    for (device, dtype), idx in group_by_device_and_dtype(tensors).items():
        empty = [i for i in idx if tensors[i].numel() == 0]
        sparse = [i for i in idx if tensors[i].layout in _SPARSE and tensors[i].numel() > 0]
        dense = [i for i in idx if i not in empty and i not in sparse] if empty or sparse else idx
        out.append(Group(device, dtype, dense, empty, sparse))
    return out


def sparse_values(t: Tensor) -> Tensor:
    """The stored values of a sparse ``t``, one per dense element: a COO tensor (``Embedding(sparse=True)``)
    repeats indices until coalesced, and the dense element is the sum of its duplicates (a new tensor then);
    compressed layouts (CSR, CSC, BSR, BSC) store each element once (a view)."""
    return t.coalesce()._values() if t.layout == torch.sparse_coo else t.values()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reduced precision (fp16/bf16) sums in float32; float64 keeps float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_norms(
    tensors: Sequence[Tensor], norm_type: float = 2.0, groups: Sequence[Group] | None = None
) -> list[Tensor]:
    """The ``norm_type``-norm of each tensor, as 0-dim tensors on each tensor's device.

    Computed with one ``torch._foreach_norm`` per ``(device, dtype)`` group, accumulated in float32
    (float64 for float64 tensors). The result is in the order of ``tensors``. Complex tensors give the norm of
    their moduli (as torch's ``clip_grad_norm_``); sparse tensors the norm of their dense value. ``groups``:
    :func:`plan` of ``tensors``, if the caller has it.
    """
    norm_type = float(norm_type)
    norms: list[Tensor | None] = [None] * len(tensors)
    for g in plan(tensors) if groups is None else groups:
        # Complex tensors: the kernel takes no real accumulation dtype; it returns the real norm of |z| anyway.
        acc = None if g.dtype.is_complex else _accumulation_dtype(g.dtype)
        for i in g.empty:
            # Empty tensors (zero-size parameters, empty FSDP shards) have norm 0; the inf-norm kernel rejects them.
            norms[i] = torch.zeros((), device=g.device, dtype=acc or torch.float32)
        for i in g.sparse:
            values = sparse_values(tensors[i])
            if values.numel() == 0:  # no stored entry (all ids were padding): the inf-norm kernel refuses empty
                norms[i] = torch.zeros((), device=g.device, dtype=acc or torch.float32)
            else:
                norms[i] = torch.linalg.vector_norm(values, norm_type, dtype=acc)
        if g.dense:
            for i, n in zip(g.dense, torch._foreach_norm([tensors[i] for i in g.dense], norm_type, dtype=acc)):
                norms[i] = n
    # Every index belongs to exactly one group, so every slot is filled.
    return cast("list[Tensor]", norms)


def total_norm(
    norms: Sequence[Tensor],
    norm_type: float = 2.0,
    all_reduce: Callable[[Tensor, str], Tensor] | None = None,
) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors taken as one vector.

    ``all_reduce`` (optional) combines partial results across processes for sharded gradients
    (FSDP): it is called as ``all_reduce(tensor, op)`` with ``op`` ``"sum"`` (on ``sum_i n_i^p``) or
    ``"max"`` (for ``p = inf``) and must return the reduced tensor. An empty ``norms`` gives ``0``.
    """
    norm_type = float(norm_type)
    if len(norms) == 0:
        zero = torch.tensor(0.0)
        if all_reduce is None:
            return zero
        # A rank with no local gradients must still join the collective, or the other ranks hang.
        inf = math.isinf(norm_type)
        return all_reduce(zero, "max" if inf else "sum").pow(1.0 if inf else 1.0 / norm_type)
    try:
        # Norms are float32 or float64; stack promotes to float64 if any is. One pass, no Python loop over them.
        stacked = torch.stack(list(norms))
    except RuntimeError:  # on several devices: gather them on the first
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        stacked = torch.stack([n.to(device=norms[0].device, dtype=dtype) for n in norms])
    if math.isinf(norm_type):
        result = stacked.max()
        return all_reduce(result, "max") if all_reduce is not None else result
    if all_reduce is None:
        return torch.linalg.vector_norm(stacked, norm_type)
    # Sharded: reduce the sum of p-th powers, then take the root once.
    power_sum = stacked.pow(norm_type).sum()
    return all_reduce(power_sum, "sum").pow(1.0 / norm_type)


def combine_norms(norms: Tensor, index: Tensor, count: int, norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of each of ``count`` groups of tensors, from the tensors' norms.

    ``norms[i]`` is tensor ``i``'s norm and ``index[i]`` its group: group ``j`` gets
    :math:`(\\sum_{i: index_i = j} n_i^p)^{1/p}`, or :math:`\\max_{i: index_i = j} n_i` for ``p = inf``; one scatter
    in float64 on the norms' device (no host read). The engine's per-layer norms (a layer: the tensors of one module).

    Example::

        >>> combine_norms(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0, 0, 1]), 2)
        tensor([5., 1.], dtype=torch.float64)
    """
    values = norms.double()
    if math.isinf(norm_type):
        out = torch.zeros(count, dtype=torch.float64, device=values.device)
        return out.scatter_reduce(0, index, values, reduce="amax", include_self=False)
    powers = torch.zeros(count, dtype=torch.float64, device=values.device)
    return powers.index_add_(0, index, values.pow(norm_type)).pow(1.0 / norm_type)


def stack_norms(norms: Sequence[Tensor], device: torch.device, inv_scale: Tensor | None = None) -> Tensor:
    """0-dim norms (:func:`grad_norms`) as one vector on ``device``, times ``inv_scale`` when given (the true units
    of gradients a ``GradScaler`` still scales). One stack when they all live on ``device``, the usual case.

    Example::

        >>> stack_norms([torch.tensor(3.0), torch.tensor(4.0)], torch.device("cpu"), torch.tensor(0.5))
        tensor([1.5000, 2.0000])
    """
    if not norms:
        vector = torch.zeros(0, device=device)
    elif {t.device for t in norms} == {device}:
        vector = torch.stack(list(norms))
    else:
        vector = torch.stack([t.to(device) for t in norms])
    return vector if inv_scale is None else vector * inv_scale


def whole_norms(
    tensors: Sequence[Tensor],
    norm_type: float,
    groups: Sequence[Group] | None,
    specs: Sequence[ShardSpec | None],
    device: torch.device,
) -> Tensor:
    """Each tensor's ``norm_type``-norm as one vector on ``device``; where ``specs`` holds a DTensor shard's spec
    (:func:`local_shards`), the norm of the whole tensor, reduced over the ranks that hold its shards.

    Example::

        >>> whole_norms([torch.tensor([3.0, 4.0]), torch.ones(4)], 2.0, None, [], torch.device("cpu"))
        tensor([5., 2.])
    """
    norms = grad_norms(tensors, norm_type, groups)
    if specs:
        norms = reduce_sharded_norms([n.to(device) for n in norms], specs, norm_type)[0]
    return stack_norms(norms, device)


def clip_coefficient(total: Tensor, max_norm: float, eps: float = EPS, finite: Tensor | None = None) -> Tensor:
    """``min(1, max_norm / (total + eps))``, or exactly ``1`` where ``total`` is not finite.

    torch's ``clip_grad_norm_`` multiplies by ``max_norm / nan = nan`` and so turns every gradient
    into NaN; here a non-finite total leaves the gradients as they are for the NaN policy to handle.
    Computed with ``torch.where`` rather than a Python ``if``, so there is no host sync. ``finite``
    (``torch.isfinite(total)``) may be passed in when the caller already has it.
    """
    coef = torch.clamp(max_norm / (total + eps), max=1.0)
    return torch.where(torch.isfinite(total) if finite is None else finite, coef, 1.0)


def clip_by_norm_(
    tensors: Sequence[Tensor],
    max_norm: float,
    total_norm: Tensor,
    eps: float = EPS,
    finite: Tensor | None = None,
    groups: Sequence[Group] | None = None,
) -> Tensor:
    """Scale ``tensors`` in place by :func:`clip_coefficient`; return the coefficient.

    Always multiplies (by exactly ``1.0`` when no clipping is needed, which leaves values
    bit-identical) instead of branching on a device value.
    """
    coef = clip_coefficient(total_norm, max_norm, eps, finite)
    scale_(tensors, coef, groups)
    return coef


def scale_(tensors: Sequence[Tensor], factor: Tensor | float, groups: Sequence[Group] | None = None) -> None:
    """Multiply ``tensors`` in place by ``factor`` (a Python number or a 0-dim tensor, kept on the device)."""
    for g in plan(tensors) if groups is None else groups:
        f = factor.to(device=g.device, dtype=g.dtype) if isinstance(factor, Tensor) else factor
        # Foreach kernels take sparse tensors for a multiply; the empty ones need nothing.
        group = [tensors[i] for i in g.dense + g.sparse]
        if group:
            torch._foreach_mul_(group, f)


def clip_by_value_(
    tensors: Sequence[Tensor],
    min_value: float | None = None,
    max_value: float | None = None,
    groups: Sequence[Group] | None = None,
) -> None:
    """Clamp every element of ``tensors`` in place into ``[min_value, max_value]`` (either bound may be None).

    Elements already in range are untouched; NaN stays NaN (the NaN policy sees it). On a GPU two foreach
    kernels (one launch per bound); on the CPU one ``clamp_`` per tensor, which reads and writes each element
    once instead of twice.

    Sparse tensors (COO, CSR, CSC, BSR, BSC) are clamped on their dense value, in the same tensor object: an
    uncoalesced COO tensor (``Embedding(sparse=True)``) is coalesced first, since the dense element is the sum of
    its duplicates, and the clamped result is copied back into it (it is then coalesced; on a GPU coalescing
    reads the number of entries back to the host). A range that excludes 0 would turn every unstored zero into
    a bound, which a sparse tensor cannot hold: ``ValueError`` then, before anything is changed.
    """
    if min_value is None and max_value is None:
        return
    groups = plan(tensors) if groups is None else groups
    if (min_value is not None and min_value > 0) or (max_value is not None and max_value < 0):
        for g in groups:
            if g.sparse:
                i = g.sparse[0]
                raise ValueError(
                    f"cannot clamp tensor {i} ({tensors[i].layout}, {g.dtype}) into [{min_value}, {max_value}]: "
                    "the range excludes 0, so every element the sparse tensor does not store would have to change; "
                    "use a range that contains 0 or a dense (strided) gradient."
                )
    for g in groups:
        for i in g.sparse:
            _clamp_sparse_(tensors[i], min_value, max_value)
        group = [tensors[i] for i in g.dense]
        if not group:
            continue
        if g.device.type == "cpu":
            for t in group:
                t.clamp_(min_value, max_value)
            continue
        if min_value is not None:
            torch._foreach_clamp_min_(group, min_value)
        if max_value is not None:
            torch._foreach_clamp_max_(group, max_value)


def _clamp_sparse_(t: Tensor, min_value: float | None, max_value: float | None) -> None:
    if t.layout != torch.sparse_coo:
        t.values().clamp_(min_value, max_value)  # a view of the stored values
    elif t.is_coalesced():
        t._values().clamp_(min_value, max_value)
    else:
        # No in-place coalesce exists: clamp a coalesced copy, then copy_ puts its indices and values into `t`,
        # so callers holding `t` (p.grad) see the result.
        coalesced = t.coalesce()
        coalesced._values().clamp_(min_value, max_value)
        t.copy_(coalesced)


# ----------------------------------------------------------------------------- adaptive clipping (AGC, z-score)
# timm's floor on a unit's gradient norm before dividing by it (a clipped unit has a norm >= its cap > 0 anyway).
_UNIT_NORM_FLOOR = 1e-6


def unitwise_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> list[Tensor]:
    """The norm of each output unit of each tensor, as a 1-D tensor per tensor (float32, float64 for float64).

    A unit is a slice along dim 0 (a row of a Linear weight, a filter of a Conv), its norm taken over every
    other dim; a tensor with ``ndim <= 1`` (bias, norm scale) is one unit, as in timm's ``unitwise_norm``.
    Tensors of one dim or less share one foreach kernel; the others take one reduction each.

    Example::

        >>> unitwise_norms([torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([6.0, 8.0])])
        [tensor([5., 1.]), tensor([10.])]
    """
    out: list[Tensor | None] = [None] * len(tensors)
    flat = [i for i, t in enumerate(tensors) if t.ndim <= 1]
    for i, n in zip(flat, grad_norms([tensors[i] for i in flat], norm_type)):
        out[i] = n.reshape(1)
    for i, t in enumerate(tensors):
        if t.ndim > 1:
            acc = None if t.is_complex() else _accumulation_dtype(t.dtype)
            out[i] = torch.linalg.vector_norm(t, norm_type, dim=tuple(range(1, t.ndim)), dtype=acc)
    return cast("list[Tensor]", out)


def adaptive_clip_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    finite: Tensor | None = None,
    inv_scale: Tensor | None = None,
) -> Tensor:
    r"""Adaptive Gradient Clipping (AGC, Brock et al. 2021, arXiv:2102.06171), in place: for each output unit
    :math:`i` of each gradient :math:`G` of a weight :math:`W`,

    .. math:: G_i \leftarrow \begin{cases} G_i & \|G_i\| < \lambda \max(\|W_i\|, \epsilon) \\
              \lambda \max(\|W_i\|, \epsilon)\, G_i / \|G_i\| & \text{otherwise} \end{cases}

    with :math:`\lambda` = ``clip_factor``, :math:`\epsilon` = ``eps`` and units as in :func:`unitwise_norms`
    (``norm_type``-norms; 2 in the paper). The same math as timm's ``adaptive_clip_grad``, with the factor rounded
    once to each gradient's dtype as timm's is, but no host read and no copy of the gradients: per device, the
    unit norms of all tensors form one vector, compared and divided in one kernel each.

    Args:
        grads: the gradients to clip, dense; ``grads[i]`` belongs to ``params[i]``.
        params: the weights, read only.
        clip_factor: :math:`\lambda`, the largest gradient-to-weight norm ratio a unit keeps.
        eps: :math:`\epsilon`, the floor on a weight norm, so zero-initialised weights (biases) can move.
        norm_type: ``p`` of the unit norms.
        finite: 0-dim bool, False to leave every gradient bit-identical (a NaN/Inf step, for a NaN policy; timm
            would turn an Inf element into NaN). Default: every unit norm of ``grads`` is finite.
        inv_scale: ``1 / scale`` when the gradients are still multiplied by a GradScaler's scale (fused optimizers
            under fp16): the norms are compared in true units, and the scaled gradients rescaled.

    Returns a 0-dim bool on the first gradient's device: was any unit rescaled (no host read).

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])      # unit norms 5 and 0.5
        >>> g = torch.tensor([[0.6, 0.8], [0.6, 0.8]])      # unit norms 1 and 1
        >>> adaptive_clip_([g], [w], clip_factor=0.5)
        tensor(True)
        >>> g                                               # row 0 kept (1 < 0.5 * 5); row 1 cut to 0.5 * 0.5
        tensor([[0.6000, 0.8000],
                [0.1500, 0.2000]])
    """
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    for i, t in enumerate(grads):
        if t.layout != torch.strided:
            raise ValueError(f"adaptive_clip_ needs dense gradients; tensor {i} is {t.layout}.")
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(grads):
        by_device.setdefault(t.device, []).append(i)
    units = []
    for device, idx in by_device.items():
        group = [grads[i] for i in idx]
        # All units of all tensors in one vector: the comparison and the ratio are one kernel each.
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in group) else torch.float32
        g = torch.cat([n.to(dtype) for n in unitwise_norms(group, norm_type)])
        w = torch.cat([n.to(dtype) for n in unitwise_norms([params[i].detach() for i in idx], norm_type)])
        if inv_scale is not None:  # scaled gradients: compare in true units
            g = g * inv_scale.to(device=device, dtype=dtype)
        units.append((device, group, g, w.clamp(min=eps) * clip_factor))
    first = grads[0].device
    if finite is None:
        finite = torch.stack([torch.isfinite(g).all().to(first) for _, _, g, _ in units]).all()
    flags = []
    for device, group, g, cap in units:
        over = ~(g < cap) & finite.to(device)  # timm's test: a unit exactly at its cap is rescaled (by ~1)
        # Factor exactly 1 where a unit is kept, or the step is not finite: those gradients stay bit-identical.
        factor = torch.where(over, cap / g.clamp(min=_UNIT_NORM_FLOOR), 1.0)
        flags.append(over.any().to(first))
        sizes = [1 if t.ndim <= 1 else t.shape[0] for t in group]
        for t, f in zip(group, factor.split(sizes)):
            f = f.to(t.dtype)  # rounded once to the gradient's dtype, as timm's factor is
            t.mul_(f.reshape(()) if t.ndim <= 1 else f.reshape(-1, *([1] * (t.ndim - 1))))
    return torch.stack(flags).any()


ZSCORE_OPTIONS = ("adaptive_scaling", "mean", "fixed")


class ZScoreState(NamedTuple):
    """The statistics of :func:`zscore_clip_`, device tensors (float64 by default; see :func:`zscore_init`).

    ``mean``, ``var``: the EMA mean and variance of the total norm (0 until the warm-up ends); ``warmup_norms``:
    the healthy norms of the warm-up so far, one slot per warm-up step; ``collected``: how many (long);
    ``initialized``: the warm-up is over (bool).
    """

    mean: Tensor
    var: Tensor
    warmup_norms: Tensor
    collected: Tensor
    initialized: Tensor


class ZScoreStep(NamedTuple):
    """What one :func:`zscore_clip_` did: ``coef``, the factor the gradients were multiplied by (1: unclipped);
    ``threshold``, the largest total norm that passed unclipped (during warm-up ``max_norm``, or NaN without one);
    ``state``, the statistics after the step."""

    coef: Tensor
    threshold: Tensor
    state: ZScoreState


def zscore_init(
    warmup_steps: int = 25, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> ZScoreState:
    """The statistics of :func:`zscore_clip_` before its first step, on ``device`` (that of the total norm).

    float64 as the reference package's Python floats (MPS has none: pass float32 there).
    """
    zero = torch.zeros((), dtype=dtype, device=device)
    return ZScoreState(
        mean=zero,
        var=zero.clone(),
        warmup_norms=torch.zeros(warmup_steps, dtype=dtype, device=device),
        collected=torch.zeros((), dtype=torch.long, device=device),
        initialized=torch.zeros((), dtype=torch.bool, device=device),
    )


def zscore_clip_(
    grads: Sequence[Tensor],
    total_norm: Tensor,
    state: ZScoreState,
    z_threshold: float = 2.5,
    ema_decay: float = 0.97,
    max_norm: float | None = None,
    clip_option: str = "adaptive_scaling",
    eps: float = EPS,
    finite: Tensor | None = None,
    healthy: Tensor | None = None,
    groups: Sequence[Group] | None = None,
) -> ZScoreStep:
    r"""ZClip (Kumar et al. 2025, arXiv:2504.02507): clip spikes of the total norm :math:`x`, found by their
    z-score against an EMA mean :math:`\mu` and variance :math:`\sigma^2` of past norms. In place on ``grads``; the
    statistics are explicit and not changed in place: the new ones are returned (``ZScoreStep.state``), so a loop
    keeps ``state = zscore_clip_(grads, total, state).state``.

    When :math:`z = (x - \mu) / (\sigma + \epsilon) > z_t` (``z_threshold``), the gradient is rescaled to

    * ``"adaptive_scaling"`` (ZClip's default): :math:`v = \mu + z_t \sigma / (z / z_t)`, lower the larger the spike;
    * ``"mean"``: :math:`v = \mu`;
    * ``"fixed"`` (ZClip's ``mode="percentile"``): :math:`v = \mu + z_t \sigma`, whenever :math:`x` exceeds it;

    else :math:`v = x`; then :math:`g \leftarrow g \cdot \min(v, \text{max\_norm}) / (x + \epsilon)` where
    :math:`x` exceeds that, and :math:`\mu \leftarrow \alpha\mu + (1-\alpha)v`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(v-\mu)^2` (the new :math:`\mu`), :math:`\alpha` =
    ``ema_decay``. The first ``len(state.warmup_norms)`` healthy norms only initialise :math:`\mu, \sigma^2`
    (their mean and population variance); meanwhile the norm is only capped at ``max_norm``, if given. The same
    steps, in the same order, as the ``zclip`` package 1.0.0 (``ZClip.step``), with no host read.

    Args:
        grads: the gradients, scaled in place (by exactly 1 when unclipped: bit-identical).
        total_norm: :math:`x`, their total norm (0-dim, on the statistics' device), in true units.
        state: the statistics (:func:`zscore_init`, then the ``state`` of the previous step).
        z_threshold, ema_decay: :math:`z_t` and :math:`\alpha`.
        max_norm: optional absolute cap on :math:`x`, warm-up included (ZClip's ``max_grad_norm``).
        clip_option: ``"adaptive_scaling"``, ``"mean"`` or ``"fixed"``.
        eps: :math:`\epsilon`.
        finite: ``torch.isfinite(total_norm)`` if the caller has it. A NaN/Inf norm clips nothing and changes
            no statistic.
        healthy: 0-dim bool, False to keep a finite step out of the statistics too (a NaN loss, a re-evaluated
            closure); it still clips. Default True.
        groups: :func:`plan` of ``grads``, if the caller has it.

    Example::

        >>> state = zscore_init(warmup_steps=4)
        >>> for x in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]:           # warm-up, one healthy step, a spike
        ...     g = [torch.tensor([x])]
        ...     out = zscore_clip_(g, torch.tensor(x), state)
        ...     state = out.state
        >>> round(g[0].item(), 3), bool(out.coef < 1)            # 50 -> mu + z_t sigma / (z / z_t)
        (1.002, True)
        >>> round(state.mean.item(), 4)                          # the EMA took the clipped norm, not 50
        1.0015
    """
    if clip_option not in ZSCORE_OPTIONS:
        raise ValueError(f"`clip_option` must be one of {ZSCORE_OPTIONS}, got {clip_option!r}.")
    mean, var, ready = state.mean, state.var, state.initialized
    dtype = mean.dtype
    x = total_norm.to(dtype)
    zt, alpha = z_threshold, ema_decay
    finite = torch.isfinite(total_norm) if finite is None else finite
    healthy = finite if healthy is None else finite & healthy
    std = var.sqrt()

    # Spike test and target, in ZClip's order of operations (ZClip._compute_clip_val).
    z = (x - mean) / (std + eps)
    if clip_option == "fixed":
        bound = mean + zt * std
        spike = x > bound
        target = bound
    else:
        bound = mean + zt * (std + eps)  # z > z_t exactly when x > bound: the line to plot
        spike = z > zt
        target = mean + (zt * std) / (z / zt) if clip_option == "adaptive_scaling" else mean
    spike = spike & ready & finite
    clip_val = torch.where(spike, target, x)

    # Clip (ZClip._apply_clipping once ready; torch's clip_grad_norm_ to max_norm during warm-up).
    one = torch.ones((), dtype=dtype, device=x.device)
    if max_norm is None:
        effective = clip_val
        coef_warm = one
    else:
        effective = clip_val.clamp(max=max_norm)
        coef_warm = (max_norm / (x + eps)).clamp(max=1.0)
    coef_ready = torch.where(x > effective, effective / (x + eps), one)
    coef = torch.where(finite, torch.where(ready, coef_ready, coef_warm), one)
    scale_(grads, coef, groups)

    new_state = _zscore_statistics(state, x, clip_val, healthy, alpha)
    if max_norm is None:
        threshold = torch.where(ready, bound, math.nan)
    else:
        threshold = torch.where(ready, bound.clamp(max=max_norm), max_norm)
    return ZScoreStep(coef, threshold, new_state)


def _zscore_statistics(state: ZScoreState, x: Tensor, clip_val: Tensor, healthy: Tensor, alpha: float) -> ZScoreState:
    """:func:`zscore_clip_`'s statistics after a step with total norm ``x`` (spike-clipped: ``clip_val``)."""
    mean, var, buf, collected, ready = state.mean, state.var, state.warmup_norms, state.collected, state.initialized
    # EMA update with the spike-clipped norm; healthy steps only (a NaN never enters).
    update = ready & healthy
    new_mean = alpha * mean + (1 - alpha) * clip_val
    new_var = alpha * var + (1 - alpha) * (clip_val - new_mean) ** 2
    # Warm-up: the norm goes into the next slot; an unhealthy step writes that slot's old value back.
    collect = ~ready & healthy
    slot = collected.clamp(max=len(buf) - 1).reshape(1)
    buf = buf.index_copy(0, slot, torch.where(collect, x, buf.index_select(0, slot)))
    collected = collected + collect.long()
    init_now = collect & (collected >= len(buf))
    init_mean = buf.mean()
    init_var = (buf - init_mean).pow(2).mean()
    return ZScoreState(
        mean=torch.where(init_now, init_mean, torch.where(update, new_mean, mean)),
        var=torch.where(init_now, init_var, torch.where(update, new_var, var)),
        warmup_norms=buf,
        collected=collected,
        initialized=ready | init_now,
    )


# ----------------------------------------------------------------------------- sharded gradients (DTensor)
@dataclass(frozen=True)
class ShardSpec:
    """Where the rest of a sharded tensor lives: the mesh and the mesh dims it is sharded over.

    The norm of the whole tensor needs the local p-th powers summed (max for inf) over exactly these dims;
    over replicated dims every rank already holds the same values and nothing is reduced.
    """

    mesh: Any  # torch.distributed.DeviceMesh
    dims: tuple[int, ...]


def local_shards(
    tensors: Sequence[Tensor], names: Sequence[str] | None = None
) -> tuple[list[Tensor], list[ShardSpec | None]]:
    """The local tensor of each DTensor in ``tensors`` (plain tensors as they are) and its :class:`ShardSpec`.

    The math then runs on local tensors, without DTensor dispatch; in-place changes to a local tensor are
    changes to the DTensor. A ``Partial`` placement (a pending sum) has no local norm and is refused, naming
    the tensor (``names``).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return list(tensors), [None] * len(tensors)
    local: list[Tensor] = []
    specs: list[ShardSpec | None] = []
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            local.append(t)
            specs.append(None)
            continue
        if any(p.is_partial() for p in t.placements):
            name = names[i] if names is not None else f"tensor {i}"
            raise ValueError(
                f"the gradient of `{name}` is a DTensor with a Partial placement {tuple(t.placements)}: its norm "
                "needs the pending reduction first; reduce it (redistribute to Shard/Replicate) before the step."
            )
        local.append(t._local_tensor)
        # Every non-replicated dim holds other parts of the tensor: Shard, and FSDP2's _StridedShard under tensor
        # parallelism (whose is_shard() is False in torch 2.13).
        specs.append(ShardSpec(t.device_mesh, tuple(d for d, p in enumerate(t.placements) if not p.is_replicate())))
    return local, specs


def reduce_sharded_norms(
    local_norms: Sequence[Tensor], specs: Sequence[ShardSpec | None], norm_type: float = 2.0
) -> tuple[list[Tensor], Tensor]:
    """Whole-tensor norms and the total norm from the norms of local shards.

    Tensors with the same :class:`ShardSpec` are reduced together: one all-reduce per mesh dim they are sharded
    over, of the vector of their local p-th powers (maxima for inf), so each element counts once, replicated
    copies are not counted again, and tensors on different meshes are never stacked together. Stays on the
    device (collectives, no host read). Every rank must call this with the same specs, in the same order.

    Returns ``(norms, total)``: the norm of each whole tensor, in the order given, and of all of them together.
    """
    import torch.distributed as dist

    norm_type = float(norm_type)
    inf = math.isinf(norm_type)
    by_spec: dict[ShardSpec | None, list[int]] = {}
    for i, spec in enumerate(specs):
        by_spec.setdefault(spec if spec is None or spec.dims else None, []).append(i)
    device = local_norms[0].device
    whole: list[Tensor | None] = [None] * len(local_norms)
    parts = []
    for spec, idx in by_spec.items():
        values = torch.stack([local_norms[i].to(device=device, dtype=torch.float64) for i in idx])
        if not inf:
            values = values.pow(norm_type)
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        if inf and spec is not None and spec.dims:
            values = _nan_to_inf(values)
        if spec is not None:
            for dim in spec.dims:
                dist.all_reduce(values, op=op, group=spec.mesh.get_group(dim))
        parts.append(values.max() if inf else values.sum())
        roots = values if inf else values.pow(1.0 / norm_type)
        for j, i in enumerate(idx):
            whole[i] = roots[j].to(torch.float32)
    total = torch.stack(parts).max() if inf else torch.stack(parts).sum().pow(1.0 / norm_type)
    return cast("list[Tensor]", whole), total.to(torch.float32)


def distributed_all_reduce(group: object | None = None) -> Callable[[Tensor, str], Tensor]:
    """An ``all_reduce`` for :func:`total_norm` over ``torch.distributed`` (``group``: default group).

    For sharded gradients (FSDP), where each rank holds a slice of every gradient. The reduction stays on
    the device: no host read.
    """
    import torch.distributed as dist

    def reduce(t: Tensor, op: str) -> Tensor:
        t = _nan_to_inf(t) if op == "max" else t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return t

    return reduce


def _nan_to_inf(t: Tensor) -> Tensor:
    # An all-reduce MAX may drop a NaN from another rank (gloo does): as +inf it survives, still non-finite.
    return torch.where(torch.isnan(t), math.inf, t)


def clip_grad_norm_(
    parameters: Iterable[Tensor] | Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` that leaves gradients alone when the norm is NaN/Inf.

    Same signature, same ``eps`` (``1e-6``) and the same behaviour as torch's, with one deliberate
    difference: when the total norm is NaN/Inf, torch multiplies every gradient by ``max_norm / nan``
    and so turns them all into NaN; here the gradients are left exactly as they were (for a NaN policy
    to handle), and the non-finite total is returned.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` is clipped in place; those without a
            gradient are left out. An empty *generator* (for instance ``model.parameters()`` already
            consumed) gives a ``UserWarning``, as torch's does.
        max_norm: the cap on the total norm.
        norm_type: ``p`` of the norm: any ``p > 0`` or ``float("inf")``.
        error_if_nonfinite: raise ``RuntimeError`` when the total norm is NaN/Inf (nothing is clipped then).
            Reads the norm back to the host, as torch's does.
        foreach: accepted for compatibility. The norms and the scaling use foreach kernels wherever the
            gradients allow (one launch per device and dtype) whatever this says, so ``False`` runs the same
            kernels, with the same result; ``True`` on a device without foreach kernels raises
            ``RuntimeError``, as torch's does.

    Returns the total norm of the gradients before clipping, as a 0-dim tensor on the first gradient's
    device (no host read unless ``error_if_nonfinite``). Reduced-precision gradients (fp16/bf16) are summed
    in float32, so their norm is returned in float32.

    Example::

        >>> import torch
        >>> from lightning_clip.functional import clip_grad_norm_
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> w.grad = torch.full((4,), 10.0)
        >>> clip_grad_norm_([w], max_norm=2.0)
        tensor(20.)
        >>> w.grad
        tensor([1.0000, 1.0000, 1.0000, 1.0000])
        >>> w.grad[0] = float("nan")
        >>> clip_grad_norm_([w], max_norm=2.0)   # torch's would turn every element into NaN
        tensor(nan)
        >>> w.grad
        tensor([   nan, 1.0000, 1.0000, 1.0000])
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)  # a generator can be read only once
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters if p.grad is not None]
    if foreach:
        _check_foreach_support(grads)
    with torch.no_grad():
        total = total_norm(grad_norms(grads, norm_type), norm_type)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and leave the gradients unchanged (unlike "
                "torch.nn.utils.clip_grad_norm_, this function never scales them by a non-finite norm), set "
                "`error_if_nonfinite=False`"
            )
        if grads:
            clip_by_norm_(grads, max_norm, total, EPS)
    return total


def _check_foreach_support(tensors: Sequence[Tensor]) -> None:
    """``foreach=True``: refuse devices without foreach kernels, with torch's message."""
    try:
        from torch.utils._foreach_utils import _device_has_foreach_support
    except ImportError:  # a torch without the helper: nothing to check against
        return
    for device in {t.device for t in tensors}:
        if not _device_has_foreach_support(device):
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
