"""Fast Trainable Projection (FTP; Tian et al., NeurIPS 2023): `FTPSGD` and `FTPAdamW`.

Each step takes an unconstrained base step (SGD with momentum, or AdamW), then pulls every
constrained parameter back toward its pre-trained value W0 (its value when the optimizer was
built): each row of `c = p - W0` whose L1 norm exceeds a per-tensor radius gamma is shrunk to
gamma. gamma is itself trained by Adam on the hyper-gradient <grad, d p / d gamma> of the previous
projection. Parameters in `exclude` (the new classifier head) take the plain base step.

A "row" is a slice along dim 0; 0-D and 1-D tensors are a single row. All state (W0, gamma and its
moments, the previous deviation and inverse row norms, the base optimizer's buffers) lives in
`self.state[p]`, the global step counter in every param group as "ftp_step", so everything
round-trips through `state_dict()` / `load_state_dict()`. A parameter without a gradient at a step
is skipped and keeps its state; its first update (at any global step) starts gamma at 1e-8.
The numerics follow docs/methods.md section 2; no step synchronises with the device.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

GAMMA_LR = 1e-2
GAMMA_BETAS = (0.9, 0.999)
GAMMA_EPS = 1e-8
GAMMA_INIT = 1e-8
NORM_EPS = 1e-8


def _rows(x: Tensor) -> Tensor:
    """Sum of each slice along dim 0 (keepdim); a single sum for 0-D / 1-D tensors."""
    return x.sum(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x.sum()


def _row_l1(x: Tensor) -> Tensor:
    """`_rows(x.abs())` without the temporary."""
    if x.dim() > 1:
        return torch.linalg.vector_norm(x, ord=1, dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.linalg.vector_norm(x, ord=1)


class _FTPOptimizer(Optimizer):
    """Base step (`_base_step`, in place) followed by the trainable projection toward W0."""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], exclude: Iterable[Tensor]):
        self._exclude = tuple(exclude)
        self._excluded_ids = {id(p) for p in self._exclude}
        super().__init__(params, defaults)
        in_groups = {id(p) for group in self.param_groups for p in group["params"]}
        if self._exclude and not self._excluded_ids & in_groups:
            raise ValueError("FTP exclude matches none of the optimized parameters")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its parameters' current values become their anchors W0."""
        k = param_group.get("k", self.defaults["k"])
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"FTP k must be in [0, 1], got {k}")
        step = max((group["ftp_step"] for group in self.param_groups), default=0)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("ftp_step", step)
        for p in group["params"]:
            if id(p) not in self._excluded_ids:
                self.state[p]["anchor"] = p.detach().clone()

    def _base_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Apply the unconstrained update in place: p <- p - u (grads are not modified)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["ftp_step"] += 1
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("FTP optimizers do not support sparse gradients")
            self._base_step(group, params, grads)
            constrained = [(p, g) for p, g in zip(params, grads) if id(p) not in self._excluded_ids]
            if constrained:
                self._project(group, *map(list, zip(*constrained)))
        return loss

    def _project(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Update gamma per parameter and project p (already base-stepped) toward W0."""
        states = [self.state[p] for p in params]
        running = [i for i, s in enumerate(states) if "c_prev" in s]
        if running:
            # hyper-gradient w.r.t. the previous gamma: sum(rows(grad * c_prev) * inv_prev); the
            # product is formed in the c_prev buffer, which then receives the new c (no temporaries)
            prods = [states[i]["c_prev"] for i in running]
            torch._foreach_mul_(prods, [grads[i] for i in running])
            hyper = torch.stack([(_rows(x) * states[i]["inv_prev"]).sum() for x, i in zip(prods, running)])
        devs = [  # c = (p - u) - W0
            torch.sub(p, s["anchor"], out=s["c_prev"]) if "c_prev" in s else p - s["anchor"]
            for p, s in zip(params, states)
        ]
        norms = [_row_l1(c) for c in devs]
        torch._foreach_add_(norms, NORM_EPS)  # n
        for s in states:
            if "gamma" not in s:  # first update of this parameter: gamma = 1e-8, moments zero
                s["gamma"] = torch.full((), GAMMA_INIT, dtype=s["anchor"].dtype, device=s["anchor"].device)
                s["gamma_m"] = torch.zeros_like(s["gamma"])
                s["gamma_v"] = torch.zeros_like(s["gamma"])
        if running:
            max_norms = torch.stack(torch._foreach_max([norms[i] for i in running]))
            _update_gamma(group["ftp_step"], group["k"], hyper, [states[i] for i in running], max_norms)

        scales = torch._foreach_div([s["gamma"] for s in states], norms)
        torch._foreach_clamp_max_(scales, 1.0)  # clamp(gamma / n, 0, 1): gamma, n > 0
        for p, s, scale, c in zip(params, states, scales, devs):
            torch.addcmul(s["anchor"], scale, c, out=p)  # p = W0 + clamp(gamma / n, 0, 1) * c
        for s, c, inv in zip(states, devs, torch._foreach_reciprocal(norms)):
            s["c_prev"], s["inv_prev"] = c, inv


def _update_gamma(t: int, k: float, hyper: Tensor, states: list[dict], max_norms: Tensor) -> None:
    """One Adam step on each gamma (bias correction with the global step t), clamped to [1e-8, max n]."""
    b1, b2 = GAMMA_BETAS
    hyper = torch.where(hyper > 0, hyper * k, hyper)
    ms, vs, gammas = ([s[key] for s in states] for key in ("gamma_m", "gamma_v", "gamma"))
    m = torch.stack(ms).mul_(b1).add_(hyper, alpha=1 - b1)
    v = torch.stack(vs).mul_(b2).addcmul_(hyper, hyper, value=1 - b2)
    gamma = torch.stack(gammas) - GAMMA_LR * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + GAMMA_EPS)
    gamma = torch.minimum(gamma.clamp_(min=GAMMA_INIT), max_norms)
    for dst, src in ((ms, m), (vs, v), (gammas, gamma)):
        torch._foreach_copy_(dst, src.unbind())


class FTPSGD(_FTPOptimizer):
    """FTP over SGD; the base step has `torch.optim.SGD` semantics (weight decay added to the grad)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        k: float = 1.0,
        exclude: Iterable[Tensor] = (),
    ):
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid SGD settings: lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, k=k)
        super().__init__(params, defaults, exclude)

    def _base_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        momentum, wd = group["momentum"], group["weight_decay"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            states = [self.state[p] for p in params]
            old = [(s["momentum_buffer"], g) for s, g in zip(states, grads) if "momentum_buffer" in s]
            for s, g in zip(states, grads):
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = g.detach().clone()
            if old:
                bufs, old_grads = map(list, zip(*old))
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, old_grads, alpha=1 - group["dampening"])
            bufs = [s["momentum_buffer"] for s in states]
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])


class FTPAdamW(_FTPOptimizer):
    """FTP over AdamW; the base step has `torch.optim.AdamW` semantics, i.e. with the parameter's own
    step count s, u = lr/(1-b1^s) * m / (sqrt(v)/sqrt(1-b2^s) + eps) + lr*wd*p (applied like torch:
    p *= 1 - lr*wd, then the Adam step)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        k: float = 1.0,
        exclude: Iterable[Tensor] = (),
    ):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, k=k)
        super().__init__(params, defaults, exclude)

    def _base_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
        states = [self.state[p] for p in params]
        for s, p in zip(states, params):
            if "step" not in s:
                s["step"] = 0
                s["exp_avg"] = torch.zeros_like(p)
                s["exp_avg_sq"] = torch.zeros_like(p)
            s["step"] += 1
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - b2 ** s["step"]) ** 0.5 for s in states])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - b1 ** s["step"]) for s in states])
