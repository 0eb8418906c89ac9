#!/usr/bin/env python
"""Train the example models with ``LightningCLI``; ``GradientClipping`` is configured in YAML.

Run from any directory; TensorBoard logs go to ``./lightning_logs`` of the working directory::

    python examples/train.py fit --config examples/configs/norm.yaml
    python examples/train.py fit --config examples/configs/nan_recovery.yaml --trainer.max_steps 100
    python examples/train.py fit --help
    tensorboard --logdir lightning_logs

The callback is set like any other Lightning callback, under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_clip.GradientClipping
          init_args: {mode: norm, max_norm: 1.0, nan_policy: skip}

A bad value ends the run before training with one ``error:`` line that names the key, e.g.
``error: trainer.callbacks[0].init_args.max_norm: `max_norm` must be a finite positive number, got -1.0.``
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

# Import this checkout's package, whether or not (and wherever) lightning-clip is installed.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "lightning_clip" / "__init__.py").is_file():
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402

from lightning_clip import GradientClipping  # noqa: E402
from lightning_clip.models import DeepMLP, SyntheticRegressionData  # noqa: E402


def _fail(message: str) -> NoReturn:
    # A configuration mistake: one line on stderr, exit status 2 (as for jsonargparse's own errors).
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _named_key(message: str) -> str:
    """The argument a lightning-clip/validation message is about: its first `backquoted` word."""
    found = re.search(r"`([\w\[\]]+)`", message)
    return f".{found.group(1)}" if found else ""


class ClipCLI(LightningCLI):
    """``LightningCLI`` over :class:`DeepMLP` and :class:`SyntheticRegressionData` that reports value
    errors from ``__init__`` (which jsonargparse's type checks cannot see, e.g. ``max_norm: -1``)
    against their configuration key instead of with a traceback."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        callbacks = config.get("trainer.callbacks") or []
        # Build each GradientClipping once here: its __init__ checks ranges and combinations.
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            cls = _clip_class(getattr(callback, "class_path", None))
            if cls is None:
                continue
            init_args = callback.get("init_args")
            try:
                cls(**(dict(vars(init_args)) if init_args else {}))
            except (ValueError, TypeError) as err:
                _fail(f"trainer.callbacks[{i}].init_args{_named_key(str(err))}: {err}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # The model's and datamodule's own range checks (e.g. `--data.batch_size 0`).
            section = next((key for name, key in (("DeepMLP", "model"), ("SyntheticRegressionData", "data"))
                            if _raised_in(err, name)), "config")
            _fail(f"{section}{_named_key(str(err))}: {err}")


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


def _raised_in(err: BaseException, class_name: str) -> bool:
    """True when ``err`` (or the error it wraps) was raised inside a method of a class named ``class_name``."""
    while err is not None:
        tb = err.__traceback__
        while tb is not None:
            if type(tb.tb_frame.f_locals.get("self")).__name__ == class_name:
                return True
            tb = tb.tb_next
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


def main() -> None:
    """Parse the command line (or config files) and run the sub-command (fit, validate, ...)."""
    if "OMP_NUM_THREADS" not in os.environ:
        # Tiny models: extra threads only add synchronization, and on a busy CPU they make it ~10x slower.
        torch.set_num_threads(1)
    ClipCLI(DeepMLP, SyntheticRegressionData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
