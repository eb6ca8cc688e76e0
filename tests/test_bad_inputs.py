"""Bad inputs are answered before any work, naming the key or the file (issue 25's cases): metric
values that are not finite numbers in the leaderboard, invalid or unknown config keys in
`rftbench.run.execute`, data and checkpoints that fail before any training (no training started, no
epoch checkpoint, no `done`) and run after the fix. Damaged image files: test_preflight.py."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from rftbench import leaderboard as lb
from rftbench import train
from rftbench.run import execute, run_folder
from rftbench.validate import ConfigError
from test_leaderboard import add_run
from test_suites import TINY

# suite=imagenet on a tiny tree (test_imagenet.write_imagenet) with a randomly initialised ResNet-18
IMAGENET = [*TINY, "suite=imagenet", "suite.build.val_per_class=1", "suite.build.corruptions=[]",
            "suite.build.ood=[imagenet_r]", "eval.adversarial.enabled=false"]


def failed_before_training(cfg, trainings: list) -> None:
    """The run folder of `cfg` failed with nothing trained: no training started, no epoch checkpoint,
    no `done`, the error recorded."""
    folder = run_folder(cfg)
    assert trainings == [] and folder.status == "failed" and not (folder.path / "done").exists()
    assert not list(folder.path.rglob("*.pt")) and (folder.path / "error.txt").exists()


def set_value(root, method: str, run_id: str, split: str, metric: str, value: str):
    path = root / "digits" / "b" / method / run_id / "metrics.csv"
    m = pd.read_csv(path, dtype={"value": str})
    m.loc[(m["split"] == split) & (m["metric"] == metric) & (m["selection"] == "val"), "value"] = value
    m.to_csv(path, index=False)
    return path.parent


@pytest.fixture
def two_seeds(tmp_path):
    root = tmp_path / "runs"
    ids = [add_run(root, "ft", seed, acc, 0.4) for seed, acc in ((0, 0.80), (1, 0.90))]
    return root, ids


@pytest.mark.parametrize("value", ["nan", "abc", "", "inf"])
def test_a_bad_value_is_an_error_naming_run_split_and_metric(two_seeds, tmp_path, value):
    root, ids = two_seeds
    folder = set_value(root, "ft", ids[1], "test", "acc", value)
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        lb.main(["--runs", str(root), "--out", str(out), "--no-plots"])
    msg = str(exc.value)
    assert str(folder) in msg and "split test, metric acc" in msg and "\n" not in msg
    assert not out.exists()  # nothing written
    with pytest.raises(lb.BadMetrics):
        lb.build_all(root)


def test_drop_bad_runs_leaves_them_out_and_counts_them(two_seeds, tmp_path, caplog):
    root, ids = two_seeds
    set_value(root, "ft", ids[1], "test", "acc", "abc")
    board = lb.build_all(root, drop_bad_runs=True).board
    assert "left out 1 runs" in caplog.text and ids[1] in caplog.text
    r = board.iloc[0]
    assert r["n_seeds"] == 1 and r["id_test_acc"] == pytest.approx(0.80)  # one seed, said so
    lb.main(["--runs", str(root), "--out", str(tmp_path / "o"), "--no-plots", "--drop-bad-runs"])
    assert pd.read_csv(tmp_path / "o" / "leaderboard.csv").loc[0, "n_seeds"] == 1


def test_a_value_from_fewer_seeds_says_how_many(two_seeds):
    """A run without a metric (not a bad value: the row is absent) is not hidden in n_seeds."""
    root, ids = two_seeds
    path = root / "digits" / "b" / "ft" / ids[1] / "metrics.csv"
    m = pd.read_csv(path)
    m[~((m["split"] == "test") & (m["metric"] == "ece"))].to_csv(path, index=False)
    board = lb.build(root)
    r = board.iloc[0]
    assert r["n_seeds"] == 2 and r["ece_n_seeds"] == 1 and r["ece"] == pytest.approx(0.1)
    assert "id_test_acc_n_seeds" not in board  # complete columns get no count of their own
    md = lb.display_table(board).iloc[0]
    assert "(n=1)" in md["ece"] and "(n=" not in md["id_test_acc"]
    assert r["id_test_acc"] == pytest.approx(0.85) and r["id_test_acc_se"] == pytest.approx(0.05)


def test_missing_runs_folder_and_uncreatable_out(two_seeds, tmp_path):
    root, _ = two_seeds
    with pytest.raises(SystemExit, match="no such folder"):
        lb.main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        lb.main(["--runs", str(root), "--out", str(blocker / "results"), "--no-plots"])
    assert str(blocker) in str(exc.value) and "--out" in str(exc.value)
    with pytest.raises(SystemExit, match="is a file"):
        lb.main(["--runs", str(root), "--out", str(blocker), "--no-plots"])


def replace_fit(monkeypatch, stand_in) -> None:
    """`rftbench.train.fit` replaced by `stand_in`, also where a method module bound it by name (every
    method module is imported first, so that none binds the stand-in for later tests)."""
    import importlib
    import pkgutil
    import sys

    import rftbench.methods

    for info in pkgutil.iter_modules(rftbench.methods.__path__):
        importlib.import_module(f"rftbench.methods.{info.name}")
    real = train.fit
    for name, mod in list(sys.modules.items()):
        if name.startswith("rftbench") and getattr(mod, "fit", None) is real:
            monkeypatch.setattr(mod, "fit", stand_in)


@pytest.fixture
def no_training(monkeypatch):
    """`rftbench.train.fit` fails wherever it is called."""
    def fail(*args, **kwargs):
        raise AssertionError("trained despite a bad config")

    replace_fit(monkeypatch, fail)


@pytest.fixture
def trainings(monkeypatch) -> list:
    """`rftbench.train.fit` counted: one list item per training started."""
    real, calls = train.fit, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    replace_fit(monkeypatch, counted)
    return calls


BAD = [  # overrides -> the key the error must name
    (["+eval.adversarial.eps=-1"], "eval.adversarial.eps"),
    (["+eval.foo=1"], "eval.foo"),
    (["eval.adversarial.threats=[{norm:L3,eps:0.1}]"], "eval.adversarial.threats[0].norm"),
    (["eval.adversarial.threats=[{norm:Linf,eps:-0.1}]"], "eval.adversarial.threats[0].eps"),
    (["eval.adversarial.threats=[{norm:Linf,eps:0.1,p:2}]"], "eval.adversarial.threats[0].p"),
    (["eval.adversarial.tier=fast"], "eval.adversarial.tier"),
    (["eval.adversarial.tier=strong"], "eval.adversarial.tier"),
    (["eval.adversarial.n=0"], "eval.adversarial.n"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.ece_bins=0"], "eval.ece_bins"),
    (["budget.epochs=0"], "budget.epochs"),
    (["budget.batch_size=0"], "budget.batch_size"),
    (["+method.adapt.foo=1"], "method.adapt.foo"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
@pytest.mark.parametrize("method", ["lp", "ft"])
def test_bad_config_is_rejected_before_any_work(make_cfg, tmp_path, no_training, overrides, key, method):
    with pytest.raises(ConfigError) as exc:
        execute(make_cfg(f"method={method}", *overrides))
    assert key in str(exc.value)
    assert not (tmp_path / "runs").exists()  # no run folder, no done, no checkpoint


def test_messages_name_the_valid_values(make_cfg):
    cases = {"eval.adversarial.tier=fast": "quick, standard",
             "eval.adversarial.threats=[{norm:L3,eps:0.1}]": "Linf, L2",
             "+eval.foo=1": "batch_size, ece_bins, adversarial",
             "+method.adapt.foo=1": "probe_cfg"}
    for override, valid in cases.items():
        with pytest.raises(ConfigError, match=valid):
            execute(make_cfg("method=lp", override))


def test_threads_above_the_cores_warn(make_cfg, caplog, monkeypatch):
    from rftbench import validate

    monkeypatch.setattr(validate, "available_cores", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        validate.validate_config(make_cfg("method=lp", "threads=64"))
    assert "threads=64" in caplog.text and "2 available cores" in caplog.text


@pytest.mark.parametrize("method", ["zeroshot", "lp"])
def test_the_fixed_config_runs(make_cfg, method):
    fixed = ["eval.adversarial.threats=[{norm:L2,eps:0.5}]", "eval.adversarial.n=10", "eval.ece_bins=10"]
    assert execute(make_cfg(f"method={method}", "threads=1", *fixed)) == "done"
    assert math.isfinite(lb.build_all(make_cfg().paths.runs, ()).board.loc[0, "id_test_acc"])


def test_an_unknown_timm_name_says_so_with_close_matches(make_cfg, tmp_path, no_training):
    from rftbench.backbones import create_backbone, library_input_spec

    for call in (lambda: library_input_spec("timm", "resnet5O"), lambda: create_backbone("resnet5O", pretrained=False)):
        with pytest.raises(ValueError, match=r"timm has no model 'resnet5O' \(backbone.arch\); close matches: .*resnet50"):
            call()
    with pytest.raises(ValueError, match="timm has no model 'not_a_model'"):
        execute(make_cfg("method=lp", "backbone=timm", "backbone.arch=not_a_model", "backbone.pretrained=false",
                         experiment=None))
    assert not (tmp_path / "runs").exists()  # rejected with the config, before any folder


def test_a_cache_or_runs_path_that_is_a_file_is_one_clear_error(make_cfg, tmp_path, no_training):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for override, match in ((f"paths.cache={afile}", r"paths.cache \(\$RFTBENCH_CACHE\) = .*afile is a file"),
                            (f"paths.cache={afile / 'sub'}", r"is under the file .*afile"),
                            (f"paths.runs={afile / 'runs'}", r"paths.runs = .*is under the file")):
        with pytest.raises(ConfigError, match=match):
            execute(make_cfg("method=lp", override))


def test_an_attack_subset_larger_than_the_test_classes_allow_fails_before_training(make_cfg, tmp_path, no_training):
    cfg = make_cfg("method=ft", "eval.adversarial.n=5000")
    with pytest.raises(ConfigError, match=r"eval.adversarial.n=5000 takes 500 test images of each of the 10 classes, "
                                          r"and class \d has \d+: set eval.adversarial.n <= \d+"):
        execute(cfg)
    assert not list((tmp_path / "runs").rglob("done"))
    assert execute(make_cfg("method=lp", "eval.adversarial.n=20")) == "done"  # the fixed input runs


def test_a_suite_without_val_images_fails_before_training(make_cfg, tmp_path, no_training, monkeypatch):
    from rftbench import run as runner

    build = runner.build_suite

    def without_val(cfg, ctx):
        suite = build(cfg, ctx)
        suite.splits.pop("val")
        return suite
    monkeypatch.setattr(runner, "build_suite", without_val)
    with pytest.raises(ConfigError, match=r"suite digits built no val split with images .*suite.build.val_fraction"):
        execute(make_cfg("method=ft"))
    assert not list((tmp_path / "runs").rglob("done"))


def test_classes_without_training_images_are_a_warning(make_cfg, caplog, monkeypatch):
    from rftbench import run as runner

    build = runner.build_suite

    def drop_class_3(cfg, ctx):
        suite = build(cfg, ctx)
        keep = torch.nonzero(suite.train.y != 3).flatten()
        suite.splits["train"] = suite.train.subset(keep)
        return suite
    monkeypatch.setattr(runner, "build_suite", drop_class_3)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        assert execute(make_cfg("method=lp")) == "done"
    assert "1 of 10 classes have no training image (3)" in caplog.text


def test_plan_reports_a_bad_choice_in_one_message(tmp_path, capsys):
    from rftbench.plan import main as plan_main

    with pytest.raises(SystemExit) as exc:
        plan_main(["method=lp,fft", f"paths.runs={tmp_path}"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Could not find 'method/fft'" in err and "Traceback" not in err


def test_file_lock_serialises_and_runs_unlocked_where_it_cannot_lock(tmp_path):
    import threading
    import time

    from rftbench.utils import file_lock

    order = []

    def worker(name):
        with file_lock(tmp_path / "x.lock") as held:
            assert held
            order.append(f"{name}+")
            time.sleep(0.2)
            order.append(f"{name}-")
    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert order == ["a+", "a-", "b+", "b-"]  # never both inside
    (tmp_path / "afile").write_text("")
    with file_lock(tmp_path / "afile" / "x.lock") as held:  # cannot be created: the block still runs
        assert held is False


def test_an_input_error_is_one_console_line_and_error_txt_keeps_the_traceback(tmp_path, cache_dir):
    import subprocess
    import sys

    def run(*overrides):
        cmd = [sys.executable, "-m", "rftbench.run", f"paths.runs={tmp_path / 'runs'}",
               f"paths.cache={cache_dir}", "tracking.enabled=false", *overrides]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    bad = run("experiment=tiny", "method=lp", "eval.batch_size=0")  # rejected with the config: no folder
    assert bad.returncode == 1 and "Traceback" not in bad.stderr + bad.stdout
    assert bad.stderr.strip().splitlines() == ["Error: ConfigError: eval.batch_size must be an integer >= 1, got 0"]
    missing = run("method=lp", "suite=cifar10", "backbone=resnet18", "backbone.pretrained=false",
                  f"paths.data={tmp_path / 'nothing'}")  # fails in the run folder: the log line names error.txt
    out = missing.stderr + missing.stdout
    assert missing.returncode == 1 and "Traceback" not in out
    line = next(ln for ln in out.splitlines() if "failed: FileNotFoundError" in ln)
    error_txt = Path(line.rsplit("(details: ", 1)[1].rstrip(")"))
    assert "Traceback" in error_txt.read_text() and not list((tmp_path / "runs").rglob("done"))


def test_a_checkpoint_of_another_architecture_is_one_line_with_counts(tmp_path):
    import timm

    from rftbench.backbones import CheckpointError, create_backbone

    path = tmp_path / "r50.pt"
    torch.save(timm.create_model("resnet50", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        create_backbone("resnet18", num_classes=10, checkpoint=str(path))
    msg = str(exc.value)
    assert msg.startswith(f"backbone.checkpoint={path} does not fit the backbone ResNet: ")
    assert "unexpected keys (e.g. " in msg and "keys of another shape (e.g. " in msg and "\n" not in msg
    assert len(msg) < 800  # not PyTorch's dump of every key


def test_a_pickle_refused_by_the_safe_loader_names_backbone_checkpoint(tmp_path):
    from rftbench.backbones import CheckpointError, load_state

    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    with pytest.raises(CheckpointError, match=rf"backbone.checkpoint={path} is refused by "
                                              r"torch.load\(weights_only=True\).*state dict alone"):
        load_state(path)


def test_a_zero_shot_head_from_a_checkpoint_with_too_few_classes_names_head_init(make_cfg, tmp_path, no_training):
    import timm

    path = tmp_path / "five_classes.pt"
    torch.save(timm.create_model("resnet10t", num_classes=5, channels=(32, 64, 128, 256), stem_width=16).state_dict(),
               path)
    with pytest.raises(ValueError, match=r"has 5 outputs .*Use suite.head_init=random"):
        execute(make_cfg("method=lp", f"backbone.checkpoint={path}"))
    assert execute(make_cfg("method=lp", f"backbone.checkpoint={path}", "suite.head_init=random")) == "done"


def _ft_then_wise_on(make_cfg, cache: Path) -> None:
    for method in ("ft", "wise"):
        cfg = make_cfg(f"method={method}", "budget.epochs=1", "method.adapt.alphas=[0.0,1.0]" if method == "wise"
                       else "seed=0", f"paths.cache={cache}")
        assert execute(cfg) == "done"


def test_an_unwritable_cache_computes_without_storing(make_cfg, tmp_path, monkeypatch, caplog):
    """Every write to the cache refused (EROFS): the runs compute what they need, warn, finish."""
    import errno

    from rftbench import utils

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(utils, "save_tensors_atomic", refuse)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        _ft_then_wise_on(make_cfg, cache)
    assert "is not writable (Read-only file system): computing without storing" in caplog.text
    assert not list(cache.rglob("*.safetensors"))


def test_a_failure_after_training_with_an_unwritable_cache_costs_no_retraining(make_cfg, tmp_path, monkeypatch):
    """The model cannot be cached (read-only cache) and the evaluation fails: the rerun resumes from the
    last epoch's checkpoint in the run folder, trains no step, and ends `done`."""
    import errno

    from rftbench import run as runner
    from rftbench import utils

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(utils, "save_tensors_atomic", refuse)
    steps, real_step, real_evaluate = [], train.accumulate_gradients, runner.evaluate
    monkeypatch.setattr(train, "accumulate_gradients", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    cfg = make_cfg("method=ft", "budget.epochs=2", f"paths.cache={tmp_path / 'cache'}")
    with pytest.raises(RuntimeError, match="disk full"):
        execute(cfg)
    assert steps and run_folder(cfg).status == "failed" and list(run_folder(cfg).path.rglob("*.pt"))
    steps.clear()
    monkeypatch.setattr(runner, "evaluate", real_evaluate)
    assert execute(cfg) == "done" and steps == []  # resumed after the last epoch: nothing trained again
    assert not list(run_folder(cfg).path.rglob("*.pt"))


def test_a_read_only_bind_mounted_cache_works(make_cfg, tmp_path, caplog):
    """A real read-only file system (a bind mount; needs root and mount rights, else skipped)."""
    import subprocess

    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root and mount rights)")
    try:
        with caplog.at_level(logging.WARNING, logger="rftbench"):
            _ft_then_wise_on(make_cfg, ro)
        assert "Read-only file system" in caplog.text
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_imagenet_with_val_per_class_0_names_the_key_before_training(make_cfg, tmp_path):
    from test_imagenet import build, write_imagenet

    from rftbench.validate import check_suite

    write_imagenet(tmp_path, val_per_class=2)
    suite = build(tmp_path, val_per_class=0)  # the builder itself accepts it: no val split
    cfg = make_cfg("suite=imagenet", "backbone=resnet18", "suite.build.val_per_class=0", experiment=None)
    with pytest.raises(ConfigError, match=r"suite imagenet built no val split with images .*suite.build.val_per_class"):
        check_suite(cfg, suite)


