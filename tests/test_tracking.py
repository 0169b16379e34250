"""Progress off a terminal: `make pipeline > run.log` gets a few lines, not a bar redrawn per step."""

import io
import sys

from core import tracking


def test_progress_off_a_terminal_writes_few_whole_lines(monkeypatch):
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    bar = tracking.progress(range(500), desc="sft", total=500)
    for i in bar:
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")  # a postfix each step must not force a line each step
    bar.close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert 1 <= len(lines) <= 3, lines  # the start, the end (and at most one timed refresh in between)
    assert lines[-1].startswith("sft: 100%") and "500/500" in lines[-1]
