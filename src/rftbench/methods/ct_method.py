"""Curvature Tuning in the runner (docs/methods.md section 1): steering, trainable and robustness modes.

- `adapt` (`method=ct`): frozen backbone, CT applied once; for every beta of the grid and beta = 1
  (plain LP) a fresh linear probe on cached features (the `method=lp` recipe, the probes of all
  betas trained as one batched problem); beta chosen on val.
- `adapt_trainable` (`method=ct_trainable`): per-channel trainable CT trained with the head, backbone
  weights and BatchNorm statistics frozen, epoch chosen on val.
- `adapt_robust` (`method=ct_robust`): a classifier that already fits the task (e.g. a RobustBench
  model); only beta is swept, no probe. Beta is chosen by the objective CT is meant to improve,
  measured on validation data only (`select`):
  * `robust` (default): AutoAttack robust accuracy (`rftbench.attacks.attack`, mean over the
    configured threats) on a fixed class-balanced subset of val; the same images and the same
    attack seed for every beta (common random numbers);
  * `corruption`: mean accuracy over the suite's `ood_val` corruption splits;
  * `clean`: val accuracy.
  Why not as the official code: the CT paper's robustness experiment picks beta by robust accuracy
  on the very test points it reports, which this project forbids; and clean val accuracy, the
  other val-only choice, is flat in beta on adversarially trained models while their robust
  accuracy is not (measured on a PGD-trained MNIST network: clean val 98.6-98.7% for beta 0.8..1,
  robust accuracy 90% at beta 1 and 0% at 0.8), so choosing by it is a coin toss for robustness.
  Cost: `select=robust` runs n_betas x (one AutoAttack per threat on `val_attack.n` images);
  `info["select_time_s"]` records the time of the whole val sweep (part of `adapt_time_s`).

The sweep table (`beta_sweep.csv`: beta, val_acc, test_acc, chosen, test_acc_selection; for
`ct_robust` also val_objective, test_objective and per-threat robust accuracies) also holds each
beta's test figures: analysis only (an oracle), computed by the runner after `adapt` returns
(`Adapted.analysis`), so they can never enter the choice.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from rftbench.backbones import Classifier
from rftbench.data.base import Split, Suite, balanced_subset, batches
from rftbench.evaluate import row
from rftbench.methods.base import Adapted, freeze
from rftbench.methods.ct import (
    apply_ct,
    apply_trainable_ct,
    ct_parameters,
    mean_beta_coeff,
    set_beta,
)
from rftbench.progress import bar
from rftbench.selection import select
from rftbench.train import (
    RunContext,
    count_params,
    extract_features,
    fit,
    fit_probes,
)

log = logging.getLogger("rftbench")
DECIMALS = 10  # grid values are rounded so that e.g. 0.70 + 3 * 0.01 == 0.73 exactly


def beta_grid(betas: Mapping | Sequence[float]) -> list[float]:
    """The candidate betas, ascending: a list, or `{start, stop, step}` (both ends included) unless
    its `values` list is given; plus 1.0 (ReLU: plain LP / the model as is). Each is rounded to
    `DECIMALS` places."""
    if isinstance(betas, Mapping) and betas.get("values") is not None:
        betas = betas["values"]
    if isinstance(betas, Mapping):
        start, stop, step = (float(betas[k]) for k in ("start", "stop", "step"))
        if step <= 0 or stop < start:
            raise ValueError(f"beta grid needs step > 0 and stop >= start, got {dict(betas)}")
        values = [start + i * step for i in range(math.floor((stop - start) / step + 1e-9) + 1)]
    else:
        values = [float(b) for b in betas]
    grid = sorted({round(b, DECIMALS) for b in [*values, 1.0]})
    bad = [b for b in grid if not 0.0 <= b <= 1.0]
    if bad:
        raise ValueError(f"CT betas must lie in [0, 1], got {bad}")
    return grid


def example_input(split: Split, ctx: RunContext) -> torch.Tensor:
    """Two images of `split` on the run's device (for the site checks of `apply_ct`)."""
    return next(batches(split, 2, device=ctx.device))[0]


