"""End-to-end runs of the tiny preset: folders, skipping, redoing, determinism, clear failures."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pandas as pd
import pytest

from rftbench.run import execute, run_folder
from rftbench.train import NonFiniteLossError

TIMING = {"adapt_time_s", "eval_time_s", "eval_images_per_s", "chosen/train_time_s"}


def metrics_of(cfg) -> pd.DataFrame:
    return pd.read_csv(run_folder(cfg).path / "metrics.csv")


def test_tiny_run_writes_a_complete_folder(make_cfg):
    cfg = make_cfg("method=ft")
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    assert path.parts[-4:-1] == ("digits", "digits_resnet", "ft")
    for name in ("config.yaml", "metrics.csv", "env.json", "info.json", "history.csv", "done"):
        assert (path / name).exists(), name
    # a second run served from the cached training (another runs folder) keeps the same history
    again = make_cfg("method=ft", runs=path.parents[4] / "again")
    assert execute(again) == "done"
    reused = run_folder(again).path
    pd.testing.assert_frame_equal(pd.read_csv(reused / "history.csv"), pd.read_csv(path / "history.csv"))
    m = metrics_of(cfg)
    splits = set(m["split"])
    assert {"test", "ood/typed", "ood/corruption/fog/5", "ood/corruption", "ood"} <= splits
    assert set(m[m["split"] == "test"]["metric"]) == {"acc", "ece", "nll"}
    acc = m[(m["metric"] == "acc") & m["split"].str.startswith("ood/corruption/")]
    mean = m[(m["split"] == "ood/corruption") & (m["metric"] == "acc_mean")]["value"].item()
    assert mean == pytest.approx(acc["value"].mean())
    assert m[m["metric"] == "trainable_params"]["value"].item() > 0
    adv = m[(m["split"] == "ood/adversarial/Linf") & (m["metric"] == "robust_acc")]
    assert len(adv) == 1 and 0 <= adv["value"].item() <= 1
    assert json.loads(adv["detail"].item())["tier"] == "quick"
    env = json.loads((path / "env.json").read_text())
    assert env["packages"]["torch"] == "2.14.1" and "commit" in env["git"]


def test_done_run_is_skipped_and_incomplete_run_is_redone(make_cfg):
    cfg = make_cfg("method=zeroshot")
    assert execute(cfg) == "done"
    folder = run_folder(cfg)
    stamp = (folder.path / "metrics.csv").stat().st_mtime_ns
    assert execute(cfg) == "skipped"
    assert (folder.path / "metrics.csv").stat().st_mtime_ns == stamp
    (folder.path / "done").unlink()  # as if the process died before the end
    assert execute(cfg) == "done" and folder.done


def test_same_seed_same_metrics(make_cfg, tmp_path):
    a, b = make_cfg("method=ft", runs=tmp_path / "a"), make_cfg("method=ft", runs=tmp_path / "b")
    execute(a), execute(b)
    ma, mb = metrics_of(a), metrics_of(b)
    keep = ~ma["metric"].isin(TIMING)
    pd.testing.assert_frame_equal(ma[keep].reset_index(drop=True), mb[keep].reset_index(drop=True))


def test_nan_loss_stops_the_run_without_done(make_cfg):
    cfg = make_cfg("method=ft", "method.finetune.optimizer.lr=1e30")
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        execute(cfg)
    folder = run_folder(cfg)
    assert not folder.done and folder.status == "failed"
    assert "NonFiniteLossError" in (folder.path / "error.txt").read_text()


def test_missing_dataset_path_is_one_clear_error(make_cfg, tmp_path):
    cfg = make_cfg("suite=cifar10", f"paths.data={tmp_path / 'nowhere'}", experiment=None)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        execute(cfg)
    assert run_folder(cfg).status == "failed"


def test_cli_unknown_method_fails_with_choices(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rftbench.run", "method=nope", f"paths.runs={tmp_path}"],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "nope" in res.stderr and "ft" in res.stderr and "zeroshot" in res.stderr
    assert not list(tmp_path.rglob("done"))


def test_zeroshot_head_is_the_upstream_digit_rows(make_cfg):
    import torch

    from rftbench.backbones import create_backbone, load_state
    from rftbench.data.digits import DIGIT_CLASSES
    from rftbench.run import build_model, build_suite
    from rftbench.train import RunContext

    cfg = make_cfg()
    ctx = RunContext(cache_dir=Path(cfg.paths.cache))
    suite = build_suite(cfg, ctx)
    model = build_model(cfg, suite, ctx)
    ckpt = next((ctx.cache_dir / "upstream").glob("glyphs-*.safetensors"))
    up = load_state(ckpt)
    assert torch.equal(model.head.weight, up["head.weight"][DIGIT_CLASSES])
    assert model.head.out_features == 10 and model.head_origin == "zeroshot"


def test_converged_unless_the_last_epoch_beats_every_earlier_one_by_more_than_one_val_image():
    from rftbench.train import FitResult

    def result(accs, n_val=200):
        hist = [{"epoch": i + 1, "val_acc": a} for i, a in enumerate(accs)]
        best = max(range(len(accs)), key=lambda i: (accs[i], -i)) + 1  # ties -> the earlier epoch
        return FitResult(best, max(accs), hist, n_val=n_val)

    assert result([0.5, 0.9, 0.8]).converged                 # best before the end
    assert result([0.5, 0.9, 0.9]).converged                 # a tie goes to the earlier epoch
    assert result([0.5, 0.900, 0.905]).converged             # +1 of 200 images at the end: noise
    assert not result([0.5, 0.900, 0.910]).converged         # +2 images: still rising
    assert not result([0.5, 0.900, 0.905], n_val=0).converged  # unknown val size: strict
    assert result([0.7]).converged                           # one epoch
