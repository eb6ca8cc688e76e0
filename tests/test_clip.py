"""CLIP through open_clip: image tower as a Classifier, the zero-shot head equal to open_clip's own."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rftbench import clip
from rftbench.backbones import Classifier
from rftbench.data.base import Split, Suite
from rftbench.methods.ct import apply_ct, count_relu_calls
from rftbench.run import build_model
from rftbench.train import RunContext

OPENAI_MEAN, OPENAI_STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
NAMES = ["cat", "dog", "airplane"]
# a tiny random CLIP (ResNet image tower, 1-layer text transformer) registered with open_clip
TINY = "RN-tiny-test"
TINY_CFG = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def register_tiny_clip(tmp_path_factory, name: str, cfg: dict) -> str:
    """Register an open_clip model config `name` (random weights, no download); returns the name."""
    import json

    path = tmp_path_factory.mktemp("open_clip") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory, TINY, TINY_CFG)


def named_suite(names=NAMES, upstream: str = "toy", upstream_classes=None) -> Suite:
    n = len(names)
    x, y = torch.rand(2 * n, 3, 8, 8), torch.arange(2 * n) % n
    suite = Suite("toy", n, {"train": Split("train", "train", x=x, y=y)}, upstream_classes=upstream_classes,
                  meta={"upstream": upstream})
    suite.class_names = list(names)  # Suite.class_names (issue 12) once merged
    return suite


def build(make_cfg, suite: Suite, *overrides: str):
    cfg = make_cfg(*overrides, "backbone.pretrained=false", experiment=None)
    torch.manual_seed(0)
    return build_model(cfg, suite, RunContext()), cfg


@pytest.mark.parametrize("name,arch,features", [("clip_rn50", "RN50", 1024), ("clip_vitb16", "ViT-B-16", 512)])
def test_clip_backbone_builds_as_a_classifier(make_cfg, single_thread, name, arch, features):
    model, cfg = build(make_cfg, named_suite(), f"backbone={name}", "suite.head_init=random")
    assert isinstance(model, Classifier) and model.num_features == features and model.head.out_features == 3
    assert dict(cfg.backbone.input) == {"size": 224, "interpolation": "bicubic", "crop_pct": 1.0}
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(OPENAI_MEAN))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(OPENAI_STD))
    # image tower only: no text transformer, token embedding or logit scale
    assert all(k.startswith(("normalize.", "body.visual.", "head.")) for k in model.state_dict())
    with torch.no_grad():
        f = model.eval().features(torch.rand(2, 3, 224, 224))
    assert f.shape == (2, features) and torch.allclose(f.norm(dim=1), torch.ones(2))
    assert model.head_origin != "zeroshot"


@pytest.mark.parametrize("imagenet", [False, True])
def test_zeroshot_head_equals_open_clips_classifier(make_cfg, single_thread, tiny_clip, imagenet):
    """Same text features and logits as open_clip's build_zero_shot_classifier on a random batch."""
    if imagenet:  # ImageNet classes: open_clip's class names and the 80 OpenAI templates
        suite = named_suite(["a", "b", "c"], upstream="imagenet", upstream_classes=[0, 207, 980])
        names = [open_clip.IMAGENET_CLASSNAMES[i] for i in (0, 207, 980)]
        templates = open_clip.OPENAI_IMAGENET_TEMPLATES
    else:
        suite, names, templates = named_suite(), NAMES, open_clip.SIMPLE_IMAGENET_TEMPLATES
    model, _ = build(make_cfg, suite, "backbone=clip", f"backbone.arch={tiny_clip}", "backbone.pretrained_tag=null",
                     "backbone.input.size=64", "suite.head_init=zeroshot")
    torch.manual_seed(0)
    ref = open_clip.create_model(tiny_clip, pretrained=None).eval()  # the same random init
    weights = open_clip.build_zero_shot_classifier(ref, open_clip.get_tokenizer(tiny_clip), names, templates)
    scale = ref.logit_scale.exp()
    assert model.head_origin == "zeroshot"
    torch.testing.assert_close(model.head.weight / scale, weights.T)  # the same text features
    assert torch.equal(model.head.bias, torch.zeros(3))
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = scale * F.normalize(ref.encode_image(open_clip_normalize(x)), dim=-1) @ weights
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-4, atol=1e-4)


def open_clip_normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_zeroshot_needs_class_names_and_a_matching_input_size(make_cfg, single_thread):
    suite = named_suite()
    del suite.class_names
    with pytest.raises(ValueError, match="needs class names"):
        build(make_cfg, suite, "backbone=clip_rn50", "suite.head_init=zeroshot")
    with pytest.raises(ValueError, match="input.size=336 but RN50 takes 224"):
        build(make_cfg, named_suite(), "backbone=clip", "backbone.arch=RN50", "backbone.pretrained_tag=openai",
              "backbone.input.size=336")


def test_generic_clip_config(make_cfg, single_thread, tiny_clip):
    model, cfg = build(make_cfg, named_suite(), "backbone=clip", f"backbone.arch={tiny_clip}",
                       "backbone.pretrained_tag=null", "backbone.input.size=64")
    assert cfg.backbone.name == f"clip/{tiny_clip}/None" and model.head_origin == "zeroshot"  # auto: names known -> zero-shot
    assert model.num_features == 64
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(OPENAI_MEAN))
    with pytest.raises(ValueError, match="unknown open_clip pretrained_tag"):
        clip.create_open_clip("RN50", "nope", pretrained=False)


def test_ct_converts_every_relu_of_clip_rn50(single_thread):
    model = clip.create_clip("RN50", "openai", pretrained=False, num_classes=3).eval()
    x = torch.rand(1, 3, 224, 224)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert relus == 51 == count_relu_calls(model, x)  # stem 3 + 16 bottlenecks x 3
    ct = apply_ct(model, 0.9, example_input=x)
    assert ct.ct_sites == 51 and count_relu_calls(ct, x) == 0


@pytest.mark.parametrize("content", ["other_architecture", "not_a_checkpoint"])
def test_a_clip_checkpoint_that_does_not_fit_names_backbone_checkpoint(tmp_path, tiny_clip, content, single_thread):
    from rftbench.backbones import CheckpointError

    path = tmp_path / "bad.pt"
    if content == "other_architecture":
        torch.save(nn.Linear(3, 4).state_dict(), path)
    else:
        path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"backbone.checkpoint={path} cannot be loaded into open_clip {tiny_clip}"):
        clip.create_open_clip(tiny_clip, None, pretrained=False, checkpoint=str(path))
