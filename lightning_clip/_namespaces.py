"""One callback class for both Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of the same Trainer. Each Trainer runs any
object with the callback hooks, but each ``LightningCLI`` refuses a ``class_path`` that is not a subclass of
its own ``Callback``. :class:`CallbackBase` derives from both (from ``lightning.pytorch`` only when that
package is installed), so ``class_path: lightning_clip.GradientClipping`` works in either CLI.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import pytorch_lightning

__all__ = ["CallbackBase", "callback_bases"]


def callback_bases() -> tuple[type, ...]:
    """``pytorch_lightning.Callback``, then ``lightning.pytorch.Callback`` when ``lightning`` is installed."""
    bases: list[type] = [pytorch_lightning.Callback]
    if importlib.util.find_spec("lightning") is not None:
        try:
            import lightning.pytorch
        except ImportError:  # a broken or partial install: serve pytorch_lightning alone
            pass
        else:
            bases.append(lightning.pytorch.Callback)
    return tuple(bases)


if TYPE_CHECKING:
    CallbackBase = pytorch_lightning.Callback
else:
    # Both bases are plain classes with empty hooks and the same state-key helpers: the MRO is well defined.
    CallbackBase = type("CallbackBase", callback_bases(), {"__module__": __name__, "__doc__": __doc__})
