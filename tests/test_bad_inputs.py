"""Bad inputs are answered before any work, naming the key or the file: metric values that are not
finite numbers in the leaderboard, and invalid or unknown config keys in `rftbench.run.execute`."""
from __future__ import annotations

import logging
import math

import pandas as pd
import pytest

from rftbench import leaderboard as lb
from rftbench import train
from rftbench.run import execute
from rftbench.validate import ConfigError
from test_leaderboard import add_run


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


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained despite a bad config")

    monkeypatch.setattr(train, "fit", fail)


BAD = [  # overrides -> the key the error must name
    (["+eval.adversarial.eps=-1"], "eval.adversarial.eps"),
    (["+eval.foo=1"], "eval.foo"),
    (["eval.adversarial.threats=[{norm:L3,eps:0.1}]"], "eval.adversarial.threats[0].norm"),
    (["eval.adversarial.threats=[{norm:Linf,eps:-0.1}]"], "eval.adversarial.threats[0].eps"),
    (["eval.adversarial.threats=[{norm:Linf,eps:0.1,p:2}]"], "eval.adversarial.threats[0].p"),
    (["eval.adversarial.tier=fast"], "eval.adversarial.tier"),
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
