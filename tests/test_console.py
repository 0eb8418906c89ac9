"""The ``lightning-clip`` console command (``demo`` and ``report``), run as real subprocesses.

The report's numbers are checked against values computed here straight from the event files, with
TensorBoard's raw event reader and numpy -- not with the code under test.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

DEMO_STEPS = 60  # the plain run goes NaN after ~35 steps
DEMO_RUNS = ("plain", "clipped", "sigmoid_plain", "sigmoid_residual")  # log sub-directories, exploding then vanishing
TIMEOUT = 240


def _command() -> list[str]:
    """The installed console script next to this interpreter, else the same entry point via -c."""
    script = Path(sys.executable).parent / "lightning-clip"
    if script.is_file():
        return [str(script)]
    found = shutil.which("lightning-clip")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from lightning_clip.app.cli import main; sys.exit(main())"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _run(args: Sequence[str], cwd: Path) -> Result:
    proc = subprocess.run([*_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _run_all(jobs: dict[str, tuple[Sequence[str], Path]]) -> dict[str, Result]:
    """Run several commands at once (the machine has 2 cores; each mostly waits on imports)."""
    procs = {
        name: subprocess.Popen([*_command(), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, cwd) in jobs.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            results[name] = Result(proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``run_dir``'s event files, by tag, read with TensorBoard's raw event loader."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                # Data-compat may hand scalars back as 0-dim tensors rather than simple_value.
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.tensor.float_val:
                    number = value.tensor.float_val[0]
                elif value.tensor.double_val:
                    number = value.tensor.double_val[0]
                else:
                    continue
                series.setdefault(value.tag, []).append((event.step, float(number)))
    return series


# ------------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One short demo run (both scenarios) with the default --logdir, in a fresh working directory."""
    cwd = tmp_path_factory.mktemp("demo")
    return cwd, _run(["demo", "--steps", str(DEMO_STEPS)], cwd)


def _row(stdout: str, label: str) -> list[str]:
    """The two value cells (plain, clipped) of the demo table row ``label``."""
    for line in stdout.splitlines():
        if line.startswith(label):
            cells = re.split(r"\s{2,}", line.strip())
            assert len(cells) == 3, line
            return cells[1:]
    raise AssertionError(f"row {label!r} not in the demo output:\n{stdout}")


def test_demo_prints_the_comparison_table(demo: tuple[Path, Result]) -> None:
    _, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    assert re.split(r"\s{2,}", lines[rule - 1].strip()) == ["plain Lightning", "GradientClipping"]
    plain_loss, clipped_loss = _row(result.stdout, "final train loss")
    assert plain_loss in ("nan", "inf")
    assert math.isfinite(float(clipped_loss)) and float(clipped_loss) < 1.0
    plain_bad, clipped_bad = _row(result.stdout, "NaN/Inf steps")
    assert re.fullmatch(rf"\d+ / {DEMO_STEPS}", plain_bad) and int(plain_bad.split()[0]) > 0
    assert clipped_bad == f"0 / {DEMO_STEPS}"
    plain_clip, clipped_clip = _row(result.stdout, "clipped fraction")
    assert plain_clip == "0.0%" and float(clipped_clip.rstrip("%")) > 0
    assert _row(result.stdout, "final LR scale") == ["1", "1"]
    assert "tensorboard --logdir lightning_logs" in result.stdout


def test_demo_writes_tensorboard_logs_that_show_the_divergence(demo: tuple[Path, Result]) -> None:
    cwd, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    plain = _read_scalars(cwd / "lightning_logs" / "demo" / "version_0" / "plain")
    clipped = _read_scalars(cwd / "lightning_logs" / "demo" / "version_0" / "clipped")
    # Logged every step, as the table says.
    assert [s for s, _ in plain["grad_norm/total"]] == list(range(DEMO_STEPS))
    # Without clipping the norm explodes and then turns NaN/Inf; with clipping it stays finite and capped.
    plain_norms = [v for _, v in plain["grad_norm/total"]]
    assert not all(math.isfinite(v) for v in plain_norms)
    assert max(v for v in plain_norms if math.isfinite(v)) > 1e6
    assert all(math.isfinite(v) for _, v in clipped["grad_norm/total"])
    assert max(v for _, v in clipped["grad_norm/total_clipped"]) <= 1.0 + 1e-4
    assert {v for _, v in clipped["grad_clip/max_norm"]} == {1.0}
    assert "grad_clip/max_norm" not in plain  # the monitor run does not clip
    # The first NaN/Inf step in the table is the first non-finite norm in the log.
    first_bad = next(s for s, v in plain["grad_norm/total"] if not math.isfinite(v))
    assert _row(result.stdout, "first non-finite step") == [str(first_bad), "-"]


