"""Scale an optimizer's learning rate for the optimizer's update only, so any LR scheduler keeps working.

Writing ``param_groups[i]["lr"] *= 0.5`` once does not last: closed-form schedulers (LambdaLR,
OneCycleLR, CosineAnnealingLR) recompute the LR from their base each step and undo it, and chainable
ones (StepLR, ExponentialLR) then compound it. :class:`StepLRScale` instead multiplies every group's LR
by ``scale`` just before the update and puts the scheduler's value back right after it:

* standalone, every update is scaled. With ``deferred=True`` (the engine's use) the scale is *armed* by
  whoever decides it (the engine, after the gradients are known) and *applied* once
  both the gradients are known and the optimizer's ``step()`` has begun -- whichever comes second. In a
  Lightning closure step (the closure runs inside ``step()``) that is the moment the engine arms it; under
  fp16 (the closure runs before ``scaler.step``) and in plain loops it is the step pre-hook. A scheduler
  stepped inside ``training_step`` therefore never sees a scaled LR, and a step GradScaler skips applies
  nothing;
* the step post-hook restores the scheduler's values;
* ``optimizer.state_dict()`` always holds the scheduler's values, even when taken between apply and restore
  (a checkpoint written by an exception handler), so a resumed run never applies the scale twice.

Schedulers, ``ReduceLROnPlateau`` and checkpoints only ever see the scheduler's own LR, and the LR applied
by a step is ``schedule(t) * scale``. Needs nothing from Lightning.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> lr_scale = StepLRScale(opt)
    >>> lr_scale.scale = 0.25
    >>> w.grad = torch.ones(1)
    >>> opt.step()
    >>> w.data, opt.param_groups[0]["lr"]   # the step used lr 0.25; the group still says 1.0
    (tensor([-0.2500]), 1.0)
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


class StepLRScale:
    """Apply ``scale`` to every param group's ``lr`` during one optimizer update at a time."""

    def __init__(self, optimizer: Optimizer, scale: float = 1.0, deferred: bool = False, hooks: bool = True) -> None:
        self.optimizer = optimizer
        self.scale = scale
        # Standalone, every update is scaled; ``deferred`` (the engine) scales only the updates it arms.
        self.deferred = deferred
        self._saved: list[Any] | None = None  # the scheduler's LRs while the scaled ones are in place
        self._armed = False
        self._in_step = False
        # ``hooks=False``: the owner of the optimizer's hooks (the engine's SlotControl) calls :meth:`_pre_step`,
        # :meth:`_post_step` and :meth:`_unscaled_state_dict` itself, in its own documented order.
        self._handles = (
            [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step),
                optimizer.register_state_dict_post_hook(self._unscaled_state_dict),
            ]
            if hooks
            else []
        )

    @property
    def applied(self) -> bool:
        """Whether the scaled LR is in ``param_groups`` right now."""
        return self._saved is not None

    def arm(self) -> None:
        """Scale the next update (this one, if ``step()`` is already running). Idempotent within a step."""
        self._armed = True
        if self._in_step:
            self._apply()

    def disarm(self) -> None:
        """Forget an armed scale that no update consumed (e.g. a step GradScaler skipped) and restore the LR."""
        self._armed = False
        self.restore()

    def _apply(self) -> None:
        if self._saved is not None or self.scale == 1.0:
            return
        self._saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.scale

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()  # a step that raised may have skipped the post-hook
        self._in_step = True
        if self._armed or not self.deferred:
            self._apply()

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._in_step = False
        self._armed = False
        self.restore()

    def _unscaled_state_dict(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._saved is not None:
            for group, lr in zip(state_dict["param_groups"], self._saved):
                group["lr"] = lr
        return state_dict

    def restore(self) -> None:
        """Put the scheduler's LR back (no-op when no scaled LR is in place)."""
        if self._saved is not None:
            for group, lr in zip(self.optimizer.param_groups, self._saved):
                group["lr"] = lr
            self._saved = None

    def remove(self) -> None:
        """Restore the LR and unregister the hooks."""
        self._in_step = self._armed = False
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
