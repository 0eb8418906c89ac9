"""Smoke test of ``benchmarks/stability.py``: tiny sweeps through its CLI, and the fairness it relies on.

Tiny settings (20 steps, 1-2 learning rates, 1 seed, 2-3 configurations, for the MLP and the RNN) keep it to a few
seconds; the documented tables come from the full default runs (docs/stability.md).
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
        assert {"config", "lr", "seed", "score", "final_train_loss", "stable", "seconds", "raised_at"} <= run.keys()
    for config in result["configs"]:
        assert config["runs"] == 2 and 0 <= config["stable"] <= 2
        assert set(config["median_score"]) == {f"{LOW:g}", f"{HIGH:g}"}
    assert result["model"] == "mlp" and result["score"] == "val MSE"
    png = (out / "stability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plain_training_blows_up_at_the_high_lr_and_clipping_holds(cli_run: tuple[str, dict, Path]) -> None:
    _, result, _ = cli_run
    runs = {(r["config"], r["lr"]): r for r in result["runs"]}
    for key in ("plain", "norm", "zclip"):  # the low LR trains everywhere: finite and below the untrained MSE
        assert runs[key, LOW]["score"] is not None and runs[key, LOW]["score"] < 1.5
    plain, norm = runs["plain", HIGH], runs["norm", HIGH]
    assert norm["score"] is not None  # a clipped step is bounded: no NaN in 20 steps
    assert plain["score"] is None or plain["score"] > 10 * norm["score"]
    if plain["score"] is None:  # diverged: stopped at the step its weights went NaN/Inf
        assert plain["stopped_at"] is not None and plain["stopped_at"] < STEPS
    # The table says so too.
    table = {c["key"]: c["median_score"] for c in result["configs"]}
    assert table["norm"][f"{HIGH:g}"] is not None


def test_both_namespaces_train_the_same_model_identically(bench: ModuleType) -> None:
    """The ZClip row runs on lightning.pytorch: the same config there must give the same numbers."""
    plain = next(c for c in bench.CONFIGS if c.key == "plain")
    other = dataclasses.replace(plain, namespace="lightning.pytorch")
    with bench.quiet_lightning():
        a = bench.train_once(plain, 0.05, 0, 10)
        b = bench.train_once(other, 0.05, 0, 10)
    assert a.steps == b.steps == 10
    assert math.isfinite(a.score) and a.score == b.score
    assert a.final_train_loss == b.final_train_loss


@pytest.fixture(scope="module")
def rnn_run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("stability_rnn")
    argv = ["--model", "rnn", "--steps", str(STEPS), "--lrs", "10", "--seeds", "0"]
    argv += ["--configs", "plain", "rollback_noclip", "--json", str(out / "rnn.json"), "--plot", str(out / "rnn.png")]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert bench.main(argv) == 0
    return buffer.getvalue(), json.loads((out / "rnn.json").read_text()), out


def test_rnn_model_sweep_reports_a_cross_entropy_or_a_flagged_divergence(rnn_run: tuple[str, dict, Path]) -> None:
    stdout, result, out = rnn_run
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and all("val CE" in line or "diverged" in line or "stopped" in line for line in progress)
    assert "trains" in stdout and "Remedies" in stdout and "ms/step" in stdout
    assert result["model"] == "rnn" and result["score"] == "val CE" and result["steps"] == STEPS
    assert result["lrs"] == [10] and result["seeds"] == [0] and result["stable_threshold"] == 3.0
    ref = result["text_entropies"]
    assert (
        ref["entropy_rate"] < ref["one_token_context"] < ref["unigram"] <= ref["uniform"] == pytest.approx(math.log(32))
    )
    assert [c["key"] for c in result["configs"]] == ["plain", "rollback_noclip"]
    runs = {r["config"]: r for r in result["runs"]}
    assert set(runs) == {"plain", "rollback_noclip"}
    for run in runs.values():
        finite = run["score"] is not None and math.isfinite(run["score"])
        flagged = run["stopped_at"] is not None or run["raised_at"] is not None
        assert finite != flagged  # a score, or the reason there is none
        assert run["steps"] <= STEPS and run["seconds"] > 0
        assert len(run["loss_curve"]) == math.ceil(run["steps"] / 10)  # steps 0, 10, ...
    assert runs["plain"]["rollbacks"] is None and runs["rollback_noclip"]["rollbacks"] >= 0
    assert (out / "rnn.png").read_bytes().startswith(b"\x89PNG")


def test_from_json_reprints_the_rnn_tables(bench: ModuleType, rnn_run: tuple[str, dict, Path]) -> None:
    stdout, _, out = rnn_run
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert bench.main(["--from-json", str(out / "rnn.json")]) == 0
    printed = stdout[stdout.index("\nconfiguration ") : stdout.index("\nTotal:")].strip().splitlines()
    reprinted = buffer.getvalue().splitlines()
    assert reprinted[0] == printed[0] and len(printed) > 10
    for line in printed:
        if not line.startswith("Cost:"):  # the thread count is today's, not the file's
            assert line in reprinted


def test_a_run_the_library_stops_is_recorded_not_raised(bench: ModuleType) -> None:
    """NonFiniteGradientError (max_consecutive_nonfinite bad steps in a row) ends the run as 'stopped'."""
    from lightning_clip import GradientClipping

    stop = bench.Config(
        "stop", "stop", "pytorch_lightning", lambda: [GradientClipping(mode="none", max_consecutive_nonfinite=2)], ""
    )
    with bench.quiet_lightning():
        run = bench.train_once(stop, 2.0, 0, 40)
    assert run.raised_at is not None and run.raised_at < 40 and run.diverged
