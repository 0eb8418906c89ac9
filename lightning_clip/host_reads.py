"""Count device-to-host reads (``.item()``, ``bool(t)``, ``.tolist()``, ...) made inside a block.

On a GPU each of these stalls the host until the device catches up; on CPU they are free but the
same code paths make them, so counting them on CPU tells how many syncs a GPU run would pay.
Used by the tests and the benchmarks; ``torch.cuda.set_sync_debug_mode("error")`` is the GPU-side check.

Example::

    >>> import torch
    >>> from lightning_clip.host_reads import count_host_reads
    >>> x = torch.ones(3)
    >>> with count_host_reads() as reads:
    ...     y = x * 2          # stays on the device
    ...     _ = y.sum().item() # one read
    >>> reads.count, reads.calls
    (1, ['item'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that copy a value to the host.
_READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__format__",
    "__repr__",
    "__array__",
}


@dataclass
class HostReads:
    calls: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


class _CountingMode(TorchFunctionMode):
    def __init__(self, record: HostReads) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.record.calls.append(name)
        elif name == "to" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            target = [a for a in list(args[1:]) + list((kwargs or {}).values()) if isinstance(a, (str, torch.device))]
            if any(torch.device(t).type == "cpu" for t in target):
                self.record.calls.append("to(cpu)")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Context manager yielding a :class:`HostReads` record of the reads made inside it."""
    record = HostReads()
    with _CountingMode(record):
        yield record
