"""What a clip rule is: :class:`ClipRule` and the step it sees (:class:`GradStep`).

A rule owns its threshold, any statistics it keeps and their ``state_dict``. The engine hands it one
:class:`GradStep` per optimizer step, after the norms are measured and the bad-step flag is known, and the
rule clips ``step.grads`` in place and says what it did (:class:`ClipResult`). Every value stays on the device:
a rule never reads a tensor back to the host, and never branches in Python on a device value (use
``torch.where``), so the hot path stays free of host syncs.

The engine makes one copy of the rule per optimizer, so statistics are per optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_clip import functional as F


@dataclass
class GradStep:
    """One optimizer step's gradients, as a clip rule sees them.

    ``grads`` are the tensors to clip in place (``params[i].grad``). ``norms`` and ``total`` are in true
    units: under fp16 with a fused optimizer the gradients themselves are still multiplied by the
    GradScaler's scale, and ``inv_scale`` (else None) is ``1 / scale``. ``bad`` is True when the step will
    not be applied (NaN/Inf in the gradient, the loss or the inputs): statistics must leave it out.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    names: Sequence[str]
    norms: Sequence[Tensor]
    total: Tensor
    finite: Tensor
    bad: Tensor
    norm_type: float
    eps: float
    inv_scale: Tensor | None
    log: bool
    # False on a further closure evaluation inside one optimizer step (LBFGS): statistics count steps, not calls.
    update_statistics: bool = True
    # functional.plan(grads), computed once per optimizer by the engine: pass it on to functional's `groups=`.
    groups: Sequence[F.Group] | None = None
    # False when the engine skipped the norm this step (rules with ``measures_finite`` only): ``total`` is NaN,
    # ``finite`` and ``bad`` are placeholders, and the rule reports ``ClipResult.finite`` itself.
    finite_measured: bool = True
    # Sharded gradients: the engine's reduction of a total norm across ranks (None: the gradients are whole).
    reduce_total: Callable[[Sequence[Tensor]], Tensor] | None = None
    # True when this rank holds shards of the gradients (FSDP, tensor parallel): only the measured norms are global.
    sharded: bool = False

    def norm_of(self, tensors: Sequence[Tensor]) -> Tensor:
        """The total ``norm_type``-norm of ``tensors`` laid out like ``grads`` (e.g. the gradients after
        clipping), over every shard when the gradients are sharded, on the device."""
        if self.reduce_total is not None:
            return self.reduce_total(tensors)
        return F.total_norm(F.grad_norms(tensors, self.norm_type, self.groups), self.norm_type).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.total.device


@dataclass
class ClipResult:
    """What a rule did: ``clipped`` (0-dim bool, did it change any gradient), the total norm after clipping
    (``total_after``, only needed on logging steps), and the ``threshold`` in force (None if it has none)."""

    clipped: Tensor
    total_after: Tensor | None = None
    threshold: Tensor | float | None = None
    # Rules with ``measures_finite``, when ``step.finite_measured`` is False: whether every element was finite before
    # clipping, and a per-tensor norm whose finiteness is the tensor's (e.g. max |x|), aligned with ``grads``.
    finite: Tensor | None = None
    tensor_norms: Sequence[Tensor] | None = None


class ClipRule:
    """Base class of the clip rules. Subclasses set :attr:`mode` and implement :meth:`clip_`.

    :attr:`options` lists the ``GradientClipping`` arguments the rule is built from (see
    :meth:`from_options`), so the callback can build any registered rule from its flat arguments and
    refuse a setting that the chosen mode would ignore.
    """

    mode: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    # A rule whose clipping marks an outlier (z-score, percentile): the engine names the layers that carried it.
    reports_spikes: ClassVar[bool] = False
    # A rule that reads every element anyway and can report finiteness: on steps where nothing else needs the
    # p-norm, the engine skips measuring it (``finite_measured=False``); the rule returns ``ClipResult.finite``.
    measures_finite: ClassVar[bool] = False

    @classmethod
    def from_options(cls, **options: Any) -> ClipRule:
        """Build the rule from the callback's arguments named in :attr:`options` (None: the rule's default)."""
        return cls(**{k: v for k, v in options.items() if k in cls.options and v is not None})

    def clip_(self, step: GradStep) -> ClipResult:
        """Clip ``step.grads`` in place; return what was done. No host reads."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Statistics to checkpoint (stateless rules: empty)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> str:
        """One line for messages and ``repr``."""
        return self.mode

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
