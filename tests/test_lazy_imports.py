"""``import lightning_clip`` loads neither jsonargparse nor a ``LightningCLI``: ``GradientClippingCLI`` is imported
on first use (a module ``__getattr__``), so a plain PyTorch loop or a Trainer script pays only for what it uses.

Each check runs in a fresh interpreter: this test process has long since imported both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = ("jsonargparse", "pytorch_lightning.cli", "lightning.pytorch.cli")


def _loaded_after(code: str) -> dict[str, bool]:
    """Which of ``CLI_MODULES`` a fresh interpreter has imported after running ``code`` (this checkout's package)."""
    script = (
        f"import json, sys; sys.path.insert(0, {str(REPO)!r})\n{code}\n"
        f"print(json.dumps({{m: m in sys.modules for m in {CLI_MODULES!r}}}))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pytorch_lightning_alone_does_not_load_jsonargparse() -> None:
    # The premise of the lazy import: were it false, the package could not avoid the cost either.
    assert _loaded_after("import pytorch_lightning") == dict.fromkeys(CLI_MODULES, False)


@pytest.mark.parametrize(
    "code",
    [
        "import lightning_clip",
        "from lightning_clip import ClipEngine",
        "from lightning_clip import GradientClipping, NonFiniteGradientError, StepLRScale, functional, rules, remedies",
        "from lightning_clip.engine import ClipEngine",
    ],
)
def test_package_import_loads_no_cli(code: str) -> None:
    assert _loaded_after(code) == dict.fromkeys(CLI_MODULES, False)


def test_gradient_clipping_cli_is_imported_on_first_use() -> None:
    loaded = _loaded_after(
        "import lightning_clip\n"
        "assert 'jsonargparse' not in sys.modules\n"
        "from lightning_clip import GradientClippingCLI\n"
        "from pytorch_lightning.cli import LightningCLI\n"
        "assert issubclass(GradientClippingCLI, LightningCLI)\n"
        "assert lightning_clip.GradientClippingCLI is GradientClippingCLI\n"
        "assert 'GradientClippingCLI' in lightning_clip.__all__"
    )
    assert loaded["jsonargparse"] and loaded["pytorch_lightning.cli"]
    # The lightning namespace's LightningCLI comes only with lightning_clip.lightning_pytorch.
    assert not loaded["lightning.pytorch.cli"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    import lightning_clip

    with pytest.raises(AttributeError, match="no attribute 'GradientClippingCLl'"):
        lightning_clip.GradientClippingCLl  # noqa: B018
    assert not hasattr(lightning_clip, "no_such_name")