@contextmanager
def cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """torch's intra-op thread count set to `n` on CPU (restored on exit). The probe's small matrix
    products gain nothing from threads; on a shared machine their spin-waits cost up to 100x."""
    old = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def choose(val_accs: dict[float, float]) -> float:
    """The beta with the best val accuracy (`rftbench.selection`, ties -> the larger beta, closer to
    ReLU: candidates in descending order)."""
    betas = sorted(val_accs, reverse=True)
    return select(betas, [val_accs[b] for b in betas])


def probe_sweep(ct_model: Classifier, suite: Suite, ctx: RunContext, grid: Sequence[float],
                init: nn.Linear, probe_cfg: dict, probe_memory_gb: float | None = None
                ) -> tuple[dict[float, float], dict[float, tuple[nn.Linear, int]]]:
    """For each beta: train and val features through `ct_model` (one pass each); then the probes of
    the betas from `init` trained at once (`rftbench.train.fit_probes`: the method=lp probe, batched
    over betas). The batch holds as many betas' features as fit in `probe_memory_gb` (at least one;
    None: all): each probe is bit for bit what it would be alone, so the chunking changes memory,
    never results. Reads train and val only. Returns ({beta: val_acc}, {beta: (head, best_epoch)})."""
    ytr, yval = suite.train.labels.to(ctx.device), suite.val.labels.to(ctx.device)
    budget = math.inf if probe_memory_gb is None else probe_memory_gb * 2 ** 30
    val_accs, heads = {}, {}
    pending: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def fit_pending() -> None:
        with cpu_threads(1, ctx.device):
            fitted = fit_probes(torch.stack([t for _, t, _ in pending]), ytr,
                                torch.stack([v for _, _, v in pending]), yval, suite.num_classes, init=init,
                                seed=ctx.seed, **probe_cfg)
        for (beta, _, _), res in zip(pending, fitted):
            val_accs[beta], heads[beta] = res.val_acc, (res.head, res.best_epoch)
            log.info("beta %.4g  val_acc %.4f (probe epoch %d)", beta, res.val_acc, res.best_epoch)
        pending.clear()

    for beta in bar(grid, "CT beta sweep"):
        set_beta(ct_model, beta)
        ftr = extract_features(ct_model, suite.train, ctx).to(ctx.device)
        fval = extract_features(ct_model, suite.val, ctx).to(ctx.device)
        per_beta = (ftr.numel() + fval.numel()) * ftr.element_size()
        if pending and (len(pending) + 1) * per_beta > budget:
            fit_pending()
        pending.append((beta, ftr, fval))
    fit_pending()
    return val_accs, heads


def model_sweep(ct_model: nn.Module, split: Split, ctx: RunContext, grid: Sequence[float]) -> dict[float, float]:
    """{beta: accuracy of `ct_model` on `split`} with its head as is."""
    out = {}
    for beta in bar(grid, f"CT beta sweep ({split.name})"):
        set_beta(ct_model, beta)
        out[beta] = ctx.store.accuracy(ct_model, split, ctx)  # frozen: head on the stored features
        log.info("beta %.4g  %s_acc %.4f", beta, split.name, out[beta])
    return out


