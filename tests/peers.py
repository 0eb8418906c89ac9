"""The published implementations our adaptive rules are measured against, loaded for tests only.

Each loader returns the peer or calls ``pytest.skip`` when it is not installed, so the suite stays green
without them. CI installs them with::

    python -m pip install zclip==1.0.0 autoclip==0.2.1
    python -m pip install --no-deps timm     # its dependencies would pull a CUDA torch and torchvision

timm is loaded from the file ``timm/utils/agc.py`` alone: importing the ``timm`` package needs torchvision.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def timm_agc() -> ModuleType:
    """timm's ``utils/agc.py`` (``adaptive_clip_grad``, ``unitwise_norm``), without importing ``timm``."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
    file_spec = importlib.util.spec_from_file_location("_timm_utils_agc", path)
    if file_spec is None or file_spec.loader is None:
        pytest.skip(f"timm is installed but has no {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def zclip_class() -> Any:
    """``zclip.ZClip`` (the ``zclip`` package, 1.0.0)."""
    return pytest.importorskip("zclip", reason="zclip is not installed (pip install zclip)").ZClip


def autoclip_quantile_clip() -> Any:
    """``autoclip.torch.QuantileClip`` (the ``autoclip`` package)."""
    return pytest.importorskip("autoclip.torch", reason="autoclip is not installed (pip install autoclip)").QuantileClip
