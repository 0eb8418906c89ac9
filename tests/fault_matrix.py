"""The fault matrix: {fault} x {optimizer} x {policy} x {precision} on a real Trainer (CPU).

The promise under test: with ``nan_policy="skip"``, ``"halve_lr"`` or ``"rollback"`` a non-finite step never reaches
the weights
or the optimizer state. This module builds the cells (used by ``tests/test_fault_matrix.py``) and, run as a
script, regenerates ``docs/fault_matrix.md`` from a pytest run of that file::

    python tests/fault_matrix.py            # runs the matrix, rewrites docs/fault_matrix.md

Every cell trains a Linear(4,8)-Tanh-Linear(8,1) model on batches of 4 rows for a few steps, with one fault at
optimizer step ``bad``, and records the weights and the whole ``optimizer.state_dict()`` each time
``global_step`` changes. Its expected outcome (:func:`expectation`) is one of

* ``noop``: the bad step changed no weight and no optimizer state (``torch.equal`` on every tensor), two more
  good steps move the weights and leave everything finite, one step was counted as skipped, and under
  ``halve_lr`` and ``rollback`` the LR scale is 0.5;
* ``overflow``: under ``16-mixed`` an Inf put into an (already scaled) gradient is a GradScaler overflow: the
  step is still a no-op, but it is counted in ``amp_overflows`` (not as divergence) and the LR is not halved;
* ``refused``: the configuration is rejected at the first step (step 1 when step 0 was skipped) with an
  exception whose message names the problem.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))  # so `python tests/fault_matrix.py` finds faults.py

from faults import states_equal, trainer

from lightning_clip import GradientClipping

# ----------------------------------------------------------------------------- dimensions
OPTIMIZER_CLASSES: list[type] = [
    c
    for c in vars(torch.optim).values()
    if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
]
POLICIES = ("skip", "halve_lr", "rollback")
# rollback with a snapshot after every healthy step: restoring the newest one is exactly the state before the bad
# step, so every cell's no-op check also checks that a restore is bit-exact for that optimizer and precision. The
# divergence watch is off: with it, a snapshot is kept only where the loss is near its best (tests/test_divergence.py),
# and the matrix is about NaN/Inf.
POLICY_ARGS: dict[str, dict[str, Any]] = {"rollback": {"snapshot_every": 1, "divergence_margin": None}}
LR_SCALED = ("halve_lr", "rollback")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_IDS = {"32-true": "32", "bf16-mixed": "bf16", "16-mixed": "fp16"}
FP16_INIT_SCALE = 2.0**8  # small enough that the tiny model never overflows by itself (tests/test_resume_amp.py)
BATCH = 4


@dataclass(frozen=True)
class Fault:
    """One fault: where it is injected, and which optimizer step (``bad``) it spoils."""

    name: str
    bad: int  # the optimizer step (global_step) that is bad
    max_steps: int
    model: dict[str, Any] = field(default_factory=dict)  # MatrixModel fault arguments
    nan_batch: int | None = None  # the batch index whose inputs hold a NaN
    nan_unread: bool = False  # ... in a tensor the model never reads (gradients stay finite)
    check_inputs: bool = False
    accumulate: int = 1
    raise_at: int | None = None  # the step at which the run crashes (after the bad step and two good ones)
    raise_in: str = ""  # "training_step" or "hook" (a callback's on_before_optimizer_step, after ours)
    doc: str = ""


FAULTS = {
    f.name: f
    for f in [
        Fault("nan_loss", bad=2, max_steps=5, model={"nan_loss_at": (2,)}, doc="loss * NaN at step 2"),
        Fault(
            "inf_grad",
            bad=2,
            max_steps=5,
            model={"inf_grad_at": (2,)},
            doc="one gradient element set to +Inf in `on_after_backward` at step 2",
        ),
        Fault(
            "nan_input",
            bad=2,
            max_steps=5,
            nan_batch=2,
            check_inputs=True,
            doc="NaN in the input `x` of batch 2 (`check_inputs=True`); loss and gradients go NaN",
        ),
        Fault(
            "nan_input_unread",
            bad=2,
            max_steps=5,
            nan_batch=2,
            nan_unread=True,
            check_inputs=True,
            doc="NaN in a batch tensor the model never reads (`check_inputs=True`); gradients stay finite",
        ),
        Fault(
            "first_step",
            bad=0,
            max_steps=3,
            model={"nan_loss_at": (0,)},
            doc="NaN loss at global step 0 (no optimizer state exists yet)",
        ),
        Fault(
            "accum_last",
            bad=2,
            max_steps=5,
            model={"nan_loss_batches": (5,)},
            accumulate=2,
            doc="`accumulate_grad_batches=2`; NaN loss in the last micro-batch (batch 5) of step 2's window",
        ),
        Fault(
            "exception",
            bad=1,
            max_steps=6,
            model={"nan_loss_at": (1,)},
            raise_at=4,
            raise_in="training_step",
            doc="NaN loss at step 1, then a `RuntimeError` in `training_step` at step 4: the run stops",
        ),
        Fault(
            "exception_hook",
            bad=1,
            max_steps=6,
            model={"nan_loss_at": (1,)},
            raise_at=4,
            raise_in="hook",
            doc="as `exception`, but raised by a later callback's `on_before_optimizer_step`, while the "
            "halved LR is applied to `param_groups`",
        ),
    ]
}


# ----------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class OptSpec:
    id: str
    cls: type
    kwargs: tuple[tuple[str, Any], ...] = ()
    only_2d: bool = False  # Muon: only matrices (the biases are left out of the optimizer)

    def build(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.ndim == 2] if self.only_2d else list(module.parameters())
        return self.cls(params, **dict(self.kwargs))

    @property
    def fused(self) -> bool:
        return dict(self.kwargs).get("fused", False)


# Extra constructor arguments per class (beyond foreach/fused): LR choices and the variants asked for.
BASE_KWARGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "SGD": [
        ("SGD", {"lr": 0.05}),
        ("SGD_momentum", {"lr": 0.05, "momentum": 0.9}),
        ("SGD_nesterov_wd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ],
    "LBFGS": [("LBFGS_it1", {"lr": 0.1, "max_iter": 1}), ("LBFGS_it20", {"lr": 0.1, "max_iter": 20})],
}


def _accepts(cls: type, name: str, kwargs: dict[str, Any]) -> bool:
    if name not in inspect.signature(cls.__init__).parameters:
        return False
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs, **{name: True})
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def optimizer_specs() -> list[OptSpec]:
    """Every ``torch.optim`` optimizer class, with ``foreach=True`` and ``fused=True`` where it constructs."""
    specs = []
    for cls in OPTIMIZER_CLASSES:
        for base_id, base in BASE_KWARGS.get(cls.__name__, [(cls.__name__, {})]):
            variants = [(flag, {flag: True}) for flag in ("foreach", "fused") if _accepts(cls, flag, base)]
            if base_id == "SGD_nesterov_wd":
                variants = variants[:1]  # one nesterov variant is enough
            for suffix, extra in variants or [("", {})]:
                specs.append(
                    OptSpec(
                        f"{base_id}-{suffix}" if suffix else base_id,
                        cls,
                        tuple(sorted({**base, **extra}.items())),
                        only_2d=cls.__name__ == "Muon",
                    )
                )
    return specs


OPTIMIZERS = {spec.id: spec for spec in optimizer_specs()}


# ----------------------------------------------------------------------------- model, data, recorder
class InjectedFault(RuntimeError):
    pass


class MatrixModel(pl.LightningModule):
    def __init__(self, spec: OptSpec, nan_loss_at=(), inf_grad_at=(), nan_loss_batches=(), raise_at=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.spec = spec
        self.nan_loss_at, self.inf_grad_at = set(nan_loss_at), set(inf_grad_at)
        self.nan_loss_batches, self.raise_at = set(nan_loss_batches), raise_at
        self.opt: torch.optim.Optimizer | None = None
        self.initial_lr: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.raise_at:
            raise InjectedFault(f"injected fault in training_step at step {self.global_step}")
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if self.global_step in self.nan_loss_at or batch_idx in self.nan_loss_batches:
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_grad_at:
            self.net[2].weight.grad[0, 3] = float("inf")

    def configure_optimizers(self):
        self.opt = self.spec.build(self)
        self.initial_lr = [g["lr"] for g in self.opt.param_groups]  # the unscaled LR (no scheduler here)
        return self.opt


def make_loader(n_batches: int, nan_batch: int | None = None, unread: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = n_batches * BATCH
    x, y, extra = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g), torch.zeros(n, 2)
    if nan_batch is not None:
        (extra if unread else x)[nan_batch * BATCH + 1, 1] = float("nan")
    return DataLoader(TensorDataset(x, y, extra), batch_size=BATCH, shuffle=False)


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's parameters and its whole state_dict (state and param groups), copied."""
    return {
        "weights": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
        "optimizer": copy.deepcopy(opt.state_dict()),
    }


