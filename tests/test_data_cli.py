"""`python -m rftbench.data verify` on partial trees lists exactly what is missing; nothing downloads."""
from __future__ import annotations

from rftbench.data import imagenet
from rftbench.data.__main__ import main
from test_domainnet import write_domainnet
from test_imagenet import write_imagenet


def checks(capsys, *args):
    rc = main(["verify", *args])
    lines = capsys.readouterr().out.splitlines()
    return rc, {l.split()[1]: l for l in lines[1:-1]}, lines[-1]


def test_verify_partial_imagenet_lists_exactly_what_is_missing(tmp_path, capsys):
    write_imagenet(tmp_path, val_per_class=2)  # no ImageNet-A, tiny counts, no ImageNet-C
    rc, rows, total = checks(capsys, "suite=imagenet", f"paths.data={tmp_path}",
                             "suite.build.corruptions=[fog]", "suite.build.severities=[1]")
    assert rc == 1
    assert rows["ood/imagenet_a"].startswith("missing") and str(tmp_path / "imagenet-a") in rows["ood/imagenet_a"]
    assert "natural-adv-examples" in rows["ood/imagenet_a"]
    assert rows["test"].startswith("incomplete") and "8/50000" in rows["test"]
    assert rows["ood/imagenet_r"].startswith("incomplete") and "6/30000" in rows["ood/imagenet_r"]
    assert rows["ood/corruption/fog/1"].startswith("missing") and "zenodo" in rows["ood/corruption/fog/1"]
    assert sorted(k for k, v in rows.items() if v.startswith("missing")) == ["ood/corruption/fog/1", "ood/imagenet_a",
                                                                             "ood/objectnet"]
    assert total == "0 found, 3 missing, 5 incomplete"


def test_verify_domainnet_counts_from_split_files(tmp_path, capsys):
    write_domainnet(tmp_path / "domainnet", n_train=2, n_test=1, domains=("real", "sketch", "clipart"))
    (tmp_path / "domainnet/real/airplane/img_0.jpg").unlink()
    rc, rows, _ = checks(capsys, "suite=domainnet", f"paths.data={tmp_path}")
    assert rc == 1
    assert rows["real_train"].startswith("incomplete") and "5/6" in rows["real_train"]
    assert rows["real_test"].startswith("found") and rows["sketch_test"].startswith("found")
    assert rows["painting_test"].startswith("missing") and "painting_test.txt" in rows["painting_test"]
    assert rows["infograph_test"].startswith("missing")


def test_verify_ct_transfer_and_complete_tree(tmp_path, capsys):
    from test_transfer import write_dtd

    rc, rows, _ = checks(capsys, "suite=ct_transfer/dtd", f"paths.data={tmp_path}")
    assert rc == 1 and set(rows) == {"dtd/train", "dtd/val", "dtd/test"}
    assert "download suite=ct_transfer/dtd" in rows["dtd/val"]
    write_dtd(tmp_path / "ct_transfer")
    rc, rows, total = checks(capsys, "suite=ct_transfer/dtd", f"paths.data={tmp_path}")
    assert rc == 0 and total == "3 found, 0 missing, 0 incomplete"


def test_usage(capsys):
    assert main([]) == 2 and "verify" in capsys.readouterr().err
    assert imagenet.PARTS["test"].expected == 50_000 and imagenet.PARTS["ood/imagenet_a"].expected == 7_500


