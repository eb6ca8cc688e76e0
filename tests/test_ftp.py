"""FTPSGD / FTPAdamW against a plain transcription of docs/methods.md section 2, plus invariants."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rftbench.methods.ftp import FTPAdamW, FTPSGD

STEPS = 25


pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    """conv + BatchNorm + linear + LayerNorm, an auxiliary branch used on some steps only, a 0-D
    scale and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # a bias before BN gets a pure-rounding grad
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(36, 6)
        self.ln = nn.LayerNorm(6)
        self.aux = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        h = torch.tanh(self.ln(self.fc(h)))
        if use_aux:
            h = h + self.aux(h)
        return self.head(h * self.scale)


def use_aux(step: int) -> bool:
    """aux gets no gradient at steps 1-3, 6, 9, ...: its first update comes at global step 4."""
    return step >= 4 and step % 3 != 0


def make_model(dtype=torch.float64, seed=0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def make_batches(n: int, dtype=torch.float64, seed=1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def backward(model: Net, batch, step: int) -> None:
    model.zero_grad(set_to_none=True)
    x, y = batch
    F.cross_entropy(model(x, use_aux(step)), y).backward()


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.sum() if x.dim() < 2 else x.sum(dim=tuple(range(1, x.dim())), keepdim=True)


class Reference:
    """Per-parameter transcription of the FTP pseudocode with its own SGD / AdamW base steps.

    `cfg[i]` holds lr (a function of the global step t), weight_decay, k and excluded for param i.
    """

    def __init__(self, params, variant: str, cfg: list[dict]):
        self.params, self.variant, self.cfg = list(params), variant, cfg
        self.w0 = [p.detach().clone() for p in self.params]
        self.state = [{} for _ in self.params]
        self.t = 1

    def base_update(self, p, st, lr, wd):
        grad = p.grad
        if self.variant == "sgd":
            d = grad + wd * p
            st["buf"] = d.clone() if "buf" not in st else 0.9 * st["buf"] + d
            return lr * (d + 0.9 * st["buf"])
        st["s"] = s = st.get("s", 0) + 1
        st["m"] = 0.9 * st.get("m", 0.0) + 0.1 * grad
        st["v"] = 0.999 * st.get("v", 0.0) + 0.001 * grad * grad
        return lr / (1 - 0.9**s) * st["m"] / (st["v"].sqrt() / math.sqrt(1 - 0.999**s) + 1e-8) + lr * wd * p

    @torch.no_grad()
    def step(self):
        t = self.t
        for p, w0, st, cfg in zip(self.params, self.w0, self.state, self.cfg):
            if p.grad is None:
                continue
            u = self.base_update(p, st, cfg["lr"](t), cfg["weight_decay"])
            if cfg["excluded"]:
                p.sub_(u)
                continue
            c = (p - u) - w0
            n = rows(c.abs()) + 1e-8
            if "gamma" not in st:  # t == 1 for this parameter
                gamma, st["gm"], st["gv"] = 1e-8, 0.0, 0.0
            else:
                g = float((rows(p.grad * st["c"]) * st["inv"]).sum())
                if g > 0:
                    g = cfg["k"] * g
                st["gm"] = 0.9 * st["gm"] + 0.1 * g
                st["gv"] = 0.999 * st["gv"] + 0.001 * g * g
                m_hat, v_hat = st["gm"] / (1 - 0.9**t), st["gv"] / (1 - 0.999**t)
                gamma = st["gamma"] - 1e-2 * m_hat / (math.sqrt(v_hat) + 1e-8)
                gamma = min(max(gamma, 1e-8), float(n.max()))
            p.copy_(w0 + torch.clamp(gamma / n, 0, 1) * c)
            st["gamma"], st["c"], st["inv"] = gamma, c, 1 / n
        self.t += 1


def build(variant: str, params, **kw):
    if variant == "sgd":
        return FTPSGD(params, lr=kw.pop("lr", 0.05), **kw)
    return FTPAdamW(params, lr=kw.pop("lr", 0.01), **kw)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
@pytest.mark.parametrize("k", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_matches_reference_transcription(variant, k, wd):
    model = make_model()
    ref_model = copy.deepcopy(model)
    lr = 0.05 if variant == "sgd" else 0.01
    opt = build(variant, model.parameters(), lr=lr, weight_decay=wd, k=k, exclude=model.head.parameters())
    head = {id(p) for p in ref_model.head.parameters()}
    ref = Reference(ref_model.parameters(), variant, [
        dict(lr=lambda t: lr, weight_decay=wd, k=k, excluded=id(p) in head) for p in ref_model.parameters()
    ])
    clamped = unclamped = 0
    for step, batch in enumerate(make_batches(STEPS), start=1):
        backward(model, batch, step)
        backward(ref_model, batch, step)
        assert (model.aux.weight.grad is None) == (not use_aux(step))
        opt.step()
        ref.step()
        assert max_diff(model, ref_model) < 1e-10, f"step {step}"
        for p, st in zip(ref_model.parameters(), ref.state):
            if "c" in st and p.grad is not None:
                scale = torch.clamp(st["gamma"] / (1 / st["inv"]), 0, 1)
                clamped += int((scale < 1).sum())
                unclamped += int((scale == 1).sum())
    for p, st in zip(model.parameters(), ref.state):
        if "gamma" in st:
            assert opt.state[p]["gamma"].item() == pytest.approx(st["gamma"], rel=1e-9, abs=1e-15)
    assert clamped > 0  # the projection was active
    if k < 1:  # damped positive hyper-gradients let gamma outgrow some rows' deviations
        assert unclamped > 0


@torch.no_grad()
def row_distance_bound_holds(opt, dtype_eps: float) -> bool:
    """Each constrained row's L1 distance to W0 is at most gamma (up to rounding of W0 + delta)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if "gamma" not in st:
                continue
            w0 = st["anchor"]
            dist = rows((p - w0).abs())
            slack = 4 * dtype_eps * rows(p.abs() + w0.abs())
            if not bool((dist <= st["gamma"] * (1 + 1e-9) + slack).all()):
                return False
    return True


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_invariants_and_excluded_head_follows_torch(variant):
    model = make_model()
    w_init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build(variant, model.parameters(), weight_decay=0.01, exclude=model.head.parameters())
    shadow = [p.detach().clone().requires_grad_() for p in model.head.parameters()]
    if variant == "sgd":
        torch_opt = torch.optim.SGD(shadow, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    else:
        torch_opt = torch.optim.AdamW(shadow, lr=0.01, weight_decay=0.01)
    for step, batch in enumerate(make_batches(STEPS), start=1):
        backward(model, batch, step)
        for s, p in zip(shadow, model.head.parameters()):
            s.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
        for s, p in zip(shadow, model.head.parameters()):
            assert torch.equal(s, p)
        assert row_distance_bound_holds(opt, torch.finfo(torch.float64).eps)
        if step == 1:
            for n, p in model.named_parameters():
                if not n.startswith("head."):
                    assert torch.equal(opt.state[p]["anchor"], w_init[n])
                    if p.grad is not None:
                        assert opt.state[p]["gamma"].item() == 1e-8
                        assert float(rows((p.detach() - w_init[n]).abs()).max()) <= 1e-8 * (1 + 1e-6)
            assert not torch.equal(model.head.weight, w_init["head.weight"])
    assert all("anchor" not in opt.state[p] for p in model.head.parameters())


def test_exclude_validation():
    model = make_model()
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="exclude"):
        FTPSGD(model.parameters(), lr=0.1, exclude=[stranger])
    with pytest.raises(ValueError, match="exclude"):
        FTPAdamW(model.conv.parameters(), exclude=model.head.parameters())
    with pytest.raises(ValueError, match="k"):
        FTPAdamW(model.parameters(), k=1.5)
    FTPAdamW(model.parameters(), exclude=[*model.head.parameters(), stranger])  # partial match is fine


def test_added_group_is_anchored_when_added_and_joins_the_global_step():
    model = make_model()
    opt = FTPAdamW([*model.conv.parameters(), *model.bn.parameters()], lr=0.01)
    batches = make_batches(4)
    for step in range(1, 4):
        backward(model, batches[step - 1], step)
        opt.step()
    w_fc = model.fc.weight.detach().clone()
    opt.add_param_group({"params": [model.fc.weight], "k": 0.5})
    assert opt.param_groups[-1]["ftp_step"] == 3
    assert torch.equal(opt.state[model.fc.weight]["anchor"], w_fc)
    backward(model, batches[3], 4)
    opt.step()
    assert [g["ftp_step"] for g in opt.param_groups] == [4, 4]
    assert opt.state[model.fc.weight]["gamma"].item() == 1e-8  # its first update
    assert opt.state[model.conv.weight]["gamma"].item() > 1e-8
    with pytest.raises(ValueError, match="k"):
        opt.add_param_group({"params": [model.ln.weight], "k": -0.1})
    assert len(opt.param_groups) == 2


def serialize(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_state_dict_resume_is_exact(variant):
    batches = make_batches(STEPS)
    model = make_model()
    opt = build(variant, model.parameters(), weight_decay=0.01, exclude=model.head.parameters())
    for step in range(1, 11):
        backward(model, batches[step - 1], step)
        opt.step()
    saved = serialize({"model": model.state_dict(), "opt": opt.state_dict()})
    st = saved["opt"]["state"]
    assert all(key in st[0] for key in ("anchor", "gamma", "gamma_m", "gamma_v", "c_prev", "inv_prev"))
    assert all(g["ftp_step"] == 10 for g in saved["opt"]["param_groups"])

    def finish(m, o):
        for step in range(11, STEPS + 1):
            backward(m, batches[step - 1], step)
            o.step()
        return [p.detach().clone() for p in m.parameters()]

    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    fresh = build(variant, resumed.parameters(), weight_decay=0.01, exclude=resumed.head.parameters())
    unloaded = copy.deepcopy(resumed)
    fresh.load_state_dict(saved["opt"])
    expected = finish(model, opt)
    for a, b in zip(expected, finish(resumed, fresh)):
        assert torch.equal(a, b)
    # without the FTP state the run differs (anchors would be the resumed weights)
    other = build(variant, unloaded.parameters(), weight_decay=0.01, exclude=unloaded.head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(expected, finish(unloaded, other)))


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_param_groups_and_cosine_schedule(variant):
    model = make_model()
    ref_model = copy.deepcopy(model)
    t_max, base = 30, (0.05, 0.02, 0.1) if variant == "sgd" else (0.01, 0.004, 0.02)
    names = [n for n, _ in model.named_parameters()]
    kinds = ["head" if n.startswith("head.")
             else "norm" if n.startswith(("bn.", "ln.", "scale")) or n.endswith("bias")
             else "weight" for n in names]
    settings = {"weight": dict(lr=base[0], weight_decay=0.02, k=1.0),
                "norm": dict(lr=base[1], weight_decay=0.0, k=0.5),
                "head": dict(lr=base[2], weight_decay=0.02, k=1.0)}
    groups = [dict(params=[p for p, kd in zip(model.parameters(), kinds) if kd == kind], **settings[kind])
              for kind in ("weight", "norm", "head")]
    opt = build(variant, groups, exclude=model.head.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)

    def cosine(lr0):
        return lambda t: lr0 * (1 + math.cos(math.pi * (t - 1) / t_max)) / 2

    ref = Reference(ref_model.parameters(), variant, [
        dict(lr=cosine(settings[kd]["lr"]), weight_decay=settings[kd]["weight_decay"], k=settings[kd]["k"],
             excluded=kd == "head") for kd in kinds
    ])
    for step, batch in enumerate(make_batches(STEPS), start=1):
        backward(model, batch, step)
        backward(ref_model, batch, step)
        opt.step()
        ref.step()
        sched.step()
        assert max_diff(model, ref_model) < 1e-10, f"step {step}"
    assert opt.param_groups[0]["lr"] < 0.2 * base[0]


def test_float32_matches_float64():
    batches64 = make_batches(10)
    m64, m32 = make_model(), make_model(torch.float32)
    o64 = FTPAdamW(m64.parameters(), lr=0.01, exclude=m64.head.parameters())
    o32 = FTPAdamW(m32.parameters(), lr=0.01, exclude=m32.head.parameters())
    for step, (x, y) in enumerate(batches64, start=1):
        backward(m64, (x, y), step)
        backward(m32, (x.float(), y), step)
        o64.step()
        o32.step()
        assert all(opt.state[p]["gamma"].dtype == p.dtype for opt, m in ((o32, m32), (o64, m64))
                   for p in m.conv.parameters())
        assert row_distance_bound_holds(o32, torch.finfo(torch.float32).eps)
    assert max_diff(m64, m32.double()) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_cuda_matches_cpu_without_host_sync(variant):
    batches = make_batches(12)
    cpu = make_model()
    gpu = copy.deepcopy(cpu).cuda()
    o_cpu = build(variant, cpu.parameters(), exclude=cpu.head.parameters())
    o_gpu = build(variant, gpu.parameters(), exclude=gpu.head.parameters())
    for step, (x, y) in enumerate(batches, start=1):
        backward(cpu, (x, y), step)
        backward(gpu, (x.cuda(), y.cuda()), step)
        o_cpu.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            o_gpu.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert max((p - q.cpu()).abs().max().item() for p, q in zip(cpu.parameters(), gpu.parameters())) < 1e-10
