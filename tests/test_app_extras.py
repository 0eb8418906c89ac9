"""The app stands apart (issue 20, item 7): matplotlib and jsonargparse are an extra (``lightning-clip[report]``).

Without them the library, the demo and the report's table work; ``report --plot`` and ``GradientClippingCLI`` say
in one line what to install. Absence is simulated in a fresh interpreter (the module blocked in ``sys.modules``, its
distribution hidden from ``importlib.metadata``, as torchmetrics asks it), not by uninstalling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _without(package: str, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which ``package`` is not installed (simulated)."""
    prelude = (
        "import sys, importlib.metadata as md\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "_version = md.version\n"
        f"def version(name):\n"
        f"    if name.lower() == {package!r}: raise md.PackageNotFoundError(name)\n"
        "    return _version(name)\n"
        "md.version = version\n"
        f"sys.modules[{package!r}] = None\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run's event files with the total norm, as GradientClipping logs it."""
    from torch.utils.tensorboard import SummaryWriter

    root = tmp_path_factory.mktemp("logs")
    writer = SummaryWriter(str(root / "run"))
    for step, value in enumerate((1.0, 2.0, 3.0)):
        writer.add_scalar("grad_norm/total", value, step)
        writer.add_scalar("grad_clip/steps", step + 1, step)
    writer.close()
    return root


def test_without_matplotlib_the_report_prints_its_table(logdir: Path) -> None:
    code = (
        "import lightning_clip, lightning_clip.app.report\n"
        "from lightning_clip.app.cli import main\n"
        f"code = main(['report', {str(logdir)!r}])\n"
        "assert [m for m in sys.modules if m.startswith('matplotlib.')] == []\n"
        "sys.exit(code)"
    )
    proc = _without("matplotlib", code, logdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median" in proc.stdout and "run" in proc.stdout.splitlines()[2]


def test_without_matplotlib_report_plot_fails_in_one_line_naming_the_extra(logdir: Path) -> None:
    code = f"from lightning_clip.app.cli import main\nsys.exit(main(['report', {str(logdir)!r}, '--plot', 'p.png']))"
    proc = _without("matplotlib", code, logdir)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lightning-clip report: error: plots need matplotlib")
    assert "pip install 'lightning-clip[report]'" in proc.stderr
    assert not (logdir / "p.png").exists()


def test_without_jsonargparse_the_library_imports_and_the_cli_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import lightning_clip\n"
        "from lightning_clip import GradientClipping, ClipEngine\n"
        "GradientClipping(mode='norm', max_norm=1.0)\n"
        "try:\n"
        "    lightning_clip.GradientClippingCLI\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    sys.exit('no ImportError')\n"
    )
    proc = _without("jsonargparse", code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GradientClippingCLI needs jsonargparse, as LightningCLI does" in proc.stdout
    assert "pip install 'lightning-clip[cli]'" in proc.stdout
