"""Curvature Tuning in the runner (methods.md section 1): steering, trainable and robustness modes.

- `adapt` (`method=ct`): frozen backbone, CT applied once; for every beta of the grid and beta = 1
  (plain LP) a fresh linear probe on cached features (the `method=lp` recipe); beta chosen on val.
- `adapt_trainable` (`method=ct_trainable`): per-channel trainable CT trained with the head, backbone
  weights and BatchNorm statistics frozen, epoch chosen on val.
- `adapt_robust` (`method=ct_robust`): a classifier that already fits the task; only beta is swept,
  chosen on val; no probe.

The sweep table (`beta_sweep.csv`: beta, val_acc, test_acc, chosen, test_acc_selection) also holds
each beta's ID test accuracy: analysis only (an oracle), never used for the choice.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rftbench.backbones import Classifier
from rftbench.data.base import Split, Suite, batches
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
from rftbench.train import (
    NonFiniteLossError,
    ProbeResult,
    RunContext,
    accuracy_on,
    extract_features,
    fit,
    make_scheduler,
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


def choose(val_accs: dict[float, float]) -> float:
    """The beta with the best val accuracy; ties go to the larger beta (closer to ReLU)."""
    return max(val_accs, key=lambda b: (val_accs[b], b))


def example_input(split: Split, ctx: RunContext) -> torch.Tensor:
    """Two images of `split` on the run's device (for the site checks of `apply_ct`)."""
    return next(batches(split, 2, device=ctx.device))[0]


def fast_fit_probe(train_feats: torch.Tensor, train_y: torch.Tensor, val_feats: torch.Tensor,
                   val_y: torch.Tensor, num_classes: int, *, init: nn.Linear | None = None, lr: float = 1e-3,
                   epochs: int = 20, batch_size: int = 32, warmup_epochs: int = 1, decay_epoch: int = 10,
                   weight_decay: float = 0.0, seed: int = 0) -> ProbeResult:
    """`rftbench.train.fit_probe` (same arguments, same result: bit for bit on CPU) without autograd,
    optimizer and scheduler overhead: the same kernels (linear, log-softmax, the cross-entropy
    backward ops, Adam's single-tensor update on one flat weight+bias buffer) called directly."""
    dev = train_feats.device
    head = copy.deepcopy(init) if init is not None else nn.Linear(train_feats.shape[1], num_classes)
    head = head.to(dev).float()
    c, d = head.weight.shape
    flat = torch.cat([head.weight.detach().flatten(), head.bias.detach()])
    weight, bias = flat[:c * d].view(c, d), flat[c * d:]
    grad = torch.empty_like(flat)
    grad_weight, grad_bias = grad[:c * d].view(c, d), grad[c * d:]
    exp_avg, exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as fit_probe uses them
    n = len(train_feats)
    steps = math.ceil(n / batch_size)
    schedule = make_scheduler(torch.optim.Adam([torch.zeros(1)], lr=lr),
                              {"name": "step", "warmup_epochs": warmup_epochs, "milestones": [decay_epoch],
                               "gamma": 0.1}, epochs, steps).lr_lambdas[0]
    one = torch.ones((), device=dev)
    total_weight = {k: torch.full((), float(k), device=dev) for k in {batch_size, n - (steps - 1) * batch_size}}
    gen = torch.Generator().manual_seed(seed)
    best, step = (-1.0, 0, flat.clone()), 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen).to(dev)
        xs, ys = train_feats[order], train_y[order]
        for start in range(0, n, batch_size):
            xb, yb = xs[start:start + batch_size], ys[start:start + batch_size]
            logp = torch.log_softmax(F.linear(xb, weight, bias), 1)
            dlogp = torch.ops.aten.nll_loss_backward(one, logp, yb, None, 1, -100, total_weight[len(xb)])
            dlogits = torch.ops.aten._log_softmax_backward_data(dlogp, logp, 1, logp.dtype)
            torch.mm(dlogits.t(), xb, out=grad_weight)
            torch.sum(dlogits, 0, out=grad_bias)
            g = grad if weight_decay == 0 else grad.add(flat, alpha=weight_decay)
            step_lr = lr * schedule(step)
            step += 1
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
            flat.addcdiv_(exp_avg, denom, value=-(step_lr / (1 - beta1 ** step)))
        acc = (F.linear(val_feats, weight, bias).argmax(1) == val_y).float().mean().item()
        if acc > best[0]:
            best = (acc, epoch, flat.clone())
    if not math.isfinite(F.nll_loss(logp, yb).item()):
        raise NonFiniteLossError("linear probe loss is not finite; lower probe.lr")
    with torch.no_grad():
        head.weight.copy_(best[2][:c * d].view(c, d))
        head.bias.copy_(best[2][c * d:])
    return ProbeResult(head.eval(), best[0], best[1])


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


