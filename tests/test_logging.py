"""What ``GradientClipping`` logs, read back from real TensorBoard event files, and what it costs in host reads.

References: the gradient of every optimizer step is captured twice by the LightningModule itself,
unclipped in ``on_after_backward`` (before the callback) and clipped in its own
``on_before_optimizer_step`` (which Lightning calls right after the callbacks' hook); the norms are
computed from those captures in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from faults import trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping
from lightning_clip.host_reads import count_host_reads

INF = float("inf")


# ----------------------------------------------------------------------------- harness
class LogNet(pl.LightningModule):
    """Layers ``encoder.0``, ``encoder.2``, ``head`` and a top-level parameter ``scale`` (no dot in its name)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same weights whatever test runs first
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.unclipped: dict[int, dict[str, torch.Tensor]] = {}
        self.clipped: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x):
        return self.head(self.encoder(x)) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean() * 30
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def _grads(self):
        return {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def on_after_backward(self):
        self.unclipped[self.trainer.global_step] = self._grads()

    def on_before_optimizer_step(self, optimizer):
        self.clipped[self.trainer.global_step] = self._grads()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n=64, batch_size=4):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g) * 3), batch_size=batch_size
    )


def fit(model, callback, tmp_path, logger=True, max_steps=4, log_every_n_steps=1):
    if logger is True:
        logger = TensorBoardLogger(save_dir=tmp_path, name="tb", version=0)
    t = trainer(
        tmp_path,
        [callback],
        max_steps=max_steps,
        log_every_n_steps=log_every_n_steps,
        logger=logger,
        accelerator="cpu",
        devices=1,
    )
    t.fit(model, loader())
    return t


def read_scalars(trainer) -> dict[str, dict[int, float]]:
    """Every scalar tag of the run's event file: {tag: {step: value}}."""
    files = list(Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file was written"
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at one step"
        out[tag] = {e.step: e.value for e in events}
    return out


def norm64(grads: dict, names, p) -> float:
    v = torch.cat([grads[n].to(torch.float64).reshape(-1) for n in names])
    return torch.linalg.vector_norm(v, p).item()


LAYERS = {
    "encoder.0": ["encoder.0.weight", "encoder.0.bias"],
    "encoder.2": ["encoder.2.weight", "encoder.2.bias"],
    "head": ["head.weight", "head.bias"],
    "scale": ["scale"],
}
PARAMS = [name for names in LAYERS.values() for name in names]


# ----------------------------------------------------------------------------- totals
@pytest.mark.parametrize("p", [1.0, 2.0, INF], ids=["L1", "L2", "Linf"])
def test_logged_total_and_total_clipped_equal_float64_norms_at_every_step(p, tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=0.5, norm_type=p), tmp_path, max_steps=4)
    scalars = read_scalars(trainer)
    total, clipped = scalars["grad_norm/total"], scalars["grad_norm/total_clipped"]
    assert sorted(total) == sorted(clipped) == [0, 1, 2, 3]
    assert sorted(total) == sorted(scalars["train_loss"]), "same step axis as Lightning's own self.log"
    for step in total:
        expected_total = norm64(model.unclipped[step], PARAMS, p)
        assert expected_total > 0.5, "the test needs clipping to happen"
        assert total[step] == pytest.approx(expected_total, rel=1e-5)
        assert clipped[step] == pytest.approx(norm64(model.clipped[step], PARAMS, p), rel=1e-5)
        assert clipped[step] == pytest.approx(0.5, rel=1e-5)


def test_logged_total_clipped_equals_total_when_nothing_is_clipped(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=1e6), tmp_path, max_steps=2)
    scalars = read_scalars(trainer)
    for step, value in scalars["grad_norm/total"].items():
        assert value == pytest.approx(norm64(model.unclipped[step], PARAMS, 2.0), rel=1e-5)
        assert scalars["grad_norm/total_clipped"][step] == pytest.approx(value, rel=1e-6)


def test_value_mode_logs_the_norm_after_clamping_as_total_clipped(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="value", clip_value=0.05), tmp_path, max_steps=2)
    scalars = read_scalars(trainer)
    for step in (0, 1):
        raw = norm64(model.unclipped[step], PARAMS, 2.0)
        after = norm64(model.clipped[step], PARAMS, 2.0)
        assert after < raw
        assert scalars["grad_norm/total"][step] == pytest.approx(raw, rel=1e-5)
        assert scalars["grad_norm/total_clipped"][step] == pytest.approx(after, rel=1e-5)


