"""LoRA baseline: exact identity at init, frozen base, gradient routing, merging, target checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rftbench.backbones import Classifier, Normalize, create_backbone
from rftbench.methods.lora import (
    apply_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    trainable_parameters,
    verify_lora_targets,
)
from rftbench.train import set_bn_eval

DIGITS_KWARGS = dict(channels=(32, 64, 128, 256), stem_width=16)


def digits_backbone(trained_bn: bool = True) -> Classifier:
    """The digits suite backbone; `trained_bn` replaces timm's zero-initialised last-BN scales and the
    fresh running statistics by random values, as in a pre-trained model."""
    torch.manual_seed(0)
    model = create_backbone("resnet10t", num_classes=10, kwargs=DIGITS_KWARGS)
    if trained_bn:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


class FunctionalLinearBody(nn.Module):
    """Reads `lin.weight` through F.linear, like torchvision Swin's attention: LoRA on `lin` is a no-op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return F.linear(h, self.lin.weight, self.lin.bias)


def toy_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(FunctionalLinearBody(), nn.Linear(4, 3), Normalize((0.5,) * 3, (0.25,) * 3))


def expected_lora_params(model: Classifier, rank: int) -> int:
    total = 0
    for layer in lora_layers(model).values():
        base = layer.get_base_layer()
        if isinstance(base, nn.Linear):
            total += rank * (base.in_features + base.out_features)
        else:
            kh, kw = base.kernel_size
            total += rank * (base.in_channels * kh * kw + base.out_channels)
    return total


def test_init_is_exact_identity_and_input_untouched():
    base = digits_backbone().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = apply_lora(base).eval()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(lora(x), base(x))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())
    assert not lora_layers(base)


def test_targets_cover_body_convs_not_head_and_param_count():
    base = digits_backbone()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in base.body.modules())
    for rank in (1, 2):
        lora = apply_lora(base, rank=rank, alpha=float(rank))
        layers = lora_layers(lora)
        assert len(layers) == n_convs == 14
        assert all(name.startswith("body.") for name in layers)
        assert type(lora.head) is nn.Linear and lora.head.weight.requires_grad
        head = sum(p.numel() for p in lora.head.parameters())
        n_lora = sum(p.numel() for p in lora_parameters(lora))
        assert n_lora == expected_lora_params(lora, rank)
        assert sum(p.numel() for p in trainable_parameters(lora)) == n_lora + head
    # rank 1, first stem conv 3->12 (3x3): 1 * (3*9 + 12) = 39 LoRA parameters.
    stem = lora_layers(apply_lora(base))["body.conv1.0"]
    assert sum(p.numel() for d in (stem.lora_A, stem.lora_B) for p in d.parameters()) == 39


def test_linear_targets_and_conv_only():
    model = toy_classifier()
    assert set(lora_layers(apply_lora(model))) == {"body.conv", "body.lin"}
    assert set(lora_layers(apply_lora(model, targets=("Linear",)))) == {"body.lin"}
    assert sum(p.numel() for p in lora_parameters(apply_lora(model, rank=2, targets=("Linear",)))) == 2 * (4 + 4)
    dropout = lora_layers(apply_lora(model, dropout=0.25))["body.conv"].lora_dropout["default"]
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.25
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(model, targets=("Conv3d",))


def test_training_touches_only_lora_and_head_and_merge_matches():
    torch.manual_seed(1)
    base = digits_backbone()
    lora = apply_lora(base)
    lora.train()
    set_bn_eval(lora)
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in lora.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert frozen and buffers
    opt = torch.optim.Adam(trainable_parameters(lora), lr=1e-2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(lora(x), y).backward()
        for n, p in lora.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
            assert p.requires_grad == ("lora_" in n or n.startswith("head.")), n
        opt.step()
    for n, p in lora.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trainable[n]), n  # every LoRA factor and the head moved
    for n, b in lora.named_buffers():
        assert torch.equal(b, buffers[n]), n

    lora.eval()
    merged = merge_lora(lora)
    assert not lora_layers(merged) and lora_layers(lora)
    assert type(merged.body.conv1[0]) is nn.Conv2d
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    x = torch.rand(4, 3, 32, 32)
    out_lora, out_merged = lora(x), merged.eval()(x)
    assert not torch.allclose(out_lora, base.eval()(x), atol=1e-3)  # the adapters changed the function
    torch.testing.assert_close(out_merged, out_lora, atol=1e-5, rtol=0)


def test_merge_is_exact_in_float64():
    torch.manual_seed(2)
    lora = apply_lora(digits_backbone().double(), rank=2, alpha=2.0).eval()
    for p in lora_parameters(lora):
        p.data.normal_(0, 0.1)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(merge_lora(lora).eval()(x), lora(x), atol=1e-10, rtol=1e-10)


def test_verify_targets_passes_on_resnets_and_restores_weights():
    x = torch.rand(1, 3, 32, 32)
    lora = apply_lora(digits_backbone())
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    lora.train()
    assert sorted(verify_lora_targets(lora, x)) == sorted(lora_layers(lora))
    assert lora.training
    assert all(torch.equal(v, state[k]) for k, v in lora.state_dict().items())

    # Fresh timm init: the residual-branch convs sit behind zero BN scales, so neither their base
    # weights nor their LoRA reach the output; they are reported as inert, not as bypassed.
    fresh = apply_lora(digits_backbone(trained_bn=False))
    with pytest.warns(UserWarning, match="8 LoRA layer"):
        checked = verify_lora_targets(fresh, x)
    stem = [f"body.conv1.{i}" for i in (0, 3, 6)]
    assert checked == stem + [f"body.layer{i}.0.downsample.1" for i in (2, 3, 4)]

    torch.manual_seed(0)
    resnet18 = apply_lora(create_backbone("resnet18", source="torchvision", num_classes=10))
    assert len(verify_lora_targets(resnet18, torch.rand(1, 3, 16, 16))) == 20


def test_verify_targets_raises_on_functional_linear():
    lora = apply_lora(toy_classifier())
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"1 of 2 layer\(s\): body\.lin\b"):
        verify_lora_targets(lora, torch.rand(2, 3, 8, 8))
    assert all(torch.equal(v, state[k]) for k, v in lora.state_dict().items())
