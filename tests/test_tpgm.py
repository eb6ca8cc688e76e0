import pytest
import torch

from rftbench.methods.tpgm import EPS, clip_radius_, deviation_norms, project_tensor


def test_mars_closed_form_rows_inside_untouched_outside_scaled():
    w0 = torch.zeros(2, 3)
    w = torch.tensor([[1.0, -1.0, 0.5], [0.1, 0.2, -0.1]])  # row L1 norms 2.5 and 0.4
    r = torch.tensor([1.0])
    out = project_tensor(w, w0, r, "mars")
    torch.testing.assert_close(out[0], w[0] * (1.0 / (2.5 + EPS)))
    torch.testing.assert_close(out[1], w[1])  # inside the ball
    assert out.abs().sum(1).max() <= 1.0 + 1e-6


def test_l2_closed_form():
    w0 = torch.ones(4)
    w = w0 + torch.tensor([3.0, 4.0, 0.0, 0.0])  # L2 deviation 5
    r = torch.tensor([2.0])
    out = project_tensor(w, w0, r, "l2")
    torch.testing.assert_close(out, w0 + (w - w0) * 2.0 / (5.0 + EPS))
    inside = project_tensor(w, w0, torch.tensor([4.99]), "l2")
    assert torch.linalg.vector_norm(inside - w0) <= 4.99 + 1e-5


def test_radius_clip_range():
    w0, w = torch.zeros(3, 2), torch.tensor([[1.0, 1.0], [0.5, 0.0], [3.0, 0.0]])
    n = deviation_norms(w, w0, "mars")
    assert clip_radius_(torch.tensor([-2.0]), n).item() == pytest.approx(EPS)
    assert clip_radius_(torch.tensor([10.0]), n).item() == pytest.approx(3.0)
    assert clip_radius_(torch.tensor([1.5]), n).item() == pytest.approx(1.5)
    r = torch.tensor([7.0])
    project_tensor(w, w0, r, "l2")
    assert EPS <= r.item() <= float(deviation_norms(w, w0, "l2")) + 1e-6


@pytest.mark.parametrize("norm", ["mars", "l2"])
def test_radius_gradient_matches_finite_differences(norm):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    w = w0 + torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    n = deviation_norms(w, w0, norm)
    # mars: between the smallest and largest row norm (some rows scaled); l2: half the norm; no kink
    r = ((n.min() + n.max()) / 2 + 0.013 if norm == "mars" else n / 2).reshape(1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda rr: project_tensor(w, w0, rr, norm), (r,))


# ---- the method: Projector, the after-step hook, the held-out split, end to end -------------------

import json  # noqa: E402

import pandas as pd  # noqa: E402
from torch import nn  # noqa: E402

from rftbench.data.base import Split, stratified_split  # noqa: E402
from rftbench.methods import ft, tpgm  # noqa: E402
from rftbench.run import execute, run_folder  # noqa: E402
from rftbench.train import RunContext, fit  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return net


