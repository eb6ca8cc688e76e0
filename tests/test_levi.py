"""LEVI (reconstruction): shapes, ensemble rule, tap routing, frozen backbone, loss, cost, errors."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rftbench.backbones import Classifier, Normalize, create_backbone
from rftbench.methods.levi import LEVI, levi_loss, make_task_model

DIGITS_KWARGS = dict(channels=(32, 64, 128, 256), stem_width=16)
SMALL = (3, 32, 32)


def digits_backbone() -> Classifier:
    torch.manual_seed(0)
    model = create_backbone("resnet10t", num_classes=10, kwargs=DIGITS_KWARGS)
    for m in model.modules():  # non-trivial BN statistics and scales, as in a pre-trained model
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def resnet_stages(model: Classifier, x: torch.Tensor, timm_style: bool) -> list[torch.Tensor]:
    """layer2..layer4 outputs, run stage by stage (independent of LEVI's hooks)."""
    b = model.body
    h = model.normalize(x)
    h = b.maxpool((b.act1 if timm_style else b.relu)(b.bn1(b.conv1(h))))
    outs = []
    for stage in (b.layer1, b.layer2, b.layer3, b.layer4):
        h = stage(h)
        outs.append(h)
    return outs[1:]


def flops(fn, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def digits_levi() -> LEVI:
    torch.manual_seed(1)
    return LEVI(digits_backbone(), num_classes=5, input_size=SMALL)


def test_shapes_ensemble_and_tap_routing(digits_levi):
    levi = digits_levi.eval()
    x = torch.rand(4, 3, 32, 32)
    per_tap = levi.forward_all(x)
    out = levi(x)
    assert out.shape == (4, 5) and len(per_tap) == 3 and all(t.shape == (4, 5) for t in per_tap)
    torch.testing.assert_close(out, (per_tap[0] + per_tap[1] + per_tap[2]) / 3, atol=1e-6, rtol=0)

    z_dim = 64  # make_task_model(width=8): last stage width 8 * 8
    for adapter, channels in zip(levi.adapters, (64, 128, 256)):
        assert adapter.norm_h.normalized_shape == (channels,)
        assert adapter.norm_z.normalized_shape == (z_dim,)
        assert adapter.mlp[0].in_features == channels + z_dim and adapter.mlp[0].out_features == 256
        assert adapter.mlp[2].out_features == 5

    with torch.no_grad():
        z = levi.task_model(x)
        stages = resnet_stages(levi.backbone, x, timm_style=True)
    for adapter, h, logits in zip(levi.adapters, stages, per_tap):
        expected = adapter.mlp(torch.cat([adapter.norm_h(h.mean((2, 3))), adapter.norm_z(z)], dim=1))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_training_keeps_backbone_bit_exact_and_routes_gradients():
    torch.manual_seed(2)
    backbone = digits_backbone()
    levi = LEVI(backbone, num_classes=10, input_size=SMALL)
    snapshot = {k: v.clone() for k, v in levi.backbone.state_dict().items()}
    task_buffers = {k: v.clone() for k, v in levi.task_model.state_dict().items() if "running_mean" in k}
    levi.train()
    assert levi.training and levi.task_model.training and not levi.backbone.training
    assert not any(m.training for m in levi.backbone.modules())

    trainable = levi.trainable_parameters()
    trainable_ids = {id(p) for p in trainable}
    assert trainable_ids == {id(p) for p in levi.parameters() if p.requires_grad}
    assert trainable_ids == {id(p) for p in [*levi.task_model.parameters(), *levi.adapters.parameters()]}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        levi_loss(levi.forward_all(x), y).backward()
        for name, p in levi.named_parameters():
            assert (p.grad is not None) == (id(p) in trainable_ids), name
        opt.step()

    for k, v in levi.backbone.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(p.grad is None and not p.requires_grad for p in levi.backbone.parameters())
    # The task model did train (its BN statistics moved), and the caller's backbone was not touched.
    assert any(not torch.equal(levi.task_model.state_dict()[k], v) for k, v in task_buffers.items())
    assert all(p.requires_grad for p in backbone.parameters())


def test_torchvision_resnet18_taps_and_task_ratio():
    torch.manual_seed(3)
    backbone = create_backbone("resnet18", source="torchvision", num_classes=10)
    levi = LEVI(backbone, num_classes=7, input_size=SMALL).eval()
    assert [a.norm_h.normalized_shape[0] for a in levi.adapters] == [128, 256, 512]
    x = torch.rand(2, 3, 32, 32)
    assert levi(x).shape == (2, 7)
    with torch.no_grad():
        stages = resnet_stages(levi.backbone, x, timm_style=False)
    for h, tap in zip(stages, levi.tap_features(x)):
        torch.testing.assert_close(tap, h.mean((2, 3)))
    assert sum(p.numel() for p in levi.task_model.parameters()) / sum(p.numel() for p in backbone.parameters()) < 0.01


def test_task_model_ratio_on_digits(digits_levi):
    task = sum(p.numel() for p in digits_levi.task_model.parameters())
    backbone = sum(p.numel() for p in digits_levi.backbone.parameters())
    assert task == 79_646 and backbone == 1_234_822
    assert task / backbone < 0.1
    with pytest.raises(ValueError, match="below 0.1"):
        LEVI(digits_backbone(), num_classes=10, task_model=make_task_model(width=32), input_size=SMALL)


def test_vit_token_taps():
    torch.manual_seed(4)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=4, num_heads=2)
    levi = LEVI(Classifier(vit, nn.Linear(32, 10), Normalize((0.5,) * 3, (0.5,) * 3)), num_classes=3,
                taps=("blocks.1", "blocks.2", "blocks.3"), task_model=make_task_model(width=4),
                input_size=SMALL, max_task_ratio=None).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(levi.backbone.normalize(x))  # after blocks.3 and the final norm
    taps = levi.tap_features(x)
    assert [t.shape for t in taps] == [(2, 32)] * 3
    assert levi(x).shape == (2, 3)
    # The last tap is the CLS token of blocks.3, i.e. before the final LayerNorm.
    torch.testing.assert_close(levi.backbone.body.norm(taps[2]), tokens[:, 0])


def test_levi_loss_known_values():
    y = torch.tensor([0])
    zeros = [torch.zeros(1, 4), torch.zeros(1, 4)]
    assert levi_loss(zeros, y).item() == pytest.approx(2 * math.log(4))
    assert levi_loss(zeros, y, mean_weight=0.5).item() == pytest.approx(1.5 * math.log(4))
    a = 1.3
    opposite = [torch.tensor([[a, 0.0]]), torch.tensor([[-a, 0.0]])]  # mean logits are 0
    expected = (math.log1p(math.exp(-a)) + math.log1p(math.exp(a))) / 2 + 0.7 * math.log(2)
    assert levi_loss(opposite, y, mean_weight=0.7).item() == pytest.approx(expected, rel=1e-6)


def test_extra_inference_cost_accounts_for_every_part(digits_levi):
    levi = digits_levi
    x = torch.rand(2, 3, 32, 32)
    cost = levi.extra_inference_cost(x)
    features = flops(levi.backbone.features, x)
    task = flops(levi.task_model, x)
    batch, hidden, classes, z_dim = 2, 256, 5, 64
    adapters = sum(2 * batch * ((c + z_dim) * hidden + hidden * classes) for c in (64, 128, 256))
    assert cost["backbone_flops"] == features + 2 * batch * 256 * 10
    assert cost["levi_flops"] == features + task + adapters
    assert cost["flop_ratio"] == pytest.approx(cost["levi_flops"] / cost["backbone_flops"])
    assert cost["trainable_params"] == cost["task_model_params"] + cost["adapter_params"]
    assert cost["adapter_params"] == sum(
        (c + z_dim) * hidden + hidden + hidden * classes + classes + 2 * c + 2 * z_dim for c in (64, 128, 256)
    )


def test_bad_taps_raise():
    with pytest.raises(ValueError, match=r"no stage\(s\) \['layer5'\].*'layer1', 'layer2'"):
        LEVI(digits_backbone(), num_classes=10, taps=("layer2", "layer5"), input_size=SMALL)
    torch.manual_seed(5)
    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    plain = Classifier(body, nn.Linear(8, 2), Normalize((0.5,) * 3, (0.5,) * 3))
    message = r"Sequential has no stage\(s\) \['layer2', 'layer3', 'layer4'\].*\['0', '1', '2'\]"
    with pytest.raises(ValueError, match=message):
        LEVI(plain, num_classes=2, input_size=SMALL, max_task_ratio=None)
    with pytest.raises(ValueError, match="at least one tap"):
        LEVI(digits_backbone(), num_classes=10, taps=(), input_size=SMALL)
