"""The collectives of one step over sharded gradients, for the engine.

* :func:`flat_shard_all_reduce` -- the all-reduce of a step whose ranks each hold a flat shard of every gradient
  (FSDP1), or None when the gradients are whole (DTensor gradients reduce over their own mesh instead);
* :func:`total_norm_reducer` -- how a rule gets the total norm of sharded gradients, with the same collectives as the
  measured norm;
* :func:`join_without_gradients` -- a rank with no gradient this step still joins the collectives the others make.

Every rank must make the same collectives in the same order, or the others hang in theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F
from lightning_clip.detect import BadStepDetector, agree_any, agree_mean
from lightning_clip.record import StepRecord


def flat_shard_all_reduce(
    optimizer: Optimizer, sharded: bool | Any | None, distributed: bool
) -> Callable[[Tensor, str], Tensor] | None:
    """The collective for flat-sharded gradients (FSDP1), or None when every rank holds whole gradients.
    ``sharded``: as :meth:`ClipEngine.step <lightning_clip.engine.ClipEngine.step>` takes it (a process group,
    True, False, or None: detected from the parameters)."""
    if sharded is None:
        # From every parameter, not only those with a gradient: a rank whose shard holds no gradient must
        # still take part in the same collectives as the others.
        sharded = distributed and any(
            getattr(p, "_fsdp_flattened", False) for group in optimizer.param_groups for p in group["params"]
        )
    if sharded is False:
        return None
    return F.distributed_all_reduce(None if isinstance(sharded, bool) else sharded)


def total_norm_reducer(step: StepRecord) -> Callable[[Sequence[Tensor]], Tensor] | None:
    """How a rule gets the total norm of sharded gradients (the same collectives as the measured norm); None for
    whole gradients."""
    specs, all_reduce, groups, norm_type = step.specs, step.all_reduce, step.groups, step.norm_type
    if specs:
        return lambda tensors: F.reduce_sharded_norms(F.grad_norms(tensors, norm_type, groups), specs, norm_type)[1]
    if all_reduce is not None:
        return lambda tensors: F.total_norm(F.grad_norms(tensors, norm_type, groups), norm_type, all_reduce=all_reduce)
    return None


def join_without_gradients(
    optimizer: Optimizer,
    all_reduce: Callable[[Tensor, str], Tensor] | None,
    distributed: bool,
    detector: BadStepDetector,
    norm_type: float,
) -> None:
    """Every parameter frozen or unused: nothing to clip. The rank still joins the collectives the others make
    (norm, loss/input flag, the mean loss when the remedy reads it, clipped flag), in the same order, or they would
    hang in theirs."""
    device = device_of(optimizer)
    if all_reduce is not None:
        F.total_norm([], norm_type, all_reduce=all_reduce)
    if detector.active:
        # Consume this optimizer's losses (those owed to another stay for its step), so a NaN loss of a step
        # without gradients does not spoil this optimizer's next step; ranks agree when distributed.
        detector.flag(device, agree=distributed, params=param_ids(optimizer))
        if distributed and detector.mean_losses:
            agree_mean(None, device)
    if all_reduce is not None:
        agree_any(torch.zeros((), dtype=torch.bool, device=device))


def param_ids(optimizer: Optimizer) -> set[int]:
    """The ids of the optimizer's parameters."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def device_of(optimizer: Optimizer) -> torch.device:
    """The device of the optimizer's first parameter (the CPU when it has none)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
