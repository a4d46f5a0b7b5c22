"""Metrics: one JSONL line per step, steps after a resume point dropped, a plot drawn."""

import json

from trainers.tracking import LoggerConfig, MetricsTracker


def make(tmp_path, resume_step=None):
    return MetricsTracker(tmp_path, LoggerConfig(wandb_mode="disabled", console=False), {}, resume_step)


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    tracker = make(tmp_path)
    for step in range(5):
        tracker.log(step, {"reward/mean": step / 10, "eval/acc_greedy": 0.5})
    resumed = make(tmp_path, resume_step=2)
    assert [r["step"] for r in resumed.rows()] == [0, 1, 2]
    resumed.log(3, {"reward/mean": 0.9})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_fresh_run_starts_empty_and_draws_a_plot(tmp_path):
    make(tmp_path).log(0, {"x": 1})
    tracker = make(tmp_path, resume_step=None)
    assert tracker.rows() == []
    tracker.log(1, {"reward/mean": 0.2, "eval/acc_greedy": 0.3})
    assert tracker.draw_plot().stat().st_size > 1000


def test_console_line_is_one_readable_line():
    line = MetricsTracker.console_line(7, {"reward/mean": 0.5, "loss/clip_frac": 0.01, "time/step": 3.2})
    assert line == "step    7 | reward 0.5 | clip 0.01 | s 3.2"