class Recorder(pl.Callback):
    """``states[g]``: weights and optimizer state while ``global_step == g`` (after step g-1, before step g)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, snapshot(pl_module.opt))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = snapshot(pl_module.opt)


class RaiseInHook(pl.Callback):
    """Raises from ``on_before_optimizer_step`` at one step; runs after GradientClipping (registered later)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.lr_at_raise: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            self.lr_at_raise = [g["lr"] for g in optimizer.param_groups]
            raise InjectedFault(f"injected fault in on_before_optimizer_step at step {self.at}")


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    fault: Fault
    opt: OptSpec
    policy: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.fault.name}-{self.opt.id}-{self.policy}-{PRECISION_IDS[self.precision]}"


@dataclass
class Expectation:
    kind: str  # "noop", "overflow", "refused"
    exc: type | tuple[type, ...] = ()
    match: str = ""  # regex the refusal message must match
    why: str = ""


def expectation(cell: Cell) -> Expectation:
    name = cell.opt.cls.__name__
    if name == "SparseAdam":
        return Expectation(
            "refused",
            RuntimeError,
            r"SparseAdam does not support dense gradients",
            "torch: SparseAdam needs sparse gradients (an `nn.Embedding(sparse=True)`); the matrix model is dense",
        )
    if name == "LBFGS" and cell.precision == "16-mixed":
        from pytorch_lightning.utilities.exceptions import MisconfigurationException

        return Expectation(
            "refused",
            MisconfigurationException,
            r"AMP and the LBFGS optimizer are not compatible",
            "Lightning: `16-mixed` (GradScaler) refuses closure optimizers",
        )
    if cell.precision == "16-mixed" and cell.fault.name == "inf_grad":
        return Expectation(
            "overflow",
            why="an Inf in a finite-loss fp16 gradient is a GradScaler overflow: skipped by "
            "the scaler, counted in `amp_overflows`, no LR change (by design)",
        )
    return Expectation("noop")


