"""suite=imagenet on a tiny tree in the releases' exact layouts (synset folders, V2's index folders,
ImageNet-R/A's 200 synsets, ImageNet-Sketch's sketch/ folder, ObjectNet's release: test_objectnet.py),
and its headline OOD mean over WiSE-FT's five shifts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rftbench.data import imagenet
from rftbench.data.base import masked
from rftbench.evaluate import summary_rows
from test_suites import leaderboard_row, run_done

I = Path(__file__).resolve().parents[1] / "src/rftbench/data"


def write_images(folder: Path, n: int, ext: str = "JPEG", size=(20, 16), seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img_{i}.{ext}")


# standard indices 1 (goldfish) and 2 (great white shark): in ImageNet-R; 15 (robin): ImageNet-A only; 0: neither
WNIDS = {i: imagenet.synsets()[i] for i in (0, 1, 2, 15)}


def write_imagenet(root: Path, val_per_class: int = 13, with_a: bool = False) -> None:
    for idx, wnid in WNIDS.items():
        write_images(root / "imagenet/train" / wnid, 4, seed=idx)
        write_images(root / "imagenet/val" / wnid, val_per_class, seed=100 + idx)
        write_images(root / "imagenetv2-matched-frequency-format-val" / str(idx), 2, "jpeg", seed=200 + idx)
        write_images(root / "imagenet-sketch/sketch" / wnid, 1, seed=300 + idx)
    for idx in (1, 2):
        write_images(root / "imagenet-r" / WNIDS[idx], 3, "jpg", seed=400 + idx)
    if with_a:
        write_images(root / "imagenet-a" / WNIDS[15], 2, "jpg", seed=500)


def test_shipped_class_lists():
    syn = imagenet.synsets()
    assert len(syn) == 1000 == len(set(syn)) == len(imagenet.class_names())
    assert syn[0] == "n01440764" and syn[-1] == "n15075141" and imagenet.class_names()[1] == "goldfish"
    for k in "ra":
        idx = imagenet.subset_indices(k)
        assert len(idx) == 200 == len(set(idx))
    # timm's independent copies of the ImageNet-R/A index lists
    info = Path(__import__("timm").__file__).parent / "data/_info"
    for k in "ra":
        assert imagenet.subset_indices(k) == [int(v) for v in (info / f"imagenet_{k}_indices.txt").read_text().split()]
    assert 1 in imagenet.subset_indices("r") and 15 not in imagenet.subset_indices("r")
    assert 15 in imagenet.subset_indices("a") and 0 not in imagenet.subset_indices("a")


def build(root, **kw):
    args = dict(root=str(root), seed=0, cache_dir="", val_per_class=1,
                ood=list(imagenet.OOD), corruption_root=None, corruptions=[], severities=[1], corruption_n=5000)
    return imagenet.build_imagenet(**(args | kw))


def test_imagenet_splits_labels_masks_and_missing_parts(tmp_path, caplog):
    write_imagenet(tmp_path, val_per_class=2)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        suite = build(tmp_path)
    warnings = [m for m in caplog.messages if "skipped" in m]
    assert len(warnings) == 2 and str(tmp_path / "imagenet-a") in warnings[0]
    assert str(tmp_path / "objectnet-1.0") in warnings[1] and "objectnet.dev" in warnings[1]
    assert suite.num_classes == 1000 and len(suite.class_names) == 1000
    assert len(suite.train) == 12 and len(suite.val) == 4 and len(suite["test"]) == 8
    assert sorted(suite.val.labels.tolist()) == [0, 1, 2, 15]  # one of each class, standard indices
    assert sorted(set(suite.train.labels.tolist())) == [0, 1, 2, 15]
    assert not set(map(tuple, suite.train.dataset.samples)) & set(map(tuple, suite.val.dataset.samples))
    # the val draw is seeded
    assert build(tmp_path).val.dataset.samples == suite.val.dataset.samples
    assert build(tmp_path, seed=1).val.dataset.samples != suite.val.dataset.samples
    v2 = suite["ood/imagenet_v2"]
    assert len(v2) == 8 and sorted(set(v2.labels.tolist())) == [0, 1, 2, 15]
    r = suite["ood/imagenet_r"]
    assert r.class_mask == imagenet.subset_indices("r") and sorted(set(r.labels.tolist())) == [1, 2]
    assert len(suite["ood/imagenet_sketch"]) == 4
    assert "ood/imagenet_a" not in suite.splits
    assert suite.meta["ood_missing"] == ["ood/imagenet_a", "ood/objectnet"]
    assert suite.meta["ood_evaluated"] == ["ood/imagenet_v2", "ood/imagenet_r", "ood/imagenet_sketch"]
    x, y = suite["test"].dataset[0]
    assert isinstance(x, Image.Image) and y == 0
    assert build(tmp_path, val_per_class=0).splits.keys() >= {"train", "test"}
    assert "val" not in build(tmp_path, val_per_class=0).splits


def test_masked_logits_choose_among_the_200_classes(tmp_path):
    write_imagenet(tmp_path, val_per_class=1, with_a=True)
    a = build(tmp_path)["ood/imagenet_a"]
    logits = torch.zeros(2, 1000)
    logits[:, 0] = 10.0  # class 0 is not an ImageNet-A class: ignored under the mask
    logits[:, 15] = 5.0
    out = masked(logits, a)
    assert (out.argmax(1) == 15).all() and torch.isinf(out[:, 0]).all()
    assert torch.allclose(out.softmax(1)[:, imagenet.subset_indices("a")].sum(1), torch.ones(2))


def test_unknown_folder_is_a_clear_error(tmp_path):
    write_imagenet(tmp_path, val_per_class=1)
    (tmp_path / "imagenet/val/cat").mkdir()
    with pytest.raises(ValueError, match="not classes"):
        build(tmp_path)


FIVE = ["ood/imagenet_v2", "ood/imagenet_r", "ood/imagenet_sketch", "ood/objectnet", "ood/imagenet_a"]


def acc_rows(values: dict[str, float]) -> list[dict]:
    return [{"split": s, "shift": "natural", "corruption": None, "severity": None, "metric": "acc", "value": v}
            for s, v in values.items()]


def test_headline_mean_is_over_exactly_the_declared_splits(caplog):
    accs = dict(zip(FIVE, [0.7, 0.6, 0.5, 0.4, 0.3])) | {"ood/corruption/fog/1": 0.9}
    rows = acc_rows(accs)
    rows[-1].update(shift="corruption", corruption="fog", severity=1)
    out = {(r["split"], r["metric"]): r for r in summary_rows(rows, FIVE)}
    assert out["ood", "acc_mean"]["value"] == pytest.approx(0.5)  # ImageNet-C is not one of the five
    assert json.loads(out["ood", "acc_mean"]["detail"]) == {"splits": FIVE, "missing": []}
    assert out["ood/corruption", "acc_mean"]["value"] == pytest.approx(0.9)
    assert out["ood", "acc_worst"]["value"] == pytest.approx(0.3)
    # without a declared headline: the mean over the OOD splits and the corruption mean, as before
    plain = {(r["split"], r["metric"]): r["value"] for r in summary_rows(rows)}
    assert plain["ood", "acc_mean"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.4 + 0.3 + 0.9) / 6)
    # ObjectNet missing: no headline over four shifts; the mean of the four is named by its splits
    four = [r for r in rows if r["split"] != "ood/objectnet"]
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        out = {(r["split"], r["metric"]): r for r in summary_rows(four, FIVE)}
    assert ("ood", "acc_mean") not in out
    partial = out["ood/mean/imagenet_v2+imagenet_r+imagenet_sketch+imagenet_a", "acc_mean"]
    assert partial["value"] == pytest.approx((0.7 + 0.6 + 0.5 + 0.3) / 4)
    assert json.loads(partial["detail"])["missing"] == ["ood/objectnet"]
    assert any("ood/objectnet not evaluated" in m for m in caplog.messages)


def test_imagenet_runs_end_to_end(make_cfg, tmp_path, single_thread):
    from test_objectnet import write_objectnet

    write_imagenet(tmp_path / "data", with_a=True)
    write_objectnet(tmp_path / "data" / "objectnet-1.0")
    m = run_done(make_cfg, "suite=imagenet", f"paths.data={tmp_path / 'data'}", "suite.build.val_per_class=1",
                 "suite.build.corruptions=[]")
    assert {"test", *FIVE, "ood/adversarial/Linf"} <= set(m["split"])
    acc = m[m["metric"] == "acc"].set_index("split")["value"]
    headline = m[(m["split"] == "ood") & (m["metric"] == "acc_mean")]
    assert headline["value"].item() == pytest.approx(acc[FIVE].mean())
    assert json.loads(headline["detail"].item())["splits"] == FIVE
    assert leaderboard_row(tmp_path, "imagenet")
