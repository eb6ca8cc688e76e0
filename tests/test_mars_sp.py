"""MARS-SP: the projection on hand-made values, the constraint after every step, bit-identity inside
the ball, optimizer state round trip, and an end-to-end run."""
from __future__ import annotations

import torch
from torch import nn

from rftbench.methods.mars_sp import MARSSGD, mars, project_tensor
from rftbench.run import execute


def test_project_tensor_hand_made():
    w0 = torch.zeros(2, 2)
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])  # row sums 4, 1 -> mars 4
    assert mars(w - w0).item() == 4.0
    assert torch.allclose(project_tensor(w, w0, 2.0), w / 2)
    assert project_tensor(w, w0, 4.0) is w
    v = torch.tensor([0.3, -0.5])  # 1-D: rows of one element -> max |d|
    assert torch.allclose(project_tensor(v + 1, torch.ones(2), 0.25), 1 + v / 2)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))


def _groups(net, r):
    return [{"params": [net[0].weight], "radius": r}, {"params": [net[1].weight], "radius": r / 10},
            {"params": [net[3].weight], "radius": r}, {"params": [net[0].bias, net[1].bias, net[3].bias]}]


def _steps(net, opt, n=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        yield


def test_constraint_holds_after_every_step():
    net = _net()
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    opt = MARSSGD(_groups(net, 0.05), lr=0.5, momentum=0.9, nesterov=True)
    for _ in _steps(net, opt, 10):
        for name, r in (("0.weight", 0.05), ("1.weight", 0.005), ("3.weight", 0.05)):
            assert mars(net.state_dict()[name] - w0[name]) <= r + 1e-6


def test_inside_the_ball_is_plain_sgd():
    a, b = _net(), _net()
    opt_a = MARSSGD(_groups(a, 1e6), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9)
    for _ in zip(_steps(a, opt_a), _steps(b, opt_b)):
        pass
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_round_trip_keeps_anchors():
    net = _net()
    opt = MARSSGD(_groups(net, 0.05), lr=0.5, momentum=0.9)
    list(_steps(net, opt, 2))
    anchor = opt.state[net[0].weight]["anchor"].clone()
    fresh = MARSSGD(_groups(net, 0.05), lr=0.5, momentum=0.9)  # anchors at the moved weights
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.state[net[0].weight]["anchor"], anchor)
    assert "momentum_buffer" in fresh.state[net[0].weight]


def test_end_to_end(make_cfg):
    assert execute(make_cfg("method=mars_sp", "budget.epochs=1")) == "done"
