"""suite=domainnet (345 classes, FTP/TPGM's split files or the release's) and suite=domainnet40 (LP-FT:
SENTRY's 40 classes) on tiny trees in their exact layouts (domain folders + split files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rftbench.data import domainnet
from rftbench.data.domainnet import build_domainnet
from test_imagenet import write_images
from test_suites import leaderboard_row, run_done

CLASSES = {"aircraft_carrier": 0, "airplane": 1, "alarm_clock": 2}
SENTRY = {"airplane": 0, "ambulance": 1, "butterfly": 36}  # SENTRY's labels are not alphabetical
FIVE = ("real", "sketch", "painting", "infograph", "clipart")
FILES = {  # part -> split file name, per layout
    "tpgm": {"train": "{d}_train_{p}_percent_split.txt", "val": "{d}_val_{p}_percent_split.txt",
             "test": "{d}_test.txt"},
    "official": {"train": "{d}_train.txt", "test": "{d}_test.txt"},
    "sentry": {"train": "{d}_train_mini.txt", "test": "{d}_test_mini.txt"},
}


def write_domainnet(root: Path, n_train: int = 10, n_test: int = 4, domains=FIVE, n_val: int = 2,
                    layout: str = "tpgm", classes: dict[str, int] = CLASSES, split_root: Path | None = None,
                    percent: int = 100) -> None:
    """Images <domain>/<class>/img_<i>.jpg and the layout's split files ("<path> <label>" lines) under
    `split_root` (default: `root`). Per class: images 0..n_train-1 train, the next n_val val (tpgm
    only), the rest test."""
    split_root = split_root or root
    split_root.mkdir(parents=True, exist_ok=True)
    files = FILES[layout]
    n_val = n_val if "val" in files else 0
    for d in domains:
        lines = {part: [] for part in files}
        for c, label in classes.items():
            write_images(root / d / c, n_train + n_val + n_test, "jpg", seed=label)
            names = [f"img_{i}.jpg" for i in range(n_train + n_val + n_test)]
            cut = {"train": names[:n_train], "val": names[n_train:n_train + n_val], "test": names[n_train + n_val:]}
            for part in files:
                lines[part] += [f"{d}/{c}/{name} {label}" for name in cut[part]]
        for part, pattern in files.items():
            (split_root / pattern.format(d=d, p=percent)).write_text("\n".join(lines[part]) + "\n")


def build(root, split_files="tpgm", **kw):
    args = dict(root=str(root), seed=0, cache_dir="", split_root=str(root), classes=345, split_files=split_files,
                percent=100, id_domain="real", ood_domains=["sketch", "painting", "infograph", "clipart"],
                val_fraction=0.2)
    return build_domainnet(**(args | kw))


def names(split) -> list[str]:
    """<class>/<file> of each image of the split, sorted."""
    return sorted("/".join(Path(p).parts[-2:]) for p, _ in split.dataset.samples)


def test_tpgm_split_files_give_train_val_test_as_listed(tmp_path):
    write_domainnet(tmp_path)
    suite = build(tmp_path)
    assert suite.name == "domainnet" and suite.num_classes == 345 and suite.class_names[:3] == list(CLASSES)
    assert suite.class_names[3] == "class_3"  # a label absent from the files
    assert (len(suite.train), len(suite.val), len(suite["test"])) == (30, 6, 12)
    assert names(suite.val) == sorted(f"{c}/img_{i}.jpg" for c in CLASSES for i in (10, 11))  # the val file's
    assert names(build(tmp_path, seed=1).val) == names(suite.val)  # a file, not a draw
    assert sorted(k for k in suite.splits if k.startswith("ood/")) == ["ood/clipart", "ood/infograph",
                                                                       "ood/painting", "ood/sketch"]
    sketch = suite["ood/sketch"]
    assert len(sketch) == 12 and sketch.shift == "domain" and "/sketch/" in sketch.dataset.samples[0][0]
    assert sketch.labels.bincount().tolist() == [4, 4, 4]
    assert suite.meta["n_train"] == 30 and suite.meta["split_files"] == "tpgm" and suite.meta["percent"] == 100


def test_tpgm_percent_reads_their_reduced_files(tmp_path):
    write_domainnet(tmp_path, domains=("real",))
    write_domainnet(tmp_path / "images10", n_train=1, n_val=1, domains=("real",), split_root=tmp_path, percent=10)
    suite = build(tmp_path / "images10", split_root=str(tmp_path), percent=10, ood_domains=[])
    assert (len(suite.train), len(suite.val)) == (3, 3)
    with pytest.raises(ValueError, match="suite.build.percent=30.*1, 5, 10, 20, 50, 100"):
        build(tmp_path, percent=30)


def test_official_split_files_draw_val_from_train(tmp_path):
    write_domainnet(tmp_path, layout="official")
    suite = build(tmp_path, split_files="official")
    assert (len(suite.train), len(suite.val), len(suite["test"])) == (24, 6, 12)
    assert suite.val.labels.bincount().tolist() == [2, 2, 2]
    other = build(tmp_path, split_files="official", seed=1)
    assert names(other.val) != names(suite.val) and not set(names(suite.val)) & set(names(suite.train))
    with pytest.raises(ValueError, match="no val file: set suite.build.val_fraction"):
        build(tmp_path, split_files="official", val_fraction=None)


def test_domainnet40_sentry_classes_domains_and_checks(tmp_path):
    split_root = tmp_path / "SENTRY_splits"
    write_domainnet(tmp_path, layout="sentry", classes=SENTRY, split_root=split_root,
                    domains=("sketch", "real", "painting", "clipart"))
    kw = dict(split_root=str(split_root), classes=40, split_files="sentry", percent=None, id_domain="sketch",
              ood_domains=["real", "painting", "clipart"], val_fraction=0.2)
    suite = build(tmp_path, **kw)
    assert suite.name == "domainnet40" and suite.num_classes == 40 and len(suite.class_names) == 40
    assert [suite.class_names[y] for y in (0, 1, 36, 39)] == ["airplane", "ambulance", "butterfly", "donut"]
    assert sorted(set(suite.train.labels.tolist())) == [0, 1, 36]
    assert (len(suite.train), len(suite.val), len(suite["test"])) == (24, 6, 12)
    assert sorted(k for k in suite.splits if k.startswith("ood/")) == ["ood/clipart", "ood/painting", "ood/real"]
    with pytest.raises(ValueError, match="'infograph' is not in the sentry split files"):
        build(tmp_path, **(kw | {"ood_domains": ["infograph"]}))
    with pytest.raises(ValueError, match="classes=345 but split_files=sentry has 40"):
        build(tmp_path, **(kw | {"classes": 345}))
    line = split_root / "sketch_train_mini.txt"
    line.write_text(line.read_text().replace("sketch/airplane/img_0.jpg 0", "sketch/airplane/img_0.jpg 1"))
    with pytest.raises(ValueError, match="airplane/img_0.jpg has label 1, whose class is 'ambulance'"):
        build(tmp_path, **kw)


def test_shipped_sentry_class_list():
    classes = domainnet.sentry_classes()
    assert len(classes) == 40 == len(set(classes)) and classes[0] == "airplane" and classes[36] == "butterfly"


def test_domainnet_missing_files_name_the_path(tmp_path):
    write_domainnet(tmp_path, domains=("real",))
    next((tmp_path / "real" / "airplane").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="real/airplane"):
        build(tmp_path, ood_domains=[])
    write_domainnet(tmp_path / "b", domains=("real",))
    with pytest.raises(FileNotFoundError, match="sketch_test.txt.*PotatoTian/TPGM"):
        build(tmp_path / "b", ood_domains=["sketch"])
    (tmp_path / "b" / "real_test.txt").write_text("real/airplane/x.jpg 345\n")
    with pytest.raises(ValueError, match="real_test.txt:1: expected"):
        build(tmp_path / "b", ood_domains=[])


def test_domainnet_configs_compose(make_cfg):
    b345 = make_cfg("suite=domainnet", "paths.data=/data", experiment=None).suite.build
    assert (b345.classes, b345.split_files, b345.percent, b345.id_domain) == (345, "tpgm", 100, "real")
    assert list(b345.ood_domains) == ["sketch", "painting", "infograph", "clipart"]
    assert b345.split_root == "/data/domainnet"
    b40 = make_cfg("suite=domainnet40", "paths.data=/data", experiment=None).suite.build
    assert (b40.classes, b40.split_files, b40.id_domain, b40.split_root) == (40, "sentry", "sketch",
                                                                              "/data/domainnet/SENTRY_splits")
    assert list(b40.ood_domains) == ["real", "painting", "clipart"]


def test_domainnet_runs_end_to_end(make_cfg, tmp_path, single_thread):
    write_domainnet(tmp_path / "data" / "domainnet", n_train=6, n_val=2, n_test=17)
    m = run_done(make_cfg, "suite=domainnet", f"paths.data={tmp_path / 'data'}", "eval.adversarial.n=6",
                 "eval.adversarial.n_iter=3", "eval.adversarial.n_target_classes=1")  # a small attack: seconds
    assert {"test", "ood/sketch", "ood/clipart", "ood/adversarial/Linf"} <= set(m["split"])
    assert leaderboard_row(tmp_path, "domainnet")
