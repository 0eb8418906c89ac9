"""Small example models and synthetic data, for the examples, the ``lightning-clip demo`` and the tests.

Everything is generated in-process from a seed (no downloads) and sized so a few hundred CPU steps
take seconds.

* :class:`DeepMLP` -- the article's chain-rule case: a deep plain MLP (tanh, no normalization,
  LeCun-normal init) trained with SGD + momentum at a high learning rate. The backward pass multiplies
  16 layer Jacobians; with ``lr=0.1`` the gradient norm climbs until the loss goes NaN/Inf after a few
  dozen steps. With ``GradientClipping(mode="norm", max_norm=1.0)`` the same run trains.
* :class:`DeepSigmoidMLP` -- the article's other chain-rule case: 20 sigmoid layers, whose derivatives (at
  most 0.25) multiply on the way back until the first layers' gradient-to-weight ratio is about 1e-18:
  ``GradientClipping``'s ``vanishing_ratio`` names them and the loss stays at the variance of the
  targets. ``residual=True`` (residual connections + LayerNorm, same depth) trains.
* :class:`SyntheticRegressionData` -- a seeded regression task; ``nan_batches`` puts NaN into chosen
  training batches (the article's "dirty data" cause) for the NaN-recovery scenario.

Example::

    import pytorch_lightning as pl
    from lightning_clip import GradientClipping
    from lightning_clip.app.models import DeepMLP, SyntheticRegressionData, mean_squared_error

    data = SyntheticRegressionData(seed=0, nan_batches=[40])
    trainer = pl.Trainer(max_steps=200, callbacks=[GradientClipping(mode="norm", max_norm=1.0)])
    trainer.fit(DeepMLP(), datamodule=data)
    print(mean_squared_error(trainer.lightning_module, data.val_dataloader()))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError

__all__ = [
    "DeepMLP",
    "DeepSigmoidMLP",
    "ResidualSigmoidBlock",
    "SyntheticRegressionData",
    "make_regression",
    "mean_squared_error",
]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_float(name: str, value: Any, minimum: float, inclusive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (not inclusive and value == minimum):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


def make_regression(
    num_samples: int, num_features: int = 16, noise: float = 0.05, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A seeded nonlinear regression set: ``y = tanh(2 x A) b``, standardized, plus Gaussian noise.

    The teacher weights ``A, b`` depend only on ``seed`` and ``num_features``, so train and
    validation sets made with the same seed share one target function.

    Example::

        >>> x, y = make_regression(8, num_features=4, seed=0)
        >>> tuple(x.shape), tuple(y.shape)
        ((8, 4), (8, 1))
        >>> torch.equal(make_regression(8, 4, seed=0)[1], y)   # same seed, same data
        True
    """
    teacher = torch.Generator().manual_seed(seed)
    a = torch.randn(num_features, 32, generator=teacher) / math.sqrt(num_features)
    b = torch.randn(32, 1, generator=teacher) / math.sqrt(32)
    # Inputs get their own stream so the teacher does not depend on num_samples.
    gen = torch.Generator().manual_seed(seed + num_samples * 7919)
    x = torch.randn(num_samples, num_features, generator=gen)
    y = torch.tanh(2.0 * x @ a) @ b
    y = (y - y.mean()) / y.std().clamp_min(1e-12)
    return x, y + noise * torch.randn(num_samples, 1, generator=gen)


