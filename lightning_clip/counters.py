"""Per-optimizer step counters kept on the device, so the hot path never reads them back.

Each optimizer gets one :class:`StepCounters`: cumulative counts (an int64 buffer on the gradients' device,
updated with in-place adds of device flags) and the run of consecutive bad steps (NaN/Inf, or spikes skipped:
``nonfinite_streak``; the steps of a skipped data window leave it as it is). Values come to the host only
when asked: on logging steps, at checkpoint time, or through :meth:`StepCounters.totals`.

Example::

    >>> import torch
    >>> c = StepCounters().on(torch.device("cpu"))
    >>> c.update(clipped=torch.tensor(True), bad=torch.tensor(False), overflow=torch.tensor(False))
    >>> c.update(clipped=torch.tensor(False), bad=torch.tensor(True), overflow=torch.tensor(False))
    >>> c.totals()  # doctest: +NORMALIZE_WHITESPACE
    {'steps': 2, 'clipped_steps': 1, 'nonfinite_steps': 1, 'amp_overflows': 0, 'spike_skips': 0,
     'requested_skips': 0, 'nonfinite_streak': 1}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_clip.state import DeviceState

# ``requested_skips``: steps skipped because a remedy asked the loop to skip them (a data window).
COUNTERS = ("clipped_steps", "nonfinite_steps", "amp_overflows", "spike_skips", "requested_skips")


class StepCounters(DeviceState):
    """The counts of one optimizer, as device buffers; ``steps`` (calls) is a plain int."""

    counts: Tensor
    streak: Tensor
    false: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0  # plain int: counting calls needs no device
        self.register_buffer("counts", torch.zeros(len(COUNTERS), dtype=torch.int64))
        self.register_buffer("streak", torch.zeros((), dtype=torch.int64))  # consecutive bad steps
        self.register_buffer("false", torch.zeros((), dtype=torch.bool), persistent=False)  # reused every step

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> Self:
        if self.__dict__.get("_placed") == (device, dtype):
            return self
        if self.counts.device.type == "cpu" and device != self.counts.device:
            # From host values (new or loaded): fill on the device; a copy of pageable CPU memory blocks the host.
            host, streak = self.counts.tolist(), int(self.streak)
            self.counts = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
            for i, value in enumerate(host):
                if value:
                    self.counts[i] = value
            self.streak = torch.full((), streak, dtype=torch.int64, device=device)
            self.false = torch.zeros((), dtype=torch.bool, device=device)
            self.__dict__["_placed"] = (device, dtype)
            return self
        return super().on(device)

    def update(
        self, clipped: Tensor, bad: Tensor, overflow: Tensor, spike: Tensor | None = None, requested: bool = False
    ) -> None:
        """Count one optimizer step from device flags, with no host read."""
        # The hot path: plain dict access, past nn.Module's __getattr__/__setattr__ (microseconds per step).
        self.__dict__["steps"] += 1
        buffers = self._buffers
        false = buffers["false"]
        assert false is not None
        # A requested step that is also bad counts as bad only: skipped_steps adds the two.
        flags = [clipped, bad, overflow, false if spike is None else spike, ~bad if requested else false]
        buffers["counts"].add_(torch.stack(flags))  # type: ignore[union-attr]
        if not requested:  # a step of a skipped data window is neither healthy nor bad: the streak stays
            unhealthy = bad if spike is None else bad | spike  # a skipped spike is not a healthy step either
            buffers["streak"].add_(1).mul_(unhealthy)  # type: ignore[union-attr]  # reset to 0 by a good step

    def count_late_bad(self, late: Tensor) -> None:
        """A step already counted as fine turned bad at a later closure evaluation (LBFGS): count it as bad."""
        buffers = self._buffers
        buffers["counts"][1].add_(late)  # type: ignore[index]  # nonfinite_steps
        buffers["streak"].add_(late)  # type: ignore[union-attr]  # it was reset by the fine evaluation

    def from_values(self, values: list[float]) -> dict[str, int]:
        """Counts from values already read back (in :data:`COUNTERS` order), plus ``steps``."""
        out = {"steps": self.steps}
        out.update({name: int(v) for name, v in zip(COUNTERS, values)})
        return out

    def totals(self) -> dict[str, int]:
        """Read the counts back (a host read: not for the hot path)."""
        values = torch.cat([self.counts, self.streak.reshape(1)]).tolist()
        return {"steps": self.steps, **dict(zip(COUNTERS, values)), "nonfinite_streak": values[-1]}

    def export(self) -> dict[str, Any]:
        """Checkpoint form: :meth:`totals`."""
        return self.totals()

    @classmethod
    def restore(cls, state: dict[str, Any]) -> StepCounters:
        """Counters from :meth:`export` (buffers on the CPU until the first step moves them)."""
        c = cls()
        c.steps = int(state.get("steps", 0))
        c.counts = torch.tensor([int(state.get(name, 0)) for name in COUNTERS], dtype=torch.int64)
        c.streak = torch.tensor(int(state.get("nonfinite_streak", 0)), dtype=torch.int64)
        return c
