"""The LightningCLI examples: ``python examples/train.py fit --config examples/configs/X.yaml``.

Every run is a real subprocess started from its own temporary working directory (not the repo), so
the script must find its package and the configs must not depend on the cwd. The runs are started
together and awaited once per module: on a 2-core machine that halves the wall time.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"
CONFIGS = REPO / "examples" / "configs"
SCENARIOS = ("norm", "value", "nan_recovery", "monitor", "rollback")
# Past the injected NaN batches (30, 31, 60) of nan_recovery.yaml; the configs log every 5 steps.
STEPS = 70
TIMEOUT = 240


@dataclass
class Run:
    cwd: Path
    returncode: int
    stdout: str
    stderr: str


def _start(cwd: Path, config: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    cmd = [
        sys.executable,
        str(TRAIN),
        "fit",
        "--config",
        str(config),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]
    out, err = (cwd / "stdout.txt").open("w"), (cwd / "stderr.txt").open("w")
    return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err), cwd


def _wait(proc: subprocess.Popen, cwd: Path) -> Run:
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Run(cwd, proc.returncode, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text())


# Each bad config: (what to replace in norm.yaml, by what, texts stderr must contain).
BAD = {
    "unknown_mode": ("mode: norm ", "mode: clip ", ["trainer.callbacks", '"mode"', "clip"]),
    "negative_max_norm": ("max_norm: 1.0 ", "max_norm: -2.5 ", ["trainer.callbacks[0].init_args.max_norm", "-2.5"]),
    "max_norm_not_a_number": ("max_norm: 1.0 ", "max_norm: abc ", ["trainer.callbacks", '"max_norm"', "abc"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Start every scenario and every bad config at once; wait for all."""
    started = {}
    for name in SCENARIOS:
        cwd = tmp_path_factory.mktemp(name)
        started[name] = _start(cwd, CONFIGS / f"{name}.yaml", "--trainer.max_steps", str(STEPS))
    for name, (old, new, _) in BAD.items():
        cwd = tmp_path_factory.mktemp(name)
        text = (CONFIGS / "norm.yaml").read_text()
        assert old in text, f"norm.yaml no longer contains {old!r}: update the test"
        (cwd / "bad.yaml").write_text(text.replace(old, new, 1))
        started[name] = _start(cwd, cwd / "bad.yaml", "--trainer.max_steps", "5")
    try:
        yield {name: _wait(proc, cwd) for name, (proc, cwd) in started.items()}
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()


def _scalars(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's single TensorBoard run directory."""
    event_files = sorted(run.cwd.glob("lightning_logs/*/events.out.tfevents.*"))
    assert event_files, f"no event files under {run.cwd / 'lightning_logs'}"
    assert len({f.parent for f in event_files}) == 1
    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _values(series: dict[str, list[tuple[int, float]]], tag: str) -> list[float]:
    return [v for _, v in series[tag]]


@pytest.mark.parametrize("name", SCENARIOS)
def test_config_runs_from_another_cwd_and_logs_there(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    scalars = _scalars(run)
    for tag in (
        "grad_norm/total",
        "grad_norm/total_clipped",
        "grad_clip/steps",
        "grad_clip/nonfinite_steps",
        "grad_clip/skipped_steps",
        "grad_clip/lr_scale",
        "grad_norm_layer/hidden.0",
        "grad_norm_layer/head",
    ):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    # Logged on Lightning's logging steps (log_every_n_steps: 5 -> steps 4, 9, ...), where the
    # cumulative optimizer-step counter equals the step index + 1.
    steps = [s for s, _ in scalars["grad_norm/total"]]
    assert steps == list(range(4, STEPS, 5))
    assert scalars["grad_clip/steps"] == [(s, s + 1) for s in steps]
    # Training ended finite in every scenario.
    assert math.isfinite(_values(scalars, "train/loss")[-1])


def test_norm_config_caps_the_total_norm(runs: dict[str, Run]) -> None:
    s = _scalars(runs["norm"])
    assert set(_values(s, "grad_clip/max_norm")) == {1.0}
    before, after = _values(s, "grad_norm/total"), _values(s, "grad_norm/total_clipped")
    assert max(before) > 1.0, "the exploding model should need clipping"
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, 1.0), rel=1e-4)
    assert _values(s, "grad_clip/clipped_steps")[-1] > 0
    assert _values(s, "grad_clip/nonfinite_steps")[-1] == 0


