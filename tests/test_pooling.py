"""Inference max-pooling (rftbench.pooling): bit for bit PyTorch's own, in its layout, used by the one
inference loop only while no gradient is recorded, and the models are left as they were."""
from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from rftbench import pooling
from rftbench.classifier import Classifier, Normalize
from rftbench.data.base import Split
from rftbench.pooling import inference_pooling, max_pool2d
from rftbench.train import RunContext, predict


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (NaN where NaN), shapes and strides."""
    return (a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(nan=0.5), b.nan_to_num(nan=0.5)))


@pytest.mark.parametrize("kernel,stride,padding", [(k, s, p) for k, s in itertools.product((1, 2, 3, 4), (1, 2, 3))
                                                   for p in range(k // 2 + 1)] + [((3, 2), (2, 1), (1, 0))])
def test_equals_torch_bit_for_bit_with_ties_nan_and_inf(kernel, stride, padding):
    g = torch.Generator().manual_seed(0)
    for h, w in ((4, 4), (7, 5), (9, 13), (max(pooling._pair(kernel)), 6)):
        x = torch.randn(2, 3, h, w, generator=g).round()  # many ties (and signed zeros)
        x[0, 0, 0, 0] = math.nan
        x[1, 2] = -math.inf
        x[1, 1, -1, -1] = math.inf
        assert same(max_pool2d(x, kernel, stride, padding), F.max_pool2d(x, kernel, stride, padding))


def test_stride_defaults_to_the_kernel_and_other_dtypes_work():
    x = torch.randn(1, 2, 8, 8)
    assert same(max_pool2d(x, 2), F.max_pool2d(x, 2))
    xb = x.to(torch.bfloat16)
    assert same(max_pool2d(xb, 3, 2, 1), F.max_pool2d(xb, 3, 2, 1))


@pytest.mark.parametrize("build", [
    lambda: timm.create_model("resnet10t", num_classes=5, channels=[32, 64, 128, 256], stem_width=16),
    lambda: torchvision.models.resnet18(num_classes=5),
], ids=["timm_resnet10t", "torchvision_resnet18"])
def test_models_give_the_same_logits_and_are_restored(build, single_thread):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.rand(8, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
        with inference_pooling(model) as m:
            assert m is model and "forward" in vars(model.maxpool)
            out = model(x)
    assert same(out, ref)
    assert "forward" not in vars(model.maxpool)  # the class's forward again


def test_pytorch_kernel_while_gradients_are_recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(pooling, "max_pool2d", lambda *a, **k: calls.append(1) or F.max_pool2d(*a, **k))
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    with inference_pooling(pool):
        pool(x).sum().backward()  # training / an input-gradient attack: the argmax indices are needed
        assert calls == []
        with torch.no_grad():
            pool(x)
        assert calls == [1]
        pool(x.detach())  # no input gradient (a frozen stem): nothing to route back
        assert calls == [1, 1]
        pool(x.detach().contiguous(memory_format=torch.channels_last).transpose(2, 3))  # not contiguous
        assert calls == [1, 1]
    grad = x.grad.clone()
    x.grad = None
    F.max_pool2d(x, 3, 2, 1).sum().backward()
    assert torch.equal(grad, x.grad)


def test_dilated_ceil_mode_and_index_pools_keep_their_own_forward():
    x = torch.randn(1, 2, 9, 9)
    for pool in (nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d(3, 2, 1, ceil_mode=True)):
        with torch.no_grad(), inference_pooling(pool):
            assert not pooling.supported(pool, x)
            assert same(pool(x), F.max_pool2d(x, 3, 2, 1, dilation=pool.dilation, ceil_mode=pool.ceil_mode))
    with torch.no_grad(), inference_pooling(pool := nn.MaxPool2d(2, return_indices=True)):
        out, idx = pool(x)
        assert idx.dtype == torch.int64


def test_the_inference_loop_pools_through_it(monkeypatch):
    calls = []
    monkeypatch.setattr(pooling, "max_pool2d", lambda *a, **k: calls.append(1) or F.max_pool2d(*a, **k))
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten())
    model = Classifier(body, nn.Linear(4 * 6 * 6, 3), Normalize([0.5] * 3, [0.5] * 3))
    split = Split("test", "test", x=torch.rand(10, 3, 12, 12), y=torch.arange(10) % 3)
    logits = predict(model, split, RunContext(eval_batch_size=4))
    assert calls == [1, 1, 1]  # one per batch
    with torch.no_grad():
        assert torch.equal(logits, model.eval()(split.x))
    assert model.training is False and "forward" not in vars(body[2])
