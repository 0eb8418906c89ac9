"""Gradient health (issue 16, item 1): vanishing layers found in the logging steps' norms and named, real Trainer."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from faults import RecordingLogger, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping
from lightning_clip.health import VanishingMonitor, ratios
from lightning_clip.host_reads import count_host_reads


class Block(nn.Module):
    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width) if residual else None

    def forward(self, x):
        if self.norm is None:
            return torch.sigmoid(self.lin(x))
        return x + torch.sigmoid(self.lin(self.norm(x)))


class DeepSigmoid(pl.LightningModule):
    """20 sigmoid layers: plain (the first layers' gradients vanish) or with residual connections and LayerNorm."""

    def __init__(self, residual: bool = False, depth: int = 20, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(16, width), *[Block(width, residual) for _ in range(depth)], nn.Linear(width, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True).tanh()), batch_size=32)


def fit(cb: GradientClipping, model: pl.LightningModule, tmp_path, steps: int = 12) -> tuple[RecordingLogger, list]:
    logger = RecordingLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=steps, logger=logger, log_every_n_steps=1).fit(model, loader())
    return logger, [w for w in caught if "Vanishing gradients" in str(w.message)]


def test_the_first_layer_of_a_deep_sigmoid_mlp_is_named_within_12_logging_steps_at_most_3_times(tmp_path):
    logger, found = fit(GradientClipping(), DeepSigmoid(), tmp_path, steps=30)
    assert 1 <= len(found) <= 3
    first = str(found[0].message)
    assert "net.0 (" in first and first.index("net.0 (") < first.index("net.1.lin (")  # shallowest first
    assert "normalization between layers" in first and "residual connections" in first
    flagged = logger.series("grad_health/vanishing_layers")
    assert flagged[2] > 0 and flagged.index(next(v for v in flagged if v > 0)) < 12
    assert flagged[0] == flagged[1] == 0  # patience: 3 logging steps below before a layer is named
    ratio = logger.series("grad_health/grad_ratio/net.0")
    assert ratio and all(r < 1e-8 for r in ratio)


def test_the_same_depth_with_residual_connections_and_layernorm_gets_no_warning(tmp_path):
    logger, found = fit(GradientClipping(), DeepSigmoid(residual=True), tmp_path, steps=30)
    assert found == [] and set(logger.series("grad_health/vanishing_layers")) == {0.0}
    assert min(logger.series("grad_health/grad_ratio/net.1.lin")) > 1e-6


def test_the_ratio_is_the_float64_gradient_over_weight_norm_of_each_layer(tmp_path):
    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lin = pl_module.net[3].lin
            g = torch.cat([lin.weight.grad.double().reshape(-1), lin.bias.grad.double()])
            w = torch.cat([lin.weight.detach().double().reshape(-1), lin.bias.detach().double()])
            self.expected = float(g.norm() / w.norm())

    probe = Probe()
    logger = RecordingLogger()
    cb = GradientClipping(max_norm=1e9)  # no clipping: the ratio is of the raw gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [cb, probe], max_steps=1, logger=logger, log_every_n_steps=1).fit(DeepSigmoid(), loader())
    assert logger.series("grad_health/grad_ratio/net.3.lin")[0] == pytest.approx(probe.expected, rel=1e-5)


def test_a_non_logging_step_reads_no_weight_norm_and_a_logging_step_still_reads_once(tmp_path):
    model = DeepSigmoid()
    cb = GradientClipping(nan_policy="ignore")
    reads = []
    logger = RecordingLogger()
    t = trainer(tmp_path, [cb], max_steps=2, logger=logger, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader())
    opt = t.optimizers[0]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with count_host_reads() as r:
        cb.engine.step(opt, log=False)
    reads.append(r.count)
    with count_host_reads() as r:
        cb.engine.step(opt, log=True)
    reads.append(r.count)
    assert reads == [0, 1]


