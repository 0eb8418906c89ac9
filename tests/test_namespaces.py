"""One ``GradientClipping`` for both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch``.

* the same YAML (``class_path: lightning_clip.GradientClipping``) runs in either package's plain ``LightningCLI``
  (real subprocesses of tests/cli_script.py, started together);
* either package's ``Trainer`` saves the callback's state in a checkpoint and restores it on resume;
* each namespace's ``GradientClippingCLI`` is that namespace's ``LightningCLI``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch
import pytest
import pytorch_lightning
from cli_script import Run, finish, launch, lightning_classes

import lightning_clip
from lightning_clip import GradientClipping

NAMESPACES = {"pytorch_lightning": pytorch_lightning, "lightning": lightning.pytorch}

# The same file for both CLIs. The model's loss is NaN at step 2: halve_lr skips that step and halves the LR.
CONFIG = """\
trainer:
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_clip.GradientClipping
      init_args:
        mode: norm
        max_norm: 1.0
        nan_policy: halve_lr
model:
  nan_at_step: 2
"""


@pytest.fixture(scope="module")
def plain_cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """``fit`` with each package's own ``LightningCLI`` (not ours), both started at once."""
    started = {ns: launch(tmp_path_factory.mktemp(ns), ns, "plain", CONFIG) for ns in NAMESPACES}
    try:
        yield {ns: finish(proc) for ns, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_same_yaml_runs_in_either_plain_lightning_cli(plain_cli_runs: dict[str, Run], namespace: str) -> None:
    run = plain_cli_runs[namespace]
    assert run.returncode == 0, run.stderr[-3000:]
    # The callback from the YAML ran in that package's Trainer: every step counted, the NaN step remedied.
    (clip,) = run.clipping()
    assert clip["steps"] == 4 and clip["lr_scales"] == [0.5] and clip["counters"]["nonfinite_steps"] == 1


def _trainer(pl: Any, root: Path, callback: GradientClipping) -> Any:
    return pl.Trainer(
        max_steps=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
    )


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_trainer_checkpoints_and_restores_the_callback_state(tmp_path: Path, namespace: str) -> None:
    pl = NAMESPACES[namespace]
    model_class, data_class = lightning_classes(pl)  # a LightningModule of the Trainer's own package
    callback = GradientClipping(mode="norm", max_norm=1.0, nan_policy="halve_lr")
    trainer = _trainer(pl, tmp_path, callback)
    trainer.fit(model_class(nan_at_step=2), datamodule=data_class())
    assert callback.lr_scales == [0.5] and callback.counters["nonfinite_steps"] == 1
    saved = callback.state_dict()
    trainer.save_checkpoint(tmp_path / "nan.ckpt")

    resumed = GradientClipping(mode="norm", max_norm=1.0, nan_policy="halve_lr")
    assert resumed.lr_scales != [0.5]  # fresh: whatever it has after resuming came from the checkpoint
    # max_steps already reached: the Trainer restores the state and trains no further step.
    _trainer(pl, tmp_path, resumed).fit(model_class(), datamodule=data_class(), ckpt_path=tmp_path / "nan.ckpt")
    assert resumed.lr_scales == [0.5]
    assert resumed.counters["nonfinite_steps"] == 1
    assert resumed.state_dict() == saved


def test_each_namespace_has_its_own_cli_and_the_same_callback() -> None:
    lightning_pytorch = importlib.import_module("lightning_clip.lightning_pytorch")
    assert issubclass(lightning_pytorch.GradientClippingCLI, lightning.pytorch.cli.LightningCLI)
    assert issubclass(lightning_clip.GradientClippingCLI, pytorch_lightning.cli.LightningCLI)
    assert not issubclass(lightning_pytorch.GradientClippingCLI, pytorch_lightning.cli.LightningCLI)
    assert lightning_pytorch.GradientClipping is GradientClipping
    assert issubclass(GradientClipping, lightning.pytorch.Callback)
    assert issubclass(GradientClipping, pytorch_lightning.Callback)


def test_lightning_pytorch_module_says_how_to_install_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if `lightning` were not installed: a None entry in sys.modules makes its import fail.
    monkeypatch.setitem(sys.modules, "lightning.pytorch.cli", None)
    monkeypatch.delitem(sys.modules, "lightning_clip.lightning_pytorch", raising=False)
    with pytest.raises(ImportError, match="install lightning: pip install lightning"):
        importlib.import_module("lightning_clip.lightning_pytorch")
