"""Issue 22: the logging step's cheaper path keeps every tag and value.

* A ``TensorBoardLogger`` gets one event per logging step (one ``Summary`` holding every tag): read back from the real
  event file, every tag and value equals the metrics dict the engine returned for that step; other loggers (CSV, a
  list of loggers, a ``TensorBoardLogger`` subclass with its own ``log_metrics``) still get ``log_metrics``.
* The update-to-weight ratio's copy of the weights lives in buffers allocated once (one copy of the parameters) and
  reused across logging steps; ``update_ratio_every`` measures it every k-th logging step, and ``None`` turns the
  copy and the tags off.
* The gradient-to-weight ratios divided on the device equal the host formula (:func:`lightning_clip.health.ratios`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from faults import RecordingLogger, StepRecorder, trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import GradientClipping
from lightning_clip import tensorboard as TB
from lightning_clip.health import named_ratios, ratio_vector, ratios
from lightning_clip.slots import UpdateBuffers


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * 50  # large enough to be clipped at max_norm 1

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :2].sum(1, keepdim=True)), batch_size=16)


class Returned(GradientClipping):
    """Keeps the metrics dict the engine returned on each logging step, with the step the callback logs it at."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.returned: list[tuple[int, dict[str, float]]] = []
        step = self.engine.step

        def recording_step(*args, **kw):
            metrics = step(*args, **kw)
            if metrics:
                self.returned.append((self.trainer_ref.fit_loop.epoch_loop._batches_that_stepped, dict(metrics)))
            return metrics

        self.engine.step = recording_step  # type: ignore[method-assign]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.trainer_ref = trainer
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def fit(tmp_path, cb: GradientClipping, loggers, steps: int = 6, every: int = 2) -> pl.Trainer:
    t = trainer(tmp_path, [cb], max_steps=steps, logger=loggers, log_every_n_steps=every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), loader())
    return t


def events_of(log_dir: str) -> list[Event]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, "no event file"
    return [event for f in files for event in EventFileLoader(str(f)).Load()]


def scalars_of(log_dir: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def as_float32(value: float) -> float:
    return float(np.float32(value))  # what a simple_value holds


def test_the_event_file_holds_every_returned_tag_and_value_one_event_per_logging_step(tmp_path):
    cb = Returned(max_norm=1.0)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(tmp_path, cb, logger, steps=8, every=2)
    returned = dict(cb.returned)
    assert sorted(returned) == [1, 3, 5, 7]  # Lightning's log_every_n_steps=2: (s + 1) % 2 == 0
    # Health on (the default) with layer norms: gradient and update ratios are among the tags.
    assert "grad_health/grad_ratio/net.0" in returned[1] and "grad_health/update_ratio/net.0" in returned[3]
    scalars = scalars_of(logger.log_dir)
    logged_tags = {tag for tag in scalars if not tag.startswith("epoch")}
    assert logged_tags == set().union(*(m.keys() for m in returned.values()))
    for step, metrics in returned.items():
        for tag, value in metrics.items():
            read = scalars[tag][step]
            assert read == as_float32(value) or (math.isnan(read) and math.isnan(value)), (tag, step, read, value)
        at_step = {tag for tag, by_step in scalars.items() if step in by_step and not tag.startswith("epoch")}
        assert at_step == set(metrics), f"step {step}: tags written but not returned, or returned but not written"
    ours = [e for e in events_of(logger.log_dir) if any(v.tag.startswith("grad_") for v in e.summary.value)]
    assert [e.step for e in ours] == sorted(returned)  # one event per logging step, holding every tag
    assert [len(e.summary.value) for e in ours] == [len(returned[e.step]) for e in ours]


def test_the_loggers_prefix_is_kept_and_a_csv_logger_beside_it_gets_the_same_values(tmp_path):
    cb = Returned(max_norm=1.0)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0, prefix="train")
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    fit(tmp_path, cb, [tb, csv_logger], steps=4, every=2)
    returned = dict(cb.returned)
    scalars = scalars_of(tb.log_dir)
    for step, metrics in returned.items():
        for tag, value in metrics.items():
            assert scalars[f"train-{tag}"][step] == as_float32(value)
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for step, metrics in returned.items():
        (row,) = [r for r in rows if int(r["step"]) == step and r.get("grad_norm/total")]
        for tag, value in metrics.items():  # the CSV logger has no prefix
            assert float(row[tag]) == pytest.approx(value, rel=1e-12, nan_ok=True)


