"""Write the checkpoints of earlier lightning-clip versions that ``tests/test_checkpoint_compat.py`` loads.

Run once, by hand, against the commit each file names, from the repository root::

    for rev in 3e6e454 5d0f227; do
        rm -rf /tmp/lc-$rev && mkdir -p /tmp/lc-$rev && git archive $rev lightning_clip | tar -x -C /tmp/lc-$rev
        PYTHONPATH=/tmp/lc-$rev python tests/data/make_checkpoints.py $rev
    done

* ``3e6e454`` (0.2.0.dev0, issue 13, ``version: 2`` with the ring layout of the spike history): ``mode="percentile"``,
  ``nan_policy="halve_lr"``, ``skip_spikes=3.0``, a NaN loss at global step 12 and a gradient spike at step 25;
* ``5d0f227`` (main before issue 19/20, ``version: 2`` flat entries with rollback's windows): the same with
  ``nan_policy="rollback"`` (``snapshot_every=5``, ``rollback_skip_steps=2``) and ``loss_spikes=3.0``.

Each trains :class:`~make_v010_checkpoint.TinyModule` (with the faults above) for ``SAVED_STEPS`` steps, saves
``v<rev>.ckpt`` next to this file and prints the callback's state (the test pins the values it reads back).
Written with torch 2.13 and pytorch-lightning 2.6.6.
"""

from __future__ import annotations

import pprint
import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_v010_checkpoint import TinyModule, make_loader

SAVED_STEPS = 30
NAN_STEP = 12
SPIKE_STEP = 25


class Faulty(TinyModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step == NAN_STEP:
            loss = loss * float("nan")
        if self.global_step == SPIKE_STEP:
            loss = loss * 1e4  # a gradient (and loss) spike
        return loss


def settings(rev: str) -> dict:
    common = dict(mode="percentile", skip_spikes=3.0)
    if rev == "3e6e454":
        return dict(common, nan_policy="halve_lr")
    return dict(common, nan_policy="rollback", snapshot_every=5, rollback_skip_steps=2, loss_spikes=3.0)


def main(rev: str) -> None:
    import lightning_clip
    from lightning_clip import GradientClipping

    source = Path(lightning_clip.__file__).resolve()
    assert f"/tmp/lc-{rev}/" in str(source), f"lightning_clip must come from /tmp/lc-{rev}, got {source}"
    callback = GradientClipping(**settings(rev))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=SAVED_STEPS,
            callbacks=[callback],
            default_root_dir=tmp,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Faulty(), make_loader())
        trainer.save_checkpoint(Path(__file__).with_name(f"v{rev}.ckpt"))
    pprint.pprint(callback.state_dict(), width=120)


if __name__ == "__main__":
    main(sys.argv[1])
