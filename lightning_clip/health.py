"""Gradient health: the article's other failure, vanishing gradients, found in the layer norms and named.

Across many layers the chain rule multiplies per-layer derivatives; below 1 they shrink the gradient of the
first layers towards nothing, and those layers stop learning. The signal is a layer's gradient-to-weight ratio
:math:`\\|\\nabla W\\| / \\|W\\|`: at initialisation a 20-layer sigmoid MLP shows about 1e-18 in its first layers
(3e-3 to 0.16 in its last), the same depth with residual connections and LayerNorm about 0.3 everywhere.

:class:`VanishingMonitor` reads the ratios of logging steps (host values the engine already brought back in its one
transfer: no extra read) and flags a layer whose ratio stays below ``ratio``, and below ``relative`` times the
largest layer's, on ``patience`` logging steps in a row: a gradient that vanished on its way back, not a converged
model whose gradients are all small (a converged 4-layer ReLU MLP falls to ~2e-5 in every layer). It says so in at
most ``max_warnings`` warnings per run (when the flagged set first appears or grows).

Example::

    >>> m = VanishingMonitor(ratio=1e-6, patience=2)
    >>> m.update({"net.0": 1e-12, "net.1": 0.1}) is None    # one step below: not yet
    True
    >>> m.update({"net.0": 3e-12, "net.1": 0.2})
    [('net.0', 3e-12)]
    >>> m.flagged
    1
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_clip.validation import check_count, check_positive

__all__ = [
    "VanishingMonitor",
    "VanishingEvent",
    "VANISHING_PREFIX",
    "VANISHING_REMEDIES",
    "layer_of",
    "describe_vanishing",
    "vanishing_headline",
    "ratios",
    "ratio_vector",
    "named_ratios",
]

VANISHING_PREFIX = "Vanishing gradients"  # how the warning begins (a RuntimeWarning)
VANISHING_REMEDIES = (
    "normalization between layers (LayerNorm/BatchNorm)",
    "an initialisation suited to the activation (Xavier for tanh/sigmoid, Kaiming for ReLU)",
    "residual connections around deep blocks",
    "another activation (ReLU/GELU instead of sigmoid/tanh)",
    "a higher learning rate, where a low one is the cause",
)


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name without the last component (``net.0.weight`` -> ``net.0``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def ratios(names: Sequence[str], grad_norms: Sequence[float], weight_norms: Sequence[float]) -> dict[str, float]:
    """``||grad|| / ||W||`` per layer, leaving out layers with zero (or non-finite) weights and non-finite grads."""
    out = {}
    for name, g, w in zip(names, grad_norms, weight_norms):
        if w > 0 and math.isfinite(w) and math.isfinite(g):
            out[name] = g / w
    return out


def ratio_vector(grad_norms: Tensor, weight_norms: Tensor) -> Tensor:
    """:func:`ratios` on the device, for vectors of layer norms: ``||grad|| / ||W||`` in float64, NaN where
    :func:`ratios` leaves the layer out (zero or non-finite weights, a non-finite gradient). No host read: the
    ratios travel in the step's one transfer, and :func:`named_ratios` names them.

    >>> ratio_vector(torch.tensor([1e-20, 1e-20, math.nan]), torch.tensor([1.0, 0.0, 1.0]))
    tensor([1.0000e-20,        nan,        nan], dtype=torch.float64)
    """
    g, w = grad_norms.double(), weight_norms.double()
    kept = (w > 0) & torch.isfinite(w) & torch.isfinite(g)
    return torch.where(kept, g / w, torch.full_like(g, math.nan))


def named_ratios(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """The host values of :func:`ratio_vector` by layer, without the layers it left out (NaN): what :func:`ratios`
    returns for the same norms.

    >>> named_ratios(["a", "zero"], [1e-20, math.nan])
    {'a': 1e-20}
    """
    return {name: r for name, r in zip(names, values) if not math.isnan(r)}


class VanishingMonitor:
    """Flag the layers whose gradient-to-weight ratio stays below ``ratio`` for ``patience`` logging steps."""

    def __init__(self, ratio: float = 1e-8, patience: int = 3, max_warnings: int = 3, relative: float = 1e-3) -> None:
        check_positive("vanishing_ratio", ratio)
        check_count("vanishing_patience", patience, allow_none=False)
        self.ratio, self.patience, self.max_warnings = float(ratio), int(patience), int(max_warnings)
        self.relative = float(relative)
        self.streaks: dict[str, int] = {}  # logging steps in a row below ``ratio``, per layer
        self.warned: set[str] = set()  # layers named in a warning already
        self.warnings = 0

    @property
    def flagged(self) -> int:
        """How many layers are vanishing now (below ``ratio`` for ``patience`` logging steps or more)."""
        return sum(1 for n in self.streaks.values() if n >= self.patience)

    def update(self, layer_ratios: dict[str, float]) -> list[tuple[str, float]] | None:
        """Take one logging step's ratios (layers in depth order). Returns the flagged layers, shallowest first, when
        a warning is due (new layers flagged, within ``max_warnings``), else None."""
        bound = min(self.ratio, self.relative * max(layer_ratios.values(), default=0.0))
        self.streaks = {
            name: self.streaks.get(name, 0) + 1 for name, r in layer_ratios.items() if r < bound
        }  # a layer back above the threshold, or without a gradient this step, starts again
        flagged = [(name, r) for name, r in layer_ratios.items() if self.streaks.get(name, 0) >= self.patience]
        new = {name for name, _ in flagged} - self.warned
        if not new or self.warnings >= self.max_warnings:
            return None
        self.warned |= new
        self.warnings += 1
        return flagged

    def state_dict(self) -> dict[str, Any]:
        return {"streaks": dict(self.streaks), "warned": sorted(self.warned), "warnings": self.warnings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streaks = {str(k): int(v) for k, v in state.get("streaks", {}).items()}
        self.warned = set(state.get("warned", []))
        self.warnings = int(state.get("warnings", 0))


def vanishing_headline(
    layers: Sequence[tuple[str, float]], ratio: float, patience: int, step: int, shown: int | None = None
) -> str:
    """The warning's first line: the step, the bound and the layers (the first ``shown`` of them, None: all).

    >>> vanishing_headline([("a", 1e-12), ("b", 2e-12)], 1e-8, 3, 7, shown=1).partition("first: ")[2][:24]
    'a (1e-12), ... (1 more).'
    """
    listed = ", ".join(f"{name} ({r:.2g})" for name, r in layers[:shown])
    if shown is not None and len(layers) > shown:
        listed += f", ... ({len(layers) - shown} more)"
    return (
        f"{VANISHING_PREFIX} at global step {step}: ||grad W|| / ||W|| below {ratio:g} on {patience} logging steps in "
        f"a row, shallowest first: {listed}. These layers barely learn: the chain rule multiplies per-layer "
        "derivatives below 1 on the way back to them."
    )


def describe_vanishing(layers: Iterable[tuple[str, float]], ratio: float, patience: int, step: int) -> str:
    """The warning: which layers, what it means, and the article's remedies."""
    remedies = "".join(f"\n  - {line}" for line in VANISHING_REMEDIES)
    return f"{vanishing_headline(list(layers), ratio, patience, step)}\nWhat to try:{remedies}"


@dataclass(frozen=True)
class VanishingEvent:
    """One vanishing-gradient warning, as a record: at ``global_step`` the layers of optimizer ``optimizer_idx``
    in ``layers`` (``(name, ||grad W|| / ||W||)``, shallowest first) had stayed below ``ratio`` (the
    ``vanishing_ratio``) on ``patience`` logging steps in a row. :meth:`message` is the warning's text.

    >>> e = VanishingEvent(global_step=7, optimizer_idx=0, layers=(("net.0", 3e-12),), ratio=1e-8, patience=3)
    >>> e.message().splitlines()[0][:38]
    'Vanishing gradients at global step 7: '
    """

    global_step: int
    optimizer_idx: int
    layers: tuple[tuple[str, float], ...]
    ratio: float
    patience: int

    def headline(self, shown: int | None = None) -> str:
        """The warning's first line, its list of layers cut to the first ``shown`` (None: all)."""
        return vanishing_headline(self.layers, self.ratio, self.patience, self.global_step, shown)

    def message(self) -> str:
        """The warning's whole text (:func:`describe_vanishing`)."""
        return describe_vanishing(self.layers, self.ratio, self.patience, self.global_step)