# Cells that fail on a library defect: {cell-id regex: reason}, from the matrix run (xfail(strict=True)).
KNOWN_BUGS: dict[str, str] = {}


def known_bug(cell: Cell) -> str | None:
    for pattern, reason in KNOWN_BUGS.items():
        if re.fullmatch(pattern, cell.id):
            return reason
    return None


# The full optimizer x policy x fault product runs at 32-true. Under AMP a cell costs ~3x
# as much, so bf16-mixed and 16-mixed run every fault and every policy on a representative set of optimizers:
# each skip path (grad=None with and without momentum/weight decay, device-side found_inf, the fused-SGD
# first-step exception, eager state (Adagrad), the closure optimizer) and, under 16-mixed, every fused optimizer
# (their gradients are still scaled in the hook) plus the Lightning refusal of LBFGS.
AMP_OPTIMIZERS = {
    "bf16-mixed": (
        "SGD_momentum-foreach",
        "SGD_momentum-fused",
        "AdamW-foreach",
        "Adam-fused",
        "Adagrad-fused",
        "LBFGS_it1",
    ),
    "16-mixed": (
        "SGD_momentum-foreach",
        "AdamW-foreach",
        "SGD-fused",
        "SGD_momentum-fused",
        "Adam-fused",
        "AdamW-fused",
        "Adagrad-fused",
        "LBFGS_it1",
    ),
}


def in_matrix(fault: Fault, opt: OptSpec, policy: str, precision: str) -> bool:
    return precision == "32-true" or opt.id in AMP_OPTIMIZERS[precision]


def all_cells() -> list[Cell]:
    return [
        Cell(fault, opt, policy, precision)
        for precision in PRECISIONS
        for fault in FAULTS.values()
        for opt in OPTIMIZERS.values()
        for policy in POLICIES
        if in_matrix(fault, opt, policy, precision)
    ]


# ----------------------------------------------------------------------------- running a cell
@dataclass
class Run:
    cell: Cell
    model: MatrixModel
    callback: GradientClipping
    states: dict[int, dict[str, Any]]
    error: BaseException | None
    base_lr: list[float]
    lr_at_raise: list[float]


