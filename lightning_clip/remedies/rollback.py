"""``nan_policy="rollback"``: go back to a healthy in-memory snapshot and skip the data window (PaLM's recipe).

PaLM (Chowdhery et al. 2022, §5.1) met about 20 loss spikes at 540B despite clipping; each time they restarted by
hand from about 100 steps before the spike and skipped 200-500 batches: the spikes came from data x state, and
skipping one step cannot undo a state that has already drifted. This remedy automates it, in memory.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch

from lightning_clip.diagnosis import describe, describe_spike
from lightning_clip.divergence import DivergenceWatch
from lightning_clip.record import steps_lost
from lightning_clip.remedies.base import (
    NOTHING,
    Remedy,
    Request,
    RunEnd,
    StepRead,
    StepRecord,
    Stop,
    diagnose,
    lr_factor_to,
    optional_int,
    stop,
    stop_at,
    warn_due,
)
from lightning_clip.remedies.halve_lr import recovery
from lightning_clip.validation import check_count, check_in_range, check_positive


class Rollback(Remedy):
    """On a bad step (NaN/Inf loss or gradient, a spike from ``skip_spikes``/``loss_spikes``) or a divergence (the
    loss has risen above its best for good): restore the newest trusted snapshot, skip the data window, lower the LR.

    Args:
        snapshot_every: every ``snapshot_every`` steps (k * snapshot_every steps done), when the steps since the last
            snapshot point were healthy and the loss is near its best, keep a snapshot of this optimizer's weights,
            its state and the callback's statistics. It becomes *trusted* when the next ``snapshot_every`` steps are
            healthy too; a restore goes to the newest trusted one. The state training starts from is trusted. At most
            three are kept, in pinned host memory for GPU parameters (``snapshot_on_device``: on the device),
            sync-free.
        rollback_after: this many bad steps in a row trigger a rollback; fewer are skipped as ``skip`` does.
        rollback_skip_steps: after a rollback, skip the bad step and this many more optimizer steps (the data
            window; under accumulation a step is a whole window).
        rollback_lr_factor: multiply the LR by this at a rollback, on top of any scheduler (1.0 keeps it); by its
            square after a divergence (the LR's doing, where a NaN may be one dirty batch); the k-th rollback since
            the last clean snapshot period multiplies by it k times (exponential back-off). ``lr_recovery_steps``
            and ``min_lr_scale`` work as under ``halve_lr``.
        max_consecutive_nonfinite: raise :class:`~lightning_clip.NonFiniteGradientError` after this many bad steps
            without a healthy step in between, rollbacks included: a run that stays bad stops.
        divergence_margin: a divergence is a loss that has risen more than this fraction above the best smoothed
            loss of the run (and above its own noise) for a few steps (:class:`~lightning_clip.divergence.
            DivergenceWatch`): rolled back like a NaN. None: only NaN/Inf and spikes roll back.
        rollbacks_per_snapshot: at most this many LR reductions from one snapshot; then an older trusted snapshot,
            and when there is none the run stops with a diagnosis.

    A restore whose steps go bad again before its snapshot is confirmed afresh (within ``snapshot_every`` healthy
    steps) falls back to the older trusted snapshot and keeps the LR: the state, not the LR, was the suspect. The LR
    goes down again only when the state restored was good.

    Counters and the LR schedule keep the Trainer's timeline: a rollback restores the weights, the optimizer state
    and the statistics, not the param groups' hyperparameters, the counters or the global step. One host read per
    step (the decision is taken on the host; the loss comes in the same read, averaged over ranks). Counted in
    ``rollbacks``; each skipped window (global steps, epoch, batch) is recorded by the engine
    (:meth:`ClipEngine.skipped_windows`) and kept in the checkpoint.

    Example::

        >>> import torch
        >>> from lightning_clip import ClipEngine
        >>> from lightning_clip.remedies import Rollback
        >>> from lightning_clip.rules import NormClip
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = ClipEngine(NormClip(), Rollback(snapshot_every=2, rollback_skip_steps=1, rollback_lr_factor=1.0))
        >>> engine.attach([opt], model.named_parameters())
        >>> engine.warn = lambda message: None
        >>> for step in range(6):
        ...     loss = model(torch.ones(1, 2)).sum() * (float("nan") if step == 3 else 1.0)
        ...     engine.observe_loss(loss)
        ...     loss.backward()
        ...     _ = engine.step(opt)
        ...     opt.step()
        ...     opt.zero_grad()
        >>> engine.counters["rollbacks"], engine.skipped_windows()[0]["snapshot_step"]  # a NaN out of a clean period
        (1, 2)
    """

    policy: ClassVar[str] = "rollback"
    options: ClassVar[tuple[str, ...]] = (
        "snapshot_every",
        "rollback_after",
        "rollback_skip_steps",
        "rollback_lr_factor",
        "min_lr_scale",
        "lr_recovery_steps",
        "max_consecutive_nonfinite",
        "divergence_margin",
        "rollbacks_per_snapshot",
    )
    skips_steps: ClassVar[bool] = True
    scales_lr: ClassVar[bool] = True
    keeps_snapshots: ClassVar[int] = (
        3  # a candidate and two trusted ones (the newest is restored, the older a fallback)
    )

    def __init__(
        self,
        snapshot_every: int = 50,
        rollback_after: int = 1,
        rollback_skip_steps: int = 0,
        rollback_lr_factor: float = 0.5,
        min_lr_scale: float | None = None,
        lr_recovery_steps: int | None = None,
        max_consecutive_nonfinite: int | None = 10,
        snapshot_on_device: bool = False,
        divergence_margin: float | None = 0.05,
        rollbacks_per_snapshot: int = 4,
    ) -> None:
        check_count("snapshot_every", snapshot_every, allow_none=False)
        check_count("rollback_after", rollback_after, allow_none=False)
        if isinstance(rollback_skip_steps, bool) or not isinstance(rollback_skip_steps, int) or rollback_skip_steps < 0:
            raise ValueError(f"`rollback_skip_steps` must be an integer >= 0, got {rollback_skip_steps!r}.")
        check_in_range("rollback_lr_factor", rollback_lr_factor, 0.0, 1.0, high_open=False)
        check_in_range("min_lr_scale", min_lr_scale, 0.0, 1.0, high_open=False, allow_none=True)
        check_count("lr_recovery_steps", lr_recovery_steps)
        check_count("max_consecutive_nonfinite", max_consecutive_nonfinite)
        check_positive("divergence_margin", divergence_margin, allow_none=True)
        check_count("rollbacks_per_snapshot", rollbacks_per_snapshot, allow_none=False)
        if not isinstance(snapshot_on_device, bool):
            raise ValueError(f"`snapshot_on_device` must be True or False, got {snapshot_on_device!r}.")
        self.snapshot_every = int(snapshot_every)
        self.rollback_after = int(rollback_after)
        self.rollback_skip_steps = int(rollback_skip_steps)
        self.rollback_lr_factor = float(rollback_lr_factor)
        self.min_lr_scale = None if min_lr_scale is None else float(min_lr_scale)
        self.lr_recovery_steps = optional_int(lr_recovery_steps)
        self.max_consecutive_nonfinite = optional_int(max_consecutive_nonfinite)
        self.snapshot_on_device = snapshot_on_device
        self.divergence_margin = None if divergence_margin is None else float(divergence_margin)
        self.rollbacks_per_snapshot = int(rollbacks_per_snapshot)
        # Checkpointed, so that a resumed run decides as a straight one would:
        self.healthy_steps = 0  # in a row, since the last rollback (recovery)
        self._bad_run = 0  # bad steps in a row (towards rollback_after)
        self._unhealthy = 0  # bad steps since the last healthy one, rollbacks included (max_consecutive_nonfinite)
        self._clean = True  # every step since the last snapshot point was healthy (and not rising)
        self._run_from_clean = True  # the current run of bad steps began in a clean period
        self.watch = DivergenceWatch(self.divergence_margin or 0.05)
        self._snapshots = Trust()

    @property
    def reads_loss(self) -> bool:
        return self.divergence_margin is not None

    def needs_read(self, step: StepRecord) -> bool:
        return True  # the decision is taken on the host

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        self._snapshots.follow(read.snapshots, self.watch)
        if step.requested:  # a step of the data window: skipped, neither healthy nor bad (a NaN in it too)
            request = Request(skip=True)
        elif read.bad or read.skip:  # NaN/Inf, or a spike
            request = self._bad_step(step, read)
        elif read.overflow:  # a GradScaler-skipped step is neither healthy nor bad
            request = NOTHING
        elif step.update_statistics and self._diverged(read.loss):  # not a closure's re-evaluation (LBFGS)
            request = self._bad_step(step, read, diverged=True)
        else:
            request = self._healthy_step(read)
        if read.counts["steps"] % self.snapshot_every == 0 and request.restore is None:
            return self._snapshot_point(step, read, request)
        return request

    def _diverged(self, loss: float) -> bool:
        """Feed the watch a healthy step's loss: has the run diverged?"""
        if self.divergence_margin is None or not math.isfinite(loss):
            return False
        self.watch.margin = self.divergence_margin  # a retune takes effect here
        diverged = self.watch.update(loss)
        if self.watch.rising:
            self._clean = False  # a snapshot point after rising steps keeps nothing
        return diverged

    def _healthy_step(self, read: StepRead) -> Request:
        self._bad_run = self._unhealthy = 0
        self.healthy_steps, factor = recovery(
            self.healthy_steps, self.lr_recovery_steps, read.lr_scale, self.rollback_lr_factor
        )
        return Request(lr_factor=factor) if factor != 1.0 else NOTHING

    def _snapshot_point(self, step: StepRecord, read: StepRead, request: Request) -> Request:
        """Every ``snapshot_every`` steps: a clean period confirms the newest snapshot; a new one is kept when the
        period was clean and the loss is near its best."""
        clean = self._clean and not read.skip
        self._clean = True  # the next period starts
        if not clean:
            return request
        self._snapshots.confirm()
        if self.divergence_margin is not None and not self.watch.near_best():
            return request
        self._snapshots.candidate(step.global_step + 1, self.watch)  # the label the engine gives it
        return replace(request, snapshot=True)

    def _bad_step(self, step: StepRecord, read: StepRead, diverged: bool = False) -> Request:
        # A run of NaN steps out of a clean period may go back to the newest snapshot, confirmed or not: every step
        # before the run was healthy. A divergence began before it was detected: only a confirmed snapshot is good.
        if self._bad_run == 0:
            self._run_from_clean = self._clean
        newest_ok = self._run_from_clean and not diverged
        self._clean = False
        self._bad_run += 1
        self._unhealthy += 1
        limit = self.max_consecutive_nonfinite
        if stop_at(limit, self._unhealthy):
            info = diagnose(
                step, read, "raised NonFiniteGradientError", read.lr_scale, stopping=True, consecutive=self._unhealthy
            )
            rollbacks = read.counts.get("rollbacks", 0)
            return stop(
                info,
                f"{self._unhealthy} bad steps without a healthy one in between, {rollbacks} rollback(s) "
                f"(max_consecutive_nonfinite={limit}).\n",
            )
        if not diverged and (self._bad_run < self.rollback_after or not read.snapshots):
            warn = None
            if read.bad and warn_due(read.counts["nonfinite_steps"]):
                info = diagnose(step, read, "step skipped", read.lr_scale, stopping=False, consecutive=self._bad_run)
                warn = describe(info)
            return Request(skip=True, warn=warn)
        return self._roll_back(step, read, diverged, newest_ok)

    def _roll_back(self, step: StepRecord, read: StepRead, diverged: bool, newest_ok: bool) -> Request:
        cause = self._cause(step, read, diverged)
        choice = self._snapshots.choose(read.snapshots, self.rollbacks_per_snapshot, newest_ok)
        if choice is None:
            return self._exhausted(step, read, diverged, cause)
        label, cuts = choice
        self._bad_run = 0
        self.healthy_steps = 0
        self._clean = False  # the period the restore cuts short confirms nothing: a full healthy one must follow
        # A divergence is the LR's doing (a NaN may be one dirty batch): it cuts twice as hard.
        target = read.lr_scale * self.rollback_lr_factor ** (cuts * (2 if diverged else 1))
        factor = lr_factor_to(read.lr_scale, target, self.min_lr_scale)
        self.watch.load_state_dict(self._snapshots.watch_state(label))  # the watch as it was at the snapshot
        why = "" if cuts else " (the newer snapshot went bad again at once: the LR is kept)"
        warn = (
            f"Rolled back at global step {step.global_step} (epoch {step.epoch}, batch {step.batch_idx}, optimizer "
            f"{step.optimizer_idx}, {cause}): restored the snapshot taken before global step {label}{why}; "
            f"skipping this step and this optimizer's next {self.rollback_skip_steps}; LR scale now "
            f"{read.lr_scale * factor:.4g}; {read.counts.get('rollbacks', 0) + 1} rollback(s) so far. Largest "
            f"gradients of the step: {_top_layers(step)}."
        )
        restore = read.snapshots.index(label)
        return Request(restore=restore, skip=True, skip_steps=self.rollback_skip_steps, lr_factor=factor, warn=warn)

    def _cause(self, step: StepRecord, read: StepRead, diverged: bool) -> str:
        if diverged:
            watch = self.watch
            median = f"the loss, median of the last {len(watch.recent)} steps, {watch.current:.4g}"
            return f"divergence: {median} rose above {watch.threshold:.4g} (best {watch.best:.4g})"
        if read.bad:
            return "NaN/Inf"
        return "; ".join(describe_spike(*spike) for spike in step.spikes())

    def _exhausted(self, step: StepRecord, read: StepRead, diverged: bool, cause: str) -> Request:
        prefix = (
            f"Rolled back {self.rollbacks_per_snapshot} time(s) to the oldest snapshot kept, down to LR scale "
            f"{read.lr_scale:.4g}, and the run went bad again (rollbacks_per_snapshot={self.rollbacks_per_snapshot})"
            ": the LR alone does not explain it. Check the data and the model (normalization, initialization).\n"
        )
        if not diverged:  # the NaN/spike diagnosis, with its parameters and inputs
            info = diagnose(step, read, "raised NonFiniteGradientError", read.lr_scale, stopping=True, consecutive=1)
            return stop(info, prefix)
        where = f"global step {step.global_step} (epoch {step.epoch}, batch {step.batch_idx}, optimizer "
        message = f"{prefix}Diverged at {where}{step.optimizer_idx}): {cause}."
        return Request(stop=Stop(message, step.global_step, (), self._unhealthy))

    def finish(self, end: RunEnd) -> Request:
        """One line on what the rollbacks found (none: nothing)."""
        if not end.rollbacks:
            return NOTHING
        lost = steps_lost(end.windows)
        lr = f"lr {end.base_lr:.4g}" if end.base_lr is not None else "the LR"
        verdict = f"{lr} was too high: training settled at {end.lr_scale:.4g}x" if end.lr_scale < 1.0 else f"{lr} kept"
        return Request(
            warn=f"lightning-clip: optimizer {end.optimizer_idx}: {end.rollbacks} rollback(s), {lost} step(s) lost; "
            f"{verdict}."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "healthy_steps": self.healthy_steps,
            "bad_run": self._bad_run,
            "unhealthy": self._unhealthy,
            "clean": self._clean,
            "run_from_clean": self._run_from_clean,
            "watch": self.watch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.healthy_steps = int(state.get("healthy_steps", 0))
        self._bad_run = int(state.get("bad_run", 0))
        self._unhealthy = int(state.get("unhealthy", 0))
        self._clean = bool(state.get("clean", True))
        self._run_from_clean = bool(state.get("run_from_clean", True))
        self.watch.load_state_dict(state.get("watch", {}))
        # Snapshots live in memory only: a resumed run starts from a fresh, trusted snapshot of its start.
        self._snapshots = Trust()


class Trust:
    """Which snapshots (by label) are trusted, the divergence watch's state at each, and the LR cuts made from each.

    A snapshot the remedy asked for is a *candidate* until the next clean snapshot period confirms it; one the
    engine took by itself (the start of training, a change of parameters) is trusted at once.
    """

    def __init__(self) -> None:
        self.trusted: list[int] = []
        self.pending: int | None = None
        self.watch: dict[int, dict[str, Any]] = {}
        self.cuts: dict[int, int] = {}
        self.restored: int | None = None  # the label restored last, until a clean period confirms it afresh
        self.streak = 0  # rollbacks with an LR cut since the last clean period

    def follow(self, labels: tuple[int, ...], watch: DivergenceWatch) -> None:
        """The engine's snapshots now (newest first): forget the dropped ones, trust the engine's own."""
        for label in labels:
            if label not in self.watch:  # taken by the engine itself: the state training (re)starts from
                self.watch[label] = watch.state_dict()
                if label != self.pending:
                    self.trusted.append(label)
        kept = set(labels)
        self.trusted = [label for label in self.trusted if label in kept]
        self.watch = {k: v for k, v in self.watch.items() if k in kept or k == self.pending}
        self.cuts = {k: v for k, v in self.cuts.items() if k in kept}

    def candidate(self, label: int, watch: DivergenceWatch) -> None:
        self.pending = label
        self.watch[label] = watch.state_dict()

    def confirm(self) -> None:
        """A clean period: the candidate is trusted, and a restored snapshot is good again."""
        for label in (self.restored, self.pending):  # a restored snapshot is good again; the candidate now trusted
            if label is not None and label in self.watch and label not in self.trusted:
                self.trusted.append(label)
        self.pending = None
        self.restored = None
        self.streak = 0

    def choose(self, labels: tuple[int, ...], max_cuts: int, newest_ok: bool) -> tuple[int, int] | None:
        """The snapshot to restore (the newest trusted one, the candidate too when ``newest_ok``, or the elder of
        one that went bad again at once) and how many LR cuts to make (0: keep the LR; the k-th rollback since
        the last clean period makes k: exponential back-off); None when every one has had ``max_cuts`` rollbacks
        with a cut."""
        trusted = [label for label in labels if label in self.trusted or (newest_ok and label == self.pending)]
        trusted = trusted or list(labels[-1:])
        cut = True
        if self.restored in self.trusted and self.restored in trusted and len(trusted) > 1:
            self.trusted.remove(self.restored)  # it went bad again before a clean period: its state is suspect
            trusted.remove(self.restored)
            cut = False
        for label in trusted:
            if not cut or self.cuts.get(label, 0) < max_cuts:
                if cut:
                    self.cuts[label] = self.cuts.get(label, 0) + 1
                    self.streak += 1
                self.restored, self.pending = label, None
                return label, self.streak if cut else 0
        return None

    def watch_state(self, label: int) -> dict[str, Any]:
        return self.watch.get(label, {})


def _top_layers(step: StepRecord, k: int = 3) -> str:
    """The parameters with the largest gradient norms of this step, non-finite first (a host read: bad path)."""
    if not step.norms:
        return "not measured"
    norms = torch.stack([n.to(step.device, torch.float64) for n in step.norms]).tolist()
    ranked = sorted(zip(step.names, norms), key=lambda pair: -math.inf if not math.isfinite(pair[1]) else -pair[1])
    return ", ".join(f"{name} ({norm:.3g})" for name, norm in ranked[:k])


__all__ = ["Rollback"]
