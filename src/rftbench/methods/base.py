"""The method contract: what every method returns (`Adapted`, checked by `validate`), and the
helpers methods share (freezing, cached training).

A method is a function `adapt(model, suite, ctx, **knobs) -> Adapted`. It may read `suite.train`,
`suite.val` and the labelled validation splits a suite declares (e.g. `ood_val/<c>`), never the test
or OOD evaluation splits: the runner evaluates the returned model on those, and `Adapted.analysis`
(optional) computes oracle tables after the choice is fixed."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable

import pandas as pd
import torch
from torch import nn

from rftbench.train import RunContext
from rftbench.utils import load_cached, save_cached, stable_hash

log = logging.getLogger("rftbench")


@dataclass
class Adapted:
    """An adapted model (pixels in [0, 1] -> logits over the suite's classes) and what the runner
    and the leaderboard need to know about it:

    - `val_acc` (required): accuracy on `suite.val` of the returned model (the leaderboard chooses
      hyper-parameter variants by it);
    - `trainable_params`: parameters the method trained (`rftbench.train.count_params`), the cost column;
    - `train_time_s`: seconds of training behind the returned model, reused cached training included;
      `reused_time_s` is the part reused from the cache (not spent in this run; the runner adds it to
      the adaptation time);
    - `tables`: written to the run folder as `<name>.csv` (e.g. a beta sweep);
    - `rows`: extra metric rows (`rftbench.evaluate.row`);
    - `info`: free-form scalars (what was chosen or measured), recorded as `chosen/<key>` rows;
    - `analysis`: optional `f(suite) -> (tables, rows)` the runner calls after `adapt`, with the test
      splits available: oracle numbers for analysis only, never part of a choice;
    - `select_score`, `select_by`: when the method chose on validation data by another objective than
      `val_acc` (e.g. ct_robust's robust val accuracy, wise's ood_val mean), that objective's value for
      the returned model and its name; the leaderboard then ranks the method's hyper-parameter
      variants by it (None: by `val_acc`);
    - `frozen_backbone`: the returned `Classifier`'s features are those of a frozen extractor (the
      pre-trained body, possibly with CT units): the runner then evaluates it as its head on the
      feature store's rows (`rftbench.features`), shared with every other run of that extractor.
    """

    model: nn.Module
    val_acc: float
    trainable_params: int
    train_time_s: float = 0.0
    reused_time_s: float = 0.0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    analysis: Callable | None = None
    select_score: float | None = None
    select_by: str = "val_acc"
    frozen_backbone: bool = False


class ContractError(ValueError):
    """A method returned something that breaks the `Adapted` contract."""


def validate(adapted: object, method: str) -> Adapted:
    """`adapted` if it keeps the contract, else a `ContractError` naming the method and the field."""
    def bad(what: str) -> ContractError:
        return ContractError(f"method={method}: adapt must return rftbench.methods.base.Adapted with {what}; "
                             f"fix the method's adapt function")

    if not isinstance(adapted, Adapted):
        raise bad(f"all its fields, got {type(adapted).__name__}")
    if not isinstance(adapted.model, nn.Module):
        raise bad(f"`model` an nn.Module, got {type(adapted.model).__name__}")
    v = getattr(adapted, "val_acc", None)
    if not isinstance(v, Real) or isinstance(v, bool) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise bad(f"`val_acc` the accuracy in [0, 1] of the returned model on suite.val, got {v!r}")
    n = adapted.trainable_params
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise bad(f"`trainable_params` a count >= 0 (rftbench.train.count_params), got {n!r}")
    for name in ("train_time_s", "reused_time_s"):
        t = getattr(adapted, name)
        if not isinstance(t, Real) or not math.isfinite(t) or t < 0:
            raise bad(f"`{name}` seconds >= 0, got {t!r}")
    if not isinstance(adapted.tables, dict) or not isinstance(adapted.rows, list) or not isinstance(adapted.info, dict):
        raise bad("`tables` a dict, `rows` a list and `info` a dict")
    if adapted.analysis is not None and not callable(adapted.analysis):
        raise bad("`analysis` None or a function of the suite")
    sc = adapted.select_score
    if sc is not None and (not isinstance(sc, Real) or isinstance(sc, bool) or not math.isfinite(sc)):
        raise bad(f"`select_score` None or the finite value of the method's validation objective, got {sc!r}")
    if sc is not None and (not isinstance(adapted.select_by, str) or adapted.select_by in ("", "val_acc")):
        raise bad(f"`select_by` the name of the objective behind `select_score`, got {adapted.select_by!r}")
    if adapted.frozen_backbone:
        from rftbench.classifier import Classifier

        if not isinstance(adapted.model, Classifier):
            raise bad(f"`frozen_backbone` only for a rftbench Classifier, got {type(adapted.model).__name__}")
    return adapted


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
    suite, seed) plus `key` (the training recipe), with the contract fields (val_acc, trainable
    params, training time) and its tables (the training history: a reused training's run folder has
    its `history.csv` too). Methods that need the same fine-tuning (WiSE-FT, RWS, LP-FT) share one
    training run this way. `model` is updated in place on a cache hit; a reused training reports
    its time as `train_time_s` and `reused_time_s`. Entries carry a content digest
    (`rftbench.utils.save_cached`); a damaged one is reported, deleted and trained again."""
    path = ctx.cache_dir / "models" / f"{stable_hash({'start': ctx.spec, 'recipe': key})}.safetensors"
    cached = load_cached(path, device=str(ctx.device))
    if cached is not None:
        state, meta = cached
        if "val_acc" in meta:  # entries written before the contract fields are retrained
            model.load_state_dict(state)
            log.info("reused cached training %s", path.name)
            spent = float(meta["train_time_s"])
            return Adapted(model.eval(), val_acc=float(meta["val_acc"]),
                           trainable_params=int(meta["trainable_params"]), train_time_s=spent,
                           reused_time_s=spent, info=json.loads(meta.get("info", "{}")),
                           tables={k: pd.DataFrame(v) for k, v in json.loads(meta.get("tables", "{}")).items()})
    adapted = train(model)
    info = {k: v for k, v in adapted.info.items() if isinstance(v, (int, float, str))}
    tables = {k: t.to_dict(orient="list") for k, t in adapted.tables.items()}  # small: one row per epoch/step
    save_cached(path, adapted.model.state_dict(),
                {"info": json.dumps(info), "tables": json.dumps(tables), "trainable_params": str(adapted.trainable_params),
                 "val_acc": repr(float(adapted.val_acc)), "train_time_s": repr(float(adapted.train_time_s))})
    return adapted
