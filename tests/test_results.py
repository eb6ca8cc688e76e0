"""Run folders and atomic writes."""
from __future__ import annotations

import os

import pytest

from rftbench.results import COLUMNS, RunFolder, load_metrics
from rftbench.run import run_id_of
from rftbench.utils import atomic_path, write_text_atomic


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_run_folder_lifecycle(tmp_path):
    f = RunFolder(tmp_path, "digits", "b/x", "ft", run_id_of({"x": 1}))
    assert f.status == "pending"
    f.start()
    assert f.status == "running" and not f.done  # this process holds the lock
    f.fail(ValueError("boom"))
    assert f.status == "failed" and "ValueError: boom" in (f.path / "error.txt").read_text()
    f.start()  # a retry clears the old error
    f.write_text("config.yaml", "x: 1\n")
    df = f.write_metrics([{"split": "test", "metric": "acc", "value": 0.5}], seed=3)
    assert list(df.columns) == COLUMNS and df.loc[0, "backbone"] == "b/x"
    assert load_metrics(tmp_path).empty  # not done -> not counted
    f.finish()
    assert f.status == "done"
    m = load_metrics(tmp_path)
    assert len(m) == 1 and m.loc[0, "seed"] == 3
