"""Remedies as units (issue 14): one copy per optimizer with its own state, declared capabilities instead of class
checks, requests to the loop, ``nan_policy=<Remedy>`` in Python and YAML, and a new remedy in one file."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytorch_lightning as pl
import torch
from faults import FaultModel, StepRecorder, make_loader, trainer

import lightning_clip
from lightning_clip import ClipEngine, GradientClipping
from lightning_clip.record import HostRead, Request, StepRead, StepRecord
from lightning_clip.remedies import REMEDIES, HalveLR, Remedy
from lightning_clip.rules import NormClip

NAN = float("nan")
PACKAGE = Path(lightning_clip.__file__).parent


class SkipWindow(Remedy):
    """A toy remedy, written as a user would: skip the bad step and the next ``window`` steps (a data window).
    It only decides; the engine skips, counts and records the window."""

    policy: ClassVar[str] = "skip_window"
    options: ClassVar[tuple[str, ...]] = ("window",)
    skips_steps: ClassVar[bool] = True

    def __init__(self, window: int = 2) -> None:
        self.window = window
        self.windows = 0  # its own state, per optimizer

    def needs_read(self, step: StepRecord) -> bool:
        return True

    def decide(self, step: StepRecord, read: StepRead) -> Request:
        if read.bad:
            self.windows += 1
            return Request(skip=True, skip_steps=self.window)
        return Request(skip=read.skip)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = int(state.get("windows", 0))


def fit(t: pl.Trainer, model: pl.LightningModule, loader=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader if loader is not None else make_loader(n=160))


def moved(step: dict) -> bool:
    return not all(torch.equal(a, b) for a, b in zip(step["weights_before"], step["weights_after"]))


# ----------------------------------------------------------------------------- a new remedy: one file + registry
def test_a_registered_remedy_runs_by_name_and_its_request_skips_the_data_window(tmp_path, monkeypatch):
    monkeypatch.setitem(REMEDIES, "skip_window", SkipWindow)
    cb = GradientClipping(nan_policy="skip_window")
    rec = StepRecorder()
    fit(trainer(tmp_path, [cb, rec], max_steps=10), FaultModel(nan_loss_at=(3,)))
    assert [moved(s) for s in rec.steps] == [True] * 3 + [False] * 3 + [True] * 4  # step 3 and the next 2
    assert cb.counters["requested_skips"] == 2 and cb.counters["skipped_steps"] == 3
    state = cb.state_dict()["optimizers"][0]
    assert state["remedy"] == {"windows": 1}  # its own section; the engine's mechanisms keep theirs
    assert state["control"]["skip_remaining"] == 0 and state["counters"]["requested_skips"] == 2
    assert [w["skipped"] for w in cb.engine.skipped_windows()] == [[3, 5]]  # recorded by the engine


def test_the_request_is_honoured_in_a_plain_loop_and_survives_a_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(NormClip(1e6), SkipWindow(window=3))
    engine.attach([opt], model.named_parameters())
    moves = []
    for step in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean() * (NAN if step == 1 else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(opt)
        before = model.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        moves.append(not torch.equal(before, model.weight))
    assert moves == [True, False, False]
    resumed = ClipEngine(NormClip(1e6), SkipWindow(window=3))
    resumed.load_state_dict(engine.state_dict())  # two steps of the window are still owed
    resumed.attach([opt], model.named_parameters())
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        resumed.step(opt)
        before = model.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        moves.append(not torch.equal(before, model.weight))
    assert moves == [True, False, False, False, False, True]
    assert resumed.counters_of(0)["requested_skips"] == 3 and resumed.remedy_of(0).windows == 1


def test_a_remedy_that_does_not_skip_cannot_ask_for_skips():
    class Asks(Remedy):
        policy: ClassVar[str] = "asks"

        def needs_read(self, step: StepRecord) -> bool:
            return True

        def decide(self, step: StepRecord, read: StepRead) -> Request:
            return Request(skip_steps=1)

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(NormClip(1.0), Asks())
    model(torch.randn(8, 4)).sum().backward()
    with pytest.raises(ValueError, match="asked to skip steps but does not declare `skips_steps`"):
        engine.step(opt)


# ----------------------------------------------------------------------------- one copy per optimizer
def test_each_optimizer_has_its_own_remedy_and_lr_scale(tmp_path):
    from faults import RecordingLogger

    class TwoOpts(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            opt_a, opt_b = self.optimizers()
            for opt, net, nan in ((opt_a, self.a, False), (opt_b, self.b, batch_idx in (1, 2))):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), y) * (NAN if nan else 1.0)
                self.manual_backward(loss)
                opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    cb = GradientClipping(nan_policy="halve_lr")
    fit(trainer(tmp_path, [cb], max_steps=8, logger=RecordingLogger()), TwoOpts())
    assert cb.lr_scales == [1.0, 0.25]
    a, b = cb.engine.remedy_of(0), cb.engine.remedy_of(1)
    assert a is not b and a is not cb.engine.remedy  # one copy per optimizer; the scale is each slot's
    assert [o["control"]["lr_scale"] for o in cb.state_dict()["optimizers"]] == [1.0, 0.25]


# ----------------------------------------------------------------------------- nan_policy=<Remedy>
def test_nan_policy_takes_a_remedy_object(tmp_path):
    cb = GradientClipping(nan_policy=HalveLR(lr_factor=0.25))
    rec = StepRecorder()
    fit(trainer(tmp_path, [cb, rec], max_steps=4), FaultModel(nan_loss_at=(1,)))
    assert cb.lr_scales == [0.25] and cb.nan_policy.lr_factor == 0.25
    with pytest.raises(ValueError, match=r"`nan_policy` .* is a remedy object, which carries its own settings"):
        GradientClipping(nan_policy=HalveLR(), lr_factor=0.1)
    with pytest.raises(ValueError, match="`lr_factor` does not apply: this GradientClipping was built with nan_policy"):
        cb.lr_factor = 0.1


YAML = """
model: {nan_at_step: 1}
trainer:
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_clip.GradientClipping
      init_args:
        nan_policy: {class_path: lightning_clip.remedies.HalveLR, init_args: {lr_factor: 0.25}}