def test_mode_none_still_logs_norms(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="none"), tmp_path, max_steps=2)
    scalars = read_scalars(trainer)
    for step in (0, 1):
        raw = norm64(model.unclipped[step], PARAMS, 2.0)
        assert scalars["grad_norm/total"][step] == pytest.approx(raw, rel=1e-5)
        assert scalars["grad_norm/total_clipped"][step] == pytest.approx(raw, rel=1e-5)
    assert {t for t in scalars if t.startswith("grad_norm_layer/")} == {f"grad_norm_layer/{n}" for n in LAYERS}


# ----------------------------------------------------------------------------- per-layer / per-parameter
def test_default_log_norms_logs_each_layer_under_grad_norm_layer(tmp_path):
    model = LogNet()
    callback = GradientClipping(mode="norm", max_norm=0.5)
    assert callback.log_norms == "layer"
    trainer = fit(model, callback, tmp_path, max_steps=3)
    scalars = read_scalars(trainer)
    grad_tags = {t for t in scalars if t.startswith("grad_norm")}
    assert grad_tags == {"grad_norm/total", "grad_norm/total_clipped"} | {f"grad_norm_layer/{n}" for n in LAYERS}
    for layer, names in LAYERS.items():
        series = scalars[f"grad_norm_layer/{layer}"]
        assert sorted(series) == [0, 1, 2]
        for step, value in series.items():
            # per-layer norms are the gradient's norms as computed, before clipping (like grad_norm/total)
            assert value == pytest.approx(norm64(model.unclipped[step], names, 2.0), rel=1e-5), (layer, step)


def test_layer_norms_use_the_configured_norm_type(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=1e6, norm_type=1.0), tmp_path, max_steps=1)
    scalars = read_scalars(trainer)
    for layer, names in LAYERS.items():
        assert scalars[f"grad_norm_layer/{layer}"][0] == pytest.approx(norm64(model.unclipped[0], names, 1.0), rel=1e-5)


def test_log_norms_parameter_logs_each_parameter_under_grad_norm_param(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=0.5, log_norms="parameter"), tmp_path, max_steps=2)
    scalars = read_scalars(trainer)
    grad_tags = {t for t in scalars if t.startswith("grad_norm")}
    assert grad_tags == {"grad_norm/total", "grad_norm/total_clipped"} | {f"grad_norm_param/{n}" for n in PARAMS}
    for name in PARAMS:
        for step, value in scalars[f"grad_norm_param/{name}"].items():
            assert value == pytest.approx(norm64(model.unclipped[step], [name], 2.0), rel=1e-5), (name, step)


def test_log_norms_total_logs_no_per_layer_or_per_parameter_tags(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=0.5, log_norms="total"), tmp_path, max_steps=2)
    scalars = read_scalars(trainer)
    assert {t for t in scalars if t.startswith("grad_norm")} == {"grad_norm/total", "grad_norm/total_clipped"}
    assert scalars["grad_norm/total"][1] == pytest.approx(norm64(model.unclipped[1], PARAMS, 2.0), rel=1e-5)


def test_log_norms_none_logs_nothing_from_the_callback(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=0.5, log_norms="none"), tmp_path, max_steps=2)
    scalars = read_scalars(trainer)
    assert "train_loss" in scalars  # the event file is there and Lightning logged into it
    assert not [t for t in scalars if t.startswith(("grad_norm", "grad_clip"))]
    # and the clipping still happened
    assert norm64(model.clipped[1], PARAMS, 2.0) == pytest.approx(0.5, rel=1e-5)


# ----------------------------------------------------------------------------- when it logs
@pytest.mark.parametrize("every,max_steps,expected_steps", [(3, 7, [2, 5]), (2, 5, [1, 3])])
def test_logging_follows_trainer_log_every_n_steps(every, max_steps, expected_steps, tmp_path):
    model = LogNet()
    trainer = fit(
        model, GradientClipping(mode="norm", max_norm=0.5), tmp_path, max_steps=max_steps, log_every_n_steps=every
    )
    scalars = read_scalars(trainer)
    assert sorted(scalars["train_loss"]) == expected_steps  # Lightning's own cadence
    for tag in ("grad_norm/total", "grad_norm/total_clipped", "grad_norm_layer/head"):
        assert sorted(scalars[tag]) == expected_steps, tag
    for step in expected_steps:
        assert scalars["grad_norm/total"][step] == pytest.approx(norm64(model.unclipped[step], PARAMS, 2.0), rel=1e-5)


