"""Backbones: normalisation inside, checkpoints, torchvision/timm/RobustBench sources, CIFAR files."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from rftbench.backbones import create_backbone
from rftbench.data.cifar import build_cifar, read_cifar
from rftbench.run import CONFIG_DIR, execute, run_folder

DIGITS = dict(name="resnet10t", kwargs=dict(channels=(32, 64, 128, 256), stem_width=16))


def test_normalisation_is_inside_the_model():
    m = create_backbone(num_classes=5, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **DIGITS).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.features(x), m.body((x - 0.5) / 0.25))
        assert torch.equal(m(x), m.head(m.features(x)))


@pytest.mark.parametrize("raw", [False, True])
def test_checkpoint_round_trip(tmp_path, raw):
    torch.manual_seed(0)
    src = create_backbone(num_classes=7, **DIGITS).eval()
    path = tmp_path / "w.safetensors"
    state = src.state_dict()
    if raw:  # a state dict of the library model itself (timm keys, classifier as fc)
        state = {k.removeprefix("body."): v for k, v in state.items() if not k.startswith("normalize.")}
        state |= {"fc.weight": src.head.weight, "fc.bias": src.head.bias}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    dst = create_backbone(num_classes=7, checkpoint=str(path), **DIGITS).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.checkpoint"):
        create_backbone(num_classes=3, checkpoint=str(tmp_path / "none.safetensors"), **DIGITS)


def test_torchvision_source_and_unknown_source():
    m = create_backbone("resnet18", source="torchvision", num_classes=4)
    assert m.head.out_features == 4 and m.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="timm, torchvision, robustbench"):
        create_backbone("resnet18", source="nope")


NO_SEEN = {"names": [], "severity": 5, "n_val": None, "seed": 3}  # suite.build.seen_corruptions turned off


def write_cifar10(root: Path, n_train_per_batch: int = 10, n_test: int = 20, seed: int = 0) -> None:
    """Files in the exact python-pickle layout of cifar-10-batches-py (tiny)."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in np.arange(n) % 10], b"batch_label": name.encode()}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_cifar_reader_matches_the_pickles(tmp_path):
    write_cifar10(tmp_path)
    data = read_cifar(tmp_path, "cifar10")
    assert data["train"][0].shape == (50, 32, 32, 3) and data["test"][0].shape == (20, 32, 32, 3)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][3]
    assert np.array_equal(data["test"][0][3].transpose(2, 0, 1).reshape(-1), raw)
    suite = build_cifar(root=str(tmp_path), dataset="cifar10", seed=0, val_fraction=0.2, corruption_root=None,
                        corruptions=[], severities=[], corruption_n=None, cifar10_1_root=None,
                        seen_corruptions=NO_SEEN)
    assert len(suite.train) == 40 and len(suite.val) == 10 and not suite.train.in_memory
    x, _ = suite["test"].dataset[3]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_robustbench_backbone_runs_on_cifar10(make_cfg, tmp_path):
    """backbone=robustbench/<dataset>/<threat>/<name> loads a local zoo checkpoint, keeps its head."""
    from rftbench.attacks import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Hendrycks2020AugMix_WRN"  # WideResNet-40-2, 2.2M parameters
    assert (Path(CONFIG_DIR) / "backbone/robustbench/cifar10/corruptions" / f"{name}.yaml").exists()
    torch.manual_seed(0)
    ref = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.corruptions][name]["model"]()
    ckpt = tmp_path / "models" / "cifar10" / "corruptions" / f"{name}.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt)
    write_cifar10(tmp_path / "data" / "cifar10")
    cfg = make_cfg(f"backbone=robustbench/cifar10/corruptions/{name}", "suite=cifar10", "method=zeroshot",
                   f"paths.data={tmp_path / 'data'}", f"paths.models={tmp_path / 'models'}",
                   "suite.build.corruptions=[]", "eval.adversarial.enabled=false", experiment=None)
    assert execute(cfg) == "done"
    m = pd.read_csv(run_folder(cfg).path / "metrics.csv")
    acc = m[(m["split"] == "test") & (m["metric"] == "acc")]["value"].item()
    x, y = read_cifar(tmp_path / "data" / "cifar10")["test"]
    with torch.no_grad():
        expected = (ref.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1)
                    == torch.from_numpy(y)).float().mean().item()
    assert acc == pytest.approx(expected)
