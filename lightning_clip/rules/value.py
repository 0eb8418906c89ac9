"""``mode="value"``: clamp every gradient element into ``[min_value, max_value]``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_clip import functional as F
from lightning_clip.rules.base import ClipInput, ClipResult, ClipRule
from lightning_clip.validation import check_finite, check_positive


def out_of_range(tensors: Sequence[Tensor], min_value: float | None, max_value: float | None) -> Tensor:
    """0-dim bool on the device: does any element lie outside ``[min_value, max_value]``? (See
    :func:`range_and_magnitudes`.)"""
    return range_and_magnitudes(tensors, min_value, max_value)[0]


def range_and_magnitudes(
    tensors: Sequence[Tensor],
    min_value: float | None,
    max_value: float | None,
    groups: Sequence[F.Group] | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Range and NaN/Inf check in one read pass, no host read, no copy.

    Returns, on the device: does any element lie outside ``[min_value, max_value]``; is every element finite; and,
    aligned with ``tensors``, each tensor's largest magnitude ``max |x|`` (finite exactly when the tensor is: the
    diagnosis names the parameters from it). Compared in each tensor's own dtype, as the clamp does (a bfloat16
    element equal to ``bfloat16(max_value)`` is not clamped, so it is not out of range). On a GPU a foreach
    inf-norm (symmetric range) or a foreach max plus a per-tensor min; on the CPU a per-tensor ``aminmax``, since
    the CPU's inf-norm kernel is several times slower than a max. A NaN makes its tensor's range answer False
    (its magnitude is NaN): the step is bad anyway, and the engine ignores the flag of a bad step.
    """
    device = tensors[0].device
    symmetric = min_value is not None and max_value is not None and min_value == -max_value
    flags: list[Tensor] = []
    finite: list[Tensor] = []
    magnitudes: list[Tensor | None] = [None] * len(tensors)
    for g in F.plan(tensors) if groups is None else groups:
        for i in g.empty:
            magnitudes[i] = torch.zeros((), device=g.device)
        for i in g.sparse:
            # The dense elements (duplicates summed); the unstored zeros are in range (clip_ refuses a range
            # without 0 for a sparse gradient).
            values = F.sparse_values(tensors[i])
            if values.numel() == 0:
                magnitudes[i] = torch.zeros((), device=g.device)
                continue
            low, high = torch.aminmax(values)
            if max_value is not None:
                flags.append((high > max_value).to(device))
            if min_value is not None:
                flags.append((low < min_value).to(device))
            magnitude = torch.maximum(low.abs(), high.abs())
            magnitudes[i] = magnitude
            finite.append(torch.isfinite(magnitude).to(device))
        if not g.dense:
            continue
        group = [tensors[i] for i in g.dense]
        if g.device.type == "cpu" or not symmetric:
            if g.device.type == "cpu":
                lows, highs = (torch.stack(v) for v in zip(*(torch.aminmax(t) for t in group)))
            else:
                # torch has no foreach min; amin per tensor still reads each element once, with no copy.
                highs = torch.stack(torch._foreach_max(group))
                lows = torch.stack([t.amin() for t in group])
            if max_value is not None:
                flags.append((highs > max_value).any().to(device))
            if min_value is not None:
                flags.append((lows < min_value).any().to(device))
            largest = torch.maximum(lows.abs(), highs.abs())  # NaN propagates, +-inf gives inf
        else:
            # max |x| is exact in the tensor's dtype: no accumulation dtype, unlike a norm.
            largest = torch.stack(torch._foreach_norm(group, math.inf))
            if max_value is not None:
                flags.append((largest > max_value).any().to(device))
        finite.append(torch.isfinite(largest).all().to(device))
        for i, m in zip(g.dense, largest.unbind()):
            magnitudes[i] = m
    false = torch.zeros((), dtype=torch.bool, device=device)
    flag = torch.stack(flags).any() if flags else false
    all_finite = torch.stack(finite).all() if finite else ~false
    return flag, all_finite, [m for m in magnitudes if m is not None]


