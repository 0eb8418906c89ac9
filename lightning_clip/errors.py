"""Exceptions raised by lightning-clip."""

from __future__ import annotations

from collections.abc import Sequence


class NonFiniteGradientError(RuntimeError):
    """Raised when gradients turn NaN/Inf and the policy says stop.

    Raised with ``nan_policy="raise"`` at the first bad step, and with ``"skip"``/``"halve_lr"`` after
    ``max_consecutive_nonfinite`` bad steps in a row (``"ignore"`` never raises). It is raised inside
    ``on_before_optimizer_step``, before the optimizer step, so the weights are still finite.

    Attributes:
        global_step: the trainer's ``global_step`` when it was raised.
        parameter_names: names of the parameters whose gradients were NaN/Inf (may be empty when
            only the input check found the problem).
        consecutive: how many bad steps in a row, this one included.
    """

    def __init__(
        self, message: str, global_step: int = -1, parameter_names: Sequence[str] = (), consecutive: int = 0
    ) -> None:
        super().__init__(message)
        self.global_step = global_step
        self.parameter_names = list(parameter_names)
        self.consecutive = consecutive
