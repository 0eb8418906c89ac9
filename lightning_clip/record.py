"""One optimizer step as a record: what every stage of the engine fills in, what remedies read, and what a rule sees.

The engine builds one :class:`StepRecord` per optimizer step and runs its stages over it
(:mod:`lightning_clip.engine`): *layout* sets the parameters, gradients and names; *measure* the norms, the total and
``finite``; *detect* ``bad`` and ``overflow``; *clip* hands the rule a read-only :class:`ClipInput`
(:meth:`StepRecord.clip_input`), the rule clips in place and returns a :class:`ClipResult` (``result``, ``clipped``),
and a ``spike`` is flagged; then the remedy acts on the same record. Every tensor field is on the device: nothing
here reads one.

The rule's input and output are defined here, not in :mod:`lightning_clip.rules`: rules import this module, and this
module imports no rule, so the dependency runs one way.

Values come to the host once per step, by name: :class:`HostRead` collects the tensors a step needs, makes one
transfer, and hands back :class:`StepRead` (what a remedy acts on) and a name -> value dict (what is logged).

Example (a record built by hand, and the view a rule gets of it)::

    >>> import torch
    >>> from lightning_clip.rules import NormClip
    >>> g = [torch.tensor([3.0, 4.0])]
    >>> step = StepRecord(params=[torch.zeros(2)], grads=g, total=torch.tensor(5.0), finite=torch.tensor(True))
    >>> NormClip(max_norm=1.0).clip_(step.clip_input()).clipped, g[0]
    (tensor(True), tensor([0.6000, 0.8000]))
    >>> read = HostRead(torch.device("cpu"))
    >>> read.add("total", torch.tensor(5.0)); read.add_all("layers", [torch.tensor(1.0), torch.tensor(2.0)])
    >>> read.read()
    {'total': 5.0, 'layers': [1.0, 2.0]}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import functional as F

if TYPE_CHECKING:
    from lightning_clip.counters import StepCounters

__all__ = [
    "NOTHING",
    "ClipInput",
    "ClipResult",
    "HostRead",
    "Request",
    "RunEnd",
    "SpikeCheck",
    "StepRead",
    "StepRecord",
    "Stop",
    "steps_lost",
    "undone_steps",
]


def _false() -> Tensor:
    return torch.zeros((), dtype=torch.bool)


def _nan() -> Tensor:
    return torch.full((), math.nan)


def _no_losses() -> bool:
    return False


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass(frozen=True, eq=False)
class SpikeCheck:
    """One spike test of a step, on the device: ``what`` (``"loss"`` or ``"gradient norm"``) was ``value`` against
    ``threshold`` (mean + k sigma of the recent healthy values; NaN while warming up) and ``flag`` says it spiked."""

    what: str
    value: Tensor
    threshold: Tensor
    flag: Tensor


@dataclass(frozen=True, eq=False)
class ClipInput:
    """What a clip rule sees of one step: the gradient part of the :class:`StepRecord`, read-only.

    ``grads`` are the tensors to clip in place (``params[i].grad``; their local shards under FSDP2/TP), ``names``
    their parameter names and ``groups`` their :func:`~lightning_clip.functional.plan`. ``norms`` are the per-tensor
    norms as measured, in the gradients' own units; ``total`` is the total ``norm_type``-norm in true units: under
    fp16 with a fused optimizer the gradients are still multiplied by the GradScaler's scale and ``inv_scale`` is
    ``1 / scale`` (else None). ``finite``: ``total`` is finite; ``bad``: the step is not healthy (NaN/Inf in the
    gradient, the loss or the inputs), so statistics leave it out, as they do when ``update_statistics`` is False
    (a re-evaluated closure, a requested skip). ``log``: a logging step (``ClipResult.total_after`` is wanted).
    ``sharded``: this rank holds shards, and only the measured norms (and :meth:`norm_of`) are global.
    ``finite_measured`` False: the engine skipped the norm for a rule that ``measures_finite`` (``total`` is a
    placeholder and the rule reports ``ClipResult.finite``). Every tensor is on the device.

    Built once per step by :meth:`StepRecord.clip_input` (no loop over the parameters), or by hand in a test::

        >>> import torch
        >>> from lightning_clip.rules import NormClip
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> view = ClipInput(params=[torch.zeros(2)], grads=g, total=torch.tensor(5.0), finite=torch.tensor(True))
        >>> NormClip(max_norm=1.0).clip_(view).clipped, g[0], view.norm_of(g)
        (tensor(True), tensor([0.6000, 0.8000]), tensor(1.0000))
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    names: Sequence[str] = ()
    groups: Sequence[F.Group] | None = None
    norm_type: float = 2.0
    eps: float = F.EPS
    norms: Sequence[Tensor] = ()
    total: Tensor = field(default_factory=_nan)
    finite: Tensor = field(default_factory=_false)
    bad: Tensor = field(default_factory=_false)
    inv_scale: Tensor | None = None
    log: bool = False
    update_statistics: bool = True
    sharded: bool = False
    finite_measured: bool = True
    # Sharded gradients: the engine's reduction of a total norm across ranks (None: the gradients are whole).
    reduce_total: Callable[[Sequence[Tensor]], Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.total.device

    def norm_of(self, tensors: Sequence[Tensor]) -> Tensor:
        """The total ``norm_type``-norm of ``tensors`` laid out like ``grads`` (e.g. the gradients after
        clipping), over every shard when the gradients are sharded, on the device."""
        if self.reduce_total is not None:
            return self.reduce_total(tensors)
        return F.total_norm(F.grad_norms(tensors, self.norm_type, self.groups), self.norm_type).to(self.device)


@dataclass
class ClipResult:
    """What a rule did: ``clipped`` (0-dim bool, did it change any gradient), the total norm after clipping
    (``total_after``, only needed on logging steps), and the ``threshold`` in force (None if it has none)."""

    clipped: Tensor
    total_after: Tensor | None = None
    threshold: Tensor | float | None = None
    # Rules with ``measures_finite``, when ``finite_measured`` is False: whether every element was finite before
    # clipping, and a per-tensor norm whose finiteness is the tensor's (e.g. max |x|), aligned with ``grads``.
    finite: Tensor | None = None
    tensor_norms: Sequence[Tensor] | None = None


@dataclass(eq=False)
class StepRecord:
    """One optimizer step. Stages fill it in order; rules see its gradient part (:meth:`clip_input`), remedies all
    of it.

    ``grads`` are the tensors to clip in place (``params[i].grad``; their local shards under FSDP2/TP). ``norms``
    and ``total`` are in true units: under fp16 with a fused optimizer the gradients themselves are still
    multiplied by the GradScaler's scale and ``inv_scale`` is ``1 / scale``. ``bad``: NaN/Inf in the gradient, the
    loss or the inputs; ``skip``: the step will not be applied (bad, a spike, or a step a remedy asked to skip).
    Statistics must leave out what is not healthy.
    """

    # --- layout: the step itself
    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    names: Sequence[str] = ()
    optimizer: Optimizer | None = None
    optimizer_idx: int = 0
    groups: Sequence[F.Group] | None = None  # functional.plan(grads), once per optimizer
    norm_type: float = 2.0
    eps: float = F.EPS
    log: bool = False
    scaler: Any = None  # a torch.amp.GradScaler under fp16, else None
    inv_scale: Tensor | None = None
    # Sharded gradients: the engine's reduction of a total norm across ranks (None: the gradients are whole).
    reduce_total: Callable[[Sequence[Tensor]], Tensor] | None = None
    sharded: bool = False  # this rank holds shards (FSDP, tensor parallel): only the measured norms are global
    specs: Sequence[F.ShardSpec | None] = ()  # DTensor gradients: how each local shard lies in the whole
    all_reduce: Callable[[Tensor, str], Tensor] | None = None  # flat shards (FSDP1): the collective over ranks
    # True on a further closure evaluation inside one optimizer step (LBFGS): counted once, as one step.
    reevaluation: bool = False
    # False on a re-evaluation or a requested skip: statistics learn from applied steps only.
    update_statistics: bool = True
    # ids of the parameters with optimizer state when ``optimizer.step()`` began, when this step runs inside it
    # (a closure); None when the update has not begun (plain loops, fp16)
    state_before: set[int] | None = None
    read_every: int = 50  # a sync-free remedy reads its counters at least this often
    distributed: bool = False  # several ranks take this step together
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = -1
    # --- measure
    norms: Sequence[Tensor] = ()
    total: Tensor = field(default_factory=_nan)
    finite: Tensor = field(default_factory=_false)
    # False when the engine skipped the norm (rules with ``measures_finite`` only): ``total`` is NaN, ``finite`` and
    # ``bad`` are placeholders, and the rule reports ``ClipResult.finite`` itself.
    finite_measured: bool = True
    # --- detect
    data_bad: Tensor | None = None  # the loss and input evidence (None: not watched)
    loss: Tensor | None = None  # the step's mean loss, when kept (loss_spikes)
    bad: Tensor = field(default_factory=_false)
    overflow: Tensor = field(default_factory=_false)  # a GradScaler overflow (fp16), not divergence
    spike: Tensor | None = None  # an outlier norm or loss to skip (skip_spikes, loss_spikes); None: not looked for
    spike_checks: list[SpikeCheck] = field(default_factory=list)  # what ``spike`` was made of, for messages
    requested: bool = False  # skipped because a remedy asked for it (a data window)
    skipped_on_device: bool = False  # ``skip`` was handed to a fused optimizer's ``found_inf`` (no host read needed)
    # --- clip
    result: ClipResult | None = None
    clipped: Tensor = field(default_factory=_false)
    # --- the optimizer's own units and evidence, for remedies
    counters: StepCounters | None = None
    loss_nonfinite: Callable[[], bool] = _no_losses  # host read: the bad path only
    input_problems: Callable[[], list[str]] = list
    warn: Callable[[str], None] = _warn

    @property
    def device(self) -> torch.device:
        return self.total.device

    @property
    def skip(self) -> Tensor:
        """0-dim bool on the device: the step is not to be applied."""
        skip = self.bad if self.spike is None else self.bad | self.spike
        return skip | True if self.requested else skip

    def spikes(self) -> list[tuple[str, float, float]]:
        """``(what, value, threshold)`` of the spike tests this step failed (host reads: the bad path only)."""
        return [
            (c.what, float(c.value), float(c.threshold)) for c in self.spike_checks if bool(c.flag.to("cpu", copy=True))
        ]

    @property
    def grads_scaled(self) -> bool:
        """Fused optimizers under fp16 unscale inside their step: in the hook the gradients are still scaled."""
        return self.scaler is not None and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def clip_input(self) -> ClipInput:
        """The read-only view a rule gets of this step (fields as they stand now: call it after *detect*)."""
        return ClipInput(
            params=self.params,
            grads=self.grads,
            names=self.names,
            groups=self.groups,
            norm_type=self.norm_type,
            eps=self.eps,
            norms=self.norms,
            total=self.total,
            finite=self.finite,
            bad=self.bad,
            inv_scale=self.inv_scale,
            log=self.log,
            update_statistics=self.update_statistics,
            sharded=self.sharded,
            finite_measured=self.finite_measured,
            reduce_total=self.reduce_total,
        )


@dataclass
class StepRead:
    """The host values of one step, from the engine's single transfer, for the remedy."""

    bad: bool
    streak: int  # consecutive bad steps (NaN/Inf or spikes) of this optimizer, this one included
    overflow: bool  # a GradScaler overflow (fp16), not divergence
    counts: dict[str, int]
    skip: bool = False  # not applied: bad, a spike, or a requested skip
    lr_scale: float = 1.0  # this optimizer's LR scale before this step's decision
    snapshots: tuple[int, ...] = ()  # the labels (global steps) of the snapshots kept, newest first
    loss: float = math.nan  # the step's mean loss (over micro-batches and ranks), for a remedy that reads_loss


@dataclass(frozen=True)
class Stop:
    """Stop training with :class:`~lightning_clip.NonFiniteGradientError`, before the step is applied."""

    message: str
    global_step: int = -1
    parameter_names: Sequence[str] = ()
    consecutive: int = 0


@dataclass(frozen=True)
class Request:
    """What a remedy decides for this step and the next ones; the engine carries it out (:mod:`lightning_clip.control`),
    in Lightning and plain loops alike, in this order: ``stop``; ``restore``; ``skip``; ``lr_factor``; ``skip_steps``;
    ``snapshot``; ``warn``.

    * ``skip``: this step is a no-op for the weights and the optimizer state.
    * ``skip_steps``: skip this optimizer's next ``skip_steps`` steps whatever their gradients (a data window: under
      accumulation a step is a whole window), counted in ``requested_skips``. Only a remedy that
      :attr:`~lightning_clip.remedies.Remedy.skips_steps` may ask for a skip.
    * ``lr_factor``: multiply this optimizer's LR scale (from the next update on), on top of any scheduler.
    * ``restore``: put back a snapshot first (0: the newest; 1: the one before; the newer ones are dropped), counted
      in ``rollbacks``; a closure optimizer's step in progress (LBFGS) ends in that state. Needs a remedy that
      ``keeps_snapshots``.
    * ``snapshot``: keep a snapshot of the state after this step's update (ignored when the step is skipped).
    * ``warn``: a message for the user; ``stop``: raise instead of applying the step.
    """

    skip: bool = False
    skip_steps: int = 0
    lr_factor: float = 1.0
    restore: int | None = None
    snapshot: bool = False
    warn: str | None = None
    stop: Stop | None = None


NOTHING = Request()


@dataclass
class RunEnd:
    """One optimizer's counters at the end of training, read back once, for ``Remedy.finish``."""

    optimizer_idx: int
    counts: dict[str, int]  # the totals, with ``nonfinite_streak``
    global_step: int
    epoch: int
    failed: bool  # an exception ended training: report, never raise
    rollbacks: int = 0  # snapshots restored
    windows: Sequence[dict[str, Any]] = ()  # the data windows skipped (control.copy_windows)
    lr_scale: float = 1.0  # the LR scale training ended on
    base_lr: float | None = None  # the first param group's LR before any scale (its scheduler's, or as set)


def undone_steps(windows: Sequence[dict[str, Any]]) -> int:
    """The applied updates the rollbacks of ``windows`` threw away: each window's ``undone`` (counted when restored;
    two rollbacks to one snapshot do not count the steps before the first twice), else, in windows written before
    it was recorded, the steps from the snapshot to the bad step."""
    return sum(int(w.get("undone", w["global_step"] - w["snapshot_step"])) for w in windows if "snapshot_step" in w)


def steps_lost(windows: Sequence[dict[str, Any]]) -> int:
    """The optimizer steps the rollbacks of ``windows`` cost: those undone and those skipped after each bad step
    (the data window, the bad step included)."""
    return undone_steps(windows) + sum(w["skipped"][-1] - w["skipped"][0] + 1 for w in windows if w.get("skipped"))


class HostRead:
    """Device values a step needs on the host, added by name, read back in one transfer.

    Scalars (0-dim) and lists of scalars are stacked in float64 on ``device`` and concatenated with any vectors:
    one ``tolist()``. :meth:`read` returns them by the names they were added under.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._scalars: list[tuple[str, Tensor]] = []
        self._vectors: list[tuple[str, Tensor]] = []

    def add(self, name: str, value: Tensor) -> None:
        """A 0-dim tensor, read back as a float."""
        self._scalars.append((name, value))

    def add_all(self, name: str, values: Sequence[Tensor] | Tensor) -> None:
        """0-dim tensors (or a vector), read back as a list of floats."""
        vector = values if isinstance(values, Tensor) else torch.stack(list(values)) if values else torch.zeros(0)
        self._vectors.append((name, vector.reshape(-1)))

    def read(self) -> dict[str, Any]:
        """Everything added, by name (the one device-to-host transfer of this step)."""
        parts = []
        if self._scalars:
            parts.append(torch.stack([v.to(device=self.device, dtype=torch.float64) for _, v in self._scalars]))
        parts += [v.to(device=self.device, dtype=torch.float64) for _, v in self._vectors]
        flat = torch.cat(parts).tolist() if parts else []
        out: dict[str, Any] = {name: flat[i] for i, (name, _) in enumerate(self._scalars)}
        pos = len(self._scalars)
        for name, vector in self._vectors:
            out[name] = flat[pos : pos + vector.numel()]
            pos += vector.numel()
        return out
