"""In-memory snapshots of one optimizer's training state: weights, optimizer state and device statistics.

A :class:`Snapshot` copies, without a host sync, every parameter the optimizer steps, every tensor of its state
and the buffers of the statistics it is given (the rule's, the spike histories'); :meth:`Snapshot.restore` puts
them back bit for bit. The param groups' hyperparameters (the LR a scheduler sets) are not part of it: a restore
leaves the schedule on the Trainer's timeline.

Copies go to pinned host memory with ``non_blocking`` copies when the parameters live on a GPU (the device memory
is not doubled), or stay on the device with ``on_device=True``; on the CPU they are plain copies. The buffers are
allocated on the first snapshot and reused by the next ones of the same layout. Sharded parameters (FSDP2, tensor
parallel DTensors) are copied as this rank's local shards.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
    >>> snap = Snapshot()
    >>> snap.take(opt, step=0)
    >>> w.grad = torch.ones(2); opt.step()
    >>> w.data, len(opt.state)
    (tensor([0.5000, 0.5000]), 1)
    >>> snap.restore(opt)
    >>> w.data, len(opt.state)      # weights and (empty) optimizer state as they were
    (tensor([1., 1.]), 0)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip.state import DeviceState

__all__ = ["Snapshot", "SnapshotStore", "Statistics", "local_tensor", "no_statistics"]

# The units whose device statistics a snapshot keeps (called when taken and when restored: a load may replace them).
Statistics = Callable[[], Sequence[DeviceState]]


def local_tensor(t: Tensor) -> Tensor:
    """The tensor a rank holds: a DTensor's local shard, else the tensor itself (detached)."""
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t).detach()


def no_statistics() -> Sequence[DeviceState]:
    """No statistics: the default of :data:`Statistics` arguments."""
    return ()


