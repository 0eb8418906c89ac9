"""What a clip rule is: :class:`ClipRule`, what it sees (:class:`ClipInput`) and what it returns (:class:`ClipResult`).

A rule owns its threshold, any statistics it keeps and their ``state_dict``. Once the norms are measured and the
bad-step flag is known, the engine hands it a read-only :class:`~lightning_clip.record.ClipInput` of the step (the
gradients and what a rule needs to clip them, not the whole :class:`~lightning_clip.record.StepRecord`); the rule
clips ``step.grads`` in place and says what it did (:class:`ClipResult`). Every value stays on the device: a rule
never reads a tensor back to the host, and never branches in Python on a device value (use ``torch.where``), so
the hot path stays free of host syncs.

``ClipInput`` and ``ClipResult`` live in :mod:`lightning_clip.record` (re-exported here): rules depend on the
record module, never the other way round.

The engine makes one copy of the rule per optimizer, so statistics are per optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning_clip.record import ClipInput, ClipResult

__all__ = ["ClipInput", "ClipResult", "ClipRule"]


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

    def clip_(self, step: ClipInput) -> ClipResult:
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