def test_training_without_a_logger_still_clips_and_writes_no_event_file(tmp_path):
    model = LogNet()
    trainer = fit(model, GradientClipping(mode="norm", max_norm=0.5), tmp_path, logger=False, max_steps=3)
    assert trainer.loggers == []
    assert len(model.clipped) == 3
    for step in range(3):
        assert norm64(model.unclipped[step], PARAMS, 2.0) > 0.5
        assert norm64(model.clipped[step], PARAMS, 2.0) == pytest.approx(0.5, rel=1e-5)
    assert not list(Path(tmp_path).rglob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- host reads
class TwentyParams(pl.LightningModule):
    """Ten linear layers: 20 parameters, 10 layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)], nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean() * 30

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountingLogger(TensorBoardLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, list[str]]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, list(metrics)))
        super().log_metrics(metrics, step)


class CountingClip(GradientClipping):
    """Counts the host reads of the real hook, per optimizer step, and the logger calls it made."""

    def __init__(self, logger, **kwargs):
        super().__init__(**kwargs)
        self.logger = logger
        self.per_step: list[tuple[int, list[str], list]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        calls_before = len(self.logger.calls) if self.logger is not None else 0
        with count_host_reads() as reads:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        made = self.logger.calls[calls_before:] if self.logger is not None else []
        self.per_step.append((trainer.global_step, list(reads.calls), made))


def run_counting(tmp_path, every, max_steps, **kwargs):
    logger = CountingLogger(save_dir=tmp_path, name="tb", version=0)
    callback = CountingClip(logger, nan_policy="ignore", **kwargs)
    trainer = pl.Trainer(
        max_steps=max_steps,
        log_every_n_steps=every,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TwentyParams(), loader())
    assert len(callback.per_step) == max_steps
    return trainer, callback, logger


@pytest.mark.parametrize(
    "kwargs",
    [dict(mode="norm", max_norm=0.5), dict(mode="value", clip_value=0.01), dict(mode="none")],
    ids=["norm", "value", "none"],
)
def test_non_logging_steps_make_zero_host_reads(kwargs, tmp_path):
    _, callback, _ = run_counting(tmp_path, every=1000, max_steps=4, **kwargs)
    for step, reads, log_calls in callback.per_step:
        assert reads == [], f"step {step} read the device: {reads}"
        assert log_calls == []


PER_TENSOR_TAGS = {
    "layer": {f"grad_norm_layer/net.{i}" for i in range(10)},
    "parameter": {f"grad_norm_param/net.{i}.{kind}" for i in range(10) for kind in ("weight", "bias")},
    "total": set(),
}


@pytest.mark.parametrize("log_norms", ["layer", "parameter", "total"])
def test_a_logging_step_makes_exactly_one_host_read_and_one_log_call(log_norms, tmp_path):
    trainer, callback, logger = run_counting(
        tmp_path, every=3, max_steps=6, mode="norm", max_norm=0.5, log_norms=log_norms
    )
    expected_tags = {"grad_norm/total", "grad_norm/total_clipped"} | PER_TENSOR_TAGS[log_norms]
    logged_steps = []
    for step, reads, log_calls in callback.per_step:
        if step in (2, 5):
            assert len(reads) == 1, f"logging step {step} made {len(reads)} host reads: {reads}"
            assert len(log_calls) == 1, "everything logged in one log_metrics call"
            (logged_step, keys) = log_calls[0]
            assert expected_tags <= set(keys)
            logged_steps.append(logged_step)
        else:
            assert reads == [] and log_calls == [], step
    assert logged_steps == [2, 5]
    grad_calls = [c for c in logger.calls if any(k.startswith("grad_norm") for k in c[1])]
    assert len(grad_calls) == 2
    scalars = read_scalars(trainer)
    for tag in expected_tags:
        assert sorted(scalars[tag]) == [2, 5], tag
    assert {t for t in scalars if t.startswith("grad_norm")} == expected_tags
