"""Write ``v010_halve_lr.ckpt``: a real checkpoint of lightning-clip 0.1.0, for ``tests/test_checkpoint_compat.py``.

Run once, by hand, against the 0.1.0 release (commit ``cbf7ce3``), from the repository root::

    rm -rf /tmp/v010 && mkdir -p /tmp/v010
    git archive cbf7ce3 lightning_clip | tar -x -C /tmp/v010
    PYTHONPATH=/tmp/v010 python tests/data/make_v010_checkpoint.py

It asserts that ``lightning_clip`` came from ``/tmp/v010`` (version 0.1.0), trains :class:`TinyModule` for
``SAVED_STEPS`` steps with ``GradientClipping(nan_policy="halve_lr", lr_recovery_steps=100)`` and a NaN loss at
global step ``NAN_STEP`` (so the checkpoint holds ``lr_scale == 0.5`` and ``nonfinite_steps == 1``), saves the
checkpoint next to this file and prints the callback's state dict (copied into the test as ``V1_STATE``).
Written with torch 2.13 and pytorch-lightning 2.6.6. The test imports :class:`TinyModule` and :func:`make_loader`
from here (the module-level code does not import lightning_clip), so the resumed model is the saved one.
"""

from __future__ import annotations

import pprint
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

CKPT = Path(__file__).with_name("v010_halve_lr.ckpt")
LR = 0.1
NAN_STEP = 1
SAVED_STEPS = 4


class TinyModule(pl.LightningModule):
    """21 parameters; plain SGD (no momentum), so an update is ``w - lr_applied * grad``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step == NAN_STEP:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def make_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)


def main() -> None:
    import warnings

    import lightning_clip
    from lightning_clip import GradientClipping

    assert lightning_clip.__version__ == "0.1.0", lightning_clip.__file__
    cb = GradientClipping(nan_policy="halve_lr", lr_recovery_steps=100)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=SAVED_STEPS,
            callbacks=[cb],
            default_root_dir=tmp,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(TinyModule(), make_loader())
        trainer.save_checkpoint(CKPT)
    assert cb.lr_scales == [0.5] and cb.counters["nonfinite_steps"] == 1, (cb.lr_scales, cb.counters)
    saved = torch.load(CKPT, weights_only=False)["callbacks"]
    pprint.pprint(saved)
    print(f"{CKPT}: {CKPT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