def _data(n: int = 48, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return Split("train", "train", x=x, y=(x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def test_held_out_split_is_stratified_disjoint_and_seeded():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 2 + [3])
    rest, held = stratified_split(y, 0.1, seed=3, keep_one=True)
    assert set(rest.tolist()).isdisjoint(held.tolist()) and len(rest) + len(held) == len(y)
    assert [int((y[held] == c).sum()) for c in range(4)] == [1, 2, 1, 0]  # a class's last example stays
    again = stratified_split(y, 0.1, seed=3, keep_one=True)
    assert torch.equal(again[1], held) and not torch.equal(stratified_split(y, 0.1, seed=4, keep_one=True)[1], held)


def test_first_projection_starts_every_radius_at_half_the_smallest_norm():
    net = _net()
    anchors = {k: p.detach().clone() for k, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    moved = {k: p.detach().clone() for k, p in net.named_parameters()}
    for norm in ("mars", "l2"):
        proj = tpgm.Projector(anchors, norm, proj_lr=0.01)
        m = _net()
        m.load_state_dict(moved)
        proj.apply_(m)
        for k, p in m.named_parameters():
            n = deviation_norms(moved[k], anchors[k], norm)
            assert proj.radii[k].item() == pytest.approx(float(n.min()) / 2, rel=1e-6)
            torch.testing.assert_close(p.detach(), project_tensor(moved[k], anchors[k], proj.radii[k], norm))


def test_radius_gradient_through_the_model_matches_finite_differences():
    """The loss of the projected model as a function of one radius: autograd == central differences."""
    net = _net().double()
    anchors = {k: p.detach().clone() for k, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    proj = tpgm.Projector(anchors, "l2", proj_lr=0.01)
    data = _data()
    x, y = data.x.double(), data.y
    key = "0.weight"
    n = float(deviation_norms(dict(net.named_parameters())[key], anchors[key], "l2"))
    loss = lambda: torch.nn.functional.cross_entropy(  # noqa: E731
        torch.func.functional_call(net, proj.projected(net), (x,)), y)
    proj.initialised = True
    for k in proj.radii:
        proj.radii[k].data.fill_(1e9)  # other tensors: clipped to their norm (unprojected)
    proj.radii[key].data.fill_(0.4 * n)
    proj.radii[key].grad = None
    loss().backward()
    auto = proj.radii[key].grad.item()
    h = 1e-6 * n
    with torch.no_grad():
        proj.radii[key].fill_(0.4 * n + h)
        up = loss().item()
        proj.radii[key].fill_(0.4 * n - h)
        down = loss().item()
    assert auto == pytest.approx((up - down) / (2 * h), rel=1e-5)


def test_after_every_step_each_row_is_within_its_radius_and_radii_train_every_proj_freq(monkeypatch):
    net, data = _net(), _data()
    head = {k for k in ("2.weight", "2.bias")}
    anchors = {k: p.detach().clone() for k, p in net.named_parameters() if k not in head}
    proj = tpgm.Projector(anchors, "mars", proj_lr=0.05)
    ctx = RunContext(seed=0)
    hook = tpgm.ProjectAfterStep(proj, tpgm.Batches(data, 16, 0, ctx), proj_freq=2, max_iters=3, ctx=ctx)
    calls, fit_radii = [], proj.fit_radii
    monkeypatch.setattr(proj, "fit_radii", lambda *a: calls.append(a[2]) or fit_radii(*a))
    seen = []

    def check(model):
        hook(model)
        for k, p in model.named_parameters():
            if k in anchors:
                n = deviation_norms(p, anchors[k], "mars")
                assert float(n.max()) <= proj.radii[k].item() * (1 + 1e-5) + 1e-7
        seen.append(1)
    check.state_dict, check.load_state_dict = hook.state_dict, hook.load_state_dict
    res = fit(net, data, data, ctx, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5), epochs=2, batch_size=8,
              checkpoint_key=None, after_step=check)
    assert len(seen) == 12 and calls == [3] * 6 and hook.data.count == 18 and res.best_epoch >= 1


def test_hook_state_round_trip_continues_the_same_training():
    """Stopping after k steps and continuing from state_dict() gives the uninterrupted weights."""
    def run(steps: int, state: dict | None = None, weights: dict | None = None):
        net, data, ctx = _net(), _data(), RunContext(seed=0)
        anchors = {k: p.detach().clone() for k, p in net.named_parameters()}
        if weights is not None:
            net.load_state_dict(weights)
        proj = tpgm.Projector(anchors, "mars", proj_lr=0.05)
        hook = tpgm.ProjectAfterStep(proj, tpgm.Batches(data, 20, 7, ctx), 1, 2, ctx)  # 3 batches a pass
        if state is not None:
            hook.load_state_dict(state)
        opt = torch.optim.SGD(net.parameters(), lr=0.3)
        for step in range(hook.steps, hook.steps + steps):  # plain SGD: no optimizer state to carry
            idx = torch.randint(0, len(data), (8,), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(data.x[idx]), data.y[idx]).backward()
            opt.step()
            hook(net)
        return net.state_dict(), hook.state_dict()

    whole, _ = run(4)
    half_w, half_s = run(2)
    rest, state = run(2, half_s, half_w)
    assert state["batches"] == 8 and state["steps"] == 4
    for k in whole:
        torch.testing.assert_close(rest[k], whole[k])


def test_tpgm_end_to_end_radii_on_a_held_out_slice_of_train(make_cfg, monkeypatch):
    seen = {}
    real_fit = tpgm.fit
    monkeypatch.setattr(tpgm, "fit", lambda m, train, val, ctx, **kw: seen.update(train=train, val=val,
                        hook=kw["after_step"]) or real_fit(m, train, val, ctx, **kw))
    cfg = make_cfg("method=tpgm", "budget.epochs=1")
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    info = json.loads((path / "info.json").read_text())["info"]
    held = seen["hook"].data.split
    assert held.name == "train/tpgm_holdout" and seen["val"].name == "val"
    assert info["n_train"] == len(seen["train"]) and info["n_radius"] == len(held)
    # the held-out rows are train rows the model never trained on
    rows = {tuple(r.flatten()[:16].tolist()) for r in seen["train"].x}
    assert not any(tuple(r.flatten()[:16].tolist()) in rows for r in held.x)
    radii = pd.read_csv(path / "tpgm_radii.csv")
    assert not radii["param"].str.startswith("head.").any() and (radii["radius"] > 0).all()


def test_tpgm_posthoc_reuses_the_cached_ft_and_lies_on_each_tensors_segment(make_cfg, monkeypatch):
    assert execute(make_cfg("method=ft", "budget.epochs=1")) == "done"
    calls = []
    monkeypatch.setattr("rftbench.methods.ft.fit", lambda *a, **kw: calls.append(1) or ft.fit(*a, **kw))
    grabbed = {}
    real = tpgm.Projector.apply_

    def apply_(self, model):
        grabbed["before"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        real(self, model)
        grabbed.update(after={k: p.detach().clone() for k, p in model.named_parameters()}, proj=self)
    monkeypatch.setattr(tpgm.Projector, "apply_", apply_)
    cfg = make_cfg("method=tpgm_posthoc", "budget.epochs=1", "method.adapt.max_iters=10")
    assert execute(cfg) == "done" and calls == []  # the fine-tuning came from the cache
    proj = grabbed["proj"]
    assert any(k.startswith("head.") for k in proj.anchors)  # the head is projected too
    for k, w1 in grabbed["before"].items():
        w0, w = proj.anchors[k], grabbed["after"][k]
        d = (w1 - w0).flatten()
        if d.norm() == 0:
            continue
        t = torch.dot((w - w0).flatten(), d) / torch.dot(d, d)  # w = w0 + t (w1 - w0), 0 <= t <= 1
        assert -1e-6 <= t.item() <= 1 + 1e-6
        torch.testing.assert_close(w, w0 + t * (w1 - w0), atol=1e-5, rtol=1e-4)
        assert float((w - w0).norm()) <= proj.radii[k].item() * (1 + 1e-5) + 1e-7
    info = json.loads((run_folder(cfg).path / "info.json").read_text())["info"]
    assert info["n_radius"] > 0 and abs(info["n_radius"] - info["n_select"]) <= 10  # halves of val, by class
