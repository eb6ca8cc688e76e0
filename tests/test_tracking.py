"""W&B tracking: offline by default, one W&B run per run, an off switch, never a failed run."""
from __future__ import annotations

import logging
import struct
import sys
import time
from pathlib import Path

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
        # one folder per sweep (here no Hydra sweep: "single"), not one per run folder
        assert path.parent == tmp_path / "runs" / ".wandb" / "single" / "wandb" and path.name.startswith("offline-run-")
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
    assert path.parent == tmp_path / "wb" / "single" / "wandb" and not (folder.path / "wandb").exists()


def test_missing_wandb_warns_once_and_the_run_goes_on(make_cfg, tmp_path, monkeypatch, caplog, offline):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr(tracking, "_warned", set())
    folder = finished(tmp_path, "r4", 0.5)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        assert tracking.log_run(make_cfg(), folder) is None
        assert tracking.log_run(make_cfg(), folder) is None
    assert len([r for r in caplog.records if "tracking off" in r.message]) == 1


def read_wandb(path: Path) -> list[bytes]:
    """The records of a `.wandb` file (W&B's LevelDB-style log: a 7-byte file header, 32 KiB blocks,
    each chunk a 7-byte header of crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    data, out, pos, part = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little left in the block for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            out.append(part)
    return out


def records(path, deadline_s: float = 30.0) -> list:
    """The protobuf records of an offline run, read back without an account (waits for its exit)."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.time() + deadline_s
    while True:
        out = []
        for blob in read_wandb(next(path.glob("run-*.wandb"))):
            rec = pb.Record()
            rec.ParseFromString(blob)
            out.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.time() > deadline:
            return out
        time.sleep(0.2)


def test_per_epoch_history_sweep_tables_grouping_and_headline(make_cfg, tmp_path, offline):
    import json

    folder = finished(tmp_path, "r5", 0.75)
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.25], "val_acc": [0.5, 0.6, 0.7],
                            "lr": [0.1, 0.05, 0.01]})
    folder.write_table("history.csv", history)
    folder.write_table("beta_sweep.csv", pd.DataFrame({"beta": [0.8, 1.0], "val_acc": [0.6, 0.5]}))
    path = tracking.log_run(make_cfg("method=zeroshot", "tracking.tags=[bench]"), folder)
    recs = records(path)
    kinds = [r.WhichOneof("record_type") for r in recs]
    steps = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
             for r in recs if kinds[recs.index(r)] == "history"]
    epochs = [h for h in steps if "train/train_loss" in h]
    assert [h["epoch"] for h in epochs] == [1, 2, 3]
    assert [h["train/train_loss"] for h in epochs] == [2.0, 1.5, 1.25]
    assert [h["train/val_acc"] for h in epochs] == [0.5, 0.6, 0.7] and [h["train/lr"] for h in epochs] == [0.1, 0.05, 0.01]
    table = next(h for h in steps if "sweep/beta_sweep/_type" in h)  # a wandb.Table, flattened keys
    assert table["sweep/beta_sweep/_type"] == "table-file" and table["sweep/beta_sweep/nrows"] == 2
    run = next(r.run for r, k in zip(recs, kinds) if k == "run")
    assert run.run_group == "single" and run.job_type == "zeroshot"
    assert {"bench", "suite:digits", "method:zeroshot"} <= set(run.tags)
    summary = {}
    for r, k in zip(recs, kinds):
        if k == "summary":
            summary |= {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update}
    assert summary["headline/id_test_acc"] == 0.75 and summary["test/acc"] == 0.75
