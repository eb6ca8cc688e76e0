"""Faults and bad input (issue 16's table): each case gives one clear error naming the cause and the
fix, leaves no run marked `done` and nothing half-written, and a rerun after the fix succeeds.

Covered elsewhere: `lr=1e6` with method=ft (test_run.test_nan_loss_stops_the_run_without_done),
unknown choices (test_run.test_cli_unknown_method_fails_with_choices), kill -9 and resume
(test_sweep), concurrent sweeps (test_sweep), a missing dataset (test_run).
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rftbench import backbones, leaderboard
from rftbench.data.cifar import read_cifar
from rftbench.data.corruptions import corrupted_set
from rftbench.data.digits import pretrain_glyphs
from rftbench.methods.base import Adapted, cached_training
from rftbench.plan import plan, report
from rftbench.results import load_metrics
from rftbench.run import execute, run_folder
from rftbench.sweep import writable
from rftbench.train import NonFiniteLossError, RunContext, fit_probe, fit_probes
from rftbench.utils import load_cached, save_cached
from rftbench.validate import ConfigError
from test_backbones import write_cifar10

SRC = str(Path(__file__).resolve().parents[1] / "src")


def no_run_folders(root: Path) -> bool:
    """No run folder under `root` (Hydra's own `.hydra/` logs are not run folders)."""
    return not [p for p in root.glob("*/*/*/*") if not p.relative_to(root).parts[0].startswith(".")]


# ---- 1: seed=abc on the command line --------------------------------------------------------------

def test_1_non_integer_seed_is_rejected_before_any_folder(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-m", "rftbench.run", "experiment=tiny", "seed=abc", f"paths.runs={runs}",
                          "tracking.enabled=false"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0
    assert "seed must be an integer >= 0, got 'abc'" in res.stderr
    assert "Logging error" not in res.stderr
    assert no_run_folders(runs)


# ---- 2, 3, 14: invalid values and incompatible keys, before anything runs -------------------------

@pytest.mark.parametrize("overrides, message", [
    (["budget.epochs=-1"], "budget.epochs must be an integer >= 1, got -1"),
    (["budget.epochs=0"], "budget.epochs must be an integer >= 1, got 0"),
    (["budget.epochs=2.5"], "budget.epochs must be an integer >= 1, got 2.5"),
    (["budget.batch_size=0"], "budget.batch_size must be an integer >= 1, got 0"),
    (["backbone=resnet18"], "backbone.pretrain.n_train, backbone.pretrain.epochs set, but backbone resnet18"),
])
def test_2_3_14_invalid_config_is_one_error_before_any_folder(make_cfg, tmp_path, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        execute(cfg)
    assert no_run_folders(tmp_path / "runs")
    with pytest.raises(ConfigError, match=message.split(" must")[0].split(",")[0].replace(".", r"\.")):
        plan(["experiment=tiny", f"paths.runs={tmp_path / 'runs'}", *overrides])


# ---- 4: a diverged linear probe, a non-finite evaluation ------------------------------------------

def _batched(x, y, xv, yv, c, **kw):  # the CT sweep's batched probes (two identical feature sets)
    return fit_probes(torch.stack([x, x]), y, torch.stack([xv, xv]), yv, c, **kw)[0]


@pytest.mark.parametrize("probe", [fit_probe, _batched])
def test_4_diverged_probe_raises(probe):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.arange(64) % 4
    assert probe(x, y, x, y, 4, lr=1e-2, epochs=3).val_acc > 0  # a sane lr passes
    with pytest.raises(NonFiniteLossError, match="linear probe diverged.*lower probe.lr"):
        probe(x, y, x, y, 4, lr=1e6, epochs=3)


@pytest.mark.slow
def test_4_lp_with_huge_probe_lr_fails_and_is_never_done(make_cfg):
    cfg = make_cfg("method=lp", "method.probe.lr=1e6")
    with pytest.raises(NonFiniteLossError, match="lower probe.lr"):
        execute(cfg)
    assert run_folder(cfg).status == "failed"
    fixed = make_cfg("method=lp")
    assert execute(fixed) == "done"


def test_4_non_finite_logits_fail_evaluation(monkeypatch):
    from rftbench import evaluate
    from rftbench.data.base import Split

    class OneSplit:
        def eval_splits(self):
            return [Split("test", "test", x=torch.zeros(4, 3, 8, 8), y=torch.zeros(4, dtype=torch.long))]

    monkeypatch.setattr(evaluate, "predict", lambda model, split, ctx: torch.full((4, 3), float("nan")))
    with pytest.raises(NonFiniteLossError, match="non-finite logits on test"):
        evaluate.evaluate(nn.Identity(), OneSplit(), RunContext(), {"ece_bins": 15, "adversarial": {"enabled": False}})


# ---- 5, 6: CIFAR pickles ----------------------------------------------------------------------------

def crafted(marker: Path) -> bytes:
    """A pickle that would run code (write `marker`) under plain pickle.load."""
    return b"cbuiltins\nexec\n(V" + f"open({str(marker)!r}, 'w').write('x')".encode() + b"\ntR."


@pytest.mark.parametrize("damage, message", [
    (lambda p, marker: p.write_bytes(p.read_bytes()[:500]), "truncated or corrupt"),
    (lambda p, marker: p.write_bytes(os.urandom(2000)), "truncated or corrupt"),
    (lambda p, marker: p.write_bytes(crafted(marker)), "asks to load code .*builtins.exec"),
])
def test_5_6_bad_cifar_pickles_name_the_file(tmp_path, damage, message):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    good = batch.read_bytes()
    damage(batch, tmp_path / "ran")
    with pytest.raises(ValueError, match=f"{batch}.*{message}") as err:
        read_cifar(tmp_path, "cifar10")
    assert "re-extract" in str(err.value) or "re-extracting" in str(err.value)
    assert not (tmp_path / "ran").exists()  # no code ran
    batch.write_bytes(good)
    assert read_cifar(tmp_path, "cifar10")["train"][0].shape == (50, 32, 32, 3)


def test_6_official_layout_python2_pickle_loads(tmp_path):
    """The official archives are Python 2 pickles of numpy.core.multiarray._reconstruct arrays."""
    import numpy as np

    arr = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072) % 251
    body = pickle.dumps({b"data": arr, b"labels": [1, 2]}, protocol=2)
    body = body.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # NumPy 1 name
    from rftbench.data.cifar import load_pickle

    path = tmp_path / "batch"
    path.write_bytes(body)
    d = load_pickle(path)
    assert np.array_equal(d[b"data"], arr) and d[b"labels"] == [1, 2]


# ---- 7, 8: cache entries ----------------------------------------------------------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def garble(path: Path) -> None:
    """Flip bytes of the tensor data in place (same size, valid header)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("spoil", [truncate, garble])
def test_7_8_corrupt_cache_entry_is_warned_once_deleted_and_rebuilt(tmp_path, spoil, caplog):
    path = tmp_path / "e.safetensors"
    tensors = {"w": torch.arange(40, dtype=torch.float32)}
    save_cached(path, tensors, {"note": "x"})
    got, meta = load_cached(path)
    assert torch.equal(got["w"], tensors["w"]) and meta == {"note": "x"}
    spoil(path)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        assert load_cached(path) is None
    assert not path.exists()
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage()][0].startswith("corrupt cache entry")


@pytest.mark.parametrize("spoil", [truncate, garble])
def test_7_8_cached_training_retrains_a_corrupt_entry(tmp_path, spoil):
    ctx = RunContext(cache_dir=tmp_path, spec={"start": 1})
    calls = []

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.5)
        return Adapted(model, val_acc=0.5, trainable_params=6)

    def run():
        return cached_training(nn.Linear(2, 3, bias=False), ctx, {"recipe": 1}, train)

    run()
    (entry,) = (tmp_path / "models").glob("*.safetensors")
    assert torch.all(run().model.weight == 0.5) and len(calls) == 1  # reused
    spoil(entry)
    assert torch.all(run().model.weight == 0.5) and len(calls) == 2  # rebuilt
    assert torch.all(run().model.weight == 0.5) and len(calls) == 2  # and reused again


@pytest.mark.parametrize("spoil", [truncate, garble])
def test_7_8_corrupted_set_cache_is_rebuilt(tmp_path, spoil):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = corrupted_set(images, ["fog"], [1], 0, tmp_path)
    (entry,) = tmp_path.glob("corrupted-*.safetensors")
    spoil(entry)
    again = corrupted_set(images, ["fog"], [1], 0, tmp_path)
    assert torch.equal(first[("fog", 1)], again[("fog", 1)]) and load_cached(entry) is not None


def test_7_upstream_checkpoint_is_rebuilt(tmp_path):
    spec = dict(name="resnet18", source="timm", pretrained=False, kwargs={})
    path = pretrain_glyphs(backbone=spec, n_train=64, epochs=1, batch_size=32, lr=0.004, weight_decay=0.05, seed=0,
                           image_size=16, fonts_held_out=None, cache_dir=tmp_path)
    truncate(path)
    assert pretrain_glyphs(backbone=spec, n_train=64, epochs=1, batch_size=32, lr=0.004, weight_decay=0.05, seed=0,
                           image_size=16, fonts_held_out=None, cache_dir=tmp_path) == path
    assert load_cached(path) is not None


# ---- 9, 10, 11: damaged run folders -----------------------------------------------------------------

@pytest.fixture(scope="module")
def done_runs(tmp_path_factory, cache_dir) -> Path:
    """A runs folder with one finished zeroshot run of the tiny preset (copied by each test)."""
    from hydra import compose, initialize_config_dir

    from rftbench.identity import CONFIG_DIR

    runs = tmp_path_factory.mktemp("done") / "runs"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tiny", f"paths.runs={runs}", f"paths.cache={cache_dir}",
                                           "device=cpu", "method=zeroshot"])
    assert execute(cfg) == "done"
    return runs


def copy_runs(done_runs: Path, tmp_path: Path) -> Path:
    shutil.copytree(done_runs, tmp_path / "runs")
    return tmp_path / "runs"


def other_yaml(folder: Path) -> None:
    """Another run's valid config in place of the folder's own."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["seed"] = 7
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("damage, problem", [
    (lambda p: (p / "metrics.csv").unlink(), "metrics.csv is missing"),
    (lambda p: (p / "config.yaml").write_text("a: [1, 2\nb: {"), "unreadable file"),
    (other_yaml, "config.yaml gives run id"),
    (lambda p: (p / "config.yaml").unlink(), "config.yaml is missing"),
])
def test_9_10_11_damaged_run_is_reported_skipped_and_redone(make_cfg, tmp_path, done_runs, damage, problem, caplog):
    runs = copy_runs(done_runs, tmp_path)
    cfg = make_cfg("method=zeroshot")
    assert run_folder(cfg).done
    folder = run_folder(cfg)
    damage(folder.path)
    assert not folder.done and folder.status == "damaged" and problem in folder.damage()
    table = plan(["experiment=tiny", f"paths.runs={runs}", "method=zeroshot"])
    assert list(table["status"]) == ["damaged"]
    assert f"damaged (redone by the next sweep): {folder.path}: {problem}" in report(table)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        assert load_metrics(runs).empty
        assert leaderboard.build_all(runs).board.empty
    assert any(str(folder.path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert execute(cfg) == "done" and folder.done and folder.damage() is None
    assert len(load_metrics(runs)) > 0


# ---- 12: read-only runs folder -------------------------------------------------------------------

def test_12_skipping_finished_runs_needs_no_write_access(make_cfg, monkeypatch, tmp_path, done_runs):
    from rftbench import results

    copy_runs(done_runs, tmp_path)
    cfg = make_cfg("method=zeroshot")

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    for obj, name in ((results.RunFolder, "start"), (results.RunLock, "acquire"), (results, "write_text_atomic"),
                      (Path, "mkdir"), (Path, "write_text"), (Path, "unlink")):
        monkeypatch.setattr(obj, name, refuse)
    assert execute(cfg) == "skipped"
    monkeypatch.undo()
    # Hydra's sweep logs go to a temp folder when the runs folder is not writable
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    moved = writable(str(tmp_path / "runs"))
    assert moved != str(tmp_path / "runs") and moved.endswith(str(tmp_path / "runs"))


# ---- 13: offline backbone -------------------------------------------------------------------------

def test_13_offline_backbone_fails_at_once_with_the_alternative(monkeypatch, make_cfg, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones.socket, "create_connection", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setattr(backbones, "weights_location", lambda name, source: (None, "/cache/models--timm--x"))
    with pytest.raises(backbones.WeightsUnavailable,
                       match=r"no internet .*looked in /cache/models--timm--x.*backbone\.checkpoint=<file>"):
        backbones.create_backbone("resnet18", pretrained=True)
    cfg = make_cfg("backbone=resnet18", "suite=digits", experiment=None)
    with pytest.raises(backbones.WeightsUnavailable):
        execute(cfg)
    assert no_run_folders(tmp_path / "runs")
    # the alternative: a local checkpoint needs no download
    ckpt = tmp_path / "w.safetensors"
    save_cached(ckpt, backbones.create_backbone("resnet18", pretrained=False).state_dict())
    model = backbones.create_backbone("resnet18", pretrained=True, checkpoint=str(ckpt))
    assert model.num_features == 512


def test_13_online_check_is_short_and_respects_hf_hub_offline(monkeypatch):
    seen = []
    monkeypatch.setattr(backbones.socket, "create_connection",
                        lambda addr, timeout: seen.append(timeout) or (_ for _ in ()).throw(OSError("down")))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not backbones.online() and seen == [2.5]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not backbones.online() and seen == [2.5]


# ---- 15: stale plots ------------------------------------------------------------------------------

def test_15_leaderboard_removes_stale_plots(tmp_path):
    from test_leaderboard import add_run

    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in (0, 1):
        add_run(runs, "ft", seed, 0.8, 0.4)
        add_run(runs, "lp", seed, 0.7, 0.5)
    out.mkdir()
    (out / "rws_coeff_digits_b.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    leaderboard.main(["--runs", str(runs), "--out", str(out)])
    assert not (out / "rws_coeff_digits_b.png").exists() and (out / "notes.txt").exists()
    assert (out / "leaderboard.csv").exists()
