"""The planner's memory model against the measured peak of a real CPU training run."""

from __future__ import annotations

import pytest

from scripts.calibrate_planner import calibrate


@pytest.mark.slow
def test_predicted_peak_within_20_percent_of_measured():
    (row,) = calibrate(["small"])
    assert abs(row["static_error"]) < 0.2, row
    assert abs(row["peak_error"]) < 0.2, row
