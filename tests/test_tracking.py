"""W&B tracking: offline by default, one W&B run per run, an off switch, never a failed run."""
from __future__ import annotations

import logging
import sys
import time

import pandas as pd
import pytest

from rftbench import tracking
from rftbench.results import RunFolder


def finished(tmp_path, run_id: str, acc: float) -> RunFolder:
    folder = RunFolder(tmp_path / "runs", "digits", "digits_resnet", "zeroshot", run_id)
    folder.path.mkdir(parents=True)
    folder.write_metrics([{"split": "test", "metric": "acc", "value": acc, "selection": "val"},
                          {"split": "ood/typed", "metric": "acc", "value": 0.25, "selection": "oracle"},
                          {"split": "-", "metric": "adapt_time_s", "value": 1.5, "selection": "val"}], seed=0)
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_each_run_is_its_own_offline_wandb_run(make_cfg, tmp_path, offline):
    import wandb

    cfg = make_cfg("method=zeroshot")
    dirs = []
    for run_id, acc in (("run0000000000000", 0.75), ("run1111111111111", 0.5)):
        folder = finished(tmp_path, run_id, acc)
        path = tracking.log_run(cfg, folder)
        assert wandb.run is None  # finished, so the next run is a new one
        assert path.parent == folder.path / "wandb" and path.name.startswith("offline-run-")
        texts = [t.encode() for t in (run_id, "test/acc", "ood/typed/acc/oracle", "adapt_time_s", "digits_resnet")]
        deadline = time.time() + 20  # the wandb service may still be writing the file
        while not all(t in (data := next(path.glob("run-*.wandb")).read_bytes()) for t in texts):
            assert time.time() < deadline, [t for t in texts if t not in data]
            time.sleep(0.1)
        dirs.append(path)
    assert dirs[0].name != dirs[1].name


def test_summary_keys_and_values():
    m = pd.DataFrame({"split": ["test", "-", "ood/c", "test"], "metric": ["acc", "n_train", "acc", "nll"],
                      "value": [0.5, 50, 0.25, float("nan")], "selection": ["val", "val", "oracle", "val"]})
    assert tracking.summary_of(m) == {"test/acc": 0.5, "n_train": 50.0, "ood/c/acc/oracle": 0.25}


def test_off_switch_and_disabled_mode_write_nothing(make_cfg, tmp_path, monkeypatch, offline):
    folder = finished(tmp_path, "r2", 0.5)
    assert tracking.log_run(make_cfg("tracking.enabled=false"), folder) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.log_run(make_cfg(), folder) is None
    assert not (folder.path / "wandb").exists()


def test_tracking_dir_and_mode_precedence(make_cfg, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    assert tracking.mode_of(make_cfg()) == "offline"
    assert tracking.mode_of(make_cfg("tracking.mode=online")) == "offline"  # no account: offline
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.mode_of(make_cfg("tracking.mode=offline")) == "disabled"  # the environment wins
    monkeypatch.delenv("WANDB_MODE")
    folder = finished(tmp_path, "r3", 0.5)
    path = tracking.log_run(make_cfg(f"tracking.dir={tmp_path / 'wb'}"), folder)
    assert path.parent == tmp_path / "wb" / "wandb" and not (folder.path / "wandb").exists()


def test_missing_wandb_warns_once_and_the_run_goes_on(make_cfg, tmp_path, monkeypatch, caplog, offline):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr(tracking, "_warned", set())
    folder = finished(tmp_path, "r4", 0.5)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        assert tracking.log_run(make_cfg(), folder) is None
        assert tracking.log_run(make_cfg(), folder) is None
    assert len([r for r in caplog.records if "tracking off" in r.message]) == 1
