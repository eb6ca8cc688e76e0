"""Curvature Tuning: the CTU activation, site coverage of apply_ct, trainable CT."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rftbench.backbones import Classifier, create_backbone
from rftbench.methods.ct import (
    CTU,
    NO_SITES_MSG,
    TrainableCTU,
    apply_ct,
    apply_trainable_ct,
    count_ct_sites,
    count_relu_calls,
    ct_parameters,
    mean_beta_coeff,
    set_beta,
)

EPS = 1e-6


pytestmark = pytest.mark.usefixtures("single_thread")


def ctu_reference(x: float, beta: float, c: float) -> float:
    """The CTU formula in float64 (stable sigmoid / softplus, no threshold)."""
    s = 1.0 - beta + EPS
    z = x / s
    softplus = max(z, 0.0) + math.log1p(math.exp(-abs(z)))
    u = beta * z
    sigmoid = 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))
    return c * sigmoid * x + (1.0 - c) * s * softplus


POINTS = [-1e4, -300.0, -20.0, -3.0, -1.0, -0.1, -1e-3, 0.0, 1e-3, 0.1, 0.5, 1.0, 3.0, 20.0, 300.0, 1e4]


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8, 0.99, 0.999999])
@pytest.mark.parametrize("coeff", [0.0, 0.5, 1.0])
def test_ctu_matches_float64_formula(beta, coeff):
    ref = torch.tensor([ctu_reference(v, beta, coeff) for v in POINTS], dtype=torch.float64)
    # float64 inputs stay float64; the only deviation is softplus returning its input above 20
    out64 = CTU(beta, coeff)(torch.tensor(POINTS, dtype=torch.float64))
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref, rtol=1e-12, atol=1e-8)
    out = CTU(beta, coeff)(torch.tensor(POINTS, dtype=torch.float32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-6)


def test_ctu_closed_forms():
    x = torch.linspace(-5, 5, 101)
    # beta = 0, c = 1: sigmoid(0) * x = x / 2
    torch.testing.assert_close(CTU(0.0, 1.0)(x), x / 2, rtol=0, atol=0)
    # beta = 0, c = 0: (1 + eps) softplus(x / (1 + eps)) ~ softplus(x)
    torch.testing.assert_close(CTU(0.0, 0.0)(x), F.softplus(x), rtol=1e-5, atol=1e-5)
    # at x = 0 the value is (1 - c) s ln 2
    for beta, c in [(0.5, 0.5), (0.8, 0.0), (0.9, 0.25)]:
        expected = (1 - c) * (1 - beta + EPS) * math.log(2)
        assert CTU(beta, c)(torch.zeros(1)).item() == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_beta_one_is_relu_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 10).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e4]).to(dtype)
    for coeff in (0.0, 0.5, 1.0):
        assert torch.equal(CTU(1.0, coeff)(x), torch.relu(x))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8, 0.99])
@pytest.mark.parametrize("coeff", [0.0, 0.5, 0.9])
def test_largest_gap_to_relu_is_at_zero(beta, coeff):
    x = torch.arange(-200_000, 200_001) * 1e-4  # [-20, 20], spacing 1e-4, contains 0 exactly
    gap = CTU(beta, coeff)(x) - torch.relu(x)
    zero = x == 0
    assert zero.sum() == 1
    expected = (1 - coeff) * (1 - beta + EPS) * math.log(2)
    assert gap[zero].item() == pytest.approx(expected, rel=2e-6)
    assert gap.max().item() == gap[zero].item()
    assert (gap[~zero] < gap[zero]).all()
    if coeff == 0.0:  # pure sharpened softplus: above ReLU, within s * exp(-|x| / s) of it
        s = 1 - beta + EPS
        assert (gap >= -4e-6).all()  # up to float32 rounding of x
        assert (gap <= s * torch.exp(-x.abs() / s) + 4e-6).all()  # + float32 rounding of x


def test_ctu_float32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 8) * 3
    unit = CTU(0.7, 0.5)
    expected = unit(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = unit(x)
        out16 = unit(x.bfloat16())
    assert out32.dtype == torch.float32 and torch.equal(out32, expected)
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, unit(x.bfloat16().float()).bfloat16())
    # near beta = 1, x / s ~ 5e9 overflows half precision; computed in float32 it does not
    near = CTU(0.999999, 0.5)
    big = torch.tensor([1e4, -1e4, 1.0, -1.0, 0.0])
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = near(big.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), torch.relu(big.to(dtype)).float(), rtol=1e-2, atol=1e-5)


def test_invalid_beta_coeff():
    for kwargs in (dict(beta=1.5), dict(beta=-0.1), dict(beta=0.5, coeff=1.2), dict(beta=float("nan"))):
        with pytest.raises(ValueError):
            CTU(**kwargs)
    with pytest.raises(ValueError):
        apply_ct(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), beta=1.01)


# ---------------------------------------------------------------- coverage on real ResNets


class AtenReluCounter(TorchDispatchMode):
    """Counts aten relu / relu_ ops actually dispatched (independent of how they were called)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in (torch.ops.aten.relu, torch.ops.aten.relu_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def run_counting(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(output, aten relu ops executed, CTU module calls) of one no-grad forward pass."""
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, CTU)]
    counter = AtenReluCounter()
    with torch.no_grad(), counter:
        out = model(x)
    for h in handles:
        h.remove()
    return out, counter.calls, len(calls)


MODELS = {
    # name: (factory, ReLU sites: stem + per-block sites)
    "tv_resnet18": (lambda: torchvision.models.resnet18(), 1 + 2 * 8),
    "tv_resnet50": (lambda: torchvision.models.resnet50(), 1 + 3 * 16),
    "timm_resnet18": (lambda: timm.create_model("resnet18", pretrained=False), 1 + 2 * 8),
    "timm_resnet50": (lambda: timm.create_model("resnet50", pretrained=False), 1 + 3 * 16),
    "classifier_timm_resnet10t": (  # the embedded digits-suite backbone; deep stem has 3 ReLUs
        lambda: create_backbone(
            "resnet10t", num_classes=10, kwargs=dict(channels=(32, 64, 128, 256), stem_width=16)
        ),
        3 + 2 * 4,
    ),
}
X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_ct_replaces_every_executed_relu(name):
    torch.manual_seed(0)
    factory, sites = MODELS[name]
    model = factory().eval()
    before_state = copy.deepcopy(model.state_dict())
    before_out, relu_calls, _ = run_counting(model, X)
    assert relu_calls == sites

    ct = apply_ct(model, beta=0.9)
    assert ct.ct_sites == count_ct_sites(ct) == sites
    out, relu_calls, ctu_calls = run_counting(ct, X)
    assert relu_calls == 0 and ctu_calls == sites
    assert not torch.allclose(out, before_out)
    assert type(ct) is type(model)
    assert list(ct.state_dict()) == list(before_state)  # fx rewrites keep parameter names

    # the input model is untouched
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, CTU) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(X), before_out)

    # beta = 1 (set in place, as a beta sweep does) is the original network bit for bit
    set_beta(ct, 1.0)
    out, _, ctu_calls = run_counting(ct, X)
    assert torch.equal(out, before_out) and ctu_calls == sites


def test_timm_blocks_swapped_without_fx_torchvision_blocks_rewritten():
    timm_model = timm.create_model("resnet18", pretrained=False).eval()
    timm_ct = apply_ct(timm_model, 1.0)
    assert type(timm_ct.layer1[0]) is type(timm_model.layer1[0])  # act1 / act2: one site each
    assert isinstance(timm_ct.layer1[0].act1, CTU) and isinstance(timm_ct.layer1[0].act2, CTU)
    with torch.no_grad():
        assert torch.equal(timm_ct(X), timm_model(X))

    tv_model = torchvision.models.resnet18().eval()
    tv_ct = apply_ct(tv_model, 1.0)
    block = tv_ct.layer1[0]
    assert isinstance(block, torch.fx.GraphModule)  # self.relu was used at two sites
    assert isinstance(block.relu, CTU) and isinstance(block.relu_1, CTU) and block.relu is not block.relu_1
    assert isinstance(tv_ct.relu, CTU) and not isinstance(tv_ct, torch.fx.GraphModule)  # stem: module swap
    with torch.no_grad():
        assert torch.equal(tv_ct(X), tv_model(X))

    clf = apply_ct(create_backbone("resnet18", source="torchvision", num_classes=3).eval(), 0.9)
    assert isinstance(clf, Classifier) and clf.features(X).shape == (1, 512)


# ---------------------------------------------------------------- functional / odd sites


class Functional(nn.Module):
    """ReLU through every route: functional, method, in-place (result ignored), built inside
    forward, and one registered module used at two sites; `scale` is specialised to its default."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        a = F.relu(self.lin(x))
        b = F.relu(input=a - 1)
        c = (b - 0.5).relu()
        d = c - 0.25
        F.relu(d, inplace=True)  # d is read again below and must see the activation
        e = nn.ReLU()(d - 0.1) + torch.relu_((x - 0.05).clone())
        f = self.act(e - 0.2)
        return self.act(f - 0.3) + d


def functional_reference(model: Functional, x: torch.Tensor, act) -> torch.Tensor:
    """`Functional.forward` written out with `act` at each of its 8 ReLU sites."""
    d = act(act(act(act(model.lin(x)) - 1) - 0.5) - 0.25)
    e = act(d - 0.1) + act(x - 0.05)
    return act(act(e - 0.2) - 0.3) + d


def test_functional_and_reused_sites():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(16, 4) * 2
    with torch.no_grad():
        expected_relu = model(x)
        assert torch.equal(expected_relu, functional_reference(model, x, torch.relu))
    assert run_counting(model, x)[1] == 8

    ct = apply_ct(model, beta=0.7, coeff=0.5, example_input=x)
    assert ct.ct_sites == 8
    assert run_counting(ct, x)[1:] == (0, 8)
    assert count_relu_calls(model, x) == 8 and count_relu_calls(ct, x) == 0
    with torch.no_grad():
        torch.testing.assert_close(ct(x), functional_reference(model, x, CTU(0.7, 0.5)), rtol=0, atol=1e-6)
        set_beta(ct, 0.9, coeff=0.2)
        assert torch.equal(ct(x), apply_ct(model, 0.9, coeff=0.2)(x))
        set_beta(ct, 1.0)
        assert torch.equal(ct(x), expected_relu)
    with pytest.raises(AssertionError, match="specialized"):
        ct(x, scale=2.0)


def test_model_without_relu_is_an_error():
    with pytest.raises(ValueError, match="no ReLU activation sites"):
        apply_ct(nn.Sequential(nn.Linear(4, 4), nn.GELU()), 0.9)
    assert "CT needs a ReLU network" in NO_SITES_MSG
    with pytest.raises(ValueError):
        apply_trainable_ct(nn.Sequential(nn.Linear(4, 4), nn.GELU()), torch.randn(2, 4))
    with pytest.raises(ValueError):
        set_beta(nn.Linear(2, 2), 0.5)


class DataDependent(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.numel() > 0 else x  # control flow on a traced value: fx cannot trace it


def test_untraceable_functional_relu_is_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), DataDependent())
    x = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="1 ReLU calls remain.*2: TraceError"):
        apply_ct(model, 0.9, example_input=x)


