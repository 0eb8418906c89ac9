"""``GradientClippingCLI``: a ``LightningCLI`` that reports a bad ``GradientClipping`` setting in one line.

jsonargparse checks types (``mode: clip`` is refused against the ``Literal``), but ranges and
combinations (``max_norm: -1``, ``min_value > max_value``) are checked in ``__init__``, which a plain
``LightningCLI`` runs inside its instantiation: the user gets two tracebacks around the message. This
subclass builds each configured ``GradientClipping`` once before instantiating anything and, on a
``ValueError``, prints one ``error:`` line naming the configuration key and exits with status 2 (as
jsonargparse does for its own errors).

Example (``train.py``)::

    from lightning_clip import GradientClippingCLI

    GradientClippingCLI(MyModel, MyDataModule)

    # python train.py fit --config config.yaml, with max_norm: -1 in config.yaml, prints
    # error: trainer.callbacks[0].init_args.max_norm: `max_norm` must be a finite positive number, got -1.0.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any, NoReturn, Optional

from pytorch_lightning.cli import LightningCLI

from lightning_clip.callback import GradientClipping


def fail(message: str) -> NoReturn:
    """A configuration mistake: one line on stderr, exit status 2."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def named_key(message: str) -> str:
    """``.arg`` for the first `backquoted` argument name in a validation message ('' if none)."""
    found = re.search(r"`([\w\[\]]+)`", message)
    return f".{found.group(1)}" if found else ""


def _clip_class(class_path: Any) -> Optional[type]:
    """The class at ``class_path`` if it is GradientClipping or a subclass, else None."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse reports unknown class paths itself
    return obj if isinstance(obj, type) and issubclass(obj, GradientClipping) else None


class GradientClippingCLI(LightningCLI):
    """``LightningCLI`` that validates every ``GradientClipping`` under ``trainer.callbacks`` up front."""

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        callbacks = config.get("trainer.callbacks") or []
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            cls = _clip_class(getattr(callback, "class_path", None))
            if cls is None:
                continue
            init_args = callback.get("init_args")
            try:
                cls(**(dict(vars(init_args)) if init_args else {}))
            except (ValueError, TypeError) as err:
                fail(f"trainer.callbacks[{i}].init_args{named_key(str(err))}: {err}")
