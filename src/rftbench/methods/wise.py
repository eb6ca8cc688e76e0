"""WiSE-FT (weight-space ensembling), a robust fine-tuning reference.

WiSE-FT (Wortsman et al., CVPR 2022): theta(a) = (1 - a) * theta_start + a * theta_end. The two end
points always share the head's origin, so that the interpolation mixes two heads of one lineage:

- the model has a zero-shot head (`model.head_origin == "zeroshot"`, or `start_head=current`):
  theta_start is the pre-trained model with that head, theta_end its full fine-tuning with the
  shared recipe (the cached model of `method=ft`, not trained again);
- otherwise (`start_head=probe`, or `auto` without a zero-shot head): theta_start is the linear-probe
  model (`method=lp`) and theta_end the LP-FT model (`method=lpft`'s cached training).

The coefficient is chosen by `select` (`rftbench.selection`, ties -> the smaller alpha, closer to the
start): `val` (accuracy on `val`, default) or `ood_val` (mean accuracy over the suite's labelled
`ood_val/*` splits). The whole curve, every alpha's accuracy on the ID test set and on every OOD
split, is computed after the choice (`Adapted.analysis`, analysis only) into `wise_sweep.csv`, and
plotted by the leaderboard as the paper's ID-vs-OOD curve (`rftbench.plots.wise_curve_figure`).
"""
from __future__ import annotations

import copy

import pandas as pd
import torch

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.evaluate import row, summary_rows
from rftbench.methods.base import Adapted, state_of
from rftbench.methods.ft import cached_finetune
from rftbench.methods.lpft import probed_and_tuned
from rftbench.selection import best_index
from rftbench.train import RunContext, accuracy_on, mean_accuracy

START_HEADS = ("auto", "current", "probe")
SELECTS = ("val", "ood_val")


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for floating tensors (BatchNorm statistics included);
    integer buffers (e.g. num_batches_tracked) are taken from `end`. alpha = 0 and 1 return copies
    of `start` and `end` exactly."""
    if start.keys() != end.keys():
        raise ValueError("WiSE-FT needs two states of the same architecture")
    if alpha in (0.0, 1.0):
        return {k: v.clone() for k, v in (start if alpha == 0.0 else end).items()}
    return {k: torch.lerp(start[k], end[k], alpha) if start[k].is_floating_point() else end[k].clone()
            for k in start}


def ood_val_splits(suite: Suite) -> list:
    splits = suite.by_role("ood_val")
    if not splits:
        raise ValueError(f"wise.select=ood_val needs labelled ood_val/* splits, and suite {suite.name} has "
                         f"none; use method.select=val or a suite that declares ood_val splits")
    return splits


def endpoints(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict, probe_cfg: dict,
              start_head: str) -> tuple[Classifier, Adapted, bool]:
    """(start model, end training, whether the start is a probe): two models of one head origin."""
    if start_head not in START_HEADS:
        raise ValueError(f"start_head={start_head!r} not valid; choose one of {START_HEADS}")
    use_probe = start_head == "probe" or (start_head == "auto" and model.head_origin != "zeroshot")
    if use_probe:
        start, _, tuned = probed_and_tuned(model, suite, ctx, recipe, probe_cfg)
    else:
        start = copy.deepcopy(model).eval()
        tuned = cached_finetune(model, suite, ctx, **recipe)
    return start, tuned, use_probe


def adapt(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict, probe_cfg: dict,
          alphas: list[float], start_head: str = "auto", select: str = "val") -> Adapted:
    """WiSE-FT: alpha chosen by `select` on validation data only; `wise_sweep.csv` holds every alpha's
    val (and ood_val) accuracy and, computed by the runner after the choice, its test and OOD ones."""
    if select not in SELECTS:
        raise ValueError(f"wise select={select!r} not valid; choose one of {SELECTS}")
    if not alphas:
        raise ValueError("WiSE-FT needs at least one mixing coefficient in alphas")
    sel_splits = ood_val_splits(suite) if select == "ood_val" else []
    start, tuned, use_probe = endpoints(model, suite, ctx, recipe, probe_cfg, start_head)
    theta0, theta1 = state_of(start), state_of(tuned.model)
    work = copy.deepcopy(tuned.model).eval()
    candidates = sorted(alphas)
    table: dict[str, list[float]] = {"alpha": candidates, "val_acc": []}
    if sel_splits:
        table["ood_val_acc"] = []
    for a in candidates:
        work.load_state_dict(interpolate(theta0, theta1, a))
        table["val_acc"].append(accuracy_on(work, suite.val, ctx))
        if sel_splits:
            table["ood_val_acc"].append(mean_accuracy(work, sel_splits, ctx))
    i = best_index(table[f"{select}_acc"])
    best = candidates[i]
    work.load_state_dict(interpolate(theta0, theta1, best))

    def analysis(full: Suite) -> tuple[dict[str, pd.DataFrame], list[dict]]:
        """Every alpha's accuracy on the ID test set and on every OOD split, with the per-shift means
        of `rftbench.evaluate.summary_rows` (analysis only: the choice is already made)."""
        m = copy.deepcopy(work)
        rows = []
        for j, a in enumerate(candidates):
            m.load_state_dict(interpolate(theta0, theta1, a))
            accs = [row(s.name, "acc", accuracy_on(m, s, ctx), shift=s.shift) for s in full.eval_splits()]
            rec = {k: v[j] for k, v in table.items()}
            rec.update({f"{r['split']}_{r['metric']}": r["value"] for r in accs + summary_rows(accs, full.meta.get("headline_ood"))})
            rows.append(rec)
        return {"wise_sweep": pd.DataFrame(rows)}, []

    info = {"alpha": best, "start_head_probe": int(use_probe), "end_val_acc": tuned.val_acc,
            "select_ood_val": int(select == "ood_val")}
    if "converged" in tuned.info:  # the end point's training
        info["converged"] = tuned.info["converged"]
    return Adapted(work, val_acc=table["val_acc"][i], trainable_params=tuned.trainable_params,
                   train_time_s=tuned.train_time_s, reused_time_s=tuned.reused_time_s, info=info,
                   tables={"wise_sweep": pd.DataFrame(table)}, analysis=analysis,
                   select_score=table["ood_val_acc"][i] if sel_splits else None,
                   select_by="ood_val_acc" if sel_splits else "val_acc")
