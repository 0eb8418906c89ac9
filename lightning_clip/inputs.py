"""Find NaN/Inf in a training batch (the article's "dirty data" cause), device-side first.

:func:`floating_tensors` walks any nesting of dicts, lists, tuples and dataclasses and names each
floating-point tensor by its path (``batch["x"]``, ``batch[0]``). :func:`nonfinite_flag` folds them
into one 0-dim bool on the device with no host read; :func:`describe_nonfinite` runs only once a
step is known to be bad and says where the first bad element is. Sparse tensors are checked through
their stored values and located in their own coordinates; nested tensors (jagged or strided) through their
packed values, located as ``(component, *position)``.

Example::

    >>> import torch
    >>> batch = {"x": torch.tensor([[1.0, float("nan")]]), "y": torch.tensor([0])}
    >>> nonfinite_flag(batch)
    tensor(True)
    >>> describe_nonfinite(batch)
    ['batch["x"] at position (0, 1) (1 of 2 elements NaN/Inf)']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


def floating_tensors(batch: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    """Yield ``(path, tensor)`` for every floating-point tensor inside ``batch``."""
    if isinstance(batch, Tensor):
        if batch.is_floating_point() or batch.is_complex():
            yield path, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from floating_tensors(value, f"{path}[{key!r}]".replace("'", '"'))
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from floating_tensors(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from floating_tensors(getattr(batch, f.name), f"{path}.{f.name}")


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _stored_values(t: Tensor) -> Tensor:
    """The elements ``t`` stores: ``t`` itself when dense; the values of a sparse tensor (COO as stored, not
    coalesced: a NaN/Inf among duplicate entries is still NaN/Inf in their sum)."""
    if t.is_nested:  # jagged or strided nested tensor: its packed buffer
        return t.values()
    if t.layout == torch.sparse_coo:
        return t._values()
    if t.layout in _COMPRESSED:
        return t.values()
    return t


def nonfinite_flag(batch: Any) -> Tensor | None:
    """0-dim bool tensor, True when any floating element of ``batch`` is NaN/Inf; None if it has none.

    Sparse tensors (COO, CSR, CSC, BSR, BSC) are checked through their stored values. No host read.
    """
    flags = [~torch.isfinite(_stored_values(t)).all() for _, t in floating_tensors(batch)]
    if not flags:
        return None
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).any()


def _first_nonfinite(t: Tensor) -> tuple[int, tuple[int, ...]]:
    """How many elements of ``t`` are NaN/Inf, and the position of the first (host reads)."""
    if t.is_nested:  # position: (component, *position inside it)
        count, first = 0, ()  # type: tuple[int, tuple[int, ...]]
        for i, component in enumerate(t.unbind()):
            n, where = _first_nonfinite(component)
            count, first = count + n, first or ((i, *where) if n else ())
        return count, first
    if t.layout == torch.strided:
        bad = ~torch.isfinite(t)
        count = int(bad.sum())
        return count, tuple(bad.nonzero()[0].tolist()) if count else ()
    # Sparse: positions in the tensor's own coordinates, duplicates summed as the dense tensor would hold them.
    coo = (t if t.layout == torch.sparse_coo else t.to_sparse_coo()).coalesce()
    bad = ~torch.isfinite(coo.values())
    count = int(bad.sum())
    if not count:
        return 0, ()
    entry, *inner = bad.nonzero()[0].tolist()  # inner: the position inside a hybrid tensor's dense part
    return count, (*coo.indices()[:, entry].tolist(), *inner)


def describe_nonfinite(batch: Any, limit: int = 3) -> list[str]:
    """Human-readable locations of NaN/Inf in ``batch`` (host reads: call on the bad path only)."""
    found = []
    for path, t in floating_tensors(batch):
        count, first = _first_nonfinite(t)
        if count:
            size = _stored_values(t).numel() if t.is_nested else t.numel()
            found.append(f"{path} at position {first} ({count} of {size} elements NaN/Inf)")
            if len(found) >= limit:
                break
    return found
