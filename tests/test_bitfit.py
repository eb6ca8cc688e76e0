"""BitFit: the trained tensors of torchvision ResNet-18 counted by hand, and an end-to-end run."""
from __future__ import annotations

import torch
import torchvision

from rftbench.backbones import as_classifier
from rftbench.methods.bitfit import bitfit_names, select
from rftbench.run import execute
from rftbench.train import count_params

# ResNet-18 BN channels: bn1 64; layer1 2 blocks x 2 BN x 64; layer2 4 x 128 + downsample 128;
# layer3 4 x 256 + 256; layer4 4 x 512 + 512. No conv biases.
BN = 64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512
HEAD = 512 * 1000 + 1000


def test_resnet18_counts_and_names():
    assert BN == 4800
    for affine, expected in ((False, BN + HEAD), (True, 2 * BN + HEAD)):
        model = select(as_classifier(torchvision.models.resnet18(weights=None)), norm_affine=affine)
        assert count_params(model, trainable=True) == expected
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained == set(bitfit_names(model, norm_affine=affine))
        body = {n for n in trained if not n.startswith("head.")}
        bn_weights = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert body == {f"{m}.bias" for m in bn_weights} | ({f"{m}.weight" for m in bn_weights} if affine else set())
        assert {"head.weight", "head.bias"} <= trained
        assert sum(n.endswith(".bias") for n in body) == 20  # 20 BN layers


def test_end_to_end(make_cfg):
    assert execute(make_cfg("method=bitfit", "budget.epochs=1")) == "done"