class ValueClip(ClipRule):
    """Value clipping, as the article describes it, with independent lower and upper bounds.

    Elements inside the range are left bit-identical; NaN stays NaN for the NaN policy to see. ``clip_value=c``
    is the symmetric range ``[-c, c]``.

    Example::

        >>> from lightning_clip.rules import ValueClip
        >>> ValueClip(min_value=-0.5, max_value=1.0), ValueClip(clip_value=2.0)
        (ValueClip(value, [-0.5, 1]), ValueClip(value, [-2, 2]))
    """

    mode: ClassVar[str] = "value"
    measures_finite: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("clip_value", "min_value", "max_value")

    def __init__(
        self, clip_value: float | None = None, min_value: float | None = None, max_value: float | None = None
    ) -> None:
        check_positive("clip_value", clip_value, allow_none=True)
        # An infinite bound would clamp every element to +-inf (and inf - inf = NaN in the optimizer).
        check_finite("min_value", min_value, allow_none=True)
        check_finite("max_value", max_value, allow_none=True)
        if clip_value is not None and (min_value is not None or max_value is not None):
            raise ValueError(
                f"mode='value' takes either `clip_value` (symmetric) or `min_value`/`max_value` (asymmetric), "
                f"got clip_value={clip_value!r}, min_value={min_value!r}, max_value={max_value!r}."
            )
        if clip_value is None and min_value is None and max_value is None:
            raise ValueError(
                "mode='value' needs a bound: set `clip_value` (range [-clip_value, clip_value]) "
                "or `min_value` and/or `max_value`; got none."
            )
        if min_value is not None and max_value is not None and min_value > max_value:
            raise ValueError(f"`min_value` ({min_value!r}) must be <= `max_value` ({max_value!r}).")
        if clip_value is not None:
            min_value, max_value = -float(clip_value), float(clip_value)
        self.clip_value = None if clip_value is None else float(clip_value)
        self.min_value = None if min_value is None else float(min_value)
        self.max_value = None if max_value is None else float(max_value)

    def clip_(self, step: ClipInput) -> ClipResult:
        grads, inv_scale = step.grads, step.inv_scale
        excludes_zero = (self.min_value or 0.0) > 0 or (self.max_value or 0.0) < 0
        for name, g in zip(step.names, grads):
            # Clamping has no meaning for a complex number; a sparse gradient cannot make its unstored zeros a
            # bound. mode="norm" supports both.
            if g.is_complex() or (g.layout != torch.strided and excludes_zero):
                kind = "complex" if g.is_complex() else f"sparse ({g.layout})"
                raise ValueError(
                    f"mode='value' cannot clamp the {kind} gradient of parameter `{name}` ({g.dtype})"
                    f"{' into a range without 0' if not g.is_complex() else ''}; "
                    "use mode='norm' (norm clipping supports sparse and complex gradients) or exclude it."
                )
        if inv_scale is not None:
            # Scaled fp16 gradients: clamp in true units. The scale is a power of two: the round trip is exact.
            F.scale_(grads, inv_scale)
        clipped, all_finite, magnitudes = range_and_magnitudes(grads, self.min_value, self.max_value, step.groups)
        # When the engine did not measure the norm, this pass (before clamping turns +-Inf finite) tells NaN/Inf.
        finite = None if step.finite_measured else all_finite
        F.clip_by_value_(grads, self.min_value, self.max_value, step.groups)
        after = None
        if step.log:  # the norm after clamping costs another pass: logging steps only
            after = step.norm_of(step.grads)
        if inv_scale is not None:
            # Back to scaled units. Clamping made +-Inf finite: put NaN back on an overflowed step, or
            # GradScaler (which checks inside the fused step) would apply it instead of skipping it.
            F.scale_(grads, torch.where(step.finite, inv_scale.reciprocal(), float("nan")))
        threshold = self.max_value if self.max_value is not None else self.min_value
        return ClipResult(clipped, after, threshold, finite, magnitudes if finite is not None else None)

    def describe(self) -> str:
        low = "-inf" if self.min_value is None else f"{self.min_value:g}"
        high = "inf" if self.max_value is None else f"{self.max_value:g}"
        return f"value, [{low}, {high}]"
