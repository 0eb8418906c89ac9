"""Run by tests/test_ddp.py as a real 2-process DDP (gloo, CPU) job. Not a test module itself.

Rank 1 alone sees a NaN in a batch tensor the model never reads (its gradients stay finite), and rank 0
alone has a NaN loss at another step. Each rank writes what it saw to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main(out: str) -> None:
    import pytorch_lightning as pl

    sys.path.insert(0, str(Path(__file__).parent))
    from faults import FaultModel, make_loader

    from lightning_clip import GradientClipping

    class RankFaults(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == 1 and trainer.global_step == 2:
                batch[2][0, 0] = float("nan")  # dirty data on one rank only

    class RankLoss(FaultModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_rank == 0 and self.global_step == 4:
                loss = loss * float("nan")
            return loss

    class Snapshots(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append([float(p.double().sum()) for p in pl_module.parameters()])

    cb = GradientClipping(max_norm=0.5, nan_policy="skip", check_inputs=True)
    snaps = Snapshots()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        callbacks=[RankFaults(), cb, snaps],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(RankLoss(optimizer="adamw"), make_loader(n=96))
    Path(out, f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"counters": cb.counters, "snapshots": snaps.rows, "world_size": trainer.world_size})
    )


if __name__ == "__main__":
    main(sys.argv[1])