def test_frozen_zero_and_gradient_free_layers_are_not_reported():
    layer_ratios = ratios(["a", "zero", "nan"], [1e-20, 1e-20, math.nan], [1.0, 0.0, 1.0])
    assert layer_ratios == {"a": 1e-20}  # zero weights and a non-finite gradient are left out
    m = VanishingMonitor(ratio=1e-8, patience=1)
    assert m.update({"a": 1e-20, "head": 0.1}) == [("a", 1e-20)]
    assert m.update({"head": 0.1}) is None and m.flagged == 0  # no gradient this step: its streak ends


def test_a_converged_model_whose_gradients_are_all_small_is_not_vanishing():
    m = VanishingMonitor(ratio=1e-8, patience=1)
    assert m.update({"a": 1e-9, "b": 2e-9, "head": 3e-9}) is None and m.flagged == 0  # no layer far below the rest


def test_vanishing_arguments_are_checked_and_off_means_no_tags(tmp_path):
    with pytest.raises(ValueError, match="`vanishing_ratio` must be a finite positive number"):
        GradientClipping(vanishing_ratio=0.0)
    with pytest.raises(ValueError, match="`vanishing_patience` must be a positive integer"):
        GradientClipping(vanishing_patience=0)
    logger, found = fit(GradientClipping(vanishing_ratio=None), DeepSigmoid(), tmp_path, steps=5)
    assert found == [] and not any(k.startswith("grad_health/") for _, m in logger.records for k in m)


def test_update_ratios_are_the_last_applied_updates_float64_reference(tmp_path):
    from faults import StepRecorder

    rec = StepRecorder()
    logger = RecordingLogger()
    model = DeepSigmoid(residual=True, depth=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(
            tmp_path, [GradientClipping(update_ratio_every=1), rec], max_steps=4, logger=logger, log_every_n_steps=1
        ).fit(model, loader())
    names = [n for n, _ in model.named_parameters()]
    logged = logger.series("grad_health/update_ratio/net.2.lin")
    assert len(logged) == 3  # from the second logging step on: each reports the update before it
    for k, value in enumerate(logged):
        step = rec.steps[k]
        pick = [i for i, n in enumerate(names) if n.startswith("net.2.lin.")]
        before = torch.cat([step["weights_before"][i].double().reshape(-1) for i in pick])
        after = torch.cat([step["weights_after"][i].double().reshape(-1) for i in pick])
        assert value == pytest.approx(float((after - before).norm() / after.norm()), rel=1e-4)
    summary = [logger.series(f"grad_health/update_ratio_{s}")[-1] for s in ("min", "median", "max")]
    assert summary[0] <= summary[1] <= summary[2] and summary[0] > 0


def test_no_update_ratio_without_layer_norms(tmp_path):
    logger, _ = fit(GradientClipping(log_norms="total"), DeepSigmoid(depth=3), tmp_path, steps=4)
    assert not any("update_ratio" in k for _, m in logger.records for k in m)


def test_each_vanishing_warning_is_kept_as_an_event_with_its_step_layers_and_ratios(tmp_path):
    cb = GradientClipping()
    _, found = fit(cb, DeepSigmoid(), tmp_path, steps=30)
    events = cb.engine.vanishing_events()
    # One event per warning, its text the warning's: the app reads these records, never the text.
    assert [e.message() for e in events] == [str(w.message) for w in found] and events
    first = events[0]
    assert first.optimizer_idx == 0 and (first.ratio, first.patience) == (1e-8, 3)
    assert f"at global step {first.global_step}:" in str(found[0].message)
    assert [e.global_step for e in events] == sorted({e.global_step for e in events})
    assert first.layers[0][0] == "net.0" and all(r < 1e-8 for _, r in first.layers)
    assert {name for e in events for name, _ in e.layers} == set(cb.engine.vanishing_layers())
    assert first.headline(shown=2).count(" (") == 3  # two layers and "... (n more)"
