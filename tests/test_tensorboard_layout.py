"""The Custom Scalars layout ``GradientClipping`` writes at fit start (``lightning_clip.tensorboard``).

Read back from real event files (TensorBoard's ``EventAccumulator``) and served by a real ``tensorboard`` server
(the custom-scalars plugin's ``layout`` route), on 127.0.0.1 only. Every chart's regexes are matched against the
scalar tags the run actually logged: a chart covers exactly the tags it is meant to, and no regex is dangling.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tb_server import free_port, get_json, tensorboard_exe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping
from lightning_clip import tensorboard as TB

SERVER_TIMEOUT = 30.0
COUNTERS = {
    "grad_clip/clipped_steps",
    "grad_clip/nonfinite_steps",
    "grad_clip/skipped_steps",
    "grad_clip/amp_overflows",
    "grad_clip/spike_skips",
    "grad_clip/requested_skips",
}


# ----------------------------------------------------------------------------- harness
class Net(pl.LightningModule):
    """A small regression whose gradient norm (about 10) is well above the thresholds below."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.automatic_optimization = not manual

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return ((self.head(torch.tanh(self.body(x))) - y) ** 2).mean() * 10

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.automatic_optimization:
            return self.loss(batch)
        for opt in self.optimizers():  # manual optimization: two optimizers, each steps on the same loss
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()
        return None

    def configure_optimizers(self) -> Any:
        if self.automatic_optimization:
            return torch.optim.SGD(self.parameters(), lr=0.01)
        return [torch.optim.SGD(self.body.parameters(), lr=0.01), torch.optim.SGD(self.head.parameters(), lr=0.01)]


def fit(root: Path, run: str, callbacks: list[Any], manual: bool = False, steps: int = 3) -> Path:
    """``steps`` steps logged every step to ``root/<run>/version_0``; returns that run's directory."""
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g) * 5), 4)
    logger = TensorBoardLogger(save_dir=root, name=run, version=0)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(manual), data)
    return Path(logger.log_dir)


def read_run(run_dir: Path) -> tuple[set[str], list[dict[str, dict[str, list[str]]]]]:
    """The scalar tags of a run and every layout written to it, in order ({category: {chart: [regexes]}})."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    layouts = []
    if TB.CONFIG_TAG in acc.Tags()["tensors"]:
        for event in acc.Tensors(TB.CONFIG_TAG):
            proto = layout_pb2.Layout()
            proto.ParseFromString(event.tensor_proto.string_val[0])
            assert all(ch.WhichOneof("content") == "multiline" for c in proto.category for ch in c.chart)
            layouts.append({c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in proto.category})
    return set(acc.Tags()["scalars"]), layouts


def covered(regexes: list[str], tags: set[str]) -> set[str]:
    """The tags the chart shows (TensorBoard matches each regex with ``re.match``); every regex matches one."""
    hits = [{t for t in tags if re.match(r, t)} for r in regexes]
    assert all(len(h) == 1 for h in hits), f"a regex matches no logged tag or several: {dict(zip(regexes, hits))}"
    return set().union(*hits)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three runs under one log directory: two callbacks (one named, under rollback), two optimizers, and
    ``log_norms="none"``."""
    root = tmp_path_factory.mktemp("tb_layout")
    # The named callback writes first: the run's last layout must still hold it (no other run has its category).
    both = [
        GradientClipping(mode="none", name="monitor", nan_policy="rollback", log_norms="layer"),
        GradientClipping(mode="norm", max_norm=0.5, log_norms="total"),
    ]
    return {
        "root": root,
        "both": fit(root, "two_callbacks", both),
        "manual": fit(root, "two_optimizers", [GradientClipping(max_norm=0.5, log_norms="total")], manual=True),
        "none": fit(root, "no_logging", [GradientClipping(max_norm=0.5, log_norms="none")], steps=1),
    }


