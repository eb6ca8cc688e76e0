"""Surgical fine-tuning (Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution
Shifts", ICLR 2023): train one block of the network, everything else frozen; and Auto-RGN, all
parameters trained with each tensor's learning rate scaled by its relative gradient norm.

- `blocks(model)`: the blocks of a `Classifier`, in depth order: block1 = the stem with the first
  stage (as the official code's `first_two_block` = conv1 + block1), then one block per further
  stage, and `head`. The head is trained only as its own block (`last` in the official code).
- `block: first|last|<name>|auto`; `auto` trains one model per block and keeps the best on val
  (ties -> the earlier block); `surgical_blocks.csv` holds every block's val accuracy.
- Auto-RGN: `rgn_scales` = (||g_i|| / ||w_i||) / max_j (||g_j|| / ||w_j||), applied to the lr of
  every tensor at every optimizer step (`RGNSGD`).

Deviations from the official code (anniesch/surgical-finetuning), with reasons:
- the shared fine-tuning recipe (SGD, cosine, best val epoch) instead of Adam over an lr grid: every
  method of the benchmark uses one budget and recipe, lr tuned by the shared `hp_seed` draws;
- RGN is recomputed at every step from the batch's gradient (the official code: once per epoch,
  averaged over 5 batches) and covers every tensor, BatchNorm included (the official code leaves
  BatchNorm parameters out of the optimizer): the brief's "all parameters, every step";
- BatchNorm running statistics of the frozen blocks update during training, as in the official code
  (model in train mode); only parameters are frozen.
"""
from __future__ import annotations

import copy
from typing import Callable

import pandas as pd
import torch
from torch import nn

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training, freeze
from rftbench.selection import best_index
from rftbench.train import RunContext, count_params, fit

STAGE_CONTAINERS = ("stages", "blocks", "layers")


def _units(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children of `body` with parameters; a stage container (timm `stages`/`blocks`/
    `layers`) contributes each of its children."""
    out = []
    for name, child in body.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name in STAGE_CONTAINERS and len(list(child.children())) > 1:
            out += [(f"{name}.{n}", c) for n, c in child.named_children() if any(True for _ in c.parameters())]
        else:
            out.append((name, child))
    return out


def _is_stage(name: str) -> bool:
    return name.startswith("layer") or name.split(".")[0] in STAGE_CONTAINERS


def blocks(model: Classifier) -> dict[str, list[str]]:
    """{block name: parameter names of `model`} in depth order: `block1` (stem + first stage),
    `block2`.., `head`. Modules before the first stage join block1, modules after the last stage
    (a final norm) join the last stage block; every parameter is in exactly one block."""
    units = _units(model.body)
    stages = [i for i, (n, _) in enumerate(units) if _is_stage(n)] or list(range(len(units)))
    groups: list[list[tuple[str, nn.Module]]] = [[] for _ in stages]
    for i, unit in enumerate(units):
        k = sum(s <= i for s in stages) - 1
        groups[max(k, 0)].append(unit)
    out = {f"block{j + 1}": [f"body.{n}.{p}" for n, m in g for p, _ in m.named_parameters()]
           for j, g in enumerate(groups)}
    out["head"] = [f"head.{p}" for p, _ in model.head.named_parameters()]
    return out


def resolve_block(names: list[str], block: str) -> str:
    if block == "first":
        return names[0]
    if block == "last":
        return names[-1]
    if block not in names:
        raise ValueError(f"surgical block={block!r} not valid; choose first, last, auto or one of {names}")
    return block


def train_block(model: Classifier, suite: Suite, ctx: RunContext, block: str, recipe: dict) -> Adapted:
    """Fine-tune only `block`'s parameters with the shared recipe (cached by block and recipe)."""
    names = set(blocks(model)[block])

    def train(m: Classifier) -> Adapted:
        freeze(m)
        for n, p in m.named_parameters():
            p.requires_grad_(n in names)
        res = fit(m, suite.train, suite.val, ctx, checkpoint_key=f"surgical-{block}", **recipe)
        return Adapted(m, val_acc=res.best_val_acc, trainable_params=count_params(m, trainable=True),
                       train_time_s=res.train_time_s,
                       info={"best_epoch": res.best_epoch, "converged": int(res.converged)})

    return cached_training(model, ctx, {"surgical": block, "finetune": recipe}, train)


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, block: str, recipe: dict) -> Adapted:
    """One block fine-tuned; `auto`: every block tried, the best on val kept (ties -> earlier)."""
    names = list(blocks(model))
    tried = names if block == "auto" else [resolve_block(names, block)]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for b in tried:
        model.load_state_dict(start)
        results.append(train_block(model if len(tried) == 1 else copy.deepcopy(model), suite, ctx, b, recipe))
    i = best_index([r.val_acc for r in results])
    best = results[i]
    table = pd.DataFrame({"block": tried, "val_acc": [r.val_acc for r in results],
                          "trainable_params": [r.trainable_params for r in results],
                          "chosen": [int(j == i) for j in range(len(tried))]})
    info = {"block": tried[i], "converged": best.info.get("converged", 1)}
    return Adapted(best.model, val_acc=best.val_acc, trainable_params=best.trainable_params,
                   train_time_s=sum(r.train_time_s for r in results),
                   reused_time_s=sum(r.reused_time_s for r in results),
                   tables={"surgical_blocks": table}, info=info)


def rgn_scales(grads: list[torch.Tensor], weights: list[torch.Tensor], eps: float = 1e-12) -> list[float]:
    """Auto-RGN: (||g_i|| / ||w_i||) / max_j (||g_j|| / ||w_j||) per tensor (0 for a zero max)."""
    rel = [float(g.norm()) / max(float(w.norm()), eps) for g, w in zip(grads, weights)]
    top = max(rel, default=0.0)
    return [r / top if top > 0 else 0.0 for r in rel]


class RGNSGD(torch.optim.SGD):
    """SGD with one group per tensor whose lr is scaled by `rgn_scales` at every step."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__([{"params": [p]} for p in params], lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)
        self.last_scales: list[float] = []

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        live = [g for g in self.param_groups if g["params"][0].grad is not None]
        scales = rgn_scales([g["params"][0].grad for g in live], [g["params"][0] for g in live])
        lrs = [g["lr"] for g in live]
        for g, s in zip(live, scales):
            g["lr"] = g["lr"] * s
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(live, lrs):
                g["lr"] = lr
            self.last_scales = scales


def adapt_rgn(model: Classifier, suite: Suite, ctx: RunContext, *, optimizer: Callable, epochs: int,
              batch_size: int, scheduler: dict | None = None) -> Adapted:
    """Auto-RGN: every parameter trained, each tensor's lr scaled by its relative gradient norm."""
    for p in model.parameters():
        p.requires_grad_(True)
    res = fit(model, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
              scheduler=scheduler, checkpoint_key="surgical-rgn")
    if not isinstance(res.optimizer, RGNSGD):
        raise ValueError("method=surgical_rgn needs method.adapt.optimizer rftbench.methods.surgical.RGNSGD")
    return Adapted(model, val_acc=res.best_val_acc, trainable_params=count_params(model, trainable=True),
                   train_time_s=res.train_time_s, tables={"history": pd.DataFrame(res.history)},
                   info={"best_epoch": res.best_epoch, "converged": int(res.converged)})
