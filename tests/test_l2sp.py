"""L2-SP: the penalty's value and gradient (autograd vs closed form), and an end-to-end run."""
from __future__ import annotations

import torch

from rftbench.methods.l2sp import l2sp_penalty
from rftbench.run import execute


def test_penalty_value_on_hand_made_tensors():
    w, w0, h = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0])
    # alpha/2 (1 + 4) + beta/2 * 4 = 0.5 * 0.5 * 5 + 0.1 / 2 * 4
    assert torch.isclose(l2sp_penalty([w], [w0], [h], alpha=0.5, beta=0.1), torch.tensor(1.45))


def test_gradient_is_alpha_deviation_and_beta_head():
    g = torch.Generator().manual_seed(0)
    body = [torch.randn(3, 4, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    anchors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    head = [torch.randn(2, 3, generator=g, requires_grad=True)]
    l2sp_penalty(body, anchors, head, alpha=0.3, beta=0.07).backward()
    for w, w0 in zip(body, anchors):
        assert torch.allclose(w.grad, 0.3 * (w.detach() - w0))
    assert torch.allclose(head[0].grad, 0.07 * head[0].detach())


def test_end_to_end(make_cfg):
    assert execute(make_cfg("method=l2sp", "budget.epochs=1")) == "done"