def test_value_config_clamps_into_the_asymmetric_range(runs: dict[str, Run]) -> None:
    s = _scalars(runs["value"])
    assert "grad_clip/max_norm" not in s  # logged in norm mode only
    # LightningCLI saved the config it ran: the asymmetric bounds reached the callback.
    saved = next(runs["value"].cwd.glob("lightning_logs/*/config.yaml")).read_text()
    assert "min_value: -0.001" in saved and "max_value: 0.002" in saved
    # Every element in [-0.001, 0.002] bounds the L2 norm by 0.002 * sqrt(#weights) of DeepMLP's defaults.
    num_weights = (16 * 64 + 64) + 15 * (64 * 64 + 64) + (64 + 1)
    before, after = _values(s, "grad_norm/total"), _values(s, "grad_norm/total_clipped")
    assert max(after) <= 0.002 * math.sqrt(num_weights) * (1 + 1e-5)
    assert all(a <= b * (1 + 1e-6) for a, b in zip(after, before))
    assert any(a < b for a, b in zip(after, before))


def test_nan_recovery_config_skips_the_nan_batches_and_recovers(runs: dict[str, Run]) -> None:
    s = _scalars(runs["nan_recovery"])
    # Batches 30, 31 and 60 carry a NaN input: three bad steps, all skipped.
    nonfinite = dict(s["grad_clip/nonfinite_steps"])
    assert (nonfinite[29], nonfinite[34], nonfinite[59], nonfinite[64]) == (0, 2, 2, 3)
    assert dict(s["grad_clip/skipped_steps"]) == nonfinite
    # halve_lr: 1 -> 0.5 -> 0.25 at batches 30-31, one halving undone after 20 healthy steps (at 51),
    # 0.25 again after batch 60.
    lr = dict(s["grad_clip/lr_scale"])
    assert (lr[29], lr[34], lr[49], lr[54], lr[64]) == (1.0, 0.25, 0.25, 0.5, 0.25)
    # Skipped steps left the weights finite: every logged norm (none falls on a NaN batch) is finite.
    assert all(math.isfinite(v) for v in _values(s, "grad_norm/total"))
    assert "batch 30" in runs["nan_recovery"].stderr  # check_inputs names the dirty batch


def test_monitor_config_never_changes_a_gradient(runs: dict[str, Run]) -> None:
    s = _scalars(runs["monitor"])
    assert _values(s, "grad_norm/total") == _values(s, "grad_norm/total_clipped")
    assert "grad_clip/max_norm" not in s
    assert set(_values(s, "grad_clip/lr_scale")) == {1.0}
    assert _values(s, "grad_clip/nonfinite_steps")[-1] == 0


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_fails_naming_the_key(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    for text in BAD[name][2]:
        assert text in run.stderr, f"{text!r} not in stderr:\n{run.stderr[-3000:]}"
    assert not (run.cwd / "lightning_logs").exists(), "a bad config must fail before training starts"


USER_SCRIPT = """
from lightning_clip import GradientClippingCLI
from lightning_clip.app.models import DeepMLP, SyntheticRegressionData
GradientClippingCLI(DeepMLP, SyntheticRegressionData)
"""


@pytest.mark.parametrize(
    "init_args,key",
    [
        ("{max_norm: -1}", "max_norm"),
        ("{mode: value, min_value: 1.0, max_value: -1.0}", "min_value"),
        ("{mode: norm, clip_value: 0.5}", "clip_value"),
    ],
)
def test_users_own_cli_reports_a_bad_setting_in_one_line(tmp_path, init_args, key):
    # A user's LightningCLI script built on GradientClippingCLI, outside the repo: exit 2, one line, the key.
    (tmp_path / "train.py").write_text(USER_SCRIPT)
    (tmp_path / "c.yaml").write_text(
        "trainer:\n  max_steps: 1\n  callbacks:\n    - class_path: lightning_clip.GradientClipping\n"
        f"      init_args: {init_args}\n"
    )
    proc = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"trainer.callbacks[0].init_args.{key}" in errors[0]
    assert "Traceback" not in proc.stderr