def run_cell(cell: Cell, tmp_path: Any) -> Run:
    fault = cell.fault
    model = MatrixModel(cell.opt, raise_at=fault.raise_at if fault.raise_in == "training_step" else None, **fault.model)
    cb = GradientClipping(
        max_norm=1.0, nan_policy=cell.policy, check_inputs=fault.check_inputs, **POLICY_ARGS.get(cell.policy, {})
    )
    rec = Recorder()
    callbacks: list[pl.Callback] = [cb, rec]
    raiser = RaiseInHook(fault.raise_at) if fault.raise_in == "hook" else None
    if raiser is not None:
        callbacks.append(raiser)
    kwargs: dict[str, Any] = {"accelerator": "cpu", "accumulate_grad_batches": fault.accumulate}
    if cell.precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=FP16_INIT_SCALE)
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    else:
        kwargs["precision"] = cell.precision
    t = trainer(tmp_path, callbacks, max_steps=fault.max_steps, **kwargs)
    loader = make_loader(fault.max_steps * fault.accumulate, fault.nan_batch, fault.nan_unread)
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            t.fit(model, loader)
        except Exception as e:
            error = e
    base_lr = [g["lr"] for g in model.opt.param_groups] if model.opt is not None else []
    return Run(cell, model, cb, rec.states, error, base_lr, raiser.lr_at_raise if raiser else [])


