"""The report stage: what a logging step adds to the step's one host read, and the metrics made from it.

A :class:`Reporter` (one per :class:`~lightning_clip.engine.ClipEngine`) runs on logging steps only:

* :meth:`Reporter.add_to` adds the totals, the layer (or parameter) norms, each layer's ``||grad W|| / ||W||``
  (divided on the device), the spike tests and the last measured update's ratios to the step's
  :class:`~lightning_clip.record.HostRead`, beside the remedy's values: still one transfer;
* :class:`LoggedValues` is that part of the read, typed, built in one place (:meth:`LoggedValues.of`);
* :meth:`Reporter.report` turns it into the metrics dict: the step's tags, gradient health (the vanishing layers
  and their warning, the update ratios) and, on a step holding a spike, the layers that carried it;
* :meth:`Reporter.watch_update` arms the update-to-weight ratio of a logging step's update, measured once the
  optimizer has applied it (:attr:`~lightning_clip.control.SlotControl.after_update`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_clip import functional as F
from lightning_clip import metrics as M
from lightning_clip.health import VanishingEvent, VanishingMonitor, named_ratios, ratio_vector
from lightning_clip.record import HostRead, StepRecord
from lightning_clip.slots import Slot
from lightning_clip.snapshot import local_tensor


@dataclass(frozen=True)
class LoggedNames:
    """What :meth:`Reporter.add_to` added per layer (or parameter), in the order of the values read back."""

    norms: list[str]  # of ``layer_norms``: layers or parameters (``log_norms``); none for "total" and "none"
    health: list[str]  # of ``health_ratios``: layers (a vanishing monitor, not on FSDP1 flat shards)
    updates: list[str]  # of ``update_ratios``: layers of the last measured update


@dataclass(frozen=True)
class LoggedValues:
    """A logging step's host values, from the step's one read.

    ``threshold`` is None where the rule has none; ``spike`` is the step's spike flag (a skipped outlier);
    ``spike_checks`` holds ``(value, threshold, flag)`` of each of the step's spike tests, in the order of
    :attr:`StepRecord.spike_checks <lightning_clip.record.StepRecord.spike_checks>`.
    """

    total: float
    total_clipped: float
    clipped: float
    threshold: float | None
    spike: bool
    norm_names: list[str]
    norms: list[float]
    health_layers: list[str]
    health_ratios: list[float]
    update_layers: list[str]
    update_ratios: list[float]
    spike_checks: list[tuple[float, float, float]]

    @classmethod
    def of(cls, values: dict[str, Any], names: LoggedNames) -> LoggedValues:
        """From :meth:`HostRead.read <lightning_clip.record.HostRead.read>` and the names :meth:`Reporter.add_to`
        returned: the one place that reads the logging part of the transfer by name."""
        triples = values["spike_checks"]
        return cls(
            total=values["total"],
            total_clipped=values["total_clipped"],
            clipped=values["clipped"],
            threshold=None if math.isnan(values["threshold"]) else values["threshold"],
            spike=bool(values["spike"]),
            norm_names=names.norms,
            norms=values["layer_norms"],
            health_layers=names.health,
            health_ratios=values.get("health_ratios", []),
            update_layers=names.updates,
            update_ratios=values.get("update_ratios", []),
            spike_checks=[(triples[j], triples[j + 1], triples[j + 2]) for j in range(0, len(triples), 3)],
        )


class Reporter:
    """The metrics of an engine's logging steps: per-layer norms, gradient health, update ratios, spike attribution.

    Args:
        log_norms: ``"layer"``, ``"parameter"``, ``"total"`` or ``"none"`` (checked by the engine).
        update_ratio_every: measure the update ratio on the 1st and every ``update_ratio_every``-th logging step
            (None: never); with ``vanishing`` and ``log_norms="layer"``.
        name: the engine's ``name`` (tags get ``/<name>``).
        vanishing: the engine's prototype monitor; each optimizer's copy lives in its slot.
        spike_top_k: how many layers a spike's warning names.

    Settings are read on each call: the engine's ``configure`` changes them from the next step on. Warnings go
    to the step's ``warn``.
    """

    def __init__(
        self,
        log_norms: str = "layer",
        update_ratio_every: int | None = 4,
        name: str | None = None,
        vanishing: VanishingMonitor | None = None,
        spike_top_k: int = 3,
    ) -> None:
        self.log_norms = log_norms
        self.update_ratio_every = update_ratio_every
        self.name = name
        self.vanishing = vanishing
        self.spike_top_k = spike_top_k
        # every vanishing warning of every optimizer, as a record (not part of the checkpoint: a resumed run
        # starts an empty list, while the monitors' state, which layers were named, is restored)
        self.vanishing_events: list[VanishingEvent] = []

    # ------------------------------------------------------------------ the logging part of the host read
    def add_to(self, read: HostRead, slot: Slot, step: StepRecord) -> LoggedNames:
        """A logging step's part of the read: the totals, the layer (or parameter) norms, each layer's
        ``||grad W|| / ||W||`` (divided on the device), the spike tests and the ratios of the last measured update."""
        result = step.result
        assert result is not None
        threshold = result.threshold
        read.add("total", step.total)
        read.add("total_clipped", step.total if result.total_after is None else result.total_after)
        read.add("clipped", step.clipped)
        read.add("threshold", torch.as_tensor(math.nan if threshold is None else threshold, device=step.device))
        names, health = self._add_norms(read, slot, step)
        # (value, threshold, flag) of each spike test, to say which spiked (a loss or the gradient norm)
        checks = [(c.value, c.threshold, c.flag) for c in step.spike_checks]
        read.add_all("spike_checks", [t.to(step.device, torch.float64) for check in checks for t in check])
        updates: list[str] = []
        pending = slot.units.update_ratios
        if pending is not None:  # the last measured update, read at the logging step after it
            updates, slot.units.update_ratios = pending[0], None
            read.add_all("update_ratios", pending[1])
        return LoggedNames(names, health, updates)

    def _add_norms(self, read: HostRead, slot: Slot, step: StepRecord) -> tuple[list[str], list[str]]:
        """The layer (or parameter) norms and, with a vanishing monitor, the layers' gradient-to-weight ratios;
        returns their names."""
        health = self.vanishing is not None and step.all_reduce is None  # flat FSDP1 shards: no per-layer norms
        names: list[str] = list(step.names) if self.log_norms == "parameter" else []
        norms = torch.zeros(0, device=step.device)
        layers: list[str] = []
        if names or self.log_norms == "layer" or health:  # else ("total", "none") no per-tensor vector at all
            true_norms = F.stack_norms(step.norms, step.device, step.inv_scale)
            norms = true_norms.float() if names else norms
            if self.log_norms == "layer" or health:
                layers, grads = _by_layer(slot, true_norms, step.norm_type)
                if self.log_norms == "layer":
                    names, norms = layers, grads
                if health:
                    read.add_all("health_ratios", ratio_vector(grads, _layer_weight_norms(slot, step)))
        read.add_all("layer_norms", norms)
        return names, layers if health else []

    # ------------------------------------------------------------------ the metrics
    def report(
        self, i: int, slot: Slot, step: StepRecord, logged: LoggedValues, counts: dict[str, int]
    ) -> dict[str, float]:
        """The metrics of a logging step (optimizer ``i``), from the values read back and the counts."""
        step_values: dict[str, Any] = {  # threshold and max_norm may be None
            "total": logged.total,
            "total_clipped": logged.total_clipped,
            "clipped": logged.clipped,
            "threshold": logged.threshold,
            "max_norm": getattr(slot.units.rule, "max_norm", None),
            "lr_scale": slot.control.lr_scale,
        }
        group = {"layer": M.LAYER_GROUP, "parameter": M.PARAM_GROUP}.get(self.log_norms)
        out = M.step_metrics(i, step_values, counts, group, logged.norm_names, logged.norms, self.name)
        if logged.health_layers:
            out.update(self._health(i, slot, step, logged))
        spiked = logged.spike or (slot.units.rule.reports_spikes and logged.clipped > 0)
        if spiked and logged.norms:
            failed = [
                (check.what, value, limit)
                for check, (value, limit, flag) in zip(step.spike_checks, logged.spike_checks)
                if flag
            ]
            out[M.tag(M.TOP_LAYER_SHARE, i, self.name)] = self._attribute_spike(step, logged, failed)
        return out

    def _health(self, i: int, slot: Slot, step: StepRecord, logged: LoggedValues) -> dict[str, float]:
        """Vanishing layers from this logging step's host values: a rate-limited warning and the tags."""
        monitor = slot.units.vanishing
        assert monitor is not None
        layer_ratios = named_ratios(logged.health_layers, logged.health_ratios)
        flagged = monitor.update(layer_ratios)
        if flagged is not None:
            event = VanishingEvent(step.global_step, i, tuple(flagged), monitor.ratio, monitor.patience)
            self.vanishing_events.append(event)
            step.warn(event.message())
        out = {M.tag(M.VANISHING_LAYERS, i, self.name): float(monitor.flagged)}
        if self.log_norms == "layer":
            out.update({M.norm_tag(M.GRAD_RATIO_GROUP, k, i, self.name): v for k, v in layer_ratios.items()})
            updates = dict(zip(logged.update_layers, logged.update_ratios))
            out.update({M.norm_tag(M.UPDATE_RATIO_GROUP, k, i, self.name): v for k, v in updates.items()})
            finite = sorted(v for v in updates.values() if math.isfinite(v))
            if finite:
                summary = (finite[0], statistics.median(finite), finite[-1])
                out.update({M.tag(name, i, self.name): v for name, v in zip(M.UPDATE_RATIO_SUMMARY, summary)})
        return out

    def _attribute_spike(
        self, step: StepRecord, logged: LoggedValues, spikes: Sequence[tuple[str, float, float]] = ()
    ) -> float:
        """Name the layers that carried a spike (host values of this logging step: no extra read); return the
        top layer's share of the squared norm. ``spikes``: the spike tests that failed (what, value, threshold)."""
        ranked = sorted(
            zip(logged.norm_names, logged.norms), key=lambda pair: -pair[1] if math.isfinite(pair[1]) else math.inf
        )
        squares = sum(n * n for _, n in ranked if math.isfinite(n)) or 1.0
        top = ranked[: self.spike_top_k]
        listed = ", ".join(f"{name} ({norm:.3g}, {100 * norm * norm / squares:.0f}%)" for name, norm in top)
        threshold = logged.threshold
        if spikes:  # skip_spikes / loss_spikes: their own thresholds (mean + k sigma), not the clip threshold
            kind = "Loss" if all(what == "loss" for what, _, _ in spikes) else "Gradient"
            measured = "; ".join(
                f"{'total norm' if what == 'gradient norm' else what} {value:.4g}, threshold {limit:.4g}"
                for what, value, limit in spikes
            )
        else:
            kind = "Gradient"
            measured = f"total norm {logged.total:.4g}" + (
                f", threshold {threshold:.4g}" if threshold is not None else ""
            )
        step.warn(
            f"{kind} spike {'skipped' if logged.spike else 'clipped'} at global step {step.global_step} (optimizer "
            f"{step.optimizer_idx}): {measured}. Largest {'layers' if self.log_norms == 'layer' else 'parameters'} "
            f"(norm, share of the squared norm): {listed}."
        )
        return top[0][1] ** 2 / squares if top and math.isfinite(top[0][1]) else math.nan

    # ------------------------------------------------------------------ the update ratio
    def watch_update(self, slot: Slot, step: StepRecord) -> None:
        """On a logging step (layer norms, health on), the 1st and then every ``update_ratio_every``-th: measure
        ``||dW|| / ||W||`` per layer once the optimizer has applied this step's update (divided on the device); read
        at the next logging step. The weights before the update go to the slot's
        :class:`~lightning_clip.slots.UpdateBuffers` (kept between logging steps on the CPU: no fresh allocation)."""
        if self.vanishing is None or self.log_norms != "layer" or step.sharded:
            return
        if not slot.updates.due(self.update_ratio_every):
            return
        weights = [p.detach() for p in step.params]
        groups = slot.layout.weight_groups(weights)
        slot.updates.take(weights, slot.layout.key)
        norm_type, device = step.norm_type, step.device

        def measure() -> None:
            moves = F.grad_norms(slot.updates.update(weights), norm_type, groups)  # before - after, in place
            sizes = F.grad_norms(weights, norm_type, groups)
            layers, move = _by_layer(slot, F.stack_norms(moves, device), norm_type)
            slot.units.update_ratios = (layers, move / _by_layer(slot, F.stack_norms(sizes, device), norm_type)[1])
            slot.updates.release()

        slot.control.after_update = measure


def _by_layer(slot: Slot, norms: Tensor, norm_type: float) -> tuple[list[str], Tensor]:
    """Per-tensor norms (a vector, in the order of the slot's parameters) combined per layer in one scatter
    (:func:`~lightning_clip.functional.combine_norms`, over the layout's cached index): the layers and their norms
    (float32)."""
    layers, where = slot.layout.layers(norms.device)
    return layers, F.combine_norms(norms, where, len(layers), norm_type).float()


def _layer_weight_norms(slot: Slot, step: StepRecord) -> Tensor:
    """Each layer's weight norm (logging steps: vanishing_ratio); the whole tensors' under DTensor shards."""
    weights = [local_tensor(p) for p in step.params]
    groups = slot.layout.weight_groups(weights)
    return _by_layer(slot, F.whole_norms(weights, step.norm_type, groups, step.specs, step.device), step.norm_type)[1]
