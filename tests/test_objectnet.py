"""ObjectNet on a tiny tree in the objectnet-1.0 release's layout: the class mapping read from its
`mappings/` files (the release's 113-class ObjectNet -> ImageNet table, tests/fixtures/), the
max-pooled 113-way logits, the 2 px border crop, and that images of other classes are not scored."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rftbench.data import imagenet, objectnet
from rftbench.data.base import Split
from rftbench.data.base import pooled, scored_logits
from rftbench.evaluate import split_rows

FIXTURE = Path(__file__).parent / "fixtures" / "objectnet_to_imagenet_1k.json"
# standard ImageNet indices (timm / torchvision order) of two many-to-one ObjectNet classes
ALARM_CLOCK = [409, 530]        # analog clock, digital clock
CHAIR = [423, 559, 765]         # barber chair, folding chair, rocking chair
OTHER = {"squeegee": "Squeegee", "eyeglasses": "Eyeglasses"}  # ObjectNet classes without an ImageNet class


def lemmas() -> list[str]:
    """The ImageNet class names as the release writes them (WordNet lemmas), in standard index order."""
    info = Path(__import__("timm").__file__).parent / "data/_info"
    lemma = dict(line.split("\t") for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    return [lemma[s] for s in imagenet.synsets()]


def folder_name(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower())


def write_mappings(root: Path, table: dict | None = None) -> None:
    """The four mapping files. `imagenet_to_label_2012_v2` lists the names in reversed order and
    `pytorch_to_imagenet_2012_id.json` maps each standard index to its line, as the release does with
    the ILSVRC2012_ID order."""
    table = table if table is not None else json.loads(FIXTURE.read_text())
    names = lemmas()
    folder = root / "mappings"
    folder.mkdir(parents=True, exist_ok=True)
    labels = {folder_name(label): label for label in table} | OTHER
    (folder / objectnet.FOLDER_TO_LABEL).write_text(json.dumps(labels, indent=2))
    (folder / objectnet.LABEL_TO_IMAGENET).write_text(json.dumps(table, indent=2))
    (folder / objectnet.IMAGENET_NAMES).write_text("".join(f"{n}\n" for n in reversed(names)))
    (folder / objectnet.INDEX_TO_LINE).write_text(json.dumps({str(i): 999 - i for i in range(1000)}, indent=2))


def write_png(path: Path, size=(12, 9), seed: int = 0) -> np.ndarray:
    """A PNG with a 1 px red frame around random pixels; returns its pixels (H, W, 3)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[[0, -1], :] = pixels[:, [0, -1]] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def write_objectnet(root: Path) -> dict[str, np.ndarray]:
    """objectnet-1.0/ with 2 chair images, 1 alarm-clock image and 2 squeegee images (not an ImageNet class)."""
    write_mappings(root)
    files = {"chair/a.png": 0, "chair/b.png": 1, "alarm_clock/c.png": 2, "squeegee/d.png": 3, "squeegee/e.png": 4}
    return {name: write_png(root / "images" / name, seed=seed) for name, seed in files.items()}


def test_the_release_mapping_has_113_classes_many_to_one(tmp_path):
    write_mappings(tmp_path)
    groups = objectnet.class_groups(tmp_path)
    assert len(groups) == 113 and list(groups) == sorted(groups)
    assert groups["alarm_clock"] == ALARM_CLOCK and groups["chair"] == CHAIR
    assert groups["banana"] == [954] and groups["weight__exercise_"] == [543]  # dumbbell
    # alarm clock, bicycle, chair, helmet, pen, skirt, still camera, tie, wheel
    assert sum(len(g) > 1 for g in groups.values()) == 9
    flat = [i for g in groups.values() for i in g]
    assert len(flat) == len(set(flat)) == 125 and all(0 <= i < 1000 for i in flat)
    assert not set(OTHER) & set(groups)


def test_a_name_two_imagenet_classes_share_is_an_error(tmp_path):
    write_mappings(tmp_path, {"Crane": "crane"})  # bird (134) and machine (517) are both "crane"
    with pytest.raises(ValueError, match="'Crane'.*missing or ambiguous"):
        objectnet.class_groups(tmp_path)
    (tmp_path / "mappings" / objectnet.INDEX_TO_LINE).unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_to_imagenet_2012_id.json not found"):
        objectnet.class_groups(tmp_path)