# ----------------------------------------------------------------------------- the event files
def test_one_chart_covers_the_norms_and_the_threshold(runs: dict[str, Path]) -> None:
    tags, layouts = read_run(runs["both"])
    merged = layouts[-1]  # TensorBoard reads the newest layout of a run: it holds both callbacks
    assert list(merged) == ["lightning_clip/monitor", "lightning_clip"]
    charts = merged["lightning_clip"]
    assert list(charts) == ["gradient norm", "counters", "LR scale"]
    assert covered(charts["gradient norm"], tags) == {
        "grad_norm/total",
        "grad_norm/total_clipped",
        "grad_clip/threshold",
    }
    assert covered(charts["counters"], tags) == COUNTERS  # no rollbacks under nan_policy="skip"
    assert covered(charts["LR scale"], tags) == {"grad_clip/lr_scale"}


def test_a_named_callback_gets_its_own_category_with_rollbacks(runs: dict[str, Path]) -> None:
    tags, layouts = read_run(runs["both"])
    assert len(layouts) == 2  # one write per callback; the first holds the first callback alone
    charts = layouts[-1]["lightning_clip/monitor"]
    assert layouts[0] == {"lightning_clip/monitor": charts}
    # mode="none" has no threshold; nan_policy="rollback" adds its counter
    assert covered(charts["gradient norm"], tags) == {"grad_norm/total/monitor", "grad_norm/total_clipped/monitor"}
    assert covered(charts["counters"], tags) == {f"{t}/monitor" for t in COUNTERS} | {"grad_clip/rollbacks/monitor"}
    assert covered(charts["LR scale"], tags) == {"grad_clip/lr_scale/monitor"}
    # The rollback markers' chart: written at a rollback's step only (this run has none; test_divergence has one).
    markers = charts.pop(TB.ROLLBACK_CHART)
    assert markers == ["^grad_clip/rollback/monitor$", "^grad_clip/lr_scale/monitor$"]
    assert TB.ROLLBACK_CHART not in layouts[-1]["lightning_clip"]  # nan_policy="skip": no such chart
    unnamed = set().union(*(covered(ch, tags) for ch in layouts[-1]["lightning_clip"].values()))
    named = set().union(*(covered(ch, tags) for ch in charts.values()))
    assert not unnamed & named and all(t.endswith("/monitor") for t in named)


def test_each_optimizer_gets_its_own_category(runs: dict[str, Path]) -> None:
    tags, layouts = read_run(runs["manual"])
    assert len(layouts) == 1
    (merged,) = layouts
    assert list(merged) == ["lightning_clip", "lightning_clip_opt1"]
    assert covered(merged["lightning_clip_opt1"]["gradient norm"], tags) == {
        "grad_norm/total_opt1",
        "grad_norm/total_clipped_opt1",
        "grad_clip/threshold_opt1",
    }
    first = set().union(*(covered(ch, tags) for ch in merged["lightning_clip"].values()))
    second = set().union(*(covered(ch, tags) for ch in merged["lightning_clip_opt1"].values()))
    assert not first & second and all("_opt1" in t for t in second)


def test_log_norms_none_writes_no_layout(runs: dict[str, Path]) -> None:
    tags, layouts = read_run(runs["none"])
    assert layouts == [] and not any(t.startswith(("grad_norm", "grad_clip")) for t in tags)


# ----------------------------------------------------------------------------- the pure parts
def test_layouts_of_two_names_and_two_optimizers_share_no_tag() -> None:
    tags = {
        f"{base}{end}"
        for base in ("grad_norm/total", "grad_norm/total_clipped", "grad_clip/threshold", "grad_clip/lr_scale")
        for end in ("", "_opt1", "/a.b", "_opt1/a.b", "/aXb", "/a.b2")
    }
    seen: dict[str, str] = {}
    for name in (None, "a.b", "aXb", "a.b2"):
        for category, charts in TB.layout(2, name=name, counters=()).items():
            for tag in {t for _, regexes in charts.values() for r in regexes for t in tags if re.match(r, t)}:
                assert tag not in seen, f"{tag} is in {seen.get(tag)} and {category}"
                seen[tag] = category
    assert set(seen) == tags  # and every tag has its chart


def test_only_tensorboard_loggers_of_either_namespace_are_recognised(tmp_path: Path) -> None:
    lightning_loggers = pytest.importorskip("lightning.pytorch.loggers")
    ours = TensorBoardLogger(tmp_path)
    theirs = lightning_loggers.TensorBoardLogger(tmp_path)
    assert TB.tensorboard_loggers([ours, CSVLogger(tmp_path), theirs, object()]) == [ours, theirs]