def test_other_loggers_and_tensorboard_subclasses_with_their_own_log_metrics_get_log_metrics(tmp_path):
    class Counting(TensorBoardLogger):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls = 0

        def log_metrics(self, metrics, step=None):
            self.calls += int(any(k.startswith("grad_norm") for k in metrics))
            super().log_metrics(metrics, step)

    counting, recording = Counting(tmp_path, name="sub", version=0), RecordingLogger()
    cb = Returned(max_norm=1.0)
    fit(tmp_path, cb, [counting, recording], steps=4, every=2)
    assert counting.calls == 2 and len(recording.records) == 2
    assert recording.records == [(step, metrics) for step, metrics in cb.returned]
    assert TB.write_scalars(recording, {"a": 1.0}, 0) is False and TB.write_scalars(counting, {"a": 1.0}, 0) is False
    patched = TensorBoardLogger(tmp_path, name="patched", version=0)
    patched.log_metrics = lambda metrics, step=None: None  # type: ignore[method-assign]
    assert TB.write_scalars(patched, {"a": 1.0}, 0) is False  # a log_metrics patched on the instance is honoured


def test_a_rank_other_than_zero_writes_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    assert TB.write_scalars(logger, {"grad_norm/total": 1.0}, 3, is_global_zero=False) is True
    assert not Path(logger.log_dir).exists() or not list(Path(logger.log_dir).glob("events.*"))