def probe_sweep(ct_model: Classifier, suite: Suite, ctx: RunContext, grid: Sequence[float],
                init: nn.Linear, probe_cfg: dict) -> tuple[dict[float, float], dict[float, tuple[nn.Linear, int]]]:
    """For each beta: train and val features through `ct_model` (one pass each), a fresh probe from
    `init` on them (`fast_fit_probe`: the method=lp probe). Reads train and val only. Returns
    ({beta: val_acc}, {beta: (head, best_epoch)})."""
    ytr, yval = suite.train.labels.to(ctx.device), suite.val.labels.to(ctx.device)
    val_accs, heads = {}, {}
    for beta in bar(grid, "CT beta sweep"):
        set_beta(ct_model, beta)
        ftr = extract_features(ct_model, suite.train, ctx).to(ctx.device)
        fval = extract_features(ct_model, suite.val, ctx).to(ctx.device)
        with cpu_threads(1, ctx.device):
            res = fast_fit_probe(ftr, ytr, fval, yval, suite.num_classes, init=init, seed=ctx.seed, **probe_cfg)
        val_accs[beta], heads[beta] = res.val_acc, (res.head, res.best_epoch)
        log.info("beta %.4g  val_acc %.4f (probe epoch %d)", beta, res.val_acc, res.best_epoch)
    return val_accs, heads


def model_sweep(ct_model: nn.Module, split: Split, ctx: RunContext, grid: Sequence[float]) -> dict[float, float]:
    """{beta: accuracy of `ct_model` on `split`} with its head as is."""
    out = {}
    for beta in bar(grid, f"CT beta sweep ({split.name})"):
        set_beta(ct_model, beta)
        out[beta] = accuracy_on(ct_model, split, ctx)
        log.info("beta %.4g  %s_acc %.4f", beta, split.name, out[beta])
    return out


def _sweep_result(ct_model: Classifier, suite: Suite, ctx: RunContext, val_accs: dict[float, float],
                  heads: dict[float, nn.Linear] | None, oracle_test: bool) -> tuple[float, pd.DataFrame, list[dict]]:
    """Choose beta on val; with `oracle_test`, each beta's ID test accuracy (analysis only). Leaves
    `ct_model` at the chosen beta (with that beta's head when `heads` is given). Returns (beta,
    sweep table, oracle rows)."""
    best = choose(val_accs)
    test_accs: dict[float, float] = {}
    if oracle_test:
        for beta in val_accs:
            set_beta(ct_model, beta)
            if heads is not None:
                ct_model.head = heads[beta]
            test_accs[beta] = accuracy_on(ct_model, suite["test"], ctx)
    set_beta(ct_model, best)
    if heads is not None:
        ct_model.head = heads[best]
    table = pd.DataFrame({"beta": list(val_accs), "val_acc": list(val_accs.values()),
                          "test_acc": [test_accs.get(b, float("nan")) for b in val_accs],
                          "chosen": [b == best for b in val_accs], "test_acc_selection": "oracle"})
    rows = []
    if test_accs:
        oracle = max(test_accs, key=lambda b: (test_accs[b], b))
        rows.append(row("test", "acc", test_accs[oracle], selection="oracle",
                        detail=json.dumps({"knob": "beta", "beta": oracle})))
    log.info("chose beta %.4g (val_acc %.4f)", best, val_accs[best])
    return best, table, rows


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, betas: Mapping | Sequence[float],
          coeff: float = 0.5, probe_cfg: dict | None = None, oracle_test: bool = True) -> Adapted:
    """Steering CT: beta (grid + 1.0) chosen by the val accuracy of a linear probe on CT features."""
    grid = beta_grid(betas)
    freeze(model).eval()
    ct_model = apply_ct(model, grid[0], coeff, example_input=example_input(suite.train, ctx))
    val_accs, fitted = probe_sweep(ct_model, suite, ctx, grid, model.head, dict(probe_cfg or {}))
    heads = {b: h for b, (h, _) in fitted.items()}
    best, table, rows = _sweep_result(ct_model, suite, ctx, val_accs, heads, oracle_test)
    info = {"beta": best, "coeff": coeff, "ct_sites": ct_model.ct_sites, "val_acc": val_accs[best],
            "probe_epoch": fitted[best][1]}
    n = sum(p.numel() for p in ct_model.head.parameters())
    return Adapted(ct_model.eval(), trainable_params=n, info=info, tables={"beta_sweep": table}, rows=rows)


