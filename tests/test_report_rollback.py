"""`lightning-clip report` counts rollbacks and says what "skipped" counts (issue 19, item 8).

Real runs: each is a real ``Trainer.fit`` under ``nan_policy="rollback"`` with a real ``TensorBoardLogger``, so the
callback writes its event files and its skipped-windows JSON beside them. The expected values are read back here
with TensorBoard's reader and ``json``, not with the code under test; the console command runs in a subprocess.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from test_console import _run as run_console
from test_report_health import scalars, table_rows
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping
from lightning_clip.app.report import RunReport, format_table, load_runs

STEPS = 12
SNAPSHOT_EVERY, WINDOW = 2, 3  # a snapshot every 2 steps; a rollback skips the bad step and 3 more
WINDOWS_JSON = "lightning_clip_skipped_windows.json"
OLD_DESCRIPTION = "optimizer steps with NaN/Inf (whole run)"
SKIPPED = "skipped: optimizer steps not applied (whole run) = non-finite (under a nan_policy that skips them)"


class Regression(pl.LightningModule):
    """4 -> 1 linear regression; the loss is NaN at the global steps in ``nan_at``."""

    def __init__(self, nan_at: set[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        return loss * float("nan") if self.global_step in self.nan_at else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: two stacked layers, each with its own optimizer; the loss is NaN at batch ``nan_batch``.
    The global step advances twice per batch, each optimizer's step count once."""

    def __init__(self, nan_batch: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 1)
        self.nan_batch = nan_batch

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            loss = nn.functional.mse_loss(self.second(self.first(x)), y)
            self.manual_backward(loss * float("nan") if batch_idx == self.nan_batch else loss)
            opt.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.first.parameters(), lr=0.05), torch.optim.SGD(self.second.parameters(), lr=0.05)]


def rollback() -> GradientClipping:
    return GradientClipping(nan_policy="rollback", snapshot_every=SNAPSHOT_EVERY, rollback_skip_steps=WINDOW)