def test_a_lightning_pytorch_trainer_gets_the_layout_too(tmp_path: Path) -> None:
    lpl = pytest.importorskip("lightning.pytorch")

    class LNet(lpl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return (self.layer(batch[0]) ** 2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    logger = lpl.loggers.TensorBoardLogger(save_dir=tmp_path, name="lightning", version=0)
    trainer = lpl.Trainer(
        max_steps=2,
        callbacks=[GradientClipping(log_norms="total")],
        logger=logger,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(LNet(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    tags, layouts = read_run(Path(logger.log_dir))
    assert len(layouts) == 1 and list(layouts[0]) == ["lightning_clip"]
    assert covered(layouts[0]["lightning_clip"]["gradient norm"], tags) == {
        "grad_norm/total",
        "grad_norm/total_clipped",
        "grad_clip/threshold",
    }


def test_a_second_fit_on_the_same_logger_replaces_the_callbacks_layout(tmp_path: Path) -> None:
    class Writer:
        def __init__(self) -> None:
            self.layouts: list[dict[str, Any]] = []

        def add_custom_scalars(self, layout: dict[str, Any]) -> None:
            self.layouts.append(layout)

    class Logger(TensorBoardLogger):
        @property
        def experiment(self) -> Any:
            return writer

    writer = Writer()
    trainer: Any = type("T", (), {"is_global_zero": True, "optimizers": [None], "loggers": [Logger(tmp_path)]})()
    a, b = GradientClipping(name="a"), GradientClipping(mode="none", name="b")
    assert TB.add_layout(trainer, a.engine) == TB.add_layout(trainer, b.engine) == 1
    trainer.optimizers = [None, None]
    TB.add_layout(trainer, a.engine)
    assert list(writer.layouts[-1]) == ["lightning_clip/a", "lightning_clip_opt1/a", "lightning_clip/b"]
    trainer.is_global_zero = False
    assert TB.add_layout(trainer, b.engine) == 0 and len(writer.layouts) == 3


# ----------------------------------------------------------------------------- a real TensorBoard server
def test_tensorboard_serves_the_merged_layout(runs: dict[str, Path], tmp_path: Path) -> None:
    exe = tensorboard_exe()
    if exe is None:
        pytest.skip("the tensorboard executable is not installed")
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin/custom_scalars"
    log_path = tmp_path / "tensorboard.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [exe, "--logdir", str(runs["root"]), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        layout: dict[str, Any] = {}
        answered = False
        deadline = time.monotonic() + SERVER_TIMEOUT
        wanted = {"lightning_clip", "lightning_clip/monitor", "lightning_clip_opt1"}
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.skip(f"tensorboard could not start:\n{log_path.read_text()[-2000:]}")
            try:
                layout = get_json(f"{base}/layout")
                answered = True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if {c["title"] for c in layout.get("category", [])} >= wanted:
                break
            time.sleep(0.3)
        assert answered, f"tensorboard did not answer in {SERVER_TIMEOUT} s:\n{log_path.read_text()[-2000:]}"
        categories = {c["title"]: c["chart"] for c in layout.get("category", [])}
        assert set(categories) == wanted, layout
        # the same unnamed category in two runs (identical charts) is merged into one, without duplicates
        assert [c["title"] for c in categories["lightning_clip"]] == ["gradient norm", "counters", "LR scale"]
        regexes = categories["lightning_clip"][0]["multiline"]["tag"]
        assert regexes == ["^grad_norm/total$", "^grad_norm/total_clipped$", "^grad_clip/threshold$"]
        # and the plugin's own data route finds each tag of the chart in the run
        for regex, tag in zip(regexes, ("grad_norm/total", "grad_norm/total_clipped", "grad_clip/threshold")):
            query = urllib.parse.urlencode({"run": "two_callbacks/version_0", "tag": regex})
            data = get_json(f"{base}/scalars?{query}")
            assert data["regex_valid"] and list(data["tag_to_events"]) == [tag]
            assert len(data["tag_to_events"][tag]) == 3  # one point per logged step
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
