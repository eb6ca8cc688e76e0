"""Surgical fine-tuning and Auto-RGN: block map, one-block training, auto choice, RGN closed form."""
from __future__ import annotations


import pytest
import torch

from rftbench.backbones import create_backbone
from rftbench.methods import surgical
from rftbench.methods.base import Adapted
from rftbench.run import execute


def tiny_resnet():
    return create_backbone("resnet10t", num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                           kwargs={"channels": [8, 8, 8, 8], "stem_width": 4})


def test_block_map_covers_every_parameter_once():
    m = tiny_resnet()
    b = surgical.blocks(m)
    assert list(b) == ["block1", "block2", "block3", "block4", "head"]
    flat = [n for names in b.values() for n in names]
    assert sorted(flat) == sorted(n for n, _ in m.named_parameters())
    assert len(flat) == len(set(flat))
    assert any(n.startswith("body.conv1") for n in b["block1"])  # the stem joins the first stage


def test_resolve_block():
    names = ["block1", "block2", "head"]
    assert surgical.resolve_block(names, "first") == "block1"
    assert surgical.resolve_block(names, "last") == "head"
    with pytest.raises(ValueError):
        surgical.resolve_block(names, "nope")



def test_train_block_changes_exactly_its_parameters(single_thread):
    m = tiny_resnet()
    with torch.no_grad():  # timm zero-inits the last BN of each residual block: no gradient upstream of it
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 3, (8,))
    names = set(surgical.blocks(m)["block3"])
    for n, p in m.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    for n, p in m.named_parameters():
        same = torch.equal(p, before[n])
        assert same == (n not in names), n


def test_auto_picks_best_val_block(monkeypatch):
    m = tiny_resnet()
    accs = {"block1": 0.5, "block2": 0.8, "block3": 0.8, "block4": 0.1, "head": 0.7}

    def fake(model, suite, ctx, block, recipe):
        return Adapted(model, val_acc=accs[block], trainable_params=1, train_time_s=2.0, info={"converged": 1})

    monkeypatch.setattr(surgical, "train_block", fake)
    out = surgical.adapt(m, None, None, block="auto", recipe={})
    assert out.info["block"] == "block2"  # tie with block3 -> the earlier block
    assert out.val_acc == 0.8 and out.train_time_s == 10.0
    assert list(out.tables["surgical_blocks"]["val_acc"]) == list(accs.values())


def test_rgn_scales_closed_form():
    g = [torch.tensor([3.0, 4.0]), torch.tensor([1.0]), torch.zeros(2)]
    w = [torch.tensor([1.0, 0.0]), torch.tensor([2.0]), torch.ones(2)]
    # relative norms 5, 0.5, 0 -> divided by the max 5
    assert surgical.rgn_scales(g, w) == pytest.approx([1.0, 0.1, 0.0])


def test_rgn_sgd_step_scales_each_tensor():
    a, b = torch.nn.Parameter(torch.tensor([1.0, 0.0])), torch.nn.Parameter(torch.tensor([2.0]))
    opt = surgical.RGNSGD([a, b], lr=0.1)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0])
    opt.step()
    assert torch.allclose(a, torch.tensor([1.0 - 0.1 * 3, -0.1 * 4]))
    assert torch.allclose(b, torch.tensor([2.0 - 0.1 * 0.1 * 1.0]))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]  # restored for the scheduler


@pytest.mark.parametrize("method", ["surgical", "surgical_rgn"])
def test_end_to_end(make_cfg, single_thread, method):
    extra = ["method.adapt.block=head"] if method == "surgical" else []
    cfg = make_cfg(f"method={method}", "budget.epochs=1", *extra)
    assert execute(cfg) == "done"
