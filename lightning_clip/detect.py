"""Detect: the bad-step flag from the loss and the inputs, kept per accumulation window, agreed across ranks.

The gradient's own check (its total norm is NaN/Inf) is made by the engine from the measured norm; this module
holds the evidence the gradient cannot show: a NaN loss whose gradient happens to be finite, and a dirty batch
(``check_inputs``). Everything stays a 0-dim bool on the device: no host read.

Example::

    >>> import torch
    >>> d = BadStepDetector(check_inputs=True, check_loss=True)
    >>> d.observe_batch({"x": torch.tensor([1.0, float("nan")])}, batch_idx=7)
    >>> d.observe_loss(torch.tensor(0.5))
    >>> d.flag(torch.device("cpu"))
    tensor(True)
    >>> d.input_problems()
    ['batch 7: batch["x"] at position (1,) (1 of 2 elements NaN/Inf)']
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_clip.inputs import describe_nonfinite, nonfinite_flag
from lightning_clip.state import NormHistory


def leaf_parameters(loss: Tensor) -> set[int]:
    """Ids of the leaf tensors (parameters) that back-propagating ``loss`` reaches: a walk of the autograd graph
    on the host, with no device work. Used only with several optimizers, to tell whose step a NaN loss spoils."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad nodes hold the leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def agree_any(flag: Tensor) -> Tensor:
    """Every rank's flag OR-ed together (a no-op outside ``torch.distributed``). Stays on the device."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    as_int = flag.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def agree_mean(value: Tensor | None, device: torch.device) -> Tensor | None:
    """The mean of ``value`` over the ranks that have one (None: this rank has none; every rank must join), on the
    device; None when no rank has one. A no-op outside ``torch.distributed``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    pair = torch.zeros(2, dtype=torch.float64, device=device)
    if value is not None:
        pair[0], pair[1] = value.to(device, torch.float64), 1.0
    dist.all_reduce(pair)
    return torch.where(pair[1] > 0, pair[0] / pair[1].clamp(min=1.0), math.nan).to(torch.float32)


class BadStepDetector:
    """Collects the loss and input evidence of one accumulation window.

    Call :meth:`observe_batch` for each micro-batch (a new window starts with the first batch after
    :meth:`step_done`), :meth:`observe_loss` before each backward, and :meth:`flag` in the optimizer step.
    The loss flag belongs to the next optimizer step only: :meth:`flag` consumes it.
    """

    def __init__(self, check_inputs: bool = False, check_loss: bool = True, keep_losses: bool = False) -> None:
        self.check_inputs = check_inputs
        self.check_loss = check_loss
        self.keep_losses = keep_losses  # keep the loss values too (loss_spikes): step_loss() is their mean
        self.mean_losses = False  # and average step_loss() over the ranks (a remedy decides on it: every rank alike)
        # (0-dim bool, ids of the parameters the loss reaches or None, the loss or None) per backward not yet
        # consumed by a step
        self._losses: list[tuple[Tensor, set[int] | None, Tensor | None]] = []
        self._step_losses: list[Tensor] = []
        self._step_values: list[Tensor] = []
        self._batches: list[tuple[int, Any, Tensor | None]] = []
        self._window_done = False

    @property
    def active(self) -> bool:
        """Whether any evidence is collected (else :meth:`flag` has nothing to add to the gradient check)."""
        return self.check_inputs or self.check_loss

    def observe_batch(self, batch: Any, batch_idx: int = -1) -> None:
        if self._window_done:  # the first micro-batch after an optimizer step opens a new window
            self._batches, self._losses, self._window_done = [], [], False
        flag = nonfinite_flag(batch) if self.check_inputs else None
        # Keep the batch only while checking inputs: it is needed to say where the NaN is.
        self._batches.append((batch_idx, batch if self.check_inputs else None, flag))

    def observe_loss(self, loss: Any, owners: set[int] | None = None) -> None:
        """A loss about to be back-propagated. ``owners`` (ids of the parameters it reaches, see
        :func:`leaf_parameters`) ties it to the optimizers of those parameters; None: to the next step."""
        if not self.check_loss or not isinstance(loss, Tensor):
            return
        value = loss.detach()
        kept = None
        if self.keep_losses:  # a 0-dim float loss is kept as it is (no kernel); anything else, its mean
            kept = value if value.ndim == 0 and value.dtype == torch.float32 else value.float().mean()
        self._losses.append((~torch.isfinite(value).all(), owners, kept))

    def flag(self, device: torch.device, agree: bool = False, params: set[int] | None = None) -> Tensor:
        """0-dim bool on ``device``: was a loss of this step or any input of this window NaN/Inf? With ``agree``,
        OR-ed over all ranks (every rank must join, also one with nothing to report).

        ``params`` (ids of the stepping optimizer's parameters) picks the losses that reached them; those losses
        are consumed for these parameters, so another optimizer's step sees only its own losses.
        """
        flags = [f.to(device) for _, _, f in self._batches if f is not None]
        self._step_losses, self._step_values = [], []
        kept: list[tuple[Tensor, set[int] | None, Tensor | None]] = []
        for bad, owners, value in self._losses:
            if owners is None or params is None or owners & params:
                self._step_losses.append(bad)
                if value is not None:
                    self._step_values.append(value)
                flags.append(bad.to(device))
                owners = None if owners is None or params is None else owners - params
            if owners:  # still owed to another optimizer's step
                kept.append((bad, owners, value))
        self._losses = kept
        bad = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)
        return agree_any(bad) if agree else bad

    def keep(self, spikes: bool, remedy: bool) -> None:
        """Keep the loss values for a loss-spike detector (``spikes``) or a remedy that reads them (``remedy``: they
        are then averaged over the ranks, so every rank's remedy decides on the same value)."""
        self.keep_losses, self.mean_losses = spikes or remedy, remedy

    def step_loss(self, device: torch.device, agree: bool = False) -> Tensor | None:
        """The mean loss of the last :meth:`flag` (its micro-batches), on ``device``; None if none was kept. With
        ``agree`` and :attr:`mean_losses`, averaged over the ranks (every rank must join, one without a loss too)."""
        loss = None
        if len(self._step_values) == 1:  # one micro-batch: its loss, no kernel
            loss = self._step_values[0].to(device)
        elif self._step_values:
            loss = torch.stack([v.to(device) for v in self._step_values]).mean()
        return agree_mean(loss, device) if agree and self.mean_losses else loss

    def loss_nonfinite(self) -> bool:
        """Was a loss of the last :meth:`flag` NaN/Inf? Host read: the bad path only."""
        return bool(torch.stack([b.cpu() for b in self._step_losses]).any()) if self._step_losses else False

    def input_problems(self) -> list[str]:
        """Where the NaN/Inf inputs of this window are (host reads: the bad path only)."""
        problems = []
        for batch_idx, batch, flag in self._batches:
            if batch is not None and flag is not None and bool(flag):
                problems += [f"batch {batch_idx}: {p}" for p in describe_nonfinite(batch)]
        return problems

    def last_batch_idx(self) -> int:
        return self._batches[-1][0] if self._batches else -1

    def step_done(self) -> None:
        """The optimizer step is over: the next micro-batch opens a new window. Losses not tied to other
        optimizers' parameters belonged to this step, whether or not it had gradients."""
        self._losses = [loss for loss in self._losses if loss[1] is not None and loss[1]]
        self._window_done = True


