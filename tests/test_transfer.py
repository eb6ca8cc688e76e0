"""suite=ct_transfer/<name>: tiny trees in the files each torchvision class reads (download=False)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rftbench.data.transfer import SPECS, build_transfer
from test_imagenet import write_images
from test_suites import leaderboard_row, run_done


def build(root, name, seed=0):
    return build_transfer(str(root), name, seed=seed, cache_dir="", val_fraction=0.25, test_fraction=0.25,
                          split_seed=0)


def write_flowers102(root: Path, monkeypatch) -> None:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = np.repeat([1, 2, 3], 6)  # 18 images, 3 classes (1-based, as imagelabels.mat)
    (base / "jpg").mkdir(parents=True)
    for i in range(1, 19):
        write_images(base / "jpg", 1)
        (base / "jpg" / "img_0.JPEG").rename(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, 19).reshape(3, 6)  # per class: 2 train, 2 val, 2 test
    savemat(base / "setid.mat", {"trnid": ids[:, :2].ravel(), "valid": ids[:, 2:4].ravel(), "tstid": ids[:, 4:].ravel()})
    # the release's md5 sums cannot match tiny files: only the checksum is bypassed
    monkeypatch.setattr("torchvision.datasets.flowers102.check_integrity", lambda *a, **k: True)


def write_dtd(root: Path) -> None:
    data = root / "dtd" / "dtd"
    for cls in ("banded", "blotchy"):
        write_images(data / "images" / cls, 6, "jpg")
    (data / "labels").mkdir(parents=True)
    for part, files in (("train", (0, 1)), ("val", (2, 3)), ("test", (4, 5))):
        lines = [f"{c}/img_{i}.jpg" for c in ("banded", "blotchy") for i in files]
        (data / "labels" / f"{part}1.txt").write_text("\n".join(lines) + "\n")


def write_food101(root: Path) -> None:
    base = root / "food-101"
    meta = {"train": {}, "test": {}}
    for cls in ("apple_pie", "baby_back_ribs"):
        write_images(base / "images" / cls, 8, "jpg")
        meta["train"][cls] = [f"{cls}/img_{i}" for i in range(6)]
        meta["test"][cls] = [f"{cls}/img_{i}" for i in range(6, 8)]
    (base / "meta").mkdir()
    for part, d in meta.items():
        (base / "meta" / f"{part}.json").write_text(json.dumps(d))


def write_pets(root: Path) -> None:
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lines = {"trainval": [], "test": []}
    for label, breed in enumerate(("Abyssinian", "beagle"), 1):
        for i in range(6):
            write_images(base / "images", 1)
            (base / "images" / "img_0.JPEG").rename(base / "images" / f"{breed}_{i}.jpg")
            lines["trainval" if i < 4 else "test"].append(f"{breed}_{i} {label} {label} 1")
    for part, ls in lines.items():
        (base / "annotations" / f"{part}.txt").write_text("\n".join(ls) + "\n")


def write_eurosat(root: Path) -> None:
    for cls in ("AnnualCrop", "Forest", "River"):
        write_images(root / "eurosat" / "2750" / cls, 8, "jpg", size=(64, 64))


def write_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_every_ct_transfer_dataset_has_a_config():
    configs = Path(__file__).resolve().parents[1] / "configs/suite/ct_transfer"
    assert sorted(p.stem for p in configs.glob("*.yaml")) == sorted(SPECS)


def test_flowers102_official_splits(tmp_path, monkeypatch):
    write_flowers102(tmp_path, monkeypatch)
    s = build(tmp_path, "flowers102")
    assert (len(s.train), len(s.val), len(s["test"])) == (6, 6, 6) and s.num_classes == 102
    assert s.val.labels.tolist() == [0, 0, 1, 1, 2, 2] and s.meta["official_val"]
    assert build(tmp_path, "flowers102", seed=1).val.dataset.indices == s.val.dataset.indices  # official


def test_dtd_official_splits(tmp_path):
    write_dtd(tmp_path)
    s = build(tmp_path, "dtd")
    assert (len(s.train), len(s.val), len(s["test"])) == (4, 4, 4)
    assert s.class_names == ["banded", "blotchy"]
    assert s["test"].labels.tolist() == [0, 0, 1, 1]


def test_food101_val_is_a_seeded_stratified_split_of_train(tmp_path):
    write_food101(tmp_path)
    s = build(tmp_path, "food101")
    assert (len(s.train), len(s.val), len(s["test"])) == (8, 4, 4)  # 6 per class, round(1.5) = 2 held out
    assert sorted(s.val.labels.tolist()) == [0, 0, 1, 1] and s.class_names == ["apple_pie", "baby_back_ribs"]
    other = build(tmp_path, "food101", seed=3)
    assert set(s.train.dataset.indices).isdisjoint(s.val.dataset.indices)
    assert [build(tmp_path, "food101").val.dataset.indices] == [s.val.dataset.indices]
    assert len(other.val) == 4 and other.val.dataset.indices != s.val.dataset.indices


def test_oxford_pet_splits(tmp_path):
    write_pets(tmp_path)
    s = build(tmp_path, "oxford_iiit_pet")
    assert (len(s.train), len(s.val), len(s["test"])) == (6, 2, 4)
    assert s["test"].labels.tolist() == [0, 0, 1, 1] and s.class_names == ["Abyssinian", "Beagle"]


def test_eurosat_fixed_test_and_seeded_val(tmp_path):
    write_eurosat(tmp_path)
    s = build(tmp_path, "eurosat")
    assert (len(s.train), len(s.val), len(s["test"])) == (12, 6, 6) and s.num_classes == 3
    other = build(tmp_path, "eurosat", seed=1)
    assert other["test"].dataset.indices == s["test"].dataset.indices  # fixed by split_seed
    assert set(s["test"].dataset.indices).isdisjoint(s.train.dataset.indices + s.val.dataset.indices)


def test_fashion_mnist_idx_files(tmp_path):
    write_fashion_mnist(tmp_path)
    s = build(tmp_path, "fashion_mnist")
    assert (len(s.train), len(s.val), len(s["test"])) == (30, 10, 20) and s.num_classes == 10
    x, y = s["test"].dataset[3]
    assert x.size == (28, 28) and y == 3


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="rftbench.data download suite=ct_transfer/dtd"):
        build(tmp_path, "dtd")
    with pytest.raises(FileNotFoundError, match="cannot download"):
        build(tmp_path, "stanford_cars")


@pytest.mark.parametrize("name", ["caltech101", "caltech256"])
def test_missing_caltech_leaves_no_empty_folders(tmp_path, name):
    """torchvision's Caltech classes create their folders before looking for the files: a failed
    open (e.g. `rftbench data verify`) removes them again."""
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{name} .*not found"):
        build(tmp_path, name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["other"]


def test_ct_transfer_runs_end_to_end(make_cfg, tmp_path, single_thread):
    write_fashion_mnist(tmp_path / "data" / "ct_transfer", n_train=100, n_test=50)
    m = run_done(make_cfg, "suite=ct_transfer/fashion_mnist", f"paths.data={tmp_path / 'data'}")
    assert {"test", "ood/adversarial/Linf"} <= set(m["split"])
    assert leaderboard_row(tmp_path, "ct_transfer/fashion_mnist")


def test_ct_transfer_experiment_sweeps_every_suite(make_cfg):
    cfg = Path(__file__).resolve().parents[1] / "configs/experiment/ct_transfer.yaml"
    import yaml

    params = yaml.safe_load(cfg.read_text())["hydra"]["sweeper"]["params"]
    assert sorted(s.removeprefix("ct_transfer/") for s in params["suite"].split(",")) == sorted(SPECS)
    assert {"lp", "ct"} <= set(params["method"].split(","))


# --- the remaining ct_transfer layouts: CIFAR pickles, FGVC-Aircraft, Stanford Cars, Country211, Caltech ---

def write_cifar(root: Path, dataset: str, labels: dict[str, list[int]], monkeypatch) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/ or cifar-100-python/ as torchvision reads them: pickled dicts with `data`
    (N, 3072) uint8 rows in CHW order and `labels` (CIFAR-10) / `fine_labels` (CIFAR-100), and the
    class names in `batches.meta`:`label_names` / `meta`:`fine_label_names`. Returns each file's data."""
    import pickle

    ten = dataset == "cifar10"
    base = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for name, ys in labels.items():
        data = rng.integers(0, 256, (len(ys), 3072), dtype=np.uint8)
        entry = {"batch_label": name, "data": data, "filenames": [f"{name}_{i}.png" for i in range(len(ys))]}
        entry.update({"labels": ys} if ten else {"fine_labels": ys, "coarse_labels": [y // 5 for y in ys]})
        (base / name).write_bytes(pickle.dumps(entry))
        out[name] = data
    meta = ({"label_names": CIFAR10_NAMES, "num_cases_per_batch": 10000, "num_vis": 3072} if ten else
            {"fine_label_names": [f"fine{i}" for i in range(100)],
             "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    (base / ("batches.meta" if ten else "meta")).write_bytes(pickle.dumps(meta))
    # the release's md5 sums cannot match tiny files: only the checksum is bypassed (a missing file still fails)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: Path(path).is_file())
    return out


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def assert_seeded_val(root, name, s):
    """val: a stratified split of train drawn by the trial seed, disjoint from train, test untouched."""
    again, other = build(root, name), build(root, name, seed=1)
    assert set(s.train.dataset.indices).isdisjoint(s.val.dataset.indices)
    assert again.val.dataset.indices == s.val.dataset.indices and not s.meta["official_val"]
    assert other.val.dataset.indices != s.val.dataset.indices and len(other.val) == len(s.val)
    assert other["test"].dataset.indices == s["test"].dataset.indices


def test_cifar10_python_pickles(tmp_path, monkeypatch):
    batches = {f"data_batch_{i}": [0, 1, 2, 3] for i in range(1, 6)}  # 5 per class over the 5 batches
    data = write_cifar(tmp_path, "cifar10", {**batches, "test_batch": [9, 8, 1, 0, 0, 1, 8, 9]}, monkeypatch)
    s = build(tmp_path, "cifar10")
    assert (len(s.train), len(s.val), len(s["test"])) == (16, 4, 8)  # round(0.25 * 5) = 1 per class held out
    assert s.num_classes == 10 and s.class_names == CIFAR10_NAMES  # label space from batches.meta
    assert sorted(s.val.labels.tolist()) == [0, 1, 2, 3] and s["test"].labels.tolist() == [9, 8, 1, 0, 0, 1, 8, 9]
    x, y = s["test"].dataset[2]  # rows are CHW planes: R (1024), G, B
    assert y == 1 and np.array_equal(np.asarray(x), data["test_batch"][2].reshape(3, 32, 32).transpose(1, 2, 0))
    full = s.train.dataset.dataset  # the 5 batches in order: image 19 is the last of data_batch_5
    assert np.array_equal(np.asarray(full[19][0]).transpose(2, 0, 1).ravel(), data["data_batch_5"][3])
    assert_seeded_val(tmp_path, "cifar10", s)


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar100", {"train": [0, 5, 99] * 4, "test": [99, 0, 5, 5]}, monkeypatch)
    s = build(tmp_path, "cifar100")
    assert (len(s.train), len(s.val), len(s["test"])) == (9, 3, 4)
    assert s.num_classes == 100 and s.class_names[99] == "fine99"  # the 100 fine classes, not the 20 coarse
    assert sorted(s.val.labels.tolist()) == [0, 5, 99] and s["test"].labels.tolist() == [99, 0, 5, 5]
    assert_seeded_val(tmp_path, "cifar100", s)


def test_cifar_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", {"data_batch_1": [0, 1], "test_batch": [0, 1]}, monkeypatch)  # 2-5 missing
    with pytest.raises(FileNotFoundError, match="cs.toronto.edu.*download suite=ct_transfer/cifar10"):
        build(tmp_path, "cifar10")


AIRCRAFT = ["A340-300", "Falcon 2000", "F/A-18"]  # variants.txt order (not sorted), names with spaces and '/'


def write_fgvc_aircraft(root: Path) -> None:
    """fgvc-aircraft-2013b/data/: variants.txt (one class a line), images_variant_{train,val,test}.txt
    ("<image id> <variant>"), images/<image id>.jpg."""
    data = root / "fgvc-aircraft-2013b" / "data"
    write_images(data / "images", 18, "jpg")
    for i in range(18):
        (data / "images" / f"img_{i}.jpg").rename(data / "images" / f"{1025794 + i:07d}.jpg")
    (data / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    for k, part in enumerate(("train", "val", "test")):  # per variant: 2 train, 2 val, 2 test
        lines = [f"{1025794 + 6 * c + 2 * k + j:07d} {v}" for c, v in enumerate(AIRCRAFT) for j in range(2)]
        (data / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")


def test_fgvc_aircraft_official_val_variant_level(tmp_path):
    write_fgvc_aircraft(tmp_path)
    s = build(tmp_path, "fgvc_aircraft")
    assert (len(s.train), len(s.val), len(s["test"])) == (6, 6, 6) and s.meta["official_val"]
    assert s.num_classes == 3 and s.class_names == AIRCRAFT  # indices follow variants.txt
    assert s.val.labels.tolist() == [0, 0, 1, 1, 2, 2] and s["test"].labels.tolist() == [0, 0, 1, 1, 2, 2]
    val_files = [Path(s.val.dataset.dataset._image_files[i]).name for i in s.val.dataset.indices]
    assert val_files[:2] == ["1025796.jpg", "1025797.jpg"]  # the ids listed in images_variant_val.txt
    assert build(tmp_path, "fgvc_aircraft", seed=1).val.dataset.indices == s.val.dataset.indices  # official
    x, y = s["test"].dataset[5]
    assert x.size == (20, 16) and y == 2


CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]


def write_stanford_cars(root: Path, test: bool = True) -> None:
    """torchvision 0.29's StanfordCars: stanford_cars/devkit/{cars_meta.mat (class_names),
    cars_train_annos.mat}, stanford_cars/cars_test_annos_withlabels.mat, cars_{train,test}/<fname>.
    The annotations are a 1xN MATLAB struct array (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class
    (1-based, uint8), fname) as in the release."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CARS)), dtype=object)
    names[0, :] = CARS
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    parts = {"train": (base / "devkit" / "cars_train_annos.mat", [3, 1, 2] * 4),
             "test": (base / "cars_test_annos_withlabels.mat", [1, 2, 3, 3])}
    for part, (mat, classes) in parts.items():
        if part == "test" and not test:
            continue
        write_images(base / f"cars_{part}", len(classes), "jpg")
        annotations = np.zeros((1, len(classes)), dtype=fields)
        for i, c in enumerate(classes):
            (base / f"cars_{part}" / f"img_{i}.jpg").rename(base / f"cars_{part}" / f"{i + 1:05d}.jpg")
            annotations[0, i] = (np.uint8(1), np.uint8(2), np.uint16(19), np.uint16(15), np.uint8(c),
                                 f"{i + 1:05d}.jpg")
        savemat(mat, {"annotations": annotations})


def test_stanford_cars_devkit_mat_files(tmp_path):
    write_stanford_cars(tmp_path)
    s = build(tmp_path, "stanford_cars")
    assert (len(s.train), len(s.val), len(s["test"])) == (9, 3, 4)
    assert s.num_classes == 3 and s.class_names == CARS  # from cars_meta.mat
    assert s["test"].labels.tolist() == [0, 1, 2, 2] and sorted(s.val.labels.tolist()) == [0, 1, 2]
    train = s.train.dataset.dataset
    assert [Path(p).name for p, _ in train._samples[:3]] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    assert [y for _, y in train._samples[:3]] == [2, 0, 1]  # class - 1
    assert_seeded_val(tmp_path, "stanford_cars", s)


COUNTRIES = ["AD", "AE", "ZW"]


def write_country211(root: Path) -> None:
    """country211/{train,valid,test}/<ISO code>/*.jpg (ImageFolder per split)."""
    for part, n in (("train", 4), ("valid", 2), ("test", 3)):
        for code in COUNTRIES:
            write_images(root / "country211" / part / code, n, "jpg")


def test_country211_official_valid_split(tmp_path):
    write_country211(tmp_path)
    s = build(tmp_path, "country211")
    assert (len(s.train), len(s.val), len(s["test"])) == (12, 6, 9) and s.meta["official_val"]
    assert s.num_classes == 3 and s.class_names == COUNTRIES
    assert s.val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert build(tmp_path, "country211", seed=1).val.dataset.indices == s.val.dataset.indices  # official


def write_caltech101(root: Path) -> None:
    """caltech101/101_ObjectCategories/<category>/image_NNNN.jpg (numbered from 1), with the
    BACKGROUND_Google folder that torchvision drops. (Annotations/ is read only for
    target_type="annotation", which the suite does not use.)"""
    cats = root / "caltech101" / "101_ObjectCategories"
    for cat, n in (("BACKGROUND_Google", 3), ("Faces", 5), ("accordion", 5), ("airplanes", 11)):
        write_images(cats / cat, n, "jpg")
        for i in range(n):
            (cats / cat / f"img_{i}.jpg").rename(cats / cat / f"image_{i + 1:04d}.jpg")
    Image.open(cats / "accordion" / "image_0002.jpg").convert("L").save(cats / "accordion" / "image_0002.jpg")


def test_caltech101_fixed_test_seeded_val(tmp_path):
    write_caltech101(tmp_path)
    s = build(tmp_path, "caltech101")
    assert s.num_classes == 3 and s.class_names == ["Faces", "accordion", "airplanes"]  # no BACKGROUND_Google
    # per class: test round(0.25 n) fixed by split_seed, then val round(0.25 rest) by the trial seed
    assert (len(s.train), len(s.val), len(s["test"])) == (12, 4, 5)
    assert sorted(s["test"].labels.tolist()) == [0, 1, 2, 2, 2] and sorted(s.val.labels.tolist()) == [0, 1, 2, 2]
    assert set(s["test"].dataset.indices).isdisjoint(s.train.dataset.indices + s.val.dataset.indices)
    assert_seeded_val(tmp_path, "caltech101", s)
    ds = s.train.dataset.dataset
    assert ds[6][1] == 1 and ds[6][0].mode == "L"  # accordion/image_0002.jpg (grayscale, as some are)
    from rftbench.transforms import to_float

    assert to_float()(ds[6][0]).shape == (3, 16, 20)  # made RGB before the model


def write_caltech256(root: Path) -> None:
    """caltech256/256_ObjectCategories/<NNN.name>/<NNN>_<MMMM>.jpg; non-.jpg entries are ignored
    (the release has a few, e.g. 198.spider/RENAME2 and a 056.dog/greg/ folder). torchvision names
    each file from the folder's position (NNN = position + 1), so the folders are 001, 002, 003...
    as in the full release (whose 257.clutter it counts as a class: 257 in all)."""
    cats = root / "caltech256" / "256_ObjectCategories"
    for k, (cat, n) in enumerate((("001.ak47", 4), ("002.american-flag", 4), ("003.backpack", 8))):
        write_images(cats / cat, n, "jpg")
        for i in range(n):
            (cats / cat / f"img_{i}.jpg").rename(cats / cat / f"{int(cat[:3]):03d}_{i + 1:04d}.jpg")
    (cats / "001.ak47" / "RENAME2").write_text("not an image")
    (cats / "002.american-flag" / "greg").mkdir()


def test_caltech256_category_folders(tmp_path):
    write_caltech256(tmp_path)
    s = build(tmp_path, "caltech256")
    assert s.num_classes == 3 and s.class_names == ["ak47", "american-flag", "backpack"]
    assert (len(s.train), len(s.val), len(s["test"])) == (8, 4, 4)  # the 16 .jpg images, the rest ignored
    assert sorted(s["test"].labels.tolist()) == [0, 1, 2, 2] and sorted(s.val.labels.tolist()) == [0, 1, 2, 2]
    assert set(s["test"].dataset.indices).isdisjoint(s.train.dataset.indices + s.val.dataset.indices)
    assert_seeded_val(tmp_path, "caltech256", s)
    x, y = s["test"].dataset[len(s["test"]) - 1]
    assert y == 2 and x.size == (20, 16)