class Snapshot:
    """One optimizer's weights, optimizer state and device statistics at one step (``step``: its label)."""

    def __init__(self, on_device: bool = False) -> None:
        self.on_device = on_device
        self.step = -1
        self.applied = 0  # its owner's count of the updates in the state it holds (what a restore undoes)
        self.param_ids: tuple[int, ...] = ()  # the parameters it holds, by identity, in the optimizer's order
        self._params: list[Tensor] = []
        self._state: dict[int, dict[str, Any]] = {}  # by parameter position: its state, tensors copied
        self._devices: dict[int, dict[str, Layout]] = {}  # where each state tensor lived (a DTensor: its layout)
        self._stats: list[dict[str, Tensor]] = []

    @property
    def taken(self) -> bool:
        return self.step >= 0

    def holds(self, optimizer: Optimizer | None) -> bool:
        """Whether this snapshot holds exactly the parameters ``optimizer`` steps now (none added or replaced)."""
        return optimizer is not None and self.param_ids == _param_ids(optimizer)

    def nbytes(self) -> int:
        """Memory held by the copies."""
        tensors = [*self._params, *(t for s in self._stats for t in s.values())]
        tensors += [v for state in self._state.values() for v in state.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _copy(self, source: Tensor, into: Any) -> Tensor:
        if not isinstance(into, Tensor) or into.shape != source.shape or into.dtype != source.dtype:
            if source.device.type == "cpu" or self.on_device:
                into = torch.empty_like(source)
            else:  # pinned host memory: the copy below does not block the host
                into = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        return into.copy_(source, non_blocking=True)

    def take(self, optimizer: Optimizer, step: int, statistics: Statistics = no_statistics) -> None:
        """Copy the state of ``optimizer`` (its parameters and their state) and of ``statistics``. No host read."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        old: list[Tensor | None] = [*self._params, *[None] * (len(params) - len(self._params))]
        self._params = [self._copy(local_tensor(p), buf) for p, buf in zip(params, old)]
        state, devices = {}, {}
        for i, p in enumerate(params):
            entry = optimizer.state.get(p)
            if entry:
                before = self._state.get(i, {})
                state[i] = {
                    k: self._copy(local_tensor(v), before.get(k)) if isinstance(v, Tensor) else copy.deepcopy(v)
                    for k, v in entry.items()
                }
                devices[i] = {k: _layout(v) for k, v in entry.items() if isinstance(v, Tensor)}
        self._state, self._devices = state, devices
        self._stats = [{name: b.clone() for name, b in unit.live.items()} for unit in statistics()]
        self.param_ids = tuple(map(id, params))
        self.step = step

    def restore(self, optimizer: Optimizer, statistics: Statistics = no_statistics) -> None:
        """Put everything back as it was when taken (the param groups' LR and settings excepted).

        Parameters are matched by identity: one the optimizer gained since (a param group added by an unfreeze)
        keeps its weights and loses its optimizer state, which is newer than the snapshot; one it no longer steps is
        left alone.
        """
        position = {pid: i for i, pid in enumerate(self.param_ids)}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        held = [(p, position.get(id(p))) for p in params]
        with torch.no_grad():
            for p, i in held:
                if i is not None:
                    local_tensor(p).copy_(self._params[i], non_blocking=True)
        for p, i in held:
            saved_state = None if i is None else self._state.get(i)
            if i is None or saved_state is None:
                optimizer.state.pop(p, None)  # created after the snapshot
                continue
            current = optimizer.state.get(p, {})
            devices = self._devices[i]
            optimizer.state[p] = {k: _restored(v, current.get(k), devices.get(k)) for k, v in saved_state.items()}
        for unit, buffers in zip(statistics(), self._stats):
            live = unit.live
            for name, value in buffers.items():
                live[name] = value.clone()


def _param_ids(optimizer: Optimizer) -> tuple[int, ...]:
    return tuple(id(p) for group in optimizer.param_groups for p in group["params"])


@dataclass(frozen=True)
class Layout:
    """Where a state tensor lived: its device and, for a DTensor (FSDP2, tensor parallel), its mesh and placements."""

    device: torch.device
    dtensor: tuple[Any, ...] | None = None  # (device_mesh, placements, shape, stride)

    def rebuild(self, saved: Tensor) -> Tensor:
        """A fresh tensor (a DTensor again when it was one) holding ``saved``."""
        local = saved.to(self.device, copy=True)
        if self.dtensor is None:
            return local
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = self.dtensor
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _layout(t: Tensor) -> Layout:
    mesh = getattr(t, "device_mesh", None)
    if mesh is None or getattr(t, "_local_tensor", None) is None:
        return Layout(t.device)
    return Layout(t.device, (mesh, t.placements, t.shape, t.stride()))  # type: ignore[attr-defined]


def _restored(saved: Any, current: Any, layout: Layout | None) -> Any:
    """A saved state value back in the optimizer: copied into the tensor it holds when it can (no allocation)."""
    if not isinstance(saved, Tensor):
        return copy.deepcopy(saved)
    # A DTensor's (FSDP2) saved copy is its local shard: compare with that, and put the values back into it, so the
    # state stays a DTensor (a plain tensor beside DTensor gradients breaks the optimizer's foreach kernels).
    if isinstance(current, Tensor) and local_tensor(current).shape == saved.shape and current.dtype == saved.dtype:
        local_tensor(current).copy_(saved, non_blocking=True)
        return current
    return layout.rebuild(saved) if layout is not None else saved.clone()


class SnapshotStore:
    """The newest snapshots of one optimizer, by age (0: the newest), at most ``kept``; the oldest one's buffers are
    recycled by the next snapshot. Used by the engine for a remedy that restores (``Request.restore``).

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> store = SnapshotStore(kept=2)
        >>> for label in (0, 1, 2):
        ...     store.take(opt, label)
        ...     w.grad = torch.ones(2); opt.step()
        >>> store.labels(), store.restore(opt, age=1).step, w.data, store.labels()
        ([2, 1], 1, tensor([0.5000, 0.5000]), [1])
    """

    def __init__(self, kept: int = 2, on_device: bool = False) -> None:
        self.kept = kept
        self.on_device = on_device
        self._snapshots: list[Snapshot] = []  # oldest first

    def __len__(self) -> int:
        return len(self._snapshots)

    def take(self, optimizer: Optimizer, label: int, statistics: Statistics = no_statistics, applied: int = 0) -> None:
        """A snapshot of the state now, labelled ``label`` (no host read); ``applied``: the updates in that state."""
        full = len(self._snapshots) >= self.kept
        snap = self._snapshots.pop(0) if full else Snapshot(self.on_device)
        snap.take(optimizer, label, statistics)
        snap.applied = applied
        self._snapshots.append(snap)

    def restore(self, optimizer: Optimizer, statistics: Statistics = no_statistics, age: int = 0) -> Snapshot:
        """Put back the snapshot of this ``age`` (0: the newest; past the oldest, the oldest) and return it. The newer
        ones are dropped: they belong to the timeline the restore abandons."""
        keep = max(len(self._snapshots) - age, 1)
        snap = self._snapshots[keep - 1]
        snap.restore(optimizer, statistics)
        del self._snapshots[keep:]
        return snap

    def labels(self) -> list[int]:
        """The labels of the snapshots kept, newest first."""
        return [snap.step for snap in reversed(self._snapshots)]

    def relabel_newest(self, label: int) -> None:
        self._snapshots[-1].step = label

    def holds(self, optimizer: Optimizer | None) -> bool:
        """Whether the newest snapshot holds exactly the parameters ``optimizer`` steps now."""
        return bool(self._snapshots) and self._snapshots[-1].holds(optimizer)

    @property
    def nbytes(self) -> int:
        """Memory held by the snapshots."""
        return sum(snap.nbytes() for snap in self._snapshots)

    def clear(self) -> None:
        self._snapshots = []
