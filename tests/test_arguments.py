"""Constructor validation of ``GradientClipping`` and its refusal to run next to ``Trainer(gradient_clip_val)``."""

from __future__ import annotations

import math
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping

NAN = float("nan")
INF = float("inf")


def shown(value) -> str:
    """How a bad value must appear in the message: its repr (``nan``, ``inf``, ``-1.0``, ``'foo'``)."""
    return re.escape(repr(value))


INVALID = [
    # (kwargs, the argument the message must name, the bad value it must show)
    (dict(max_norm=0.0), "max_norm", 0.0),
    (dict(max_norm=-1.0), "max_norm", -1.0),
    (dict(max_norm=NAN), "max_norm", NAN),
    (dict(max_norm=INF), "max_norm", INF),
    (dict(norm_type=0), "norm_type", 0),
    (dict(norm_type=-2.0), "norm_type", -2.0),
    (dict(norm_type=NAN), "norm_type", NAN),
    (dict(mode="clip"), "mode", "clip"),
    (dict(mode="NORM"), "mode", "NORM"),
    (dict(nan_policy="zero"), "nan_policy", "zero"),
    (dict(log_norms="all"), "log_norms", "all"),
    (dict(mode="value", min_value=1.0, max_value=-1.0), "min_value", 1.0),
    (dict(mode="value", clip_value=0.0), "clip_value", 0.0),
    (dict(mode="value", clip_value=-0.5), "clip_value", -0.5),
    (dict(mode="value", clip_value=0.5, min_value=-0.1), "clip_value", 0.5),
    (dict(mode="value", clip_value=0.5, max_value=0.1), "clip_value", 0.5),
    (dict(lr_factor=0.0), "lr_factor", 0.0),
    (dict(lr_factor=1.0), "lr_factor", 1.0),
    (dict(lr_factor=1.5), "lr_factor", 1.5),
    (dict(lr_factor=-0.5), "lr_factor", -0.5),
    (dict(min_lr_scale=0.0), "min_lr_scale", 0.0),
    (dict(min_lr_scale=1.5), "min_lr_scale", 1.5),
    (dict(min_lr_scale=-0.1), "min_lr_scale", -0.1),
    (dict(lr_recovery_steps=0), "lr_recovery_steps", 0),
    (dict(max_consecutive_nonfinite=0), "max_consecutive_nonfinite", 0),
]


@pytest.mark.parametrize("kwargs,name,value", INVALID, ids=[f"{n}={v!r}" for _, n, v in INVALID])
def test_invalid_argument_raises_value_error_naming_the_argument_and_the_value(kwargs, name, value):
    with pytest.raises(ValueError) as info:
        GradientClipping(**kwargs)
    message = str(info.value)
    assert name in message
    assert re.search(shown(value), message), f"{value!r} not shown in: {message}"


def test_min_value_above_max_value_names_both_bounds():
    with pytest.raises(ValueError, match=r"min_value.*2\.0.*max_value.*1\.0"):
        GradientClipping(mode="value", min_value=2.0, max_value=1.0)


def test_clip_value_together_with_min_value_names_both_arguments():
    with pytest.raises(ValueError) as info:
        GradientClipping(mode="value", clip_value=0.5, min_value=-0.1)
    assert "clip_value" in str(info.value) and "min_value" in str(info.value) and "-0.1" in str(info.value)