class SyntheticRegressionData(pl.LightningDataModule):
    """Seeded synthetic regression data, with optional NaN injected into chosen training batches.

    Args:
        num_samples: training samples.
        num_val_samples: validation samples (0 disables validation).
        num_features: input width (must match the model's ``num_features``).
        batch_size: samples per batch.
        noise: standard deviation of the label noise (the targets have unit variance).
        seed: seeds the data and the shuffling order.
        nan_batches: 0-based indices of training batches, counted over the whole run (across epochs;
            with ``accumulate_grad_batches=1`` it is the optimizer step), whose first input element is
            set to NaN on the way to the model. Used to make a run with really non-finite gradients.

    Example::

        >>> dm = SyntheticRegressionData(num_samples=64, batch_size=16, nan_batches=[2])
        >>> dm.setup("fit")
        >>> len(dm.train_dataloader())
        4
    """

    def __init__(
        self,
        num_samples: int = 2048,
        num_val_samples: int = 512,
        num_features: int = 16,
        batch_size: int = 64,
        noise: float = 0.05,
        seed: int = 0,
        nan_batches: list[int] | None = None,
    ) -> None:
        super().__init__()
        _check_int("num_samples", num_samples, 1)
        _check_int("num_val_samples", num_val_samples, 0)
        _check_int("num_features", num_features, 1)
        _check_int("batch_size", batch_size, 1)
        _check_float("noise", noise, 0.0, inclusive=True)
        _check_int("seed", seed, 0)
        for i, index in enumerate(nan_batches or []):
            _check_int(f"nan_batches[{i}]", index, 0)
        self.num_samples = num_samples
        self.num_val_samples = num_val_samples
        self.num_features = num_features
        self.batch_size = batch_size
        self.noise = noise
        self.seed = seed
        self.nan_batches = sorted(set(nan_batches or []))
        # Training batches seen so far in this run; saved in checkpoints so a resumed run
        # injects at the same batches.
        self.train_batches_seen = 0
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self._train is None:
            self._train = TensorDataset(*make_regression(self.num_samples, self.num_features, self.noise, self.seed))
            self._val = TensorDataset(*make_regression(self.num_val_samples, self.num_features, self.noise, self.seed))

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "call setup() first"
        # Seeded shuffling: the same seed gives the same batches in every run.
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None, "call setup() first"
        return DataLoader(self._val, batch_size=max(self.batch_size, 256))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch  # validation, sanity check, predict: never dirty
        index = self.train_batches_seen
        self.train_batches_seen += 1
        if index in self.nan_batches:
            x, y = batch
            x = x.clone()  # the dataset's own tensor must stay clean
            x.view(-1)[0] = float("nan")
            batch = [x, y]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches_seen": self.train_batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches_seen = int(state_dict.get("train_batches_seen", 0))


