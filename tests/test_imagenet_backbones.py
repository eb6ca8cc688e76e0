"""ImageNet backbones: swin_t_relu, vit_b16 and any timm model, random-initialised (nothing downloads)."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import rftbench.backbones as backbones
from rftbench.backbones import Classifier, create_backbone
from rftbench.data.base import Split, Suite
from rftbench.methods.ct import apply_ct, count_relu_calls
from rftbench.run import build_model
from rftbench.train import RunContext

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def tiny_suite(num_classes: int = 3) -> Suite:
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % num_classes
    return Suite("tiny", num_classes, {"train": Split("train", "train", x=x, y=y)})


def build(make_cfg, *overrides: str) -> tuple[Classifier, object]:
    cfg = make_cfg(*overrides, "backbone.pretrained=false", experiment=None)
    return build_model(cfg, tiny_suite(), RunContext()), cfg


@pytest.mark.parametrize("name,features,mean_std,spec", [
    ("swin_t_relu", 768, IMAGENET, {"size": 224, "interpolation": "bicubic", "crop_pct": 0.875}),
    ("vit_b16", 768, ([0.5] * 3, [0.5] * 3), {"size": 224, "interpolation": "bicubic", "crop_pct": 0.9}),
])
def test_backbone_builds_as_a_classifier(make_cfg, single_thread, name, features, mean_std, spec):
    model, cfg = build(make_cfg, f"backbone={name}")
    assert isinstance(model, Classifier) and model.num_features == features and model.head.out_features == 3
    assert dict(cfg.backbone.input) == spec
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(mean_std[0]))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(mean_std[1]))
    with torch.no_grad():
        assert model.eval().features(torch.rand(1, 3, 224, 224)).shape == (1, features)
    resolved = backbones.input_spec(cfg.backbone)
    assert {k: getattr(resolved, k) for k in spec} == spec


def test_generic_timm_takes_its_input_spec_from_timm(make_cfg, single_thread):
    model, cfg = build(make_cfg, "backbone=timm", "backbone.arch=convnext_atto")
    pcfg = timm.get_pretrained_cfg("convnext_atto")
    assert cfg.backbone.name == "timm/convnext_atto" and model.num_features == 320
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(pcfg.mean))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(pcfg.std))
    spec = backbones.input_spec(cfg.backbone)
    assert (spec.size, spec.interpolation, spec.crop_pct) == (pcfg.input_size[-1], pcfg.interpolation, pcfg.crop_pct)


def test_swin_t_relu_is_relu_and_ct_converts_every_site(single_thread):
    model = create_backbone("swin_tiny_patch4_window7_224", activation="relu").eval()
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    x = torch.rand(1, 3, 224, 224)
    assert relus == 12 == count_relu_calls(model, x)  # one per block: depths (2, 2, 6, 2)
    ct = apply_ct(model, 0.9, example_input=x)
    assert ct.ct_sites == 12 and count_relu_calls(ct, x) == 0


def test_swin_t_relu_refuses_gelu_weights_and_loads_a_checkpoint(tmp_path, single_thread):
    with pytest.raises(ValueError, match="trained with GELU"):
        create_backbone("swin_tiny_patch4_window7_224", activation="relu", pretrained=True)
    torch.manual_seed(0)
    raw = timm.create_model("swin_tiny_patch4_window7_224", num_classes=1000)
    backbones.replace_activation(raw, nn.GELU, nn.ReLU)
    path = tmp_path / "swin_t_relu.pth"
    torch.save({"model": raw.state_dict()}, path)  # the {"model": ...} layout of Swin releases
    model = create_backbone("swin_tiny_patch4_window7_224", activation="relu", checkpoint=str(path)).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw.eval()((x - model.normalize.mean) / model.normalize.std))
    sf = tmp_path / "swin_t_relu.safetensors"
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(sf))
    from rftbench.run import _upstream_size

    assert _upstream_size(str(sf)) == 1000  # timm's head.fc.weight is found


def test_ct_refuses_vit_naming_gelu(single_thread):
    model = create_backbone("vit_base_patch16_224.augreg2_in21k_ft_in1k", mean=None, std=None)
    with pytest.raises(ValueError, match=r"no ReLU activation sites.*activations found: GELU x12"):
        apply_ct(model, 0.9)
