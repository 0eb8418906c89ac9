"""The reporter unit: the typed logging part of the host read, and the engine's settings reaching it."""

from __future__ import annotations

import math

import pytest

from lightning_clip.engine import ClipEngine
from lightning_clip.health import VanishingMonitor
from lightning_clip.reporter import LoggedNames, LoggedValues


def test_logged_values_read_the_transfer_by_name_with_no_threshold_as_none_and_spike_tests_as_triples() -> None:
    values = {
        "spike": 1.0,
        "total": 3.0,
        "total_clipped": 1.0,
        "clipped": 1.0,
        "threshold": math.nan,
        "layer_norms": [2.0, 1.0],
        "spike_checks": [5.0, 4.0, 1.0, 0.5, 0.7, 0.0],
    }
    logged = LoggedValues.of(values, LoggedNames(["a", "b"], [], []))
    assert logged.threshold is None and logged.spike is True and logged.total == 3.0
    assert logged.norm_names == ["a", "b"] and logged.norms == [2.0, 1.0]
    assert logged.spike_checks == [(5.0, 4.0, 1.0), (0.5, 0.7, 0.0)]
    assert logged.health_ratios == [] and logged.update_ratios == []  # not in the transfer: none logged


def test_engine_settings_of_the_reporter_are_one_copy_set_by_configure() -> None:
    engine = ClipEngine(log_norms="total", update_ratio_every=2, name="x", vanishing=VanishingMonitor())
    reporter = engine.reporter
    assert (reporter.log_norms, reporter.update_ratio_every, reporter.name) == ("total", 2, "x")
    assert reporter.vanishing is engine.vanishing
    engine.configure(log_norms="layer", update_ratio_every=None)
    assert (engine.log_norms, reporter.log_norms, reporter.update_ratio_every) == ("layer", "layer", None)
    engine.spike_top_k = 5
    assert reporter.spike_top_k == 5
    with pytest.raises(ValueError, match="log_norms"):
        engine.configure(log_norms="layers")
    assert reporter.log_norms == "layer"