# ----------------------------------------------------------------------------- checks
def all_finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def diff(a: Any, b: Any, path: str = "") -> str | None:
    """The first place where two snapshots differ (for the failure message)."""
    if isinstance(a, torch.Tensor):
        return None if isinstance(b, torch.Tensor) and torch.equal(a, b) else path
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{path} keys {sorted(a) if isinstance(a, dict) else a} != {sorted(b) if isinstance(b, dict) else b}"
        return next((d for k in a if (d := diff(a[k], b[k], f"{path}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path} length {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := diff(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {a!r} != {b!r}"


def assert_noop(before: dict, after: dict, what: str) -> None:
    assert states_equal(before["weights"], after["weights"]), f"weights moved on the {what}: {diff(before, after)}"
    assert states_equal(before["optimizer"], after["optimizer"]), (
        f"optimizer state changed on the {what}: {diff(before['optimizer'], after['optimizer'], 'state_dict')}"
    )


def check(run: Run, expected: Expectation) -> None:
    """Assert the cell's outcome; raises AssertionError with the first deviation."""
    cell, fault, states, cb = run.cell, run.cell.fault, run.states, run.callback
    if expected.kind == "refused":
        assert run.error is not None, f"expected a refusal ({expected.match}), the run finished"
        assert isinstance(run.error, expected.exc), f"refusal of the wrong type: {run.error!r}"
        assert re.search(expected.match, str(run.error)), f"refusal message: {run.error}"
        assert max(states, default=0) <= 1, f"refused late, at step {max(states)}: not at the first step"
        return
    if fault.raise_at is None:
        assert run.error is None, f"the run failed: {run.error!r}"
    else:
        assert isinstance(run.error, InjectedFault), f"expected the injected fault, got {run.error!r}"
    b = fault.bad
    # (a) the bad step is a no-op for the weights and the whole optimizer state_dict
    assert_noop(states[b], states[b + 1], f"bad step {b}")
    # (b) two more good steps move the weights and leave weights and optimizer state finite
    after = states[b + 3]
    assert not states_equal(states[b + 1]["weights"], after["weights"]), "the good steps after the bad one did nothing"
    assert all_finite(after["weights"]) and all_finite(after["optimizer"]), "non-finite weights or optimizer state"
    counters = cb.counters
    if expected.kind == "overflow":
        assert counters["amp_overflows"] == 1 and counters["skipped_steps"] == 0, counters
        assert cb.lr_scales == [1.0]
    else:
        # (c) exactly one step counted as skipped; (d) halve_lr and rollback halved once
        assert counters["skipped_steps"] == 1 and counters["nonfinite_steps"] == 1, counters
        assert counters["amp_overflows"] == 0, counters
        if cell.policy in LR_SCALED:
            assert cb.lr_scales == [0.5]
    if fault.raise_at is not None:
        # the crash: nothing of step raise_at was applied, and the LR in param_groups is the unscaled one
        crash = snapshot(run.model.opt)
        assert max(states) == fault.raise_at
        assert_noop(states[fault.raise_at], crash, f"crashed step {fault.raise_at}")
        unscaled = run.model.initial_lr
        assert run.base_lr == unscaled, f"LR in param_groups after the crash {run.base_lr} != unscaled {unscaled}"
        if fault.raise_in == "hook" and cell.policy in LR_SCALED:
            # The fault hit while the halved LR was in param_groups (the check above is not vacuous), except
            # under 16-mixed, where the closure and the hook run before optimizer.step() applies the scale.
            factor = 1.0 if cell.precision == "16-mixed" else 0.5
            assert run.lr_at_raise == [lr * factor for lr in unscaled], (run.lr_at_raise, unscaled)


def outcome_symbol(kind: str) -> str:
    return {"noop": "✓", "overflow": "O", "refused": "R"}[kind]


# ----------------------------------------------------------------------------- the doc
def _main() -> None:  # pragma: no cover - documentation generator
    import time

    import pytest

    root = Path(__file__).resolve().parents[1]
    results: dict[str, str] = {}

    class Collect:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
                cell_id = report.nodeid.split("[", 1)[1].rstrip("]")
                results[cell_id] = "xfailed" if hasattr(report, "wasxfail") else report.outcome

    start = time.perf_counter()
    pytest.main(["-q", "-p", "no:cacheprovider", str(root / "tests" / "test_fault_matrix.py")], plugins=[Collect()])
    wall = time.perf_counter() - start
    (root / "docs" / "fault_matrix.md").write_text(render(results, wall))


def render(results: dict[str, str], wall: float) -> str:
    cells = all_cells()
    by_id = {c.id: c for c in cells}
    faults, opts = list(FAULTS), list(OPTIMIZERS)
    counts: dict[str, int] = {}
    n_full = sum(1 for c in cells if c.precision == "32-true")
    passed = sum(1 for res in results.values() if res == "passed")
    for cid, res in results.items():
        kind = "xfail" if res == "xfailed" else (expectation(by_id[cid]).kind if res == "passed" else res)
        counts[kind] = counts.get(kind, 0) + 1
    lines = [
        "# Fault matrix: a non-finite step is never applied",
        "",
        '**Promise.** With `nan_policy="skip"`, `"halve_lr"` or `"rollback"`, a non-finite step never reaches the '
        "weights or the optimizer state. Rollback runs with `snapshot_every=1`: its snapshot is the state before the "
        "bad step, so the no-op check is also a check that the restore is bit-exact.",
        "",
        '**Cell.** A real `Trainer(accelerator="cpu")` trains Linear(4,8)-Tanh-Linear(8,1) on batches of 4 with '
        "`GradientClipping(max_norm=1.0, nan_policy=...)` (`snapshot_every=1, divergence_margin=None` under rollback), "
        "no logger, no checkpointing. A recorder copies the optimizer's parameters and its whole `state_dict()` "
        "(state and param groups) at every `global_step`. "
        "A cell passes when:",
        "",
        "- **no-op** (✓): (a) across the bad step every weight and every optimizer-state tensor is bit-identical "
        "(`torch.equal`); (b) after two more good steps the weights moved and weights and optimizer state are "
        "finite; (c) the callback counted exactly one skipped (non-finite) step and no AMP overflow; (d) under "
        "`halve_lr` and `rollback`, `cb.lr_scales == [0.5]`. For the exception faults also: the weights and "
        "optimizer state at the "
        'crash equal those after the previous step, and `param_groups[*]["lr"]` is the unscaled LR.',
        "- **overflow** (O): `16-mixed` only, Inf put into a gradient with a finite loss: GradScaler skips the "
        "step (a and b hold), it is counted in `amp_overflows` rather than as divergence, and the LR is not "
        "halved. By design: under fp16 the callback cannot tell this from a normal scaler overflow.",
        "- **refused** (R): an exception at the first step whose message names the problem (asserted).",
        "- **xfail** (X): a library defect, marked `xfail(strict=True)`; listed below.",
        "",
        "## Dimensions",
        "",
        f"- **faults** ({len(faults)}): " + "; ".join(f"`{f.name}`: {f.doc}" for f in FAULTS.values()) + ".",
        f"- **optimizers** ({len(opts)}): every class in `torch.optim` "
        f"({', '.join(c.__name__ for c in OPTIMIZER_CLASSES)}), `foreach=True` and `fused=True` where the class "
        "constructs with it on CPU, SGD also with momentum and with nesterov + weight decay, LBFGS with "
        "`max_iter=1` and `max_iter=20` (the weights and LBFGS state are snapshotted at each step start and a bad "
        "evaluation anywhere in the step puts them back). Muon takes the 2-D weights only (it refuses 1-D biases); "
        "the biases stay out of its optimizer.",
        f"- **policies** ({len(POLICIES)}): " + ", ".join(f"`{p}`" for p in POLICIES) + ".",
        '- **precisions** (3): `32-true`, `bf16-mixed`, `16-mixed` (a `GradScaler("cpu", init_scale=2**8)`, so '
        "the model never overflows by itself).",
        "",
        f"**Coverage.** The full fault x optimizer x policy product at `32-true` ({n_full} cells). An AMP cell costs "
        "about 3x as much, so `bf16-mixed` and `16-mixed` run every fault and every policy on a representative "
        "set: one optimizer per skip path (`grad=None` with and without momentum/weight decay, the fused "
        "device-side `found_inf` skip, fused SGD's first-step exception, eager state (Adagrad), the closure "
        "optimizer) and, under `16-mixed`, every fused optimizer (their gradients are still scaled in the hook). "
        "The sets are `AMP_OPTIMIZERS` in `tests/fault_matrix.py`.",
        "",
        f"**{len(results)} cells, {passed} passed** ({counts.get('noop', 0)} no-op, {counts.get('overflow', 0)} "
        f"overflow, {counts.get('refused', 0)} refused), **{counts.get('xfail', 0)} xfail**"
        + "".join(f", {counts[k]} {k}" for k in counts if k not in ("noop", "overflow", "refused", "xfail"))
        + f"; {wall:.0f} s wall for the pytest run on 2 CPU cores (it varies with the load).",
        "",
    ]
    for precision in PRECISIONS:
        lines += [
            f"## {precision}",
            "",
            "One symbol when every policy agrees, else " + "/".join(f"`{p}`" for p in POLICIES) + ".",
            "",
            "| optimizer | " + " | ".join(faults) + " |",
            "| --- |" + " --- |" * len(faults),
        ]
        for oid in opts:
            if not any(in_matrix(FAULTS[f], OPTIMIZERS[oid], p, precision) for f in faults for p in POLICIES):
                continue
            row = []
            for fname in faults:
                entry = []
                for policy in POLICIES:
                    cid = Cell(FAULTS[fname], OPTIMIZERS[oid], policy, precision).id
                    res = results.get(cid)
                    if res is None:
                        entry.append("·")
                    elif res == "xfailed":
                        entry.append("X")
                    elif res == "passed":
                        entry.append(outcome_symbol(expectation(by_id[cid]).kind))
                    else:
                        entry.append("FAIL")
                row.append(entry[0] if len(set(entry)) == 1 else "/".join(entry))
            lines.append(f"| {oid} | " + " | ".join(row) + " |")
        lines.append("")
    refused: dict[str, list[Cell]] = {}
    for c in cells:
        if expectation(c).kind == "refused":
            refused.setdefault(expectation(c).why, []).append(c)
    lines += ["## Refused cells (the message is asserted)", ""]
    for why, group in refused.items():
        ids = sorted({f"{c.opt.id} @ {c.precision}" for c in group})
        lines.append(f"- {', '.join(ids)} ({len(group)} cells): {why}; `{expectation(group[0]).match}`.")
    lines.append("")
    lines += ["## Library defects (xfail)", ""]
    if KNOWN_BUGS:
        for pattern, reason in KNOWN_BUGS.items():
            n = sum(1 for c in cells if re.fullmatch(pattern, c.id))
            example = next(c.id for c in cells if re.fullmatch(pattern, c.id))
            lines.append(
                f"- `{pattern}` ({n} cells): {reason} Repro: `pytest --runxfail "
                f"'tests/test_fault_matrix.py::test_fault_matrix[{example}]'`."
            )
    else:
        lines.append("None.")
    failed = sorted(cid for cid, res in results.items() if res not in ("passed", "xfailed"))
    if failed:
        lines += ["", "## Unexpected failures", ""] + [f"- `{cid}`" for cid in failed]
    lines += [
        "",
        "## How this page is produced",
        "",
        "```bash",
        "python tests/fault_matrix.py   # runs tests/test_fault_matrix.py in-process, rewrites docs/fault_matrix.md",
        "```",
        "",
        "The cells, faults, expected outcomes (`expectation`) and known defects (`KNOWN_BUGS`) live in "
        "`tests/fault_matrix.py`; the tables above are the outcomes pytest reported, not the expectations. A fixed "
        "defect turns its cells into strict-xfail failures (XPASS): remove its `KNOWN_BUGS` entry and regenerate.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _main()
