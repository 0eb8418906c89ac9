"""lightning-clip: gradient clipping, gradient-norm logging and NaN/Inf remedies for PyTorch Lightning.

* :class:`GradientClipping` -- the Lightning callback (``on_before_optimizer_step``).
* :mod:`lightning_clip.functional` -- the pure math on lists of tensors, usable without Lightning.
* :class:`GradientClippingCLI` -- a ``LightningCLI`` that reports bad YAML settings in one line.
"""

from lightning_clip import functional
from lightning_clip.callback import GradientClipping
from lightning_clip.errors import NonFiniteGradientError
from lightning_clip.lightning_cli import GradientClippingCLI
from lightning_clip.lr_scale import StepLRScale

__all__ = ["GradientClipping", "GradientClippingCLI", "NonFiniteGradientError", "StepLRScale", "functional"]
__version__ = "0.1.0"
