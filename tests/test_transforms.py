"""Evaluation transforms at the backbone's input spec; seeded augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rftbench.backbones import InputSpec, input_spec
from rftbench.data.base import Split, batches
from rftbench.run import CONFIG_DIR
from rftbench.transforms import eval_transform, train_transform


def backbone_cfg(name: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"backbone={name}"]).backbone


def image(h=300, w=400, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resnet50_eval_transform_is_224_with_timm_interpolation_and_crop_ratio():
    spec = input_spec(backbone_cfg("resnet50"))
    assert spec == InputSpec(224, "bicubic", 0.95)  # timm's pretrained_cfg of resnet50 (a1_in1k)
    img = image()
    out = eval_transform({"name": "center_crop"}, spec)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # shorter side to int(224 / 0.95) = 235 with bicubic, then the centre 224 x 224
    ref = TF.center_crop(TF.resize(TF.pil_to_tensor(img), 235, InterpolationMode.BICUBIC, antialias=True), 224)
    assert torch.allclose(out, ref.float() / 255, atol=1e-6)


def test_torchvision_and_config_input_specs():
    assert input_spec(backbone_cfg("tv_resnet50")) == InputSpec(224, "bilinear", 224 / 232)
    cfg = dict(backbone_cfg("resnet50"))
    cfg["input"] = {"size": 160, "interpolation": None, "crop_pct": 1.0}
    assert input_spec(cfg) == InputSpec(160, "bicubic", 1.0)
    cfg["input"] = {"size": 160, "interpolation": "lanczos", "crop_pct": 1.0}
    with pytest.raises(ValueError, match="interpolation"):
        input_spec(cfg)


class Images(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.images = [image(40, 48, seed=i) for i in range(n)]
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


@pytest.mark.parametrize("name", ["random_resized_crop", "crop_flip"])
def test_augmentation_is_seeded_per_trial(name):
    spec = InputSpec(32, "bilinear", 1.0)
    split = Split("train", "train", dataset=Images(), transform=eval_transform({"name": "resize"}, spec),
                  train_transform=train_transform({"name": name}, spec, {"name": "resize"}))

    def epoch(seed, augment=True, workers=0):
        return torch.cat([x for x, _ in batches(split, 4, shuffle=True, seed=seed, augment=augment,
                                                num_workers=workers)])

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(epoch(1), a)
    if name == "crop_flip":  # the same crops whichever process (DataLoader worker) decodes the image
        assert torch.equal(epoch(1, workers=1), a)
    # without augment (feature extraction, evaluation) the evaluation transform is used
    plain = epoch(1, augment=False)
    assert torch.equal(plain, epoch(1, augment=False)) and not torch.equal(plain, a)
