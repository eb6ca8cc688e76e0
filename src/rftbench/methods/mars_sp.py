"""`method=mars_sp`: MARS-SP (Gouk, Hospedales & Pontil, "Distance-Based Regularisation of Deep
Networks for Fine-Tuning", ICLR 2021).

After every optimizer step each constrained weight W is projected back into the ball
mars(W - W0) <= radius around its pre-trained value W0, with
mars(D) = max_i sum_j |D_ij| (the infinity operator norm of D reshaped to (out, -1)) and the
projection W0 + (W - W0) / max(1, mars(W - W0) / radius). Radii are fixed and separate per layer
kind: convolution, linear and normalisation weights (`radius_conv`, `radius_linear`,
`radius_norm`). Biases and the new head are unconstrained (the head has no pre-trained W0).
The projection lives in `MARSSGD` (SGD + projection after each step; anchors kept in the
optimizer state, so they survive `state_dict`/`load_state_dict` and fit's resume).
Deviations: the shared recipe (SGD nesterov, cosine, best val epoch) with the optimizer's weight
decay 0 (the constraint replaces it), instead of the authors' per-dataset schedules.
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training, unfreeze
from rftbench.train import RunContext, count_params, fit

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def mars(d: torch.Tensor) -> torch.Tensor:
    """Maximum absolute row sum of `d` reshaped to (out, -1) (a scalar: its absolute value)."""
    return d.abs().reshape(d.shape[0] if d.dim() else 1, -1).sum(1).max()


def project_tensor(w: torch.Tensor, w0: torch.Tensor, radius: float) -> torch.Tensor:
    """w0 + (w - w0) / max(1, mars(w - w0) / radius); `w` itself (unchanged) when inside the ball."""
    d = w - w0
    ratio = float(mars(d)) / radius
    return w if ratio <= 1.0 else w0 + d / ratio


class MARSSGD(torch.optim.SGD):
    """SGD whose param groups may carry a `radius` (None: unconstrained): after each step, every
    tensor of such a group is projected into the MARS ball of that radius around its value at
    construction (`state[p]["anchor"]`)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)
        for group in self.param_groups:
            group.setdefault("radius", None)
            if group["radius"] is not None:
                for p in group["params"]:
                    self.state[p]["anchor"] = p.detach().clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group["radius"] is not None:
                for p in group["params"]:
                    new = project_tensor(p, self.state[p]["anchor"], group["radius"])
                    if new is not p:
                        p.copy_(new)
        return loss

    def ratios(self, names: dict[nn.Parameter, str]) -> pd.DataFrame:
        """Per constrained tensor: name, radius and mars(w - w0) / radius."""
        return pd.DataFrame([{"param": names.get(p, ""), "radius": g["radius"],
                              "ratio": float(mars(p.detach() - self.state[p]["anchor"])) / g["radius"]}
                             for g in self.param_groups if g["radius"] is not None for p in g["params"]])


def param_groups(model: Classifier, *, radius_conv: float, radius_linear: float,
                 radius_norm: float) -> list[dict]:
    """Groups of `model`'s trainable tensors by radius: conv / linear / norm weights of the body,
    and the rest (biases, head, other tensors) unconstrained (radius None)."""
    kinds = {"conv": [], "linear": [], "norm": []}
    for m in model.body.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            kinds["conv"].append(w)
        elif isinstance(m, nn.Linear):
            kinds["linear"].append(w)
        elif isinstance(m, NORMS):
            kinds["norm"].append(w)
    taken = {id(p) for ps in kinds.values() for p in ps}
    radius = {"conv": radius_conv, "linear": radius_linear, "norm": radius_norm}
    groups = [{"params": ps, "radius": float(radius[k])} for k, ps in kinds.items() if ps]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return groups + ([{"params": rest, "radius": None}] if rest else [])


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, radius_conv: float, radius_linear: float,
          radius_norm: float, recipe: dict) -> Adapted:
    """Fine-tune all of `model` with MARS-SP projections after every step."""
    recipe = dict(recipe)

    def train(m: Classifier) -> Adapted:
        unfreeze(m)
        groups = param_groups(m, radius_conv=radius_conv, radius_linear=radius_linear, radius_norm=radius_norm)
        res = fit(m, suite.train, suite.val, ctx, checkpoint_key="mars_sp", params=groups, **recipe)
        if not isinstance(res.optimizer, MARSSGD):
            raise ValueError("method=mars_sp needs method.finetune.optimizer to be rftbench.methods.mars_sp.MARSSGD")
        table = res.optimizer.ratios({p: n for n, p in m.named_parameters()})
        return Adapted(m, val_acc=res.best_val_acc, trainable_params=count_params(m, trainable=True),
                       train_time_s=res.train_time_s,
                       tables={"history": pd.DataFrame(res.history), "mars_ratio": table},
                       info={"best_epoch": res.best_epoch, "converged": int(res.converged),
                             "max_ratio": float(table["ratio"].max()) if len(table) else 0.0})

    key = {"mars_sp": {"radius_conv": radius_conv, "radius_linear": radius_linear,
                       "radius_norm": radius_norm, "recipe": recipe}}
    return cached_training(model, ctx, key, train)