# ---------------------------------------------------------------- trainable CT


def test_trainable_ctu_matches_ctu_per_channel():
    torch.manual_seed(0)
    betas, coeffs = torch.tensor([0.1, 0.6, 0.95]), torch.tensor([0.0, 0.5, 1.0])
    unit = TrainableCTU(3, channel_dim=1)
    unit_last = TrainableCTU(3, channel_dim=-1)
    with torch.no_grad():
        for u in (unit, unit_last):
            u.r.copy_(torch.logit(betas))
            u.q.copy_(torch.logit(coeffs.clamp(1e-7, 1 - 1e-7)))
    x = torch.randn(2, 3, 4, 4) * 3
    out = unit(x)
    out_last = unit_last(x.permute(0, 2, 3, 1))
    for k in range(3):
        ref = CTU(betas[k].item(), coeffs[k].item())(x[:, k])
        torch.testing.assert_close(out[:, k], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_last[..., k], ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit(x.bfloat16()).dtype == torch.bfloat16


def test_apply_trainable_ct_on_bottleneck_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = X
    tr = apply_trainable_ct(model, x)
    units = [m for m in tr.modules() if isinstance(m, TrainableCTU)]
    assert tr.ct_sites == len(units) == len({id(u) for u in units}) == 49
    assert run_counting(tr, x)[1] == 0
    block = tr.layer1[0]
    assert [block.relu.num_channels, block.relu_1.num_channels, block.relu_2.num_channels] == [64, 64, 256]
    assert tr.relu.num_channels == 64 and tr.layer4[2].relu_2.num_channels == 2048
    assert all(u.channel_dim == 1 for u in units)
    beta, coeff = mean_beta_coeff(tr)
    assert beta == pytest.approx(1 / (1 + math.exp(-1.386)), abs=1e-6) and abs(beta - 0.8) < 1e-3
    assert coeff == 0.5
    params = ct_parameters(tr)
    assert len(params) == 2 * 49 and all(p.requires_grad for p in params)
    # gradients reach every r and q (backbone weights frozen)
    for p in tr.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    tr(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert not any(isinstance(m, TrainableCTU) for m in model.modules())


def test_trainable_ct_channel_dims_and_mean():
    mlp = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.ReLU())
    for x in (torch.randn(4, 3), torch.randn(4, 7, 3)):
        tr = apply_trainable_ct(mlp, x)
        assert [(m.num_channels, m.channel_dim) for m in tr.modules() if isinstance(m, TrainableCTU)] == [
            (5, -1),
            (2, -1),
        ]
        assert tr(x).shape == mlp(x).shape
    with torch.no_grad():
        tr[1].r.fill_(math.log(0.9 / 0.1))
        tr[3].r.fill_(math.log(0.6 / 0.4))
        tr[1].q.fill_(0.0)
        tr[3].q.fill_(math.log(0.2 / 0.8))
    beta, coeff = mean_beta_coeff(tr)
    assert beta == pytest.approx((5 * 0.9 + 2 * 0.6) / 7, abs=1e-6)  # mean over all channels
    assert coeff == pytest.approx((5 * 0.5 + 2 * 0.2) / 7, abs=1e-6)


# ---------------------------------------------------------------- ReLU6 / LeakyReLU / Hardtanh kinks

from rftbench.methods.ct import NOT_PIECEWISE_MSG, CTHardtanh, CTLeakyReLU  # noqa: E402

VALUES = torch.tensor([-1e4, -20.0, -7.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.9, 6.0, 6.1, 9.0, 1e4],
                      dtype=torch.float64)


def test_piecewise_affine_identities_on_hand_made_values():
    relu = torch.relu
    torch.testing.assert_close(F.relu6(VALUES), relu(VALUES) - relu(VALUES - 6), rtol=0, atol=0)
    for lo, hi in [(-1.0, 1.0), (-2.0, 3.0), (0.0, 6.0)]:
        expected = lo + relu(VALUES - lo) - relu(VALUES - hi)
        torch.testing.assert_close(F.hardtanh(VALUES, lo, hi), expected, rtol=0, atol=0)
    for s in (0.01, 0.2, -0.5):
        torch.testing.assert_close(F.leaky_relu(VALUES, s), s * VALUES + (1 - s) * relu(VALUES), rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_ct_kink_modules_are_the_smoothed_identities(beta):
    u = CTU(beta, 0.5)
    x = VALUES
    torch.testing.assert_close(CTHardtanh(0.0, 6.0, CTU(beta), CTU(beta))(x), u(x) - u(x - 6), rtol=0, atol=0)
    torch.testing.assert_close(CTHardtanh(-2.0, 3.0, CTU(beta), CTU(beta))(x), -2 + u(x + 2) - u(x - 3), rtol=0, atol=0)
    torch.testing.assert_close(CTLeakyReLU(0.2, CTU(beta))(x), 0.2 * x + 0.8 * u(x), rtol=0, atol=0)
    # hand value: ReLU6 at x = 0 is s ln 2 / 2 - CTU(-6) (c = 1/2), s = 1 - beta + eps
    s = 1 - beta + EPS
    assert CTHardtanh(0.0, 6.0, CTU(beta), CTU(beta))(torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(
        s * math.log(2) / 2 - ctu_reference(-6.0, beta, 0.5), rel=1e-9
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kink_modules_at_beta_one_are_the_native_ops_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = (torch.randn(1000, dtype=torch.float64) * 8).to(dtype)
    x[:4] = torch.tensor([0.0, -0.0, 6.0, -1.0]).to(dtype)
    assert torch.equal(CTHardtanh(0.0, 6.0, CTU(1.0), CTU(1.0))(x), F.relu6(x))
    assert torch.equal(CTHardtanh(-1.0, 2.5, CTU(1.0), CTU(1.0))(x), F.hardtanh(x, -1.0, 2.5))
    assert torch.equal(CTLeakyReLU(0.1, CTU(1.0))(x), F.leaky_relu(x, 0.1))
    # and so are their gradients at the kinks
    k = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64, requires_grad=True)
    (g_ct,) = torch.autograd.grad(CTHardtanh(-1.0, 2.5, CTU(1.0), CTU(1.0))(k).sum(), k)
    (g_native,) = torch.autograd.grad(F.hardtanh(k, -1.0, 2.5).sum(), k)
    assert torch.equal(g_ct, g_native)


def finite_differences(f, x0: float, h: float) -> tuple[float, float, float]:
    """(left derivative, right derivative, second difference) of a scalar function at x0, float64."""
    v = f(torch.tensor([x0 - h, x0, x0 + h], dtype=torch.float64))
    left, right = (v[1] - v[0]).item() / h, (v[2] - v[1]).item() / h
    return left, right, (v[2] - 2 * v[1] + v[0]).item() / h**2


KINKED = {  # name: (plain activation, CT version at beta, kinks)
    "relu6": (nn.ReLU6(), lambda b: CTHardtanh(0.0, 6.0, CTU(b), CTU(b)), [0.0, 6.0]),
    "hardtanh": (nn.Hardtanh(-2.0, 3.0), lambda b: CTHardtanh(-2.0, 3.0, CTU(b), CTU(b)), [-2.0, 3.0]),
    "leaky_relu": (nn.LeakyReLU(0.2), lambda b: CTLeakyReLU(0.2, CTU(b)), [0.0]),
}


@pytest.mark.parametrize("name", list(KINKED))
@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_ct_smooths_every_kink(name, beta):
    plain, make, kinks = KINKED[name]
    ct = make(beta)
    h = 1e-4
    for k in kinks:
        left, right, second = finite_differences(plain, k, h)
        assert abs(right - left) > 0.5 and abs(second) > 0.5 / h  # a kink: jump in slope, f'' ~ 1 / h
        left, right, second = finite_differences(ct, k, h)
        assert abs(right - left) < 10 * h / (1 - beta)  # C1: one-sided slopes agree to O(h f'')
        assert math.isfinite(second) and abs(second) < 2 / (1 - beta)  # |f''| bounded by ~ 1 / (2 s)
        assert abs(ct(torch.tensor([k], dtype=torch.float64)) - plain(torch.tensor([k], dtype=torch.float64))) > 1e-3


class Kinked(nn.Module):
    """LeakyReLU and Hardtanh as modules (one reused at two sites) and functionally (in place too)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.leaky = nn.LeakyReLU(0.1)
        self.clip = nn.Hardtanh(-1.5, 2.0)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU6())

    def forward(self, x):
        a = self.leaky(self.lin1(x))
        b = self.clip(a - 0.3)
        c = F.hardtanh(b, min_val=-1.0, max_val=0.5) + F.relu6(a) + F.leaky_relu(b, 0.3)
        d = self.lin2(c)
        F.hardtanh_(d, -2.0, 2.0)  # d is read again below
        return self.head(self.leaky(d - 0.1)) + d


def kinked_reference(m: Kinked, x: torch.Tensor, beta: float) -> torch.Tensor:
    def ht(v, lo, hi):
        return CTHardtanh(lo, hi, CTU(beta), CTU(beta))(v)

    def leaky(v, s):
        return CTLeakyReLU(s, CTU(beta))(v)

    a = leaky(m.lin1(x), 0.1)
    b = ht(a - 0.3, -1.5, 2.0)
    d = ht(m.lin2(ht(b, -1.0, 0.5) + ht(a, 0.0, 6.0) + leaky(b, 0.3)), -2.0, 2.0)
    return ht(m.head[0](leaky(d - 0.1, 0.1)), 0.0, 6.0) + d


def test_leaky_hardtanh_model_modules_and_functional():
    torch.manual_seed(0)
    model = Kinked().eval()
    x = torch.randn(64, 4) * 3
    with torch.no_grad():
        plain = model(x)
    assert count_relu_calls(model, x) == 8
    for beta in (1.0, 0.8):
        ct = apply_ct(model, beta, example_input=x if beta < 1 else None)
        assert ct.ct_sites == count_ct_sites(ct) == 2 * 5 + 3  # 5 Hardtanh / ReLU6 sites, 3 LeakyReLU
        with torch.no_grad():
            out = ct(x)
            torch.testing.assert_close(out, kinked_reference(model, x, beta), rtol=0, atol=1e-6)
        if beta == 1.0:
            torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)
        else:
            assert (out - plain).abs().max() > 1e-2
            assert count_relu_calls(ct, x) == 0
            set_beta(ct, 1.0)
            with torch.no_grad():
                torch.testing.assert_close(ct(x), plain, rtol=0, atol=1e-6)


def test_mobilenet_v2_relu6():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
    assert count_relu_calls(model, X) == 35
    with torch.no_grad():
        plain = model(X)
    ct = apply_ct(model, 1.0, example_input=X)
    assert ct.ct_sites == count_ct_sites(ct) == 70  # two kinks per ReLU6
    assert sum(isinstance(m, CTHardtanh) for m in ct.modules()) == 35 and count_relu_calls(ct, X) == 0
    assert list(ct.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ct(X), plain, rtol=0, atol=1e-6)
        set_beta(ct, 0.9)
        smooth = ct(X)
    assert (smooth - plain).abs().max() > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(apply_ct(model, 0.9)(X), smooth, rtol=0, atol=0)

    tr = apply_trainable_ct(model, X)
    units = [m for m in tr.modules() if isinstance(m, TrainableCTU)]
    assert tr.ct_sites == len(units) == len({id(u) for u in units}) == 70
    assert len(ct_parameters(tr)) == 140
    pairs = [(m.kink_lo.num_channels, m.kink_hi.num_channels) for m in tr.modules() if isinstance(m, CTHardtanh)]
    assert pairs[0] == (32, 32) and pairs[-1] == (1280, 1280) and all(a == b for a, b in pairs)
    beta, coeff = mean_beta_coeff(tr)
    assert beta == pytest.approx(1 / (1 + math.exp(-1.386)), abs=1e-6) and coeff == 0.5


def test_hardswish_hardsigmoid_are_refused_by_name():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    for convert in (lambda: apply_ct(model, 0.9), lambda: apply_trainable_ct(model, X)):
        with pytest.raises(ValueError, match=r"not piecewise affine.*Hardswish x\d+, Hardsigmoid x\d+"):
            convert()
    assert "Hardswish" in NOT_PIECEWISE_MSG and "Hardsigmoid" in NOT_PIECEWISE_MSG

    class FunctionalGate(nn.Module):
        def forward(self, x):
            return F.hardswish(torch.relu(x) - 1)

    with pytest.raises(ValueError, match=r"not piecewise affine.*F.hardswish x1"):
        apply_ct(FunctionalGate(), 0.9, example_input=torch.randn(2, 3))
