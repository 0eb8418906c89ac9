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

import os
import sys
from pathlib import Path

# Import this checkout's package, whether or not (and wherever) lightning-clip is installed.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "lightning_clip" / "__init__.py").is_file():
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from lightning_clip.app.models import DeepMLP, SyntheticRegressionData  # noqa: E402
from lightning_clip.lightning_cli import GradientClippingCLI, fail, named_key  # noqa: E402


class ClipCLI(GradientClippingCLI):
    """The library's CLI (one-line errors for bad GradientClipping settings) over the example model and
    data, whose own range checks (e.g. ``--data.batch_size 0``) are reported the same way."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            section = next(
                (
                    key
                    for name, key in (("DeepMLP", "model"), ("SyntheticRegressionData", "data"))
                    if _raised_in(err, name)
                ),
                "config",
            )
            fail(f"{section}{named_key(str(err))}: {err}")


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
