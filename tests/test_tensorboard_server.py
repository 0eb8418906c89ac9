"""A real ``tensorboard`` server, on 127.0.0.1 only, serves the norms an example run logged."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tb_server import free_port, get_json, tensorboard_exe

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def example_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 steps of the monitor example, logged every 5 steps, in a fresh working directory."""
    cwd = tmp_path_factory.mktemp("tb_example")
    cmd = [
        sys.executable,
        str(REPO / "examples" / "train.py"),
        "fit",
        "--config",
        str(REPO / "examples" / "configs" / "monitor.yaml"),
        "--trainer.max_steps",
        "10",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "lightning_logs"


def test_tensorboard_serves_the_gradient_norms(example_logs: Path, tmp_path: Path) -> None:
    exe = tensorboard_exe()
    if exe is None:
        pytest.skip("the tensorboard executable is not installed")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen(
        [exe, "--logdir", str(example_logs), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        tags: dict[str, Any] = {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        # The server starts, then loads the event files in the background: poll until the tag shows.
        while time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited:\n{(tmp_path / 'tensorboard.log').read_text()}"
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                tags = {}
            if any("grad_norm/total" in run_tags for run_tags in tags.values()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(
                f"no grad_norm/total after {STARTUP_TIMEOUT:.0f} s; tags: {tags}\n"
                f"{(tmp_path / 'tensorboard.log').read_text()}"
            )
        assert "version_0" in tags
        assert {"grad_norm/total", "grad_norm/total_clipped", "grad_clip/steps", "grad_norm_layer/head"} <= set(
            tags["version_0"]
        )
        # The series itself: logging steps 4 and 9 of the 10-step run, positive finite norms.
        query = urllib.parse.urlencode({"run": "version_0", "tag": "grad_norm/total"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [step for _, step, _ in points] == [4, 9]
        assert all(0 < value < float("inf") for _, _, value in points)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
