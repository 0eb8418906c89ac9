"""lightning-clip: gradient clipping, gradient-norm logging and NaN/Inf remedies for PyTorch Lightning.

* :class:`GradientClipping` -- the Lightning callback (``on_before_optimizer_step``), for ``pytorch_lightning``
  and ``lightning.pytorch`` alike.
* :class:`ClipEngine` -- the same pipeline for a plain PyTorch loop or Lightning Fabric.
* :mod:`lightning_clip.rules` and :mod:`lightning_clip.remedies` -- the clip rules and NaN policies, one unit each.
* :mod:`lightning_clip.functional` -- the pure math on lists of tensors, usable without Lightning.
* :class:`GradientClippingCLI` -- a ``LightningCLI`` that reports bad YAML settings in one line
  (``lightning_clip.lightning_pytorch.GradientClippingCLI`` for ``lightning.pytorch``). Imported on first
  use, so ``import lightning_clip`` loads neither jsonargparse nor ``LightningCLI``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_clip import functional, remedies, rules
from lightning_clip.callback import GradientClipping
from lightning_clip.engine import ClipEngine
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.lr_scale import StepLRScale

if TYPE_CHECKING:
    from lightning_clip.lightning_cli import GradientClippingCLI

__all__ = [
    "ClipEngine",
    "GradientClipping",
    "GradientClippingCLI",
    "NonFiniteGradientError",
    "StepLRScale",
    "functional",
    "remedies",
    "rules",
]
__version__ = "0.2.0.dev0"


def __getattr__(name: str) -> Any:
    """``GradientClippingCLI`` on first use (PEP 562): it imports jsonargparse and ``pytorch_lightning.cli``."""
    if name == "GradientClippingCLI":
        from lightning_clip.lightning_cli import GradientClippingCLI

        globals()[name] = GradientClippingCLI
        return GradientClippingCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
