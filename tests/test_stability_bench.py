"""Smoke test of ``benchmarks/stability.py``: a tiny sweep through its CLI, and the fairness it relies on.

Tiny settings (20 steps, 2 learning rates, 1 seed, 3 configurations) keep it to a few seconds; the
documented table comes from the full default run (docs/stability.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "stability.py"
LOW, HIGH = 0.01, 1.0
STEPS = 20


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("stability_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def cli_run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("stability")
    argv = [
        "--steps",
        str(STEPS),
        "--lrs",
        str(LOW),
        str(HIGH),
        "--seeds",
        "0",
        "--configs",
        "plain",
        "norm",
        "zclip",  # the lightning.pytorch path
        "--json",
        str(out / "stability.json"),
        "--plot",
        str(out / "stability.png"),
    ]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert bench.main(argv) == 0
    return buffer.getvalue(), json.loads((out / "stability.json").read_text()), out


def test_cli_prints_progress_table_and_writes_json_and_plot(cli_run: tuple[str, dict, Path]) -> None:
    stdout, result, out = cli_run
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and all(" s elapsed" in line for line in progress)
    assert "configuration" in stdout and "stable" in stdout and f"lr={HIGH:g}" in stdout
    assert [c["key"] for c in result["configs"]] == ["plain", "norm", "zclip"]
    assert result["steps"] == STEPS and result["lrs"] == [LOW, HIGH] and result["seeds"] == [0]
    assert 0 < result["stable_threshold"] < 1
    assert len(result["runs"]) == 6
    for run in result["runs"]:
        assert {"config", "lr", "seed", "val_mse", "final_train_loss", "stable", "seconds"} <= run.keys()
    for config in result["configs"]:
        assert config["runs"] == 2 and 0 <= config["stable"] <= 2
        assert set(config["median_val_mse"]) == {f"{LOW:g}", f"{HIGH:g}"}
    png = (out / "stability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plain_training_blows_up_at_the_high_lr_and_clipping_holds(cli_run: tuple[str, dict, Path]) -> None:
    _, result, _ = cli_run
    runs = {(r["config"], r["lr"]): r for r in result["runs"]}
    for key in ("plain", "norm", "zclip"):  # the low LR trains everywhere: finite and below the untrained MSE
        assert runs[key, LOW]["val_mse"] is not None and runs[key, LOW]["val_mse"] < 1.5
    plain, norm = runs["plain", HIGH], runs["norm", HIGH]
    assert norm["val_mse"] is not None  # a clipped step is bounded: no NaN in 20 steps
    assert plain["val_mse"] is None or plain["val_mse"] > 10 * norm["val_mse"]
    if plain["val_mse"] is None:  # diverged: stopped at the step its weights went NaN/Inf
        assert plain["stopped_at"] is not None and plain["stopped_at"] < STEPS
    # The table says so too.
    table = {c["key"]: c["median_val_mse"] for c in result["configs"]}
    assert table["norm"][f"{HIGH:g}"] is not None


def test_both_namespaces_train_the_same_model_identically(bench: ModuleType) -> None:
    """The ZClip row runs on lightning.pytorch: the same config there must give the same numbers."""
    plain = next(c for c in bench.CONFIGS if c.key == "plain")
    other = dataclasses.replace(plain, namespace="lightning.pytorch")
    with bench.quiet_lightning():
        a = bench.train_once(plain, 0.05, 0, 10)
        b = bench.train_once(other, 0.05, 0, 10)
    assert a.steps == b.steps == 10
    assert math.isfinite(a.val_mse) and a.val_mse == b.val_mse
    assert a.final_train_loss == b.final_train_loss
