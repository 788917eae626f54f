"""Progress output: a tqdm bar on a terminal, a few plain log lines in a log file."""

from __future__ import annotations

import logging

import pytest
from tqdm.auto import tqdm

from modeling_mae.text import counted, format_number
from modeling_mae.training import progress
from modeling_mae.training.progress import LogProgress, progress_bar


def test_log_progress_writes_a_line_per_interval_not_per_update(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.INFO, logger="modeling_mae.training.progress")
    bar = LogProgress(total=800, desc="pretraining", unit="step", interval=30.0)
    for step in range(800):  # 100 s in steps of 1/8 s
        now[0] += 0.125
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    bar.close()
    lines = [record.getMessage() for record in caplog.records if record.name == "modeling_mae.training.progress"]
    assert len(lines) == 4  # at 30, 60 and 90 s, and at the end
    assert lines[0] == "pretraining: 240/800 step (30%), 00:00:30 elapsed, loss=0.0042"
    assert lines[-1] == "pretraining: 800/800 step (100%), 00:01:40 elapsed, loss=0.0013"


def test_log_progress_of_an_unknown_total_counts_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modeling_mae.training.progress")
    bar = LogProgress(total=None, desc="streaming", initial=5, unit="step")
    bar.update(2)
    bar.close()
    assert caplog.records[-1].getMessage().startswith("streaming: 7 step, 00:00:0")


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_is_tqdm_on_a_terminal_and_log_lines_elsewhere(
    monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    monkeypatch.setattr(progress, "is_terminal", lambda: terminal)
    bar = progress_bar(10, "fine-tuning", unit="epoch")
    assert isinstance(bar, tqdm if terminal else LogProgress)
    bar.close()
    silent = progress_bar(10, "fine-tuning", enabled=False)  # every process but the main one
    assert isinstance(silent, tqdm) and silent.disable


def test_printed_counts_take_the_plural_only_when_not_one() -> None:
    assert [counted(n, "epoch") for n in (1, 2, 0, 1.0, 0.5)] == ["1 epoch", "2 epochs", "0 epochs", "1 epoch",
                                                                  "0.5 epochs"]
    assert counted(1, "batch", "batches") == "1 batch" and counted(3, "batch", "batches") == "3 batches"


def test_printed_losses_have_four_decimals() -> None:
    assert format_number(0.8371186554431915) == "0.8371" and format_number(12) == "12"
    assert format_number(None) == "None"  # no loss yet (a run of 0 steps)