def test_a_flat_imagenet_val_fails_before_training_and_the_sorted_tree_runs(make_cfg, tmp_path, trainings):
    from test_imagenet import WNIDS, write_imagenet

    data = tmp_path / "data"
    write_imagenet(data, val_per_class=2)
    val = data / "imagenet/val"
    for wnid in WNIDS.values():  # unsort: every image straight in val/, as the official tarball unpacks
        for f in sorted((val / wnid).iterdir()):
            f.rename(val / f"{wnid}_{f.name}")
        (val / wnid).rmdir()
    cfg = make_cfg(*IMAGENET, f"paths.data={data}", experiment=None)
    with pytest.raises(FileNotFoundError, match=rf"{val}: the images lie directly in the folder, not in one folder "
                                                rf"per class \(expected {val}/n01440764/<image>\)"):
        execute(cfg)
    failed_before_training(cfg, trainings)
    for f in sorted(val.iterdir()):  # sorted into synset folders
        wnid, name = f.name.split("_", 1)
        (val / wnid).mkdir(exist_ok=True)
        f.rename(val / wnid / name)
    assert execute(cfg) == "done"


def test_imagenet_without_a_val_split_fails_before_training_naming_the_key(make_cfg, tmp_path, trainings):
    from test_imagenet import write_imagenet

    write_imagenet(tmp_path / "data", val_per_class=2)
    cfg = make_cfg(*IMAGENET, f"paths.data={tmp_path / 'data'}", "suite.build.val_per_class=0", experiment=None)
    with pytest.raises(ConfigError, match=r"suite imagenet built no val split with images .*suite.build.val_per_class"):
        execute(cfg)
    failed_before_training(cfg, trainings)
    assert execute(make_cfg(*IMAGENET, f"paths.data={tmp_path / 'data'}", experiment=None)) == "done"


