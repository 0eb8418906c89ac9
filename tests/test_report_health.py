"""`lightning-clip report` shows gradient health (issue 16, item 4): the vanishing layers in its table and a depth plot.

Real event files: each run is a real ``Trainer.fit`` with a real ``TensorBoardLogger``. The expected values are read
back here with TensorBoard's own reader, not with the code under test.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping
from lightning_clip.app.report import RunReport, depth_path, format_table, load_runs, plot, plot_depth
from lightning_clip.health import layer_of

DEPTH = 16  # sigmoid blocks: the first layers' ||grad W|| / ||W|| falls to ~1e-13
STEPS = 12  # logged every step: the vanishing monitor's patience (3) is met well before the end


class Block(nn.Module):
    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return torch.sigmoid(self.lin(x))
        return x + torch.sigmoid(self.lin(self.norm(x)))


def blocks(n: int, residual: bool, width: int = 32) -> list[nn.Module]:
    return [Block(width, residual) for _ in range(n)]


class DeepSigmoid(pl.LightningModule):
    """net.0 (16 -> 32), DEPTH sigmoid blocks (net.<i>.lin, plus net.<i>.norm with residual), net.<DEPTH + 1> (-> 1)."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), *blocks(DEPTH, residual), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class SplitSigmoid(pl.LightningModule):
    """Manual optimization, two optimizers: ``lower`` (the vanishing end) and ``upper`` (the output end)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.lower = nn.Sequential(nn.Linear(16, 32), *blocks(7, residual=False))
        self.upper = nn.Sequential(*blocks(7, residual=False), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self.upper(self.lower(x)), y))
            opt.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.lower.parameters(), lr=1e-3), torch.optim.Adam(self.upper.parameters(), lr=1e-3)]


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True).tanh()), batch_size=32)


def fit(root: Path, run: str, model: pl.LightningModule, callbacks: list[GradientClipping]) -> None:
    logger = TensorBoardLogger(save_dir=str(root), name=run, version=0, default_hp_metric=False)
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vanishing warning itself is tested in test_health.py
        trainer.fit(model, loader())


def depth_order(module: nn.Module) -> list[str]:
    """The layers in the order the callback logs them: named_parameters(), one entry per layer."""
    return list(dict.fromkeys(layer_of(name) for name, _ in module.named_parameters()))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def table_rows(table: str) -> dict[str, dict[str, str]]:
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("health_logs")
    fit(root, "sigmoid", DeepSigmoid(residual=False), [GradientClipping()])
    fit(root, "residual", DeepSigmoid(residual=True), [GradientClipping()])
    fit(root, "total_only", DeepSigmoid(residual=False), [GradientClipping(log_norms="total")])  # the count only
    # The monitor first: both callbacks see the same gradient (the unnamed one clips nothing at 1e9).
    fit(root, "split", SplitSigmoid(), [GradientClipping(mode="none", name="monitor"), GradientClipping(max_norm=1e9)])
    return root


@pytest.fixture(scope="module")
def runs(logs: Path) -> dict[str, RunReport]:
    return {r.name: r for r in load_runs(logs)}


def test_the_table_counts_and_names_the_vanishing_layers_of_a_deep_sigmoid_mlp(logs, runs):
    events = scalars(logs / "sigmoid" / "version_0")
    step, count = events["grad_health/vanishing_layers"][-1]
    assert count > 0
    # The `count` smallest ratios logged at that step, in depth order: computed here from the raw scalars.
    at_step = {
        tag.removeprefix("grad_health/grad_ratio/"): dict(series)[step]
        for tag, series in events.items()
        if tag.startswith("grad_health/grad_ratio/")
    }
    smallest = sorted(at_step, key=at_step.get)[: int(count)]
    expected = [layer for layer in depth_order(DeepSigmoid(residual=False)) if layer in smallest]

    sig = runs["sigmoid/version_0"]
    assert sig.vanishing == count and [name for name, _ in sig.vanishing_layers] == expected
    assert expected[0] == "net.0" and all(r < 1e-8 for _, r in sig.vanishing_layers)
    assert sig.vanishing_layers[0][1] == pytest.approx(at_step["net.0"]) and at_step["net.0"] < 1e-11

    table = format_table(list(runs.values()), logs)
    rows = table_rows(table)
    assert rows["sigmoid/version_0"]["vanishing"] == str(int(count))
    assert rows["residual/version_0"]["vanishing"] == "0"
    listing = table.split("vanishing layers (", 1)[1]
    assert re.search(r"^  sigmoid/version_0: net\.0 \(\d\.?\d*e-\d+\), net\.1\.lin \(", listing, re.M)
    assert "residual/version_0:" not in listing  # nothing vanishing: only in the table, as 0
    assert "vanishing: last grad_health/vanishing_layers" in table


def test_residual_connections_and_layernorm_show_no_vanishing_layer(runs):
    res = runs["residual/version_0"]
    assert res.vanishing == 0 and res.vanishing_layers == []
    assert min(layer.grad_ratio for layer in res.layers if layer.grad_ratio is not None) > 1e-6


def test_without_per_layer_tags_the_table_shows_the_count_alone(logs, runs):
    events = scalars(logs / "total_only" / "version_0")
    assert not any(tag.startswith(("grad_norm_layer/", "grad_health/grad_ratio/")) for tag in events)
    report = runs["total_only/version_0"]
    assert report.vanishing == events["grad_health/vanishing_layers"][-1][1] > 0
    assert report.vanishing_layers == [] and report.layers == [] and report.depth_step is None
    table = format_table([report])
    assert table_rows(table)["total_only/version_0"]["vanishing"] == str(report.vanishing)
    assert f"  total_only/version_0: {report.vanishing} (no per-layer ratios logged" in table


def test_layers_are_in_depth_order_with_the_values_of_the_last_logging_step(logs, runs):
    for run, model in (("sigmoid", DeepSigmoid(residual=False)), ("residual", DeepSigmoid(residual=True))):
        report = runs[f"{run}/version_0"]
        # net.2.lin < net.10.lin; net.<i>.lin < net.<i>.norm (registration order), as named_parameters() lists them.
        assert [layer.name for layer in report.layers] == depth_order(model)
        events = scalars(logs / run / "version_0")
        last = events["grad_norm/total"][-1][0]
        assert report.depth_step == last
        for layer in report.layers:
            assert layer.grad_norm == dict(events[f"grad_norm_layer/{layer.name}"])[last]
            assert layer.grad_ratio == dict(events[f"grad_health/grad_ratio/{layer.name}"])[last]
            # measured every 4th logging step (update_ratio_every): the last one logged by then
            updates = events[f"grad_health/update_ratio/{layer.name}"]
            assert updates[-1][0] < last and layer.update_ratio == updates[-1][1]
    # The slope: in the sigmoid MLP the ratio grows by orders of magnitude from the input to the output.
    ratios = [layer.grad_ratio for layer in runs["sigmoid/version_0"].layers]
    assert ratios[-1] / ratios[0] > 1e9


def test_named_instances_and_a_second_optimizer_get_their_own_layers(logs, runs):
    split = {(r.optimizer, r.instance): r for r in runs.values() if r.run == "split/version_0"}
    assert set(split) == {(0, None), (0, "monitor"), (1, None), (1, "monitor")}
    model = SplitSigmoid()
    lower, upper = depth_order(model)[:8], depth_order(model)[8:]
    assert lower[0] == "lower.0" and upper[0] == "upper.0.lin"
    for instance in (None, "monitor"):
        assert [layer.name for layer in split[0, instance].layers] == lower
        assert [layer.name for layer in split[1, instance].layers] == upper
    events = scalars(logs / "split" / "version_0")
    last = events["grad_norm/total_opt1/monitor"][-1][0]
    for layer in split[1, "monitor"].layers:
        assert layer.grad_ratio == dict(events[f"grad_health/grad_ratio/{layer.name}_opt1/monitor"])[last]
    for opt in (0, 1):  # the same gradients, measured by both callbacks
        mine, theirs = split[opt, None], split[opt, "monitor"]
        assert [x.grad_norm for x in mine.layers] == pytest.approx([x.grad_norm for x in theirs.layers], rel=1e-6)
        assert mine.vanishing == theirs.vanishing == events[f"grad_health/vanishing_layers{'_opt1' * opt}"][-1][1]
    # The lower optimizer's first layer vanishes; the ratio is per optimizer's own layers.
    assert split[0, "monitor"].vanishing > 0 and split[0, "monitor"].vanishing_layers[0][0] == "lower.0"
    rows = table_rows(format_table(list(runs.values()), logs))
    assert rows["split/version_0 [opt1] [monitor]"]["vanishing"] == str(split[1, "monitor"].vanishing)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_the_depth_plot_next_to_the_norm_plot(tmp_path, runs):
    sig = runs["sigmoid/version_0"]
    written = plot([sig], tmp_path / "plots" / "norms.png")
    assert written == tmp_path / "plots" / "norms.png" and png_size(written)[0] >= 400
    depth = tmp_path / "plots" / "norms_depth.png"
    assert depth_path(written) == depth
    # One panel of 18 layers (names up to 10 characters): 9 x 3.6 inches at 110 dpi.
    assert png_size(depth) == (990, 396)
    # Every run with per-layer tags gets a panel; one without is left out, and without any there is no depth plot.
    assert png_size(plot_depth(list(runs.values()), tmp_path / "all.png"))[1] >= 6 * 3 * 110  # 6 panels
    bare = RunReport("bare", 0, 1, 1.0, 1.0, 1.0, 0, None, 1, 0, 0, 0, 1.0)
    plot([bare], tmp_path / "bare.png")
    assert (tmp_path / "bare.png").is_file() and not (tmp_path / "bare_depth.png").exists()
    with pytest.raises(ValueError, match="per-layer"):
        plot_depth([bare], tmp_path / "none.png")
