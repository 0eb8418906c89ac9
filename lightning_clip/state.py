"""Statistics kept on the device, as ``nn.Module`` buffers: torch moves, copies and pickles them.

* :class:`DeviceState` -- the base: buffers, and :meth:`~DeviceState.on` to bring them to the gradients' device (and
  dtype) on first use, a no-op afterwards.
* :class:`NormHistory` -- the one ring buffer of recent healthy norms, shared by the statistics that look back over
  a window (``skip_spikes``, the percentile rule). NaN where empty, so ``nanmean``/``nanquantile`` see only what is
  there; a value is recorded only where a device flag allows it: no host read on the hot path. Its portable state
  lists the values oldest first, so a checkpoint resumes under another ``size`` (the newest values are kept when
  it shrinks).

Example::

    >>> import torch
    >>> h = NormHistory(3)
    >>> for x, keep in [(1.0, True), (9.0, False), (2.0, True), (3.0, True), (4.0, True)]:
    ...     h.record(torch.tensor(x), torch.tensor(keep))
    >>> h.export()
    {'history': tensor([2., 3., 4.], dtype=torch.float64), 'count': 4}
    >>> g = NormHistory(5)
    >>> g.restore(h.export())
    >>> g.values.tolist(), int(g.count)
    ([2.0, 3.0, 4.0, nan, nan], 4)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self


class DeviceState(nn.Module):
    """Statistics as buffers. :meth:`on` moves them to the gradients' device (floating ones to ``dtype``) once."""

    @property
    def live(self) -> dict[str, Tensor]:
        """The buffers by name, for the hot path: reading and replacing them here skips nn.Module's
        ``__getattr__``/``__setattr__``, which cost microseconds per access."""
        return self._buffers  # type: ignore[return-value]  # every buffer here is a tensor

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> Self:
        """Bring every buffer to ``device`` (and the floating ones to ``dtype``): a no-op once they are there."""
        if self.__dict__.get("_placed") == (device, dtype):  # the hot path: one dict lookup
            return self
        for name, buffer in self.named_buffers():
            cast = dtype if dtype is not None and buffer.is_floating_point() else buffer.dtype
            setattr(self, name, buffer.to(device=device, dtype=cast))
        self.__dict__["_placed"] = (device, dtype)
        return self


class NormHistory(DeviceState):
    """The last ``size`` recorded values, in a ring buffer on the device (NaN where empty).

    ``count`` is the number of values ever recorded (a warm-up reads it); ``pos`` the slot written next.
    """

    values: Tensor
    pos: Tensor
    count: Tensor

    def __init__(self, size: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("values", torch.full((size,), math.nan, dtype=dtype))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def record(self, x: Tensor, keep: Tensor) -> None:
        """Append ``x`` (0-dim) where ``keep`` (0-dim bool) is True; else leave everything as it was. No host read."""
        b = self.live
        values, pos = b["values"], b["pos"]
        slot = pos.reshape(1)
        new = torch.where(keep, x.to(values.dtype), values.index_select(0, slot))
        values.index_copy_(0, slot, new.reshape(1))
        pos.copy_(torch.where(keep, (pos + 1) % self.size, pos))
        b["count"].add_(keep.long())

    def ordered(self) -> Tensor:
        """The recorded values, oldest first (a host read)."""
        values, pos = self.values.cpu(), int(self.pos)
        ordered = torch.cat([values[pos:], values[:pos]])
        return ordered[~ordered.isnan()].clone()

    def export(self) -> dict[str, Any]:
        """Portable state: ``history`` (oldest first, CPU) and ``count``."""
        return {"history": self.ordered(), "count": int(self.count)}

    def restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`export`, of any ``size``, or the ring layout of lightning-clip 0.2.0.dev0 (``history``
        with NaN where empty, ``pos``, ``count``). Keeps the newest values when the saved ones do not fit."""
        saved = torch.as_tensor(state.get("history", []))
        saved = saved.to(saved.dtype if saved.is_floating_point() else torch.float64)
        if "pos" in state and len(saved):  # the ring itself: put it oldest first, drop the empty slots
            pos = int(state["pos"]) % len(saved)
            saved = torch.cat([saved[pos:], saved[:pos]])
            saved = saved[~saved.isnan()]
        kept = saved[-self.size :] if len(saved) else saved
        device = self.values.device
        self.values = torch.full((self.size,), math.nan, dtype=self.values.dtype, device=device)
        self.values[: len(kept)] = kept.to(self.values.dtype)
        self.pos = torch.tensor(len(kept) % self.size, device=device)
        self.count = torch.tensor(int(state.get("count", len(kept))), device=device)


__all__ = ["DeviceState", "NormHistory"]