def test_the_update_buffers_are_allocated_once_and_hold_one_copy_of_the_parameters(tmp_path):
    cb = GradientClipping(max_norm=1.0)
    seen: list[list[int]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append([t.data_ptr() for t in cb.engine._slots[0].updates.before])

    t = trainer(tmp_path, [cb, Watch()], max_steps=5, logger=RecordingLogger(), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model := Net(), loader())
    assert seen[0] and all(ptrs == seen[0] for ptrs in seen)  # the same memory on every logging step
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cb.engine._slots[0].updates.nbytes() == weights
    cb.update_ratio_every = None  # off: the copy goes
    assert cb.engine._slots[0].updates.nbytes() == 0


def test_update_ratio_every_k_measures_the_1st_and_every_kth_logging_step_float64_reference(tmp_path):
    rec = StepRecorder()
    logger = RecordingLogger()
    t = trainer(
        tmp_path,
        [GradientClipping(update_ratio_every=2), rec],
        max_steps=6,
        logger=logger,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model := Net(), loader())
    names = [n for n, _ in model.named_parameters()]
    pick = [i for i, n in enumerate(names) if n.startswith("net.2.")]
    by_step = [m.get("grad_health/update_ratio/net.2") for _, m in logger.records]
    # measured after logging steps 0, 2, 4 (the 1st, then every 2nd), each read at the logging step after it
    assert [v is not None for v in by_step] == [False, True, False, True, False, True]
    for k in (0, 2, 4):
        step = rec.steps[k]
        before = torch.cat([step["weights_before"][i].double().reshape(-1) for i in pick])
        after = torch.cat([step["weights_after"][i].double().reshape(-1) for i in pick])
        assert by_step[k + 1] == pytest.approx(float((after - before).norm() / after.norm()), rel=1e-4)
    assert all("grad_health/grad_ratio/net.2" in m for _, m in logger.records)  # health itself every step


def test_update_ratio_every_none_logs_no_update_ratio_and_keeps_no_copy(tmp_path):
    logger = RecordingLogger()
    cb = GradientClipping(update_ratio_every=None)
    t = trainer(tmp_path, [cb], max_steps=4, logger=logger, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(Net(), loader())
    keys = set().union(*(m.keys() for _, m in logger.records))
    assert not any("update_ratio" in k for k in keys) and "grad_health/grad_ratio/net.0" in keys
    assert cb.engine._slots[0].updates.nbytes() == 0


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_update_ratio_every_is_checked_naming_the_argument_and_the_value(value):
    with pytest.raises(ValueError, match=rf"`update_ratio_every` must be a positive integer or None, got {value!r}"):
        GradientClipping(update_ratio_every=value)
    cb = GradientClipping()
    with pytest.raises(ValueError, match="`update_ratio_every` must be a positive integer or None"):
        cb.update_ratio_every = value
    assert cb.update_ratio_every == 4  # the default, kept


def test_update_buffers_follow_a_new_layout():
    buffers = UpdateBuffers()
    a = [torch.ones(3), torch.ones(2, 2)]
    assert buffers.due(1) and buffers.due(1)
    buffers.take(a, ("k",))
    first = [t.data_ptr() for t in buffers.before]
    buffers.take(a, ("k",))
    assert [t.data_ptr() for t in buffers.before] == first
    b = [torch.ones(4), torch.ones(2, 2)]  # a parameter's data swapped for another shape
    buffers.take(b, ("k",))
    assert [t.shape for t in buffers.before] == [torch.Size([4]), torch.Size([2, 2])]
    assert buffers.update([torch.zeros(4), torch.zeros(2, 2)])[0].tolist() == [1.0] * 4
    assert not buffers.due(None) and buffers.nbytes() == 0


def test_ratios_divided_on_the_device_equal_the_host_formula():
    g = torch.Generator().manual_seed(0)
    grads = torch.rand(64, generator=g).float() * 10.0 ** torch.randint(-20, 3, (64,), generator=g)
    weights = torch.rand(64, generator=g).float()
    grads[[1, 5]] = torch.tensor([math.nan, math.inf])
    weights[[2, 3, 4]] = torch.tensor([0.0, math.inf, math.nan])
    names = [f"layer{i}" for i in range(64)]
    expected = ratios(names, grads.double().tolist(), weights.double().tolist())
    assert named_ratios(names, ratio_vector(grads, weights).tolist()) == expected  # exactly: the same float64 math
    assert set(names) - set(expected) == {f"layer{i}" for i in (1, 2, 3, 4, 5)}


def test_a_real_tensorboard_server_serves_every_returned_tag_and_value(tmp_path):
    import subprocess
    import time
    import urllib.error
    import urllib.parse

    from tb_server import free_port, get_json, tensorboard_exe

    exe = tensorboard_exe()
    if exe is None:
        pytest.skip("the tensorboard executable is not installed")
    cb = Returned(max_norm=1.0)
    logger = TensorBoardLogger(tmp_path / "logs", name="tb", version=0)
    fit(tmp_path, cb, logger, steps=6, every=2)
    returned = dict(cb.returned)
    expected = set().union(*(m.keys() for m in returned.values()))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "tensorboard.log").open("w") as log:
        server = subprocess.Popen(
            [exe, "--logdir", str(tmp_path / "logs"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            tags: set[str] = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not expected <= tags:  # the server loads the files in the background
                with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                    tags = set(get_json(f"{base}/data/plugin/scalars/tags").get("tb/version_0", {}))
                time.sleep(0.5)
            assert expected <= tags, f"missing: {sorted(expected - tags)[:5]}"
            for tag in expected:
                query = urllib.parse.urlencode({"run": "tb/version_0", "tag": tag})
                served = {step: value for _, step, value in get_json(f"{base}/data/plugin/scalars/scalars?{query}")}
                logged = {step: as_float32(m[tag]) for step, m in returned.items() if tag in m}
                assert served == logged, tag
        finally:
            server.terminate()
            server.wait(timeout=10)
