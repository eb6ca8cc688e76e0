"""Progress bars (one helper decides) and the summary block printed at the end of every run."""
from __future__ import annotations

import io
import sys

import pytest

from rftbench import progress
from rftbench.run import execute, run_folder


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_on_a_terminal_unless_switched_off(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file (a sweep worker): no bar
    items = [1, 2]
    assert progress.bar(items, "x") is items
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.bar(items, "x") is not items and list(progress.bar(items, "x")) == items
    monkeypatch.setenv(progress.ENV, "0")
    assert progress.bar(items, "x") is items
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv(progress.ENV, "1")  # asked for: bars even into a log
    assert progress.bar(items, "x") is not items


def test_slow_steps_show_a_bar_fast_ones_do_not(monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "DELAY_S", 0.05)
    import time

    for _ in progress.bar(range(4), "slow step"):
        time.sleep(0.25)
    assert "slow step" in err.getvalue()
    err.truncate(0)
    monkeypatch.setattr(progress, "DELAY_S", 5.0)
    list(progress.bar(range(3), "fast step"))
    assert "fast step" not in err.getvalue()


def test_every_run_ends_with_its_summary_block(make_cfg, capsys):
    cfg = make_cfg("method=ct", "seed=0")
    assert execute(cfg) == "done"
    out = capsys.readouterr().out
    folder = run_folder(cfg).path
    block = out[out.index(f"run {folder.name}:"):]
    for label in ("ID test acc", "OOD mean acc", "worst OOD acc", "corruption acc", "robust acc", "ECE",
                  "adapt time", "trainable params", "chosen", "run folder"):
        assert label in block, label
    assert "beta=" in block and str(folder) in block
    import pandas as pd

    m = pd.read_csv(folder / "metrics.csv")
    id_acc = m[(m["split"] == "test") & (m["metric"] == "acc") & (m["selection"] != "oracle")]["value"].iloc[0]
    assert f"{100 * id_acc:.1f}%" in block
