"""suite=domainnet on a tiny tree in the official layout (domain folders + split files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rftbench.data.domainnet import build_domainnet
from test_imagenet import write_images
from test_suites import leaderboard_row, run_done

CLASSES = ["aircraft_carrier", "airplane", "alarm_clock"]


def write_domainnet(root: Path, n_train: int = 10, n_test: int = 4,
                    domains=("real", "sketch", "painting", "infograph", "clipart")) -> None:
    for d in domains:
        lines = {"train": [], "test": []}
        for label, c in enumerate(CLASSES):
            write_images(root / d / c, n_train + n_test, "jpg", seed=label)
            files = sorted(p.name for p in (root / d / c).iterdir())
            lines["train"] += [f"{d}/{c}/{f} {label}" for f in files[:n_train]]
            lines["test"] += [f"{d}/{c}/{f} {label}" for f in files[n_train:]]
        for part, ls in lines.items():
            (root / f"{d}_{part}.txt").write_text("\n".join(ls) + "\n")


def test_domainnet_splits(tmp_path):
    write_domainnet(tmp_path)
    suite = build_domainnet(str(tmp_path), seed=0, cache_dir="", id_domain="real",
                            ood_domains=["sketch", "painting", "infograph", "clipart"], val_fraction=0.2)
    assert suite.num_classes == 345 and suite.class_names[:3] == CLASSES
    assert len(suite.train) == 24 and len(suite.val) == 6 and len(suite["test"]) == 12
    assert suite.val.labels.bincount().tolist() == [2, 2, 2]
    assert sorted(k for k in suite.splits if k.startswith("ood/")) == ["ood/clipart", "ood/infograph",
                                                                       "ood/painting", "ood/sketch"]
    assert all(len(suite[f"ood/{d}"]) == 12 and suite[f"ood/{d}"].shift == "domain" for d in ["sketch", "clipart"])
    assert "/sketch/" in suite["ood/sketch"].dataset.samples[0][0]
    other = build_domainnet(str(tmp_path), seed=1, cache_dir="", id_domain="real", ood_domains=[], val_fraction=0.2)
    assert other.val.dataset.samples != suite.val.dataset.samples


def test_domainnet_missing_images_name_the_path(tmp_path):
    write_domainnet(tmp_path, domains=("real",))
    next((tmp_path / "real" / "airplane").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="real/airplane"):
        build_domainnet(str(tmp_path), seed=0, cache_dir="", id_domain="real", ood_domains=[], val_fraction=0.2)
    write_domainnet(tmp_path / "b", domains=("real",))
    with pytest.raises(FileNotFoundError, match="sketch_test.txt"):
        build_domainnet(str(tmp_path / "b"), seed=0, cache_dir="", id_domain="real", ood_domains=["sketch"], val_fraction=0.2)


def test_domainnet_runs_end_to_end(make_cfg, tmp_path, single_thread):
    write_domainnet(tmp_path / "data" / "domainnet", n_train=6, n_test=17)
    m = run_done(make_cfg, "suite=domainnet", f"paths.data={tmp_path / 'data'}")
    assert {"test", "ood/sketch", "ood/clipart", "ood/adversarial/Linf"} <= set(m["split"])
    assert leaderboard_row(tmp_path, "domainnet")