class _Regressor(pl.LightningModule):
    """The regression steps shared by the example models: MSE loss, ``train/loss``, ``train/mse``, ``val/mse``."""

    train_mse: MeanSquaredError
    val_mse: MeanSquaredError

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        pred = self(x)
        loss = nn.functional.mse_loss(pred, y)
        self.train_mse(pred.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", self.train_mse, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_mse(self(x), y)
        self.log("val/mse", self.val_mse, prog_bar=True)


class DeepMLP(_Regressor):
    """A deep plain MLP regressor (no normalization): the exploding-gradient example.

    ``depth`` hidden ``Linear`` layers of width ``width``, each followed by ``activation``, then a
    linear head. Weights are drawn from ``N(0, init_gain^2 / fan_in)``, biases are zero. Trained on the
    mean squared error with SGD (``lr``, ``momentum``).

    Logs ``train/loss`` (every step), ``train/mse`` (per epoch) and ``val/mse`` with
    :class:`torchmetrics.MeanSquaredError`.

    The defaults diverge: the loss is NaN within about 30 steps on :class:`SyntheticRegressionData`
    without clipping, and falls from about 1.0 to about 0.1-0.2 in 300 steps with
    ``GradientClipping(mode="norm", max_norm=1.0)``.

    Example::

        >>> model = DeepMLP(depth=3, width=8, num_features=4)
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 1])
        >>> [name for name, _ in model.named_children()]
        ['hidden', 'head', 'act', 'train_mse', 'val_mse']
    """

    def __init__(
        self,
        num_features: int = 16,
        width: int = 64,
        depth: int = 16,
        activation: Literal["tanh", "relu"] = "tanh",
        lr: float = 0.1,
        momentum: float = 0.9,
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        _check_int("num_features", num_features, 1)
        _check_int("width", width, 1)
        _check_int("depth", depth, 1)
        if activation not in ("tanh", "relu"):
            raise ValueError(f"`activation` must be 'tanh' or 'relu', got {activation!r}.")
        _check_float("lr", lr, 0.0, inclusive=False)
        _check_float("momentum", momentum, 0.0, inclusive=True)
        _check_float("init_gain", init_gain, 0.0, inclusive=False)
        self.save_hyperparameters()
        sizes = [num_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        self.head = nn.Linear(width, 1)
        self.act = nn.Tanh() if activation == "tanh" else nn.ReLU()
        for layer in [*self.hidden, self.head]:
            nn.init.normal_(layer.weight, 0.0, init_gain / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
        self.train_mse = MeanSquaredError()
        self.val_mse = MeanSquaredError()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.head(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=self.hparams["momentum"])


class ResidualSigmoidBlock(nn.Module):
    """``x + sigmoid(linear(norm(x)))``: a pre-LayerNorm residual block of :class:`DeepSigmoidMLP`.

    Example::

        >>> block = ResidualSigmoidBlock(4)
        >>> [name for name, _ in block.named_children()], block(torch.zeros(2, 4)).shape
        (['norm', 'linear'], torch.Size([2, 4]))
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.sigmoid(self.linear(self.norm(x)))


class DeepSigmoidMLP(_Regressor):
    """A deep sigmoid MLP regressor: the vanishing-gradient example, plain or with the residual + LayerNorm fix.

    ``depth`` sigmoid layers of width ``width``, then a linear ``head``; PyTorch's default ``nn.Linear``
    init (uniform in ``+-1/sqrt(fan_in)``), trained on the mean squared error with Adam (``lr``).

    * ``residual=False``: ``x = sigmoid(hidden.i(x))`` for each ``nn.Linear`` ``hidden.0`` ...
      ``hidden.<depth-1>``. The sigmoid's derivative is at most 0.25 and the weights are small, so the
      backward pass shrinks the gradient at every layer: with the defaults the first layers'
      ``||grad W|| / ||W||`` is about 1e-18 (the head's about 0.6). ``GradientClipping``'s
      ``vanishing_ratio`` names them from the third logging step, and since the input's influence fades
      the same way on the forward pass, the loss stays near 1.0, the variance of the targets (the model
      predicts their mean).
    * ``residual=True``: ``hidden.0`` as above, then ``hidden.i`` (``i >= 1``) is a
      :class:`ResidualSigmoidBlock` ``x = x + sigmoid(hidden.i.linear(hidden.i.norm(x)))``, and
      ``final_norm`` (LayerNorm) before the head. The identity path carries the gradient back unshrunk:
      every layer's ratio is about 0.4 to 0.9 at the start, no warning, and the loss falls (val MSE about
      0.1 after 500 steps on :class:`SyntheticRegressionData`).

    The parameters are registered in depth order (input first, ``head`` last), the order in which the
    callback lists layers ("shallowest first"). With the same seed both variants draw the same
    ``Linear`` weights: only the wiring differs.

    Logs ``train/loss`` (every step), ``train/mse`` (per epoch) and ``val/mse``, as :class:`DeepMLP`.

    Example::

        >>> model = DeepSigmoidMLP(depth=3, width=8, num_features=4, residual=True)
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 1])
        >>> list(dict.fromkeys(name.rsplit(".", 1)[0] for name, _ in model.named_parameters()))  # depth order
        ['hidden.0', 'hidden.1.norm', 'hidden.1.linear', 'hidden.2.norm', 'hidden.2.linear', 'final_norm', 'head']
        >>> [name for name, _ in DeepSigmoidMLP(depth=2).named_children()]
        ['hidden', 'head', 'train_mse', 'val_mse']

    Trained with the callback (the plain net warns ``Vanishing gradients at global step 2: ...
    shallowest first: hidden.0 (3.3e-18), hidden.1 (1.1e-17), ...``; the residual one does not)::

        import pytorch_lightning as pl
        from lightning_clip import GradientClipping

        for residual in (False, True):
            trainer = pl.Trainer(max_steps=500, log_every_n_steps=1, callbacks=[GradientClipping()])
            trainer.fit(DeepSigmoidMLP(residual=residual), datamodule=SyntheticRegressionData())
    """

    def __init__(
        self,
        num_features: int = 16,
        width: int = 32,
        depth: int = 20,
        residual: bool = False,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        _check_int("num_features", num_features, 1)
        _check_int("width", width, 1)
        _check_int("depth", depth, 1)
        if not isinstance(residual, bool):
            raise ValueError(f"`residual` must be True or False, got {residual!r}.")
        _check_float("lr", lr, 0.0, inclusive=False)
        self.save_hyperparameters()
        rest = (ResidualSigmoidBlock(width) if residual else nn.Linear(width, width) for _ in range(depth - 1))
        self.hidden = nn.ModuleList([nn.Linear(num_features, width), *rest])
        self.final_norm = nn.LayerNorm(width) if residual else None
        self.head = nn.Linear(width, 1)
        self.train_mse = MeanSquaredError()
        self.val_mse = MeanSquaredError()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.sigmoid(self.hidden[0](x))
        for layer in self.hidden[1:]:
            x = layer(x) if isinstance(layer, ResidualSigmoidBlock) else torch.sigmoid(layer(x))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


@torch.no_grad()
def mean_squared_error(model: nn.Module, batches: Iterable[Sequence[Tensor]]) -> float:
    """The mean squared error of ``model`` over ``(x, y)`` batches (NaN if the model has diverged).

    Example::

        >>> model = nn.Linear(1, 1)
        >>> _ = model.weight.data.fill_(2.0), model.bias.data.zero_()
        >>> mean_squared_error(model, [(torch.tensor([[1.0]]), torch.tensor([[3.0]]))])
        1.0
    """
    metric = MeanSquaredError()
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            metric.update(model(x), y)
        return float(metric.compute())
    finally:
        model.train(was_training)