def adapt_robust(model: Classifier, suite: Suite, ctx: RunContext, *, betas: Mapping | Sequence[float],
                 coeff: float = 0.5, oracle_test: bool = True) -> Adapted:
    """CT for a classifier that already fits the task: only beta (grid + 1.0) is chosen, by the
    model's own val accuracy; no training."""
    if not getattr(model, "zeroshot_head", False):
        raise ValueError(
            "method=ct_robust needs a classifier that already fits the task (the pre-trained head, "
            "suite.head_init=auto or zeroshot, with a backbone trained on the suite's classes); "
            "use method=ct (a linear probe per beta) otherwise")
    grid = beta_grid(betas)
    freeze(model).eval()
    ct_model = apply_ct(model, grid[0], coeff, example_input=example_input(suite.val, ctx))
    val_accs = model_sweep(ct_model, suite.val, ctx, grid)
    best, table, rows = _sweep_result(ct_model, suite, ctx, val_accs, None, oracle_test)
    info = {"beta": best, "coeff": coeff, "ct_sites": ct_model.ct_sites, "val_acc": val_accs[best]}
    return Adapted(ct_model.eval(), trainable_params=0, info=info, tables={"beta_sweep": table}, rows=rows)


def adapt_trainable(model: Classifier, suite: Suite, ctx: RunContext, *, optimizer: Callable, epochs: int,
                    batch_size: int, ct_lr: float = 0.1, decay_at: float = 0.5, gamma: float = 0.1,
                    r_init: float = 1.386, q_init: float = 0.0) -> Adapted:
    """Trainable CT: per-channel beta and coeff at every site trained with the head (optimizer's lr;
    CT parameters at `ct_lr`), lr x `gamma` after `decay_at` of the epochs, backbone weights and
    BatchNorm statistics frozen, best epoch by val."""
    freeze(model).eval()
    ct_model = apply_trainable_ct(model, example_input(suite.train, ctx), r_init, q_init)
    ct_params, head = ct_parameters(ct_model), list(ct_model.head.parameters())
    for p in head:
        p.requires_grad_(True)
    milestone = max(1, round(epochs * decay_at))
    res = fit(ct_model, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs,
              batch_size=batch_size, params=[{"params": ct_params, "lr": ct_lr}, {"params": head}],
              scheduler={"name": "step", "milestones": [milestone], "gamma": gamma}, bn_eval=True)
    mean_beta, mean_coeff = mean_beta_coeff(ct_model)
    info = {"mean_beta": mean_beta, "mean_coeff": mean_coeff, "ct_sites": ct_model.ct_sites,
            "val_acc": res.best_val_acc, "best_epoch": res.best_epoch, "train_time_s": res.train_time_s}
    n = sum(p.numel() for p in [*ct_params, *head])
    return Adapted(ct_model.eval(), trainable_params=n, info=info, tables={"history": pd.DataFrame(res.history)})