# ------------------------------------------------------------------------------- demo: vanishing scenario
VANISHING_HEADER = ["plain deep sigmoid", "residual + LayerNorm"]


def _table(stdout: str, header: list[str]) -> dict[str, list[str]]:
    """The value cells of each row of the demo table whose header row is ``header``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.split(r"\s{2,}", line.strip()) == header)
    assert set(lines[start + 1].replace(" ", "")) == {"-"}, lines[start + 1]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == 3, line
        rows[cells[0]] = cells[1:]
    return rows


def test_demo_tells_the_vanishing_story_after_the_exploding_one(demo: tuple[Path, Result]) -> None:
    _, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.index("Exploding-gradient demo") < out.index("Vanishing-gradient demo")
    assert "[3/4] plain deep sigmoid" in out and "[4/4] residual + LayerNorm" in out
    rows = _table(out, VANISHING_HEADER)
    # The plain net: the callback warned within the first logging steps and named its first layers.
    plain_warnings, residual_warnings = rows["vanishing-layer warnings"]
    found = re.fullmatch(r"([1-3]) \(first at step (\d+)\)", plain_warnings)
    assert found and int(found.group(2)) < 10, plain_warnings
    assert residual_warnings == "0"
    plain_named, residual_named = rows["layers named vanishing"]
    named = re.fullmatch(r"(\d+) of 21: hidden\.0, hidden\.1, hidden\.2, \.\.\.", plain_named)
    assert named and int(named.group(1)) >= 5, plain_named
    assert residual_named == "none"
    plain_ratio, residual_ratio = rows["||grad W|| / ||W||, hidden.0 (first)"]
    assert float(plain_ratio) < 1e-12 and float(residual_ratio) > 1e-3
    # Its loss stays at the targets' variance (1: it predicts their mean); the residual net trains.
    plain_val, residual_val = (float(v) for v in rows["final val MSE (torchmetrics)"])
    assert plain_val > 0.8 and residual_val < 0.5 * plain_val
    assert "With residual connections and LayerNorm the same depth got no warning" in out
    # The warning's first line is shown once, its layer list cut short; the remedies once; nothing on stderr.
    assert out.count('"Vanishing gradients at global step') == 1
    assert "shallowest first: hidden.0 (" in out and "more). These layers barely learn" in out
    assert out.count("residual connections around deep blocks") == 1 and "What to try" not in out
    assert "Vanishing gradients" not in result.stderr and "Traceback" not in result.stderr
    # The exploding table has the same row: the clipped run is never flagged.
    assert _row(out, "vanishing-layer warnings")[1] == "0"
    assert "lightning_logs/demo/version_0: plain, clipped, sigmoid_plain, sigmoid_residual" in out


def test_demo_logs_the_vanishing_layers_for_the_report(demo: tuple[Path, Result]) -> None:
    cwd, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    root = cwd / "lightning_logs" / "demo" / "version_0"
    plain, residual = _read_scalars(root / "sigmoid_plain"), _read_scalars(root / "sigmoid_residual")
    assert [s for s, _ in plain["grad_norm/total"]] == list(range(DEMO_STEPS))
    flagged = [v for _, v in plain["grad_health/vanishing_layers"]]
    assert flagged[:2] == [0, 0] and min(flagged[2:]) >= 5  # patience 3, then from the third logging step on
    assert all(v < 1e-12 for _, v in plain["grad_health/grad_ratio/hidden.0"])
    assert {v for _, v in residual["grad_health/vanishing_layers"]} == {0}
    assert min(v for _, v in residual["grad_health/grad_ratio/hidden.0"]) > 1e-3
    named = int(_table(result.stdout, VANISHING_HEADER)["layers named vanishing"][0].split()[0])
    assert named >= max(flagged)  # every layer flagged in the logs was named in a warning


def test_demo_runs_one_scenario_when_asked(tmp_path: Path) -> None:
    result = _run(["demo", "--scenario", "vanishing", "--steps", "4", "--logdir", "logs"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exploding-gradient demo" not in result.stdout
    assert "[1/2] plain deep sigmoid" in result.stdout and "[2/2] residual + LayerNorm" in result.stdout
    assert "shallowest first: hidden.0 (" in result.stdout  # step 2 is the third logging step
    assert sorted(p.name for p in (tmp_path / "logs" / "demo" / "version_0").iterdir()) == [
        "sigmoid_plain",
        "sigmoid_residual",
    ]
    assert re.search(r"Wall time: \d+\.\d s for 2 runs\.", result.stdout)


# ------------------------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def report(demo: tuple[Path, Result]) -> tuple[Path, Result]:
    cwd, _ = demo
    return cwd, _run(["report", "lightning_logs", "--plot", "plots/norms.png"], cwd)


def _report_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = stdout.splitlines()
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


def test_report_numbers_match_the_event_files(report: tuple[Path, Result]) -> None:
    cwd, result = report
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _report_rows(result.stdout)
    assert set(rows) == {f"demo/version_0/{run}" for run in DEMO_RUNS}
    for name, row in rows.items():
        scalars = _read_scalars(cwd / "lightning_logs" / name)
        norms = np.array([v for _, v in scalars["grad_norm/total"]])
        finite = norms[np.isfinite(norms)]
        expected = {"median": np.median(finite), "p99": np.percentile(finite, 99), "max": finite.max()}
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(value, rel=1e-3), (name, column)
        last = {tag: series[-1][1] for tag, series in scalars.items()}
        assert int(row["steps"]) == last["grad_clip/steps"] == DEMO_STEPS
        assert int(row["logged"]) == len(norms)
        assert int(row["non-finite"]) == last["grad_clip/nonfinite_steps"]
        assert int(row["skipped"]) == last["grad_clip/skipped_steps"]
        assert float(row["LR scale"]) == last["grad_clip/lr_scale"]
        if "grad_clip/clipped_steps" in scalars:
            fraction = last["grad_clip/clipped_steps"] / last["grad_clip/steps"]
            assert row["clipped"] == f"{100 * fraction:.1f}%"
    assert int(rows["demo/version_0/plain"]["non-finite"]) > 0
    assert rows["demo/version_0/clipped"]["non-finite"] == "0"


def test_report_plot_is_a_png(report: tuple[Path, Result]) -> None:
    cwd, result = report
    assert result.returncode == 0, result.stderr[-3000:]
    png = cwd / "plots" / "norms.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width >= 400 and height >= 300
    assert str(Path("plots") / "norms.png") in result.stdout


def _write_events_without_grad_norms(run_dir: Path) -> None:
    """A real event file holding only a `loss` scalar (a run without GradientClipping)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(run_dir))
    for step in range(3):
        value = summary_pb2.Summary.Value(tag="loss", simple_value=1.0 / (step + 1))
        writer.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary_pb2.Summary(value=[value])))
    writer.close()


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Result]]:
    """report on a missing dir, an empty dir, and logs with no gradient norms; plus --help. At once."""
    root = tmp_path_factory.mktemp("report_errors")
    missing, empty, no_norms = root / "does_not_exist", root / "empty", root / "no_norms"
    empty.mkdir()
    (no_norms / "version_0").mkdir(parents=True)
    _write_events_without_grad_norms(no_norms / "version_0")
    paths = {"missing": missing, "empty": empty, "no_norms": no_norms}
    jobs = {name: (["report", str(path)], root) for name, path in paths.items()}
    jobs["help"] = (["--help"], root)
    results = _run_all(jobs)
    return {name: (paths.get(name, root), result) for name, result in results.items()}


@pytest.mark.parametrize("case", ["missing", "empty", "no_norms"])
def test_report_without_data_fails_with_one_line_naming_the_path(
    failures: dict[str, tuple[Path, Result]], case: str
) -> None:
    path, result = failures[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert result.stdout == ""


def test_help_lists_the_commands(failures: dict[str, tuple[Path, Result]]) -> None:
    _, result = failures["help"]
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "report" in result.stdout
    assert result.stdout.startswith("usage: lightning-clip")
