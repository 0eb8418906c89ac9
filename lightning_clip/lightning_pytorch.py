"""lightning-clip for ``import lightning.pytorch as pl`` (the ``lightning`` package).

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of the same Trainer. The callback needs
nothing here: :class:`GradientClipping` derives from both namespaces' ``Callback`` and is re-exported
as is. :class:`GradientClippingCLI` is the one-line-error CLI of :mod:`lightning_clip.lightning_cli`
on ``lightning.pytorch.cli.LightningCLI``; ``lightning_clip.GradientClippingCLI`` is the
``pytorch_lightning`` one.

Example::

    import lightning.pytorch as pl
    from lightning_clip.lightning_pytorch import GradientClipping, GradientClippingCLI

    trainer = pl.Trainer(callbacks=[GradientClipping(mode="norm", max_norm=1.0, nan_policy="skip")])
    trainer.fit(model)

    # or, in train.py, configured in YAML under trainer.callbacks (class_path: lightning_clip.GradientClipping)
    GradientClippingCLI(MyModel, MyDataModule)
"""

from __future__ import annotations

from lightning_clip.callback import GradientClipping
from lightning_clip.lightning_cli import GradientClippingCLIMixin

try:
    from lightning.pytorch.cli import LightningCLI
except ImportError as err:  # say what to do, not just which import failed
    raise ImportError(
        f"lightning_clip.lightning_pytorch is for the `lightning` package, which could not be imported ({err}); "
        "install lightning: pip install lightning"
    ) from err

__all__ = ["GradientClipping", "GradientClippingCLI"]


class GradientClippingCLI(GradientClippingCLIMixin, LightningCLI):
    """``lightning.pytorch.cli.LightningCLI`` that reports a bad ``GradientClipping`` setting in one line.

    Same behaviour as ``lightning_clip.GradientClippingCLI``: a refused ``init_args`` key of a
    ``GradientClipping`` under ``trainer.callbacks`` ends the run before anything is instantiated, with
    exit status 2 and one ``error:`` line naming the key.

    Example::

        from lightning_clip.lightning_pytorch import GradientClippingCLI

        GradientClippingCLI(MyModel, MyDataModule)  # MyModel: a lightning.pytorch.LightningModule
        # max_nrom: 1.0 in the config -> one line, exit status 2:
        # error: trainer.callbacks[0].init_args.max_nrom: unknown argument "max_nrom" of GradientClipping;
        #   did you mean "max_norm"?
    """
