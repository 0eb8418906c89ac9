"""Helpers for the tests that start a real TensorBoard server (on 127.0.0.1 only)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any


def tensorboard_exe() -> str | None:
    """The venv's ``tensorboard`` script, else one on PATH; None if there is none."""
    script = Path(sys.executable).parent / "tensorboard"
    return str(script) if script.is_file() else shutil.which("tensorboard")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)
