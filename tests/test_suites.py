"""Real suites end to end on tiny trees written in each dataset's exact on-disk format."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rftbench.run import execute, run_folder
from test_backbones import write_cifar10

TINY = ["backbone=resnet18", "backbone.pretrained=false", "backbone.input.size=32", "method=ft",
        "budget.epochs=1", "budget.batch_size=16"]


def run_done(make_cfg, *overrides: str) -> pd.DataFrame:
    cfg = make_cfg(*TINY, *overrides, experiment=None)
    assert execute(cfg) == "done"
    folder = run_folder(cfg).path
    assert (folder / "done").exists()
    return pd.read_csv(folder / "metrics.csv")


def test_cifar10_file_backed_runs_end_to_end_with_the_default_eval(make_cfg, tmp_path, single_thread):
    """The defect of issue 12: AutoAttack took `sub.x` (None) of a streamed test split."""
    write_cifar10(tmp_path / "data" / "cifar10", n_train_per_batch=10, n_test=50)
    m = run_done(make_cfg, "suite=cifar10", f"paths.data={tmp_path / 'data'}", "suite.build.corruptions=[]")
    adv = m[m["split"] == "ood/adversarial/Linf"]
    assert set(adv["metric"]) == {"robust_acc", "clean_acc"}
    assert m[(m["split"] == "test") & (m["metric"] == "acc")]["value"].notna().all()
    assert leaderboard_row(tmp_path, "cifar10")


def leaderboard_row(tmp_path: Path, suite: str) -> bool:
    from rftbench import leaderboard

    board = leaderboard.build(tmp_path / "runs")
    return bool((board["suite"] == suite).any())
