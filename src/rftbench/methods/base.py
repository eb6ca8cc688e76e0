"""What every method returns, and the helpers methods share (freezing, cached training)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
from torch import nn

from rftbench.train import RunContext
from rftbench.utils import load_cached, save_cached, stable_hash

log = logging.getLogger("rftbench")


@dataclass
class Adapted:
    """An adapted model (pixels in [0, 1] -> logits over the suite's classes) and what the method
    chose or measured: `info` (scalars, e.g. {"beta": 0.93}) becomes `chosen/<key>` result rows;
    `tables` (e.g. a beta sweep) are written to the run folder as CSV; `rows` are extra metric rows
    (`rftbench.evaluate.row`, e.g. accuracy on seen corruptions); `trainable_params` is the cost
    column."""

    model: nn.Module
    trainable_params: int
    info: dict = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cached_training(model: nn.Module, ctx: RunContext, key: dict,
                    train: Callable[[nn.Module], Adapted]) -> Adapted:
    """`train(model)`, or its cached result: the trained weights are stored under
    `<cache>/models/<hash>.safetensors`, keyed by the run's starting point (`ctx.spec`: backbone,
    suite, seed) plus `key` (the training recipe). Methods that need the same fine-tuning (WiSE-FT,
    RWS, LP-FT) share one training run this way. `model` is updated in place on a cache hit."""
    path = ctx.cache_dir / "models" / f"{stable_hash({'start': ctx.spec, 'recipe': key})}.safetensors"
    cached = load_cached(path, device=str(ctx.device))
    if cached is not None:
        state, meta = cached
        model.load_state_dict(state)
        log.info("reused cached training %s", path.name)
        info = json.loads(meta.get("info", "{}"))
        info["cached_train_time_s"] = info.pop("train_time_s", 0.0)
        return Adapted(model.eval(), int(meta.get("trainable_params", 0)), info=info)
    adapted = train(model)
    info = {k: v for k, v in adapted.info.items() if isinstance(v, (int, float, str))}
    save_cached(path, adapted.model.state_dict(),
                        {"info": json.dumps(info), "trainable_params": str(adapted.trainable_params)})
    return adapted