def spike_threshold(history: Tensor, k: float) -> Tensor:
    r""":math:`\mu + k\sigma` of the non-NaN values of ``history``, on the device.

    The variance is centred on the mean (two passes over the window) rather than :math:`E[x^2] - E[x]^2`: in float32
    a loss near 5 with a spread of 5e-4 cancels to a variance of 0 that way, and every loss above the mean becomes a
    spike.
    """
    mean = torch.nanmean(history)
    centred = history - mean
    var = torch.nanmean(centred * centred)
    return mean + k * var.sqrt()


class SpikeDetector:
    r"""Flag a step whose total norm is an extreme outlier, so the remedy skips it instead of clipping it.

    OLMo-core's skip-step rule: a norm :math:`x` is a spike when :math:`x > \mu + k\sigma`, with :math:`\mu,
    \sigma` the mean and standard deviation of the last ``window`` healthy norms (once ``warmup`` of them are
    known). The history is a ring buffer on the device; neither a bad (NaN/Inf) step nor a spike enters it, so
    one explosion cannot widen :math:`\sigma` and let the next one through. No host read; ``state_dict`` keeps
    the history across resume.

    Example::

        >>> import torch
        >>> d = SpikeDetector(k=4.0, window=8, warmup=4)
        >>> [bool(d.flag(torch.tensor(x), torch.tensor(False))) for x in [1.0, 1.2, 0.9, 1.1, 1.0, 30.0, 1.05]]
        [False, False, False, False, False, True, False]
    """

    def __init__(
        self,
        k: float = 6.0,
        window: int = 128,
        warmup: int = 20,
        setting: str = "skip_spikes",
        dtype: torch.dtype | None = None,
    ) -> None:
        from lightning_clip.validation import check_count, check_positive

        check_positive(setting, k)  # errors name the callback argument that set ``k``
        check_count("spike_window", window, allow_none=False)
        check_count("warmup", warmup, allow_none=False)
        if warmup > window:
            raise ValueError(f"`warmup` ({warmup}) must be <= `spike_window` ({window}).")
        self.k, self.window, self.warmup = float(k), int(window), int(warmup)
        # None: float64 on the CPU, float32 on accelerators (where float64 is slow or missing)
        self.dtype = dtype
        self.history = NormHistory(self.window)
        self.threshold: Tensor = torch.full((), math.nan)  # the last step's, on the device (for messages)

    def flag(self, total: Tensor, bad: Tensor) -> Tensor:
        """0-dim bool: is ``total`` a spike? Records it (on the device) when it is healthy and not a spike."""
        device = total.device
        dtype = self.dtype or (torch.float64 if device.type == "cpu" else torch.float32)
        h = self.history.on(device, dtype)
        x = total.to(h.values.dtype)
        self.threshold = threshold = spike_threshold(h.values, self.k)
        ready = h.count >= self.warmup
        healthy = torch.isfinite(x) & ~bad
        spike = ready & healthy & (x > threshold)
        h.record(x, healthy & ~spike)
        return spike

    def state_dict(self) -> dict[str, Any]:
        return self.history.export() if int(self.history.count) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint taken with another ``spike_window`` keeps its newest norms."""
        if state:
            self.history.restore(state)