"""


def test_nan_policy_class_path_in_yaml_in_both_namespaces_and_both_clis(tmp_path):
    from cli_script import finish, launch

    keys = [(ns, flavour) for ns in ("pytorch_lightning", "lightning") for flavour in ("ours", "plain")]
    started = {}
    for ns, flavour in keys:
        cwd = tmp_path / f"{ns}_{flavour}"
        cwd.mkdir()
        started[ns, flavour] = launch(cwd, ns, flavour, YAML)
    for key, proc in started.items():
        run = finish(proc)
        assert run.returncode == 0, (key, run.stderr[-2000:])
        (ran,) = run.clipping()
        assert ran["lr_scales"] == [0.25] and ran["counters"]["skipped_steps"] == 1, key


# ----------------------------------------------------------------------------- structure: what the engine asks
def test_the_engine_and_the_callback_never_name_a_remedy_class():
    for module in ("engine.py", "callback.py", "slots.py"):
        source = (PACKAGE / module).read_text()
        code = re.sub(r'"""[\s\S]*?"""', "", source)  # docstrings may show examples
        assert not re.search(r"\b(Skip|HalveLR|RaiseError|Ignore)\b", code), module


def test_the_host_read_is_unpacked_by_name():
    read = HostRead(torch.device("cpu"))
    read.add("bad", torch.tensor(True))
    read.add_all("layers", [torch.tensor(2.0), torch.tensor(3.0)])
    read.add("streak", torch.tensor(4))
    read.add_all("counts", torch.tensor([5, 6]))
    assert read.read() == {"bad": 1.0, "streak": 4.0, "layers": [2.0, 3.0], "counts": [5.0, 6.0]}
