"""Progress lines where stderr is not a terminal (common/runtime.py): when they appear, what they say."""
from __future__ import annotations

import io
import logging

import pytest

from common.runtime import IntervalLine, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_speed_loss_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="kd")
    clock = _Clock()
    line = IntervalLine("teacher epoch 3/50", 400, 60.0, stream=io.StringIO(), clock=clock)
    written = []
    for step in range(1, 401):
        clock.now += 1.0  # a step a second: 64 images of 64 per batch
        written.append(line.step(step, 64 * step, lambda: 1.23456))
    shown = [w for w in written if w is not None]
    assert len(shown) == 6  # at 60, 120, ..., 360 s
    assert shown[0] == "teacher epoch 3/50: batch 60/400, 64 img/s, loss 1.2346, ETA 5m40s"
    assert [r.getMessage() for r in caplog.records] == shown


@pytest.mark.parametrize(("stream", "enabled", "interval"), [(_Terminal(), True, 1.0), (io.StringIO(), False, 1.0), (io.StringIO(), True, 0.0)])
def test_no_line_on_a_terminal_with_progress_off_or_interval_zero(stream, enabled, interval):
    """A terminal has the bar; lines are off on torchrun's other ranks and with log_interval_s=0."""
    clock = _Clock()
    line = IntervalLine("x", 10, interval, enabled, stream=stream, clock=clock)
    clock.now += 1000
    assert line.step(5, 5) is None


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (0, 42.4, 312, 3720, 90000)] == ["0s", "42s", "5m12s", "1h02m", "25h00m"]


def test_a_loop_without_a_known_total_gives_the_time_so_far(caplog):
    """Stage 1's S/I/E/Q passes are planned inside the stream: no total, so no ETA."""
    clock = _Clock()
    line = IntervalLine("profile S/I/E/Q", 0, 60.0, unit="img", what="images forwarded", stream=io.StringIO(), clock=clock)
    clock.now += 90
    assert line.step(4500, 4500) == "profile S/I/E/Q: images forwarded 4500, 50 img/s, 1m30s so far"