def _sweep_result(ct_model: Classifier, ctx: RunContext, val_accs: dict[float, float],
                  heads: dict[float, nn.Linear] | None, oracle_test: bool):
    """Choose beta on val and leave `ct_model` at it (with that beta's head when `heads` is given).
    Returns (beta, sweep table, analysis): with `oracle_test`, the analysis (called by the runner
    after adapt) adds each beta's ID test accuracy to the table and the oracle row."""
    best = choose(val_accs)
    set_beta(ct_model, best)
    if heads is not None:
        ct_model.head = heads[best]
    table = pd.DataFrame({"beta": list(val_accs), "val_acc": list(val_accs.values()),
                          "test_acc": float("nan"), "chosen": [b == best for b in val_accs],
                          "test_acc_selection": "oracle"})
    log.info("chose beta %.4g (val_acc %.4f)", best, val_accs[best])

    def analysis(suite: Suite) -> tuple[dict[str, pd.DataFrame], list[dict]]:
        """Each beta's ID test accuracy (an oracle, analysis only); `ct_model` is restored."""
        test_accs = {}
        try:
            for beta in val_accs:
                set_beta(ct_model, beta)
                if heads is not None:
                    ct_model.head = heads[beta]
                test_accs[beta] = ctx.store.accuracy(ct_model, suite["test"], ctx)
        finally:
            set_beta(ct_model, best)
            if heads is not None:
                ct_model.head = heads[best]
        oracle = max(test_accs, key=lambda b: (test_accs[b], b))
        full = table.assign(test_acc=[test_accs[b] for b in val_accs])
        return {"beta_sweep": full}, [row("test", "acc", test_accs[oracle], selection="oracle",
                                          detail=json.dumps({"knob": "beta", "beta": oracle}))]

    return best, table, analysis if oracle_test else None


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, betas: Mapping | Sequence[float],
          coeff: float = 0.5, probe_cfg: dict | None = None, oracle_test: bool = True,
          probe_memory_gb: float | None = 4.0) -> Adapted:
    """Steering CT: beta (grid + 1.0) chosen by the val accuracy of a linear probe on CT features
    (`probe_memory_gb`: the cached features of one batched probe, see `probe_sweep`)."""
    grid = beta_grid(betas)
    freeze(model).eval()
    ct_model = apply_ct(model, grid[0], coeff, example_input=example_input(suite.train, ctx))
    val_accs, fitted = probe_sweep(ct_model, suite, ctx, grid, model.head, dict(probe_cfg or {}),
                                     probe_memory_gb)
    heads = {b: h for b, (h, _) in fitted.items()}
    best, table, analysis = _sweep_result(ct_model, ctx, val_accs, heads, oracle_test)
    info = {"beta": best, "coeff": coeff, "ct_sites": ct_model.ct_sites, "probe_epoch": fitted[best][1]}
    return Adapted(ct_model.eval(), val_acc=val_accs[best], trainable_params=count_params(ct_model.head),
                   info=info, tables={"beta_sweep": table}, analysis=analysis, frozen_backbone=True)


SELECTS = ("robust", "corruption", "clean")
Objective = Callable[[nn.Module], dict[str, float]]  # model -> {"objective": value, other parts...}