def test_value_mode_without_any_bound_raises_and_says_which_arguments_are_missing():
    with pytest.raises(ValueError) as info:
        GradientClipping(mode="value")
    message = str(info.value)
    assert "mode='value'" in message
    assert "clip_value" in message and "min_value" in message and "max_value" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(mode="norm", max_norm=0.5, norm_type=1),
        dict(mode="norm", max_norm=3, norm_type=INF),
        dict(mode="norm", norm_type=0.5),
        dict(mode="norm", norm_type=3.0),
        dict(mode="value", clip_value=0.1),
        dict(mode="value", min_value=-0.5),
        dict(mode="value", max_value=0.5),
        dict(mode="value", min_value=-0.5, max_value=2.0),
        dict(mode="value", min_value=0.25, max_value=0.25),
        dict(mode="none"),
        dict(nan_policy="halve_lr", lr_factor=0.1, min_lr_scale=1.0, lr_recovery_steps=1),
        dict(nan_policy="halve_lr", lr_factor=0.9, min_lr_scale=0.01, lr_recovery_steps=None),
        dict(nan_policy="raise", max_consecutive_nonfinite=None),
        dict(nan_policy="ignore", max_consecutive_nonfinite=1),
        dict(nan_policy="skip", check_inputs=True),
        dict(log_norms="parameter"),
        dict(log_norms="total"),
        dict(log_norms="none"),
        dict(eps=0.0),
    ],
)
def test_valid_combinations_construct_and_keep_their_settings(kwargs):
    callback = GradientClipping(**kwargs)
    for key, value in kwargs.items():
        if key in ("clip_value",):
            continue
        stored = getattr(callback, key)
        assert stored == value or (isinstance(value, float) and math.isinf(value) and math.isinf(stored)), key
    if "clip_value" in kwargs:
        assert (callback.min_value, callback.max_value) == (-kwargs["clip_value"], kwargs["clip_value"])


def test_defaults_are_norm_clipping_at_one_with_the_l2_norm():
    callback = GradientClipping()
    assert (callback.mode, callback.max_norm, callback.norm_type) == ("norm", 1.0, 2.0)
    assert (callback.nan_policy, callback.log_norms) == ("skip", "layer")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_gradient_clip_val_with_the_callback_fails_at_fit_naming_gradient_clip_val(tmp_path):
    trainer = pl.Trainer(  # constructing is fine: the conflict is reported when fitting starts
        gradient_clip_val=0.5,
        callbacks=[GradientClipping()],
        max_steps=1,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    model = Tiny()
    before = model.layer.weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        trainer.fit(model, data)
    assert torch.equal(model.layer.weight.detach(), before), "no step was taken"


def test_trainer_without_gradient_clip_val_fits_with_the_callback(tmp_path):
    trainer = pl.Trainer(
        callbacks=[GradientClipping()],
        max_steps=1,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
    assert trainer.global_step == 1


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"mode": "norm", "clip_value": 0.5}, "clip_value"),
        ({"mode": "none", "min_value": -1.0}, "min_value"),
        ({"nan_policy": "skip", "lr_recovery_steps": 10}, "lr_recovery_steps"),
        ({"nan_policy": "raise", "min_lr_scale": 0.1}, "min_lr_scale"),
        ({"mode": "none", "max_norm": 1e-3}, "max_norm"),
        ({"mode": "value", "clip_value": 0.5, "max_norm": 5.0}, "max_norm"),
        ({"mode": "zscore", "max_norm": 0.5}, "max_norm"),
    ],
)
def test_arguments_that_would_be_silently_ignored_raise(kwargs, named):
    # A setting that the chosen mode/policy never reads is a configuration mistake, not a no-op.
    with pytest.raises(ValueError, match=named) as info:
        GradientClipping(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


@pytest.mark.parametrize("name", ["max_norm", "norm_type"])
def test_required_numbers_reject_none_with_a_value_error(name):
    # YAML `max_norm: null` reaches the constructor as None
    with pytest.raises(ValueError, match=f"`{name}` is required"):
        GradientClipping(**{name: None})


def test_name_separates_two_instances_of_the_same_mode(tmp_path):
    a, b = GradientClipping(name="encoder"), GradientClipping(name="decoder")
    assert a.name == "encoder" and a.state_key != b.state_key
    pl.Trainer(callbacks=[a, b], logger=False, default_root_dir=tmp_path)  # Lightning refuses duplicate keys
    with pytest.raises(ValueError, match="`name` must be None or a non-empty string"):
        GradientClipping(name=3)