def fit(root: Path, run: str, model: pl.LightningModule, clip: GradientClipping, log_every: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * STEPS, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[clip],
        logger=TensorBoardLogger(save_dir=str(root), name=run, version=0, default_hp_metric=False),
        log_every_n_steps=log_every,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rollback warnings themselves are tested in test_rollback.py
        trainer.fit(model, data)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rollback_logs")
    fit(root, "rollback", Regression(nan_at={5}), rollback(), log_every=1)
    # Logged at steps 4 and 9 only: the second rollback (step 10) is in the windows file, not in the counters.
    fit(root, "late", Regression(nan_at={5, 10}), rollback(), log_every=5)
    fit(root, "two_optimizers", TwoOptimizers(nan_batch=3), rollback(), log_every=1)
    fit(root, "skip", Regression(nan_at={5}), GradientClipping(nan_policy="skip"), log_every=1)
    return root


@pytest.fixture(scope="module")
def runs(logs: Path) -> dict[str, RunReport]:
    return {r.name: r for r in load_runs(logs)}


def last(events: dict[str, list[tuple[int, float]]], tag: str) -> float:
    return events[tag][-1][1]


def test_report_counts_the_rollback_and_the_steps_it_undid(logs: Path, runs: dict[str, RunReport]) -> None:
    run_dir = logs / "rollback" / "version_0"
    events, windows = scalars(run_dir), json.loads((run_dir / WINDOWS_JSON).read_text())
    (window,) = windows
    assert window["global_step"] == 5 and window["skipped"] == [5, 5 + WINDOW]
    r = runs["rollback/version_0"]
    assert r.rollbacks == r.logged_rollbacks == last(events, "grad_clip/rollbacks") == 1
    # Back to the snapshot after 4 steps: step 4 was applied, then undone.
    assert r.undone_steps == window["global_step"] - window["snapshot_step"] == 1
    assert r.lr_scale == last(events, "grad_clip/lr_scale") == 0.5  # rollback_lr_factor 0.5, once
    # The one NaN step and the 3 steps of its window: skipped 4, of which 3 were requested.
    assert r.nonfinite_steps == last(events, "grad_clip/nonfinite_steps") == 1
    assert r.requested_skips == last(events, "grad_clip/requested_skips") == WINDOW
    assert r.skipped_steps == last(events, "grad_clip/skipped_steps") == 1 + WINDOW


def test_table_shows_rollbacks_undone_steps_and_the_skipped_breakdown(logs: Path, runs: dict[str, RunReport]) -> None:
    table = format_table(list(runs.values()), logs)
    rows = table_rows(table)
    rolled = rows["rollback/version_0"]
    assert (rolled["non-finite"], rolled["skipped"], rolled["requested"]) == ("1", "4", "3")
    assert (rolled["rollbacks"], rolled["undone"], rolled["LR scale"]) == ("1", "1", "0.5")
    plain = rows["skip/version_0"]  # no rollback policy: nothing to count
    assert (plain["skipped"], plain["requested"], plain["rollbacks"], plain["undone"]) == ("1", "0", "-", "-")
    listing = table.split("rollbacks (at global step", 1)[1]
    # The fit-end line first (1 undone + 4 skipped = 5 steps lost), then each rollback with the LR scale it left.
    rollback = "  rollback/version_0: 1 rollback(s), 5 steps lost, LR scale 0.5 at the end;\n"
    assert rollback + "    step 5: snapshot after 4 steps, skipped 5..8, LR scale 0.5\n" in listing
    # A rollback after the last logging step: the end's LR scale is the last window's, not the logged one (0.5).
    assert "  late/version_0: 2 rollback(s), 7 steps lost, LR scale 0.25 at the end;\n" in listing
    assert "skip/version_0:" not in listing


def test_legend_says_skipped_steps_are_steps_not_applied(logs: Path, runs: dict[str, RunReport]) -> None:
    table = format_table(list(runs.values()), logs)
    assert OLD_DESCRIPTION not in table
    assert f"{SKIPPED} + requested." in table
    assert "requested: steps of a data window a remedy asked to skip" in table
    assert "undone: the applied steps they threw" in table
    # Without rollbacks or requested skips the table keeps its columns and the breakdown has one part.
    plain = format_table([runs["skip/version_0"]], logs)
    assert "rollbacks" not in plain and "requested" not in plain and f"{SKIPPED}." in plain


def test_rollbacks_after_the_last_logging_step_are_counted_from_the_windows_file(
    logs: Path, runs: dict[str, RunReport]
) -> None:
    run_dir = logs / "late" / "version_0"
    events, windows = scalars(run_dir), json.loads((run_dir / WINDOWS_JSON).read_text())
    assert [w["global_step"] for w in windows] == [5, 10]
    assert events["grad_clip/rollbacks"][-1] == (9, 1.0)  # the counter was last logged before step 10
    r = runs["late/version_0"]
    assert r.rollbacks == 2 and r.logged_rollbacks == 1
    assert r.undone_steps == sum(w["global_step"] - w["snapshot_step"] for w in windows) == 1
    table = format_table(list(runs.values()), logs)
    assert table_rows(table)["late/version_0"]["rollbacks"] == "2"
    assert "(1 after the last logging step: not in the logged LR scale, skipped and requested counts)" in table


def test_undone_steps_are_unknown_with_several_optimizers(logs: Path, runs: dict[str, RunReport]) -> None:
    windows = json.loads((logs / "two_optimizers" / "version_0" / WINDOWS_JSON).read_text())
    assert [w["optimizer"] for w in windows] == [0, 1]
    # Each optimizer undid one step (batch 2), but the global steps between its snapshot and the rollback count both
    # optimizers' steps: what one optimizer undid cannot be told from the window.
    assert [w["global_step"] - w["snapshot_step"] for w in windows] == [3, 3]
    rows = table_rows(format_table(list(runs.values()), logs))
    for name in ("two_optimizers/version_0", "two_optimizers/version_0 [opt1]"):
        assert runs[name].rollbacks == 1 and runs[name].undone_steps is None
        assert (rows[name]["rollbacks"], rows[name]["undone"]) == ("1", "-")


def test_console_report_prints_rollbacks_and_the_corrected_description(logs: Path) -> None:
    result = run_console(["report", str(logs)], logs)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(result.stdout)
    rolled = rows["rollback/version_0"]
    assert (rolled["rollbacks"], rolled["undone"], rolled["LR scale"], rolled["skipped"]) == ("1", "1", "0.5", "4")
    assert rows["late/version_0"]["rollbacks"] == "2"
    assert OLD_DESCRIPTION not in result.stdout and f"{SKIPPED} + requested." in result.stdout