def _other_architecture(path: Path) -> str:
    import timm

    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    return r"backbone.checkpoint=.* does not fit the backbone .*unexpected keys \(e.g. "


def _pickled_module(path: Path) -> str:
    torch.save(torch.nn.Linear(2, 2), path)
    return r"backbone.checkpoint=.* is refused by torch.load\(weights_only=True\)"


@pytest.mark.parametrize("write", [_other_architecture, _pickled_module])
def test_a_bad_checkpoint_fails_the_run_before_training_in_one_line(make_cfg, tmp_path, trainings, write):
    from rftbench.backbones import CheckpointError

    path = tmp_path / "weights.pt"
    message = write(path)
    cfg = make_cfg("method=ft", f"backbone.checkpoint={path}")
    with pytest.raises(CheckpointError, match=message) as exc:
        execute(cfg)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 800
    failed_before_training(cfg, trainings)
    assert execute(make_cfg("method=ft")) == "done"  # without the wrong file (its training may come from the cache)


def test_rftbench_cache_pointing_to_a_file_is_one_error_naming_it(tmp_path, monkeypatch, no_training):
    from hydra import compose, initialize_config_dir

    from rftbench.identity import CONFIG_DIR

    afile = tmp_path / "cachefile"
    afile.write_text("x")
    monkeypatch.setenv("RFTBENCH_CACHE", str(afile))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tiny", f"paths.runs={tmp_path / 'runs'}", "device=cpu"])
    with pytest.raises(ConfigError, match=rf"^paths.cache \(\$RFTBENCH_CACHE\) = {afile} is a file; it must be"):
        execute(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_non_ascii_path_needs_hydra_quotes_as_the_readme_says(tmp_path, capsys):
    from rftbench.data.__main__ import main

    data = tmp_path / "dätä"
    assert main(["verify", "suite=domainnet", f"paths.data={data}"]) == 2  # Hydra's lexer stops at 'ä'
    assert capsys.readouterr().err.startswith("Error: OverrideParseException: LexerNoViableAltException")
    for quoted in (f"paths.data='{data}'", f'paths.data="{data}"'):
        assert main(["verify", "suite=domainnet", quoted]) == 1  # parsed: the tree is only missing
        assert str(data / "domainnet") in capsys.readouterr().out
