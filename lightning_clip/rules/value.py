"""``mode="value"``: clamp every gradient element into ``[min_value, max_value]``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_clip import functional as F
from lightning_clip.rules.base import ClipResult, ClipRule, GradStep
from lightning_clip.validation import check_finite, check_positive


def out_of_range(tensors: Sequence[Tensor], min_value: float | None, max_value: float | None) -> Tensor:
    """0-dim bool on the device: does any element lie outside ``[min_value, max_value]``? No host read, no copy.

    Compared in each tensor's own dtype, as the clamp does (a bfloat16 element equal to ``bfloat16(max_value)``
    is not clamped, so it is not out of range). One read pass over the gradients: on a GPU a foreach inf-norm
    (symmetric range) or a foreach max plus a per-tensor min; on the CPU a per-tensor ``aminmax``, since the
    CPU's inf-norm kernel is several times slower than a max. A NaN makes its tensor's answer False: the step
    is bad anyway, and the engine ignores the flag of a bad step.
    """
    device = tensors[0].device
    symmetric = min_value is not None and max_value is not None and min_value == -max_value
    flags: list[Tensor] = []
    for (group_device, _), idx in F.group_by_device_and_dtype(tensors).items():
        group = [tensors[i] for i in idx if tensors[i].numel() > 0]
        if not group:
            continue
        if group_device.type == "cpu":
            lows, highs = zip(*(torch.aminmax(t) for t in group))
            if max_value is not None:
                flags.append((torch.stack(highs) > max_value).any().to(device))
            if min_value is not None:
                flags.append((torch.stack(lows) < min_value).any().to(device))
        elif symmetric and max_value is not None:
            # max |x| is exact in the tensor's dtype: no accumulation dtype, unlike a norm.
            flags.append((torch.stack(torch._foreach_norm(group, math.inf)) > max_value).any().to(device))
        else:
            if max_value is not None:
                flags.append((torch.stack(torch._foreach_max(group)) > max_value).any().to(device))
            if min_value is not None:
                # torch has no foreach min; amin per tensor still reads each element once, with no copy.
                flags.append((torch.stack([t.amin() for t in group]) < min_value).any().to(device))
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack(flags).any()


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
        self.clip_value = clip_value
        self.min_value = None if min_value is None else float(min_value)
        self.max_value = None if max_value is None else float(max_value)

    def clip_(self, step: GradStep) -> ClipResult:
        grads, inv_scale = step.grads, step.inv_scale
        for name, g in zip(step.names, grads):
            if g.is_sparse or g.is_complex():
                # Clamping has no meaning for a complex number, and a sparse gradient would have to be coalesced
                # (a copy that replaces p.grad); use mode="norm" for these, which supports both.
                kind = "sparse" if g.is_sparse else "complex"
                raise ValueError(
                    f"mode='value' cannot clamp the {kind} gradient of parameter `{name}` ({g.dtype}); "
                    "use mode='norm' (norm clipping supports sparse and complex gradients) or exclude it."
                )
        if inv_scale is not None:
            # Scaled fp16 gradients: clamp in true units. The scale is a power of two: the round trip is exact.
            F.scale_(grads, inv_scale)
        clipped = out_of_range(grads, self.min_value, self.max_value)
        F.clip_by_value_(grads, self.min_value, self.max_value)
        after = None
        if step.log:  # the norm after clamping costs another pass: logging steps only
            after = step.norm_of(step.grads)
        if inv_scale is not None:
            # Back to scaled units. Clamping made +-Inf finite: put NaN back on an overflowed step, or
            # GradScaler (which checks inside the fused step) would apply it instead of skipping it.
            F.scale_(grads, torch.where(step.finite, inv_scale.reciprocal(), float("nan")))
        threshold = self.max_value if self.max_value is not None else self.min_value
        return ClipResult(clipped, after, threshold)

    def describe(self) -> str:
        low = "-inf" if self.min_value is None else f"{self.min_value:g}"
        high = "inf" if self.max_value is None else f"{self.max_value:g}"
        return f"value, [{low}, {high}]"