def test_max_pooled_logits_and_metrics_on_the_pooled_classes():
    split = Split("ood/objectnet", "ood", "natural", x=torch.zeros(2, 3, 4, 4), y=torch.tensor([0, 1]),
                  logit_groups=[ALARM_CLOCK, CHAIR])
    logits = torch.full((2, 1000), -5.0)
    logits[0, 530], logits[0, 409], logits[0, 765] = 2.0, 1.0, 0.5   # alarm clock wins through 530
    logits[1, 409], logits[1, 423], logits[1, 559] = 3.0, 1.0, 4.0   # chair wins through 559
    logits[:, 7] = 9.0  # a class outside both groups: never a candidate
    out = pooled(logits, split)
    assert torch.equal(out, torch.tensor([[2.0, 0.5], [3.0, 4.0]]))
    assert torch.equal(scored_logits(logits, split), out)
    rows = {r["metric"]: r["value"] for r in split_rows(split, out)}
    assert rows["acc"] == 1.0
    nll = (math.log1p(math.exp(0.5 - 2.0)) + math.log1p(math.exp(3.0 - 4.0))) / 2
    assert rows["nll"] == pytest.approx(nll, rel=1e-12)
    # a split without groups keeps its logits
    assert pooled(logits, Split("test", "test", x=torch.zeros(2, 1), y=torch.tensor([0, 1]))) is logits
    with pytest.raises(ValueError, match="not both"):
        Split("x", "ood", x=torch.zeros(1, 1), y=torch.tensor([0]), class_mask=[1], logit_groups=[[1]])


def test_objectnet_split_scores_only_mapped_classes_with_the_border_cropped(tmp_path):
    pixels = write_objectnet(tmp_path)
    split = objectnet.objectnet_split(tmp_path)
    groups = objectnet.class_groups(tmp_path)
    label = {f: k for k, f in enumerate(groups)}
    assert split.logit_groups == list(groups.values()) and len(split.logit_groups) == 113
    paths = [Path(p).relative_to(tmp_path / "images").as_posix() for p, _ in split.dataset.samples]
    assert paths == ["alarm_clock/c.png", "chair/a.png", "chair/b.png"]  # no squeegee image
    assert split.labels.tolist() == [label["alarm_clock"], label["chair"], label["chair"]]
    image, y = split.dataset[1]
    assert image.size == (12 - 4, 9 - 4) and y == label["chair"]
    assert np.array_equal(np.asarray(image), pixels["chair/a.png"][2:-2, 2:-2])  # 2 px off every side
    # subsets (e.g. a fixed attack subset) keep the groups
    assert split.subset(torch.tensor([0])).logit_groups == split.logit_groups
    (tmp_path / "images" / "not_a_class").mkdir()
    with pytest.raises(ValueError, match="not_a_class.*not ObjectNet classes"):
        objectnet.objectnet_split(tmp_path)


def test_objectnet_in_the_imagenet_suite_and_verify(tmp_path, capsys):
    from test_data_cli import checks
    from test_imagenet import build, write_imagenet

    write_imagenet(tmp_path, val_per_class=1)
    write_objectnet(tmp_path / "objectnet-1.0")
    suite = build(tmp_path, ood=["objectnet"], headline_ood=["objectnet"])
    on = suite["ood/objectnet"]
    assert on.role == "ood" and on.shift == "natural" and len(on) == 3 and on.class_mask is None
    assert suite.meta["ood_evaluated"] == ["ood/objectnet"] and suite.meta["headline_ood"] == ["ood/objectnet"]
    with pytest.raises(ValueError, match="headline_ood has unknown splits \\['objectnet_v2'\\]"):
        build(tmp_path, ood=["objectnet"], headline_ood=["objectnet_v2"])
    (tmp_path / "objectnet-1.0/mappings" / objectnet.IMAGENET_NAMES).unlink()
    rc, rows, _ = checks(capsys, "suite=imagenet", f"paths.data={tmp_path}", "suite.build.corruptions=[]")
    assert rc == 1 and rows["ood/objectnet"].startswith("incomplete") and "5/50273" in rows["ood/objectnet"]
    assert rows[f"ood/objectnet/mappings/{objectnet.IMAGENET_NAMES}"].startswith("missing")
    assert rows[f"ood/objectnet/mappings/{objectnet.LABEL_TO_IMAGENET}"].startswith("found")
    import shutil

    shutil.rmtree(tmp_path / "objectnet-1.0")
    rc, rows, _ = checks(capsys, "suite=imagenet", f"paths.data={tmp_path}", "suite.build.corruptions=[]")
    assert rows["ood/objectnet"].startswith("missing") and "objectnet.dev" in rows["ood/objectnet"]
    assert not any(k.startswith("ood/objectnet/") for k in rows)
