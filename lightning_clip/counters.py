"""Per-optimizer step counters kept on the device, so the hot path never reads them back.

Each optimizer gets one :class:`StepCounters`: cumulative counts (an int64 vector on the gradients'
device, updated with in-place adds of device flags), the run of consecutive bad steps, and the host-side
LR-scale state of ``nan_policy="halve_lr"``. Values come to the host only when asked: on logging steps,
at checkpoint time, or through :meth:`StepCounters.totals`.

Example::

    >>> import torch
    >>> c = StepCounters().to(torch.device("cpu"))
    >>> c.update(clipped=torch.tensor(True), bad=torch.tensor(False), overflow=torch.tensor(False))
    >>> c.update(clipped=torch.tensor(False), bad=torch.tensor(True), overflow=torch.tensor(False))
    >>> c.totals()
    {'steps': 2, 'clipped_steps': 1, 'nonfinite_steps': 1, 'amp_overflows': 0, 'spike_skips': 0, 'nonfinite_streak': 1}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

COUNTERS = ("clipped_steps", "nonfinite_steps", "amp_overflows", "spike_skips")


class StepCounters:
    """The counts of one optimizer: device tensors for the hot path, host values for the LR scale."""

    def __init__(self) -> None:
        self.steps = 0  # plain int: counting calls needs no device
        self.counts = torch.zeros(len(COUNTERS), dtype=torch.int64)  # moved to the gradients' device by to()
        self.streak = torch.zeros((), dtype=torch.int64)  # consecutive bad steps
        self.false = torch.zeros((), dtype=torch.bool)  # a device False, reused every step
        # halve_lr state (host)
        self.lr_scale = 1.0
        self.healthy_steps = 0
        # fused-skip path: bad steps already reported to the user
        self.reported_nonfinite = 0

    def to(self, device: torch.device) -> StepCounters:
        """Move the device tensors to ``device`` (once; a no-op when they are there)."""
        if self.counts.device == device:
            return self
        if self.counts.device.type == "cpu":
            # From host values (new or loaded): fill on the device; a copy of CPU memory would block the host.
            host, streak = self.counts.tolist(), int(self.streak)
            self.counts = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
            for i, value in enumerate(host):
                if value:
                    self.counts[i] = value
            self.streak = torch.full((), streak, dtype=torch.int64, device=device)
            self.false = torch.zeros((), dtype=torch.bool, device=device)
        else:
            self.counts, self.streak, self.false = (t.to(device) for t in (self.counts, self.streak, self.false))
        return self

    def update(self, clipped: Tensor, bad: Tensor, overflow: Tensor, spike: Tensor | None = None) -> None:
        """Count one optimizer step from device flags, with no host read."""
        self.steps += 1
        self.counts.add_(torch.stack([clipped, bad, overflow, bad & False if spike is None else spike]))
        self.streak.add_(1).mul_(bad)  # reset to 0 by a good step

    def from_values(self, values: list[float]) -> dict[str, int]:
        """Counts from values already read back (in :data:`COUNTERS` order), plus ``steps``."""
        out = {"steps": self.steps}
        out.update({name: int(v) for name, v in zip(COUNTERS, values)})
        return out

    def totals(self) -> dict[str, int]:
        """Read the counts back (a host read: not for the hot path)."""
        values = torch.cat([self.counts, self.streak.reshape(1)]).tolist()
        return {"steps": self.steps, **dict(zip(COUNTERS, values)), "nonfinite_streak": values[-1]}

    def state_dict(self) -> dict[str, Any]:
        return {**self.totals(), "lr_scale": self.lr_scale, "healthy_steps": self.healthy_steps}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StepCounters:
        """Counters from :meth:`state_dict` (tensors on the CPU until the first step moves them)."""
        c = cls()
        c.steps = int(state.get("steps", 0))
        c.counts = torch.tensor([int(state.get(name, 0)) for name in COUNTERS], dtype=torch.int64)
        c.streak = torch.tensor(int(state.get("nonfinite_streak", 0)), dtype=torch.int64)
        c.lr_scale = float(state.get("lr_scale", 1.0))
        c.healthy_steps = int(state.get("healthy_steps", 0))
        c.reported_nonfinite = int(state.get("nonfinite_steps", 0))
        return c
