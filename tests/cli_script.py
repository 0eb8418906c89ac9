"""A tiny ``LightningCLI`` program for the CLI tests, in either Lightning namespace.

The first two arguments choose the namespace and the CLI class; the rest is an ordinary LightningCLI
command line::

    python tests/cli_script.py pytorch_lightning ours fit --config cfg.yaml   # lightning_clip.GradientClippingCLI
    python tests/cli_script.py lightning plain fit --config cfg.yaml          # lightning.pytorch.cli.LightningCLI

After ``fit`` it prints one JSON line to stdout describing each GradientClipping the Trainer ran with, so a
test can tell that the YAML-configured callback really ran (``steps``, ``lr_scales``, ``counters``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Import this checkout's package, whether or not (and wherever) lightning-clip is installed.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "lightning_clip" / "__init__.py").is_file():
    sys.path.insert(0, str(_REPO))


def lightning_classes(pl: Any) -> tuple[type, type]:
    """A 4-feature linear regression model (NaN loss at step ``nan_at_step``) and its data, for ``pl``.

    Built per namespace: each ``LightningCLI`` and ``Trainer`` accepts only its own package's classes.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class TinyModel(pl.LightningModule):
        def __init__(self, lr: float = 0.05, nan_at_step: int = -1) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.lr = lr
            self.nan_at_step = nan_at_step

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            return loss * float("nan") if self.global_step == self.nan_at_step else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class TinyData(pl.LightningDataModule):
        def __init__(self, batch_size: int = 4) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(32, 4, generator=g)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=self.batch_size)

    return TinyModel, TinyData


def main() -> None:
    namespace, flavour = sys.argv.pop(1), sys.argv.pop(1)  # the rest is LightningCLI's command line
    import torch

    torch.set_num_threads(1)  # a tiny model: extra threads only contend with the other test processes
    if namespace == "lightning":
        import lightning.pytorch as pl
        from lightning.pytorch.cli import LightningCLI

        from lightning_clip.lightning_pytorch import GradientClippingCLI
    elif namespace == "pytorch_lightning":
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.cli import LightningCLI  # type: ignore[assignment]

        from lightning_clip import GradientClippingCLI  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown namespace {namespace!r}")
    cli_class = {"ours": GradientClippingCLI, "plain": LightningCLI}[flavour]
    cli: Any = cli_class(*lightning_classes(pl), save_config_callback=None)

    from lightning_clip import GradientClipping

    ran = [
        dict(
            cls=type(cb).__name__,
            steps=cb.counters["steps"],
            lr_scales=cb.lr_scales,
            counters=cb.counters,
            divergence_margin=getattr(cb.engine.remedy, "divergence_margin", None),
        )
        for cb in cli.trainer.callbacks
        if isinstance(cb, GradientClipping)
    ]
    print(json.dumps(ran))


# ------------------------------------------------------------------ for the tests: run this script

SCRIPT = Path(__file__).resolve()
TIMEOUT = 240


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def clipping(self) -> list[dict[str, Any]]:
        """What the script printed about each GradientClipping after fit (last stdout line)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def launch(cwd: Path, namespace: str, flavour: str, config: str) -> subprocess.Popen:
    """Start ``cli_script.py NAMESPACE FLAVOUR fit --config cfg.yaml`` in ``cwd`` (where it writes everything).

    Tests start all their runs first and then :func:`finish` them: on 2 cores that halves the wall time.
    """
    (cwd / "cfg.yaml").write_text(config)
    cmd = [sys.executable, str(SCRIPT), namespace, flavour, "fit", "--config", "cfg.yaml"]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> Run:
    """Wait for a :func:`launch` ed run (killed after ``TIMEOUT`` seconds)."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return Run(proc.returncode, stdout, stderr)


if __name__ == "__main__":
    main()
