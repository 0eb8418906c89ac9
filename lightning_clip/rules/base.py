"""What a clip rule is: :class:`ClipRule` and what it returns (:class:`ClipResult`).

A rule owns its threshold, any statistics it keeps and their ``state_dict``. The engine hands it the step's
:class:`~lightning_clip.record.StepRecord` once the norms are measured and the bad-step flag is known, and the
rule clips ``step.grads`` in place and says what it did (:class:`ClipResult`). Every value stays on the device:
a rule never reads a tensor back to the host, and never branches in Python on a device value (use
``torch.where``), so the hot path stays free of host syncs.

The engine makes one copy of the rule per optimizer, so statistics are per optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from lightning_clip.record import StepRecord


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

    def clip_(self, step: StepRecord) -> ClipResult:
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