def attack_subset(split: Split, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed class-balanced subset (`n // classes` per class, seeded) of `split` to attack."""
    try:
        index = balanced_subset(split.labels, n, seed)
    except ValueError as exc:
        raise ValueError(f"method=ct_robust select=robust: cannot draw {n} class-balanced {split.name} images "
                         f"({exc}); lower method.val_attack.n") from None
    sub = split.subset(index).materialize()  # streamed: read once, through the evaluation transform
    return sub.x, sub.y


def robust_objective(split: Split, attack_cfg: Mapping, ctx: RunContext) -> Objective:
    """AutoAttack robust accuracy per threat (`robust_acc/<norm>/<eps>`) on the fixed subset of
    `split`, and their mean (`objective`). The subset and the attack seed are drawn once: every
    model measured by the returned function sees the same images and random numbers."""
    from rftbench import attacks

    x, y = attack_subset(split, int(attack_cfg["n"]), int(attack_cfg["seed"]))
    threats = list(attack_cfg["threats"])
    if not threats:
        raise ValueError("method=ct_robust select=robust needs at least one threat (method.val_attack.threats)")

    def measure(model: nn.Module) -> dict[str, float]:
        out = {}
        for threat in threats:
            res = attacks.attack(model, x, y, norm=threat["norm"], eps=float(threat["eps"]),
                                tier=attack_cfg["tier"], seed=int(attack_cfg["seed"]),
                                batch_size=int(attack_cfg["batch_size"]), device=ctx.device,
                                n_iter=int(attack_cfg["n_iter"]), n_target_classes=int(attack_cfg["n_target_classes"]))
            out[f"robust_acc/{threat['norm']}/{float(threat['eps']):.6g}"] = res.robust_acc
        return {"objective": sum(out.values()) / len(out), **out}

    return measure


def accuracy_objective(splits: Sequence[Split], ctx: RunContext) -> Objective:
    """Mean accuracy over `splits` (`objective`) of the frozen CT model (head on stored features)."""
    def measure(model: nn.Module) -> dict[str, float]:
        return {"objective": sum(ctx.store.accuracy(model, s, ctx) for s in splits) / len(splits)}

    return measure


def select_objective(select: str, suite: Suite, ctx: RunContext, attack_cfg: Mapping | None,
                     on: str) -> Objective | None:
    """The beta-selection objective of `select` measured on val (`on="val"`) or, for the oracle,
    on the matching test data (`on="test"`: the test split, or the `ood` corruption splits); None
    when the suite has no such data for the oracle."""
    if select == "robust":
        return robust_objective(suite.val if on == "val" else suite["test"], attack_cfg or {}, ctx)
    if select == "corruption":
        splits = (suite.by_role("ood_val") if on == "val"
                  else [s for s in suite.by_role("ood") if s.shift == "corruption"])
        if not splits and on == "val":
            raise ValueError(f"method=ct_robust select=corruption needs corrupted val splits (role ood_val); suite "
                             f"{suite.name} has none (digits: suite.build.seen_corruptions.names); use select=robust "
                             "or select=clean")
        return accuracy_objective(splits, ctx) if splits else None
    return accuracy_objective([suite.val if on == "val" else suite["test"]], ctx)


def beta_sweep(ct_model: nn.Module, grid: Sequence[float], measure: Objective) -> dict[float, dict[str, float]]:
    """{beta: measure(ct_model at beta)} over the grid."""
    out = {}
    for beta in grid:
        set_beta(ct_model, beta)
        out[beta] = measure(ct_model)
        log.info("beta %.4g  %s", beta, "  ".join(f"{k} {v:.4f}" for k, v in out[beta].items()))
    return out


def adapt_robust(model: Classifier, suite: Suite, ctx: RunContext, *, betas: Mapping | Sequence[float],
                 coeff: float = 0.5, select: str = "robust", val_attack: Mapping | None = None,
                 oracle_test: bool = True) -> Adapted:
    """CT for a classifier that already fits the task: only beta (grid + 1.0) is chosen, by the
    `select` objective on val (see the module docstring; ties -> larger beta); no training.
    `val_attack` (select=robust): {n, tier, seed, threats: [{norm, eps}], n_iter, n_target_classes,
    batch_size}."""
    if model.head_origin != "zeroshot":
        raise ValueError(
            "method=ct_robust needs a classifier that already fits the task (the pre-trained head, "
            "suite.head_init=auto or zeroshot, with a backbone trained on the suite's classes); "
            "use method=ct (a linear probe per beta) otherwise")
    if select not in SELECTS:
        raise ValueError(f"method.select={select!r} not valid; choose one of {', '.join(SELECTS)}")
    if select == "robust" and not val_attack:
        raise ValueError("method=ct_robust select=robust needs the val attack settings (method.val_attack)")
    grid = beta_grid(betas)
    freeze(model).eval()
    ct_model = apply_ct(model, grid[0], coeff, example_input=example_input(suite.val, ctx))
    t0 = time.perf_counter()
    val_accs = model_sweep(ct_model, suite.val, ctx, grid)
    if select == "clean":
        val = {b: {"objective": acc} for b, acc in val_accs.items()}
    else:
        val = beta_sweep(ct_model, grid, select_objective(select, suite, ctx, val_attack, "val"))
    select_time = time.perf_counter() - t0
    best = choose({b: v["objective"] for b, v in val.items()})
    set_beta(ct_model, best)
    log.info("chose beta %.4g (select=%s, val objective %.4f, val_acc %.4f, %.1fs)", best, select,
             val[best]["objective"], val_accs[best], select_time)

    def sweep_table(test: dict[float, dict]) -> pd.DataFrame:
        return pd.DataFrame({
            "beta": grid, "val_acc": [val_accs[b] for b in grid],
            "test_acc": [test.get(b, {}).get("acc", float("nan")) for b in grid],
            "val_objective": [val[b]["objective"] for b in grid],
            "test_objective": [test.get(b, {}).get("objective", float("nan")) for b in grid],
            **{f"val_{k}": [val[b][k] for b in grid] for k in val[grid[0]] if k != "objective"},
            **{f"test_{k}": [test.get(b, {}).get(k, float("nan")) for b in grid]
               for k in val[grid[0]] if k != "objective"},
            "chosen": [b == best for b in grid], "select": select, "test_acc_selection": "oracle"})

    def analysis(suite: Suite) -> tuple[dict[str, pd.DataFrame], list[dict]]:
        """Each beta's test accuracy and test objective (oracle, analysis only); beta restored."""
        try:
            test_accs = model_sweep(ct_model, suite["test"], ctx, grid)
            measure = None if select == "clean" else select_objective(select, suite, ctx, val_attack, "test")
            test = (beta_sweep(ct_model, grid, measure) if measure
                    else {b: {"objective": a} for b, a in test_accs.items()})
        finally:
            set_beta(ct_model, best)
        for b in grid:
            test[b] = {"acc": test_accs[b], **test[b]}
        rows = []
        for metric, key in (("acc", "acc"), ("select_objective", "objective")):
            oracle = max(grid, key=lambda b: (test[b][key], b))
            rows.append(row("test" if metric == "acc" else "-", metric, test[oracle][key], selection="oracle",
                            detail=json.dumps({"knob": "beta", "beta": oracle, "select": select})))
        return {"beta_sweep": sweep_table(test)}, rows

    info = {"beta": best, "coeff": coeff, "ct_sites": ct_model.ct_sites, "select": select,
            "select_objective": val[best]["objective"], "select_time_s": select_time, "n_betas": len(grid)}
    if select == "robust":
        info["select_n"] = int(val_attack["n"])
    return Adapted(ct_model.eval(), val_acc=val_accs[best], trainable_params=0, info=info,
                   tables={"beta_sweep": sweep_table({})}, analysis=analysis if oracle_test else None,
                   select_score=None if select == "clean" else val[best]["objective"],
                   select_by="val_acc" if select == "clean" else f"{select}_val_objective", frozen_backbone=True)


def adapt_trainable(model: Classifier, suite: Suite, ctx: RunContext, *, optimizer: Callable, epochs: int,
                    batch_size: int, ct_lr: float = 0.1, decay_at: float = 0.5, gamma: float = 0.1,
                    warmup_epochs: int = 1, r_init: float = 1.386, q_init: float = 0.0) -> Adapted:
    """Trainable CT: per-channel beta and coeff at every site trained with the head (optimizer's lr;
    CT parameters at `ct_lr`), `warmup_epochs` of linear warm-up (the official 1), lr x `gamma`
    after `decay_at` of the epochs, backbone weights and BatchNorm statistics frozen, best epoch by
    val."""
    freeze(model).eval()
    ct_model = apply_trainable_ct(model, example_input(suite.train, ctx), r_init, q_init)
    ct_params, head = ct_parameters(ct_model), list(ct_model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    milestone = max(1, round(epochs * decay_at))
    res = fit(ct_model, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs,
              batch_size=batch_size, params=[{"params": ct_params, "lr": ct_lr}, {"params": head}],
              scheduler={"name": "step", "milestones": [milestone], "gamma": gamma,
                         "warmup_epochs": warmup_epochs}, bn_eval=True,
              checkpoint_key="ct_trainable")
    mean_beta, mean_coeff = mean_beta_coeff(ct_model)
    info = {"mean_beta": mean_beta, "mean_coeff": mean_coeff, "ct_sites": ct_model.ct_sites,
            "best_epoch": res.best_epoch, "converged": int(res.converged)}
    return Adapted(ct_model.eval(), val_acc=res.best_val_acc, trainable_params=count_params([*ct_params, *head]),
                   train_time_s=res.train_time_s, info=info, tables={"history": pd.DataFrame(res.history)})
