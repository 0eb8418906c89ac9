"""Issue 20: every option is declared once, by the unit that reads it (its ``options`` and ``__init__`` signature);
the callback derives its defaults, argument checks and live settings from there (lightning_clip/settings.py)."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from lightning_clip import GradientClipping
from lightning_clip.engine import ClipEngine
from lightning_clip.remedies import REMEDIES, Remedy, Skip
from lightning_clip.rules import RULES
from lightning_clip.validation import check_count

ROOT = Path(__file__).resolve().parents[1]
CALLBACK = inspect.signature(GradientClipping).parameters


def _default(unit: type, name: str) -> object:
    return inspect.signature(unit).parameters[name].default


@pytest.mark.parametrize("unit", list(REMEDIES.values()), ids=list(REMEDIES))
def test_every_remedy_option_has_the_callbacks_default_where_the_remedy_declares_it(unit):
    for option in unit.options:
        readers = [r for r in REMEDIES.values() if option in r.options]
        if len({repr(_default(r, option)) for r in readers}) > 1:  # the remedies disagree: the default policy's
            assert CALLBACK[option].default == _default(Skip, option), option
        else:
            assert CALLBACK[option].default == _default(unit, option), option


@pytest.mark.parametrize("unit", list(RULES.values()), ids=list(RULES))
def test_every_rule_option_has_the_callbacks_default_where_the_rule_declares_it(unit):
    for option in unit.options:
        assert CALLBACK[option].default == _default(unit, option), option


def test_the_engines_own_settings_have_the_callbacks_defaults():
    for setting in list(inspect.signature(ClipEngine.configure).parameters)[1:]:
        assert CALLBACK[setting].default == _default(ClipEngine, setting), setting


class _Window(Remedy):
    """A toy remedy with an option no GradientClipping argument names."""

    policy: ClassVar[str] = "window"
    options: ClassVar[tuple[str, ...]] = ("max_consecutive_nonfinite", "window")
    skips_steps: ClassVar[bool] = True

    def __init__(self, max_consecutive_nonfinite: int | None = 10, window: int = 3) -> None:
        check_count("window", window, allow_none=False)
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.window = window


@pytest.fixture
def window_remedy(monkeypatch):
    monkeypatch.setitem(REMEDIES, "window", _Window)


def test_a_new_remedy_option_is_a_live_setting_with_no_callback_edit(window_remedy):
    clip = GradientClipping(nan_policy="window")
    assert clip.window == 3 and clip.engine.remedy.window == 3  # the remedy's signature default
    clip.window = np.int64(5)
    assert clip.engine.remedy.window == 5 and clip.window == 5 and type(clip.window) is int
    with pytest.raises(ValueError, match="`window` must be a positive integer, got 0"):
        clip.window = 0
    assert clip.engine.remedy.window == 5  # a refused value changes nothing


def test_a_new_remedy_option_is_refused_under_a_policy_that_does_not_read_it(window_remedy):
    clip = GradientClipping(nan_policy="skip")
    assert clip.window == 3
    with pytest.raises(ValueError, match=r"`window` does not apply to nan_policy='skip' \(it reads max_consec"):
        clip.window = 5


def test_an_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_setting'"):
        _ = GradientClipping().no_such_setting


def test_the_callback_pickles_with_its_live_settings():
    clip = GradientClipping(mode="value", clip_value=0.5, nan_policy="halve_lr")
    clip.lr_factor = 0.25
    copy = pickle.loads(pickle.dumps(clip))
    assert (copy.lr_factor, copy.min_value, copy.max_value) == (0.25, -0.5, 0.5)
    copy.clip_value = 0.2
    assert copy.engine.rule.max_value == 0.2 and clip.engine.rule.max_value == 0.5


def test_callback_py_stays_lightning_wiring_of_at_most_200_code_lines():
    tool = [sys.executable, str(ROOT / "tools/function_lengths.py"), str(ROOT / "lightning_clip/callback.py")]
    done = subprocess.run([*tool, "--max-module", "200"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
