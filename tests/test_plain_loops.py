"""``ClipEngine`` without Lightning: the two loop examples run as scripts, and the engine in plain loops in-process.

The examples are real subprocesses started from a temporary working directory (so logs land there and the
scripts must find their package on their own); both are started together and awaited once, which halves the
wall time on a 2-core machine. The in-process tests drive the engine in hand-written SGD/Adam loops and check
the numbers the optimizer actually sees: bit-identical weights and state across a skipped step, the clipped
norm against a float64 reference, and the LR applied by the update after a bad step.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_clip import ClipEngine
from lightning_clip.remedies import HalveLR, Skip
from lightning_clip.rules import NoClip, NormClip

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ("plain_pytorch", "fabric")
NAN_STEP = 30  # where both examples inject their NaN batch
TIMEOUT = 240


# ----------------------------------------------------------------------------- the examples, as scripts
@dataclass
class Run:
    cwd: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    started = {}
    for name in EXAMPLES:
        cwd = tmp_path_factory.mktemp(name)
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / f"{name}.py")],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[name] = (cwd, proc)
    out = {}
    for name, (cwd, proc) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[name] = Run(cwd, proc.returncode, stdout, stderr)
    return out


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_reports_the_skip(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = run.stdout
    assert _number(r"^steps: (\d+)", out) == 100
    assert _number(r"^skipped steps: (\d+)", out) == 1
    assert _number(r"^lr scale: ([-\d.e]+)", out) == 0.5
    assert _number(r"lr applied ([-\d.e]+)", out) == pytest.approx(0.05)
    assert _number(r"param_groups lr ([-\d.e]+)", out) == pytest.approx(0.1)  # the scheduler's value, unscaled
    clipped = _number(r"^clipped steps: (\d+) of", out)
    assert 0 < clipped < 100  # the model explodes: clipping did real work, but not on every step
    assert math.isfinite(_number(r"^last loss: (\S+)", out))
    raw = _number(r"^final grad norm: (\S+)", out)
    after = _number(r"after clipping (\S+)\)", out)
    assert math.isfinite(raw) and after <= min(raw, 1.0) + 1e-4
    # The resumed engine, loaded from the saved state, reports the same skip and scale.
    assert _number(r"^resumed engine: skipped steps (\d+)", out) == 1
    assert _number(r"^resumed engine: .*lr scale ([-\d.e]+)", out) == 0.5
    # The bad step was diagnosed once, at the injected step.
    assert re.findall(r"global step (\d+)", run.stderr) == [str(NAN_STEP)], run.stderr


def test_fabric_example_logs_metrics_to_tensorboard(runs: dict[str, Run]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["fabric"]
    assert run.returncode == 0, run.stderr
    (log_dir,) = (run.cwd / "lightning_logs" / "fabric").iterdir()  # in the working directory, one version
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    # The example logs every 10th step, the NaN step (30 is one of them) and the last one.
    assert sorted(s for s, _ in scalars["grad_norm/total"]) == [*range(0, 100, 10), 99]
    lr_scale = dict(scalars["grad_clip/lr_scale"])
    assert lr_scale[20] == 1.0 and lr_scale[40] == 0.5  # halved by the NaN step at 30
    skipped = dict(scalars["grad_clip/skipped_steps"])
    assert skipped[20] == 0 and skipped[NAN_STEP] == 1 and skipped[99] == 1
    # Per-layer norms are named from the unwrapped module, as under the Lightning callback.
    assert {"grad_norm_layer/hidden.0", "grad_norm_layer/head"} <= scalars.keys(), sorted(scalars)
    assert not any("_forward_module" in tag for tag in scalars)


# ----------------------------------------------------------------------------- the engine in plain loops
def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 4, generator=gen, dtype=dtype), torch.randn(16, 1, generator=gen, dtype=dtype)


def _state_snapshot(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }


def _states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for pid in a:
        if a[pid].keys() != b[pid].keys():
            return False
        for k, v in a[pid].items():
            w = b[pid][k]
            same = torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
            if not same:
                return False
    return True


def _record_grads(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor | None]]:
    """The gradients as the optimizer sees them, recorded at the start of every ``optimizer.step()``."""
    seen: list[list[torch.Tensor | None]] = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            [None if p.grad is None else p.grad.detach().clone() for g in opt.param_groups for p in g["params"]]
        )
    )
    return seen


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_skip_leaves_weights_and_optimizer_state_bit_identical(opt_name: str) -> None:
    model = _mlp()
    optimizer = OPTIMIZERS[opt_name](model)
    engine = ClipEngine(NormClip(max_norm=1.0), Skip())
    engine.attach([optimizer], model.named_parameters())
    for step in range(5):
        weights = [p.detach().clone() for p in model.parameters()]
        state = _state_snapshot(optimizer)
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y) * (math.nan if step == 2 else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        if step == 2:
            with pytest.warns(RuntimeWarning, match="step skipped"):
                engine.step(optimizer, global_step=step)
            assert all(p.grad is None for p in model.parameters())
        else:
            engine.step(optimizer, global_step=step)
        optimizer.step()
        optimizer.zero_grad()
        same_weights = all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
        same_state = _states_equal(state, _state_snapshot(optimizer))
        if step == 2:
            assert same_weights, "the skipped step moved the weights"
            assert same_state, "the skipped step changed the optimizer state (momentum / moments / step count)"
        else:
            assert not same_weights, f"good step {step} did not move the weights"
            assert not same_state, f"good step {step} did not update the optimizer state"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    counters = engine.counters
    assert (counters["steps"], counters["nonfinite_steps"], counters["skipped_steps"]) == (5, 1, 1)
    assert engine.lr_scales == [1.0]  # Skip never scales the LR
    engine.detach()


def test_norm_clip_matches_a_float64_reference() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = _record_grads(optimizer)
    engine = ClipEngine(NormClip(max_norm=0.5), Skip())
    engine.attach([optimizer], model.named_parameters())
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x * 10.0), y * 10.0)  # large targets: a raw norm well above 0.5
    engine.observe_loss(loss)
    loss.backward()
    raw_grads = [p.grad.detach().to(torch.float64).clone() for p in model.parameters()]
    raw = torch.linalg.vector_norm(torch.cat([g.flatten() for g in raw_grads])).item()
    assert raw > 5.0, f"the test needs a raw norm far above max_norm, got {raw}"
    metrics = engine.step(optimizer, log=True)
    optimizer.step()

    (clipped,) = seen
    clipped64 = [g.to(torch.float64) for g in clipped]
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped64])).item() == pytest.approx(0.5, abs=1e-5)
    # Scaled, not clamped: every gradient keeps its direction, by the same factor.
    for before, after in zip(raw_grads, clipped64):
        torch.testing.assert_close(after, before * (0.5 / raw), rtol=1e-5, atol=1e-9)
    assert metrics["grad_norm/total"] == pytest.approx(raw, rel=1e-5)
    assert metrics["grad_norm/total_clipped"] == pytest.approx(0.5, abs=1e-5)
    assert engine.counters["clipped_steps"] == 1


def test_norm_clip_leaves_a_small_gradient_bit_identical() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = ClipEngine(NormClip(max_norm=1e6), Skip())
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    engine.step(optimizer)  # never attached: bound on first use
    assert all(torch.equal(a, p.grad) for a, p in zip(raw, model.parameters()))
    assert engine.counters["clipped_steps"] == 0
    engine.detach()


def _sgd_deltas(
    engine: ClipEngine, model: nn.Module, optimizer: torch.optim.Optimizer, bad_steps: set[int], steps: int
) -> list[tuple[list[torch.Tensor], list[torch.Tensor | None]]]:
    """Per step: the weight change and the gradient the optimizer saw (float64 model, plain SGD)."""
    seen = _record_grads(optimizer)
    out = []
    for step in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        x, y = _batch(step, torch.float64)
        loss = nn.functional.mse_loss(model(x), y) * (math.nan if step in bad_steps else 1.0)
        engine.observe_loss(loss)
        loss.backward()
        engine.step(optimizer, global_step=step)
        optimizer.step()
        optimizer.zero_grad()
        out.append(([p.detach() - b for p, b in zip(model.parameters(), before)], seen[-1]))
    return out


def _applied_lr(delta: list[torch.Tensor], grads: list[torch.Tensor | None]) -> float:
    """The LR of a plain SGD update: ``delta = -lr * grad``, checked elementwise."""
    g = torch.cat([gr.flatten() for gr in grads])  # type: ignore[union-attr]
    d = torch.cat([x.flatten() for x in delta])
    lr = (-(d @ g) / (g @ g)).item()
    torch.testing.assert_close(d, -lr * g, rtol=1e-9, atol=1e-12)
    return lr


def test_halve_lr_scales_the_next_update_but_not_param_groups() -> None:
    model = _mlp(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(NoClip(), HalveLR(lr_factor=0.5))
    engine.attach([optimizer], model.named_parameters())
    with pytest.warns(RuntimeWarning):  # the diagnosis of the bad step
        (d0, g0), (d1, g1), (d2, g2), (d3, g3) = _sgd_deltas(engine, model, optimizer, {1}, 4)
    assert _applied_lr(d0, g0) == pytest.approx(0.1, rel=1e-9)  # before the bad step: the full LR
    assert all(g is None for g in g1) and all(torch.equal(d, torch.zeros_like(d)) for d in d1)  # skipped
    assert engine.lr_scales == [0.5]
    assert _applied_lr(d2, g2) == pytest.approx(0.05, rel=1e-9)  # after it: lr * 0.5 ...
    assert _applied_lr(d3, g3) == pytest.approx(0.05, rel=1e-9)  # ... and it stays (no recovery configured)
    assert optimizer.param_groups[0]["lr"] == 0.1  # ... while the group keeps the scheduler's value
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.1
    # detach() removes the hooks: the next update uses the full LR again.
    engine.detach()
    ((d4, g4),) = _sgd_deltas(ClipEngine(NoClip(), Skip()), model, optimizer, set(), 1)
    assert _applied_lr(d4, g4) == pytest.approx(0.1, rel=1e-9)


def test_halve_lr_recovers_after_healthy_steps() -> None:
    model = _mlp(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(NoClip(), HalveLR(lr_factor=0.5, lr_recovery_steps=2))
    engine.attach([optimizer], model.named_parameters())
    with pytest.warns(RuntimeWarning):
        steps = _sgd_deltas(engine, model, optimizer, {0}, 4)
    # Step 0 bad; steps 1 and 2 healthy at 0.05, after which the scale is back to 1.0 for step 3.
    assert [round(_applied_lr(d, g), 12) for d, g in steps[1:]] == [0.05, 0.05, 0.1]
    assert engine.lr_scales == [1.0]
    engine.detach()


def test_state_dict_round_trip_through_torch_save(tmp_path: Path) -> None:
    model = _mlp(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = ClipEngine(NormClip(max_norm=0.05), HalveLR(lr_factor=0.5))
    engine.attach([optimizer], model.named_parameters())
    with pytest.warns(RuntimeWarning):
        _sgd_deltas(engine, model, optimizer, {2}, 4)
    counters = engine.counters
    assert counters["skipped_steps"] == 1 and counters["clipped_steps"] == 3 and counters["steps"] == 4
    assert engine.lr_scales == [0.5]
    torch.save(engine.state_dict(), tmp_path / "engine.pt")
    engine.detach()

    resumed = ClipEngine(NormClip(max_norm=0.05), HalveLR(lr_factor=0.5))
    resumed.load_state_dict(torch.load(tmp_path / "engine.pt"))  # weights_only: plain numbers and dicts
    assert resumed.counters == counters
    assert resumed.lr_scales == engine.lr_scales == [0.5]
    # Attached to a fresh optimizer, the resumed engine keeps applying the halved LR ...
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed.attach([fresh], model.named_parameters())
    ((delta, grads),) = _sgd_deltas(resumed, model, fresh, set(), 1)
    assert _applied_lr(delta, grads) == pytest.approx(0.05, rel=1e-9)
    assert resumed.counters["steps"] == counters["steps"] + 1
    assert resumed.counters["skipped_steps"] == 1
    resumed.detach()
    # ... and a run resumed under a policy that does not scale the LR drops the scale instead.
    other = ClipEngine(NormClip(max_norm=0.05), Skip())
    other.load_state_dict(torch.load(tmp_path / "engine.pt"))
    assert other.lr_scales == [1.0] and other.counters == counters