def test_rftbench_data_is_the_console_command(tmp_path):
    """`rftbench data ...` (the installed console script) is `python -m rftbench.data ...`."""
    import subprocess
    import sys

    code = "import sys; from rftbench.run import main; sys.argv = ['rftbench', 'data']; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: python -m rftbench.data {verify,download}" in out.stderr
    code = ("import sys; from rftbench.run import main; "
            f"sys.argv = ['rftbench', 'data', 'verify', 'suite=domainnet', 'paths.data={tmp_path}']; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "missing" in out.stdout


def test_verify_stanford_cars_without_its_test_annotations(tmp_path, capsys):
    """A partial Stanford Cars tree: train found with its count; test missing, with the by-hand source."""
    from test_transfer import write_stanford_cars

    write_stanford_cars(tmp_path / "ct_transfer", test=False)
    rc, rows, total = checks(capsys, "suite=ct_transfer/stanford_cars", f"paths.data={tmp_path}")
    assert rc == 1 and set(rows) == {"stanford_cars/train", "stanford_cars/test"}
    assert rows["stanford_cars/train"].startswith("found") and " 12/? " in rows["stanford_cars/train"]
    assert rows["stanford_cars/test"].startswith("missing") and "cannot download" in rows["stanford_cars/test"]
    assert "rftbench.data download" not in rows["stanford_cars/test"] and total == "1 found, 1 missing, 0 incomplete"


def test_verify_recognises_a_flat_imagenet_val_and_says_how_to_sort_it(tmp_path, capsys):
    import shutil

    from test_imagenet import write_images

    write_imagenet(tmp_path, val_per_class=2)
    val = tmp_path / "imagenet/val"
    shutil.rmtree(val)
    write_images(val, 5)  # ILSVRC2012_val_*.JPEG straight in val/, as the official tarball unpacks
    rc, rows, total = checks(capsys, "suite=imagenet", f"paths.data={tmp_path}", "suite.build.corruptions=[]")
    assert rc == 1 and rows["test"].startswith("unsorted") and "one folder per synset" in rows["test"]
    assert total.endswith(", 1 unsorted")


def test_hidden_folders_and_appledouble_files_are_not_data(tmp_path, capsys):
    from test_imagenet import WNIDS, build, write_images

    write_imagenet(tmp_path, val_per_class=2)
    wnid = WNIDS[0]
    (tmp_path / "imagenet/val/.ipynb_checkpoints").mkdir()          # a hidden folder: not a class
    (tmp_path / "imagenet/val" / wnid / "._img_0.JPEG").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    write_images(tmp_path / "imagenet/train" / ".hidden", 1)
    suite = build(tmp_path)  # before: "folders ['.ipynb_checkpoints'] are not classes of this dataset"
    assert len(suite["test"]) == 8  # 4 classes x 2, the ._ file not counted
    rc, rows, _ = checks(capsys, "suite=imagenet", f"paths.data={tmp_path}", "suite.build.corruptions=[]")
    assert "8/50000" in rows["test"]


def test_an_unreadable_image_names_the_file(tmp_path):
    import pytest
    from PIL import Image

    from rftbench.data.folders import ImageFileError, ImageFiles

    good, cut, empty = tmp_path / "good.jpg", tmp_path / "cut.jpg", tmp_path / "empty.jpg"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(good)
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated JPEG
    empty.write_bytes(b"")
    files = ImageFiles([(str(good), 0), (str(cut), 1), (str(empty), 2)])
    assert files[0][0].size == (32, 32)
    for i, path in ((1, cut), (2, empty)):
        with pytest.raises(ImageFileError, match=rf"cannot read image {path}: .*replace or remove the file"):
            files[i]
    # through a DataLoader worker (the streamed suites' path): still one line naming the file
    import torch

    loader = torch.utils.data.DataLoader(ImageFiles([(str(cut), 1)]), num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(ImageFileError) as exc:
        next(iter(loader))
    assert str(exc.value).startswith(f"cannot read image {cut}: ") and "\n" not in str(exc.value)


def test_verify_deep_decodes_every_file_and_names_the_unreadable_ones_with_their_split(tmp_path, capsys):
    from test_imagenet import WNIDS

    write_imagenet(tmp_path, val_per_class=2)
    cut = tmp_path / "imagenet/val" / WNIDS[1] / "img_0.JPEG"
    cut.write_bytes(cut.read_bytes()[:60])                       # truncated
    empty = tmp_path / "imagenet-r" / WNIDS[2] / "img_1.jpg"
    empty.write_bytes(b"")                                       # zero bytes
    rc = main(["verify", "--deep", "suite=imagenet", f"paths.data={tmp_path}", "suite.build.corruptions=[]",
               "suite.build.ood=[imagenet_r]", "suite.build.val_per_class=1", f"paths.cache={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = [ln for ln in out.splitlines() if ln.startswith("unreadable")]
    assert len(lines) == 2 and out.rstrip().endswith("deep check: 2 unreadable image file(s)")
    assert any(ln.split()[1] == "test" and str(cut) in ln for ln in lines)
    assert any(ln.split()[1] == "ood/imagenet_r" and str(empty) in ln for ln in lines)


def test_a_streamed_split_names_the_unreadable_file_and_its_split(tmp_path):
    import pytest
    from PIL import Image

    from rftbench.data.base import Split, batches
    from rftbench.data.folders import ImageFileError, ImageFiles

    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    Image.new("RGB", (8, 8)).save(good)
    cut.write_bytes(good.read_bytes()[:40])
    import torch
    import torchvision.transforms.v2 as T

    split = Split("ood/sketch", "ood", dataset=ImageFiles([(str(good), 0), (str(cut), 1)]),
                  transform=T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)]))
    for workers in (0, 1):
        with pytest.raises(ImageFileError) as exc:
            list(batches(split, 2, num_workers=workers))
        assert str(exc.value).startswith(f"cannot read image {cut}: ") and str(exc.value).endswith("(split ood/sketch)")
