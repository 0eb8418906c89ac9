"""Scale an optimizer's learning rate for the optimizer step only, so any LR scheduler keeps working.

Writing ``param_groups[i]["lr"] *= 0.5`` once does not last: closed-form schedulers (LambdaLR,
OneCycleLR, CosineAnnealingLR) recompute the LR from their base each step and undo it, and chainable
ones (StepLR, ExponentialLR) then compound it. :class:`StepLRScale` instead multiplies every group's
LR by ``scale`` in an optimizer step pre-hook and puts the scheduler's value back in a post-hook.
Schedulers, ``ReduceLROnPlateau`` and the optimizer's ``state_dict`` only ever see the scheduler's
own LR, and the LR applied by a step is ``schedule(t) * scale``. Needs nothing from Lightning.

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

from typing import Any, Optional

from torch.optim import Optimizer


class StepLRScale:
    """Apply ``scale`` to every param group's ``lr`` during ``optimizer.step()`` only."""

    def __init__(self, optimizer: Optimizer, scale: float = 1.0) -> None:
        self.optimizer = optimizer
        self.scale = scale
        self._saved: Optional[list[Any]] = None
        self._handles = [
            optimizer.register_step_pre_hook(self._apply),
            optimizer.register_step_post_hook(self._restore_hook),
        ]

    def _apply(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()  # a step that raised may have skipped the post-hook
        if self.scale == 1.0:
            return
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.scale

    def _restore_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the scheduler's LR back (no-op outside a step)."""
        if self._saved is not None:
            for group, lr in zip(self.optimizer.param_groups, self._saved):
                group["lr"] = lr
            self._saved = None

    def remove(self) -> None:
        """Restore the LR and unregister the hooks."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
