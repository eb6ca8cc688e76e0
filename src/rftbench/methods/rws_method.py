"""`method=rws`: Robust Weight Signatures in the runner (docs/methods.md section 3).

1. Experts, all from the SAME start theta_init (the model the runner passes in) with the shared
   fine-tuning recipe (configs/recipe/finetune.yaml), each cached with `cached_training` under a key
   made of the recipe and the data only, so a later run trains nothing: theta_std on clean train
   (epoch chosen on `val`) is `ft.cached_finetune`, the very model of method=ft and WiSE-FT;
   theta_rob[c] for each seen corruption c is trained on train corrupted by c (suite severity, seed
   `suite.meta["seen_seed"]`), epoch chosen on `ood_val/<c>` (`robust_key`).
2. Signatures of the first `k` RWS layers (`rws.shallow_keys`), saved in `<run>/signatures/` full
   precision and quantised to `levels`, with K, keys, layers, corruption and source hashes.
3. Patch target theta_std. Per corruption, the coefficient is swept over `coeffs` and chosen on
   `ood_val/<c>`; the composition gives every seen signature alpha / N, alpha swept over `alphas`
   and chosen on the mean `ood_val` accuracy over the seen corruptions. Ties go to the coefficient of
   smallest magnitude (the least change to theta_std; `rftbench.selection`): our choice. The composed
   model is the one the runner evaluates. Test-set numbers (oracle sweep columns, seen-corruption
   test rows) are computed by the runner after the choices (`Adapted.analysis`).

`bn` (recorded in the results):
- `keep`: running statistics stay theta_std's; signatures include BatchNorm affine tensors.
- `average`: signatures leave out every BatchNorm/downsample tensor (`rws.bn_keys`), which are
  replaced by their mean over the robust models of the patched corruptions (the original ResNet-50
  path). At coefficient 0 the model is therefore theta_std with averaged BatchNorms, not theta_std.
- `recalibrate`: signatures as in `keep`; after patching, running statistics are re-estimated on the
  corrupted TRAINING images of the patched corruptions (all seen ones for the composition) and
  replace theta_std's in full, at every coefficient (coefficient 0 included).
- `blend` (default): the official blending. The statistics are re-estimated as in `recalibrate`,
  then interpolated with theta_std's by the official coefficient a: `(1 - a) * stats_std + a *
  stats_new` for a < 1, `stats_new` for a >= 1 (`blend_weight`). At coefficient 0, a = 0 and the
  model is theta_std bit for bit (nothing is re-estimated).
  Measured on digits (bench config, seed 0; chosen composition, mean `ood_val` accuracy over the
  seen corruptions): see docs/methods.md section 3 for the figures that made it the default.

Memory: the corrupted copies of the train set live in memory. A streamed (file-backed) train or
test split is read once at its native resolution and each corrupted copy is kept as uint8 with the
split's transforms (`rftbench.data.corruptions.corrupted_splits`): for CIFAR-10's 40,000 training
images ~0.5 GB of float32 while corrupting, then ~0.12 GB per seen corruption.

Seen corruptions are also measured on the ID test set (`ood_seen/<c>/<severity>`, shift
`corruption`, the test corruptions' seed and class-balanced subset): these rows never enter the
unseen-corruption mean, which the evaluator takes over `ood/corruption/...` splits only.

Mapping to the official coefficients. The official code scales each signature by its weight w_c
twice (once before the projection, once in the combination), so its patch is w_c^2 * RWS[c]: our
linear coefficient is beta_c = w_c^2. Its composition gives every one of N signatures w_c =
alpha_off / N, i.e. beta_c = (alpha_off / N)^2 here; ours gives beta_c = alpha / N (linear in
alpha), so alpha = alpha_off^2 / N. The official BatchNorm blend weight is alpha_off = sum_c w_c =
sum_c sqrt(beta_c), which `blend_weight` computes from our coefficients (one signature: sqrt(beta)).

Quantisation is per signature: each signature tensor gets its own uniform min-max range over
`levels` codes (`rws.quantize`). The official code quantises the stacked projections of all robust
models of one layer tensor with one shared range; per-signature ranges let a signature be stored,
shipped and added alone, at the cost of one (low, scale) pair per tensor and signature.

Attribution (`bn_only`): the chosen composition's BatchNorm treatment applied to theta_std with every
signature coefficient 0. Its ID val accuracy, test and OOD accuracies and seen-corruption test
accuracies are recorded after the choice (analysis) as metric rows with `detail` "row:bn_only";
the leaderboard shows them as their own row `rws_bn_only` beside `rws`, so the gain of `rws` over
`rws_bn_only` is what the signatures add (no adversarial evaluation for that row).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from rftbench.data import corruptions as C
from rftbench.data.base import Split, Suite, balanced_subset, batches, scored_logits
from rftbench.evaluate import row, split_rows, summary_rows
from rftbench.methods import ft, rws
from rftbench.methods.base import Adapted, cached_training, state_of
from rftbench.progress import bar
from rftbench.selection import select
from rftbench.train import RunContext, accuracy_on, count_params, mean_accuracy, predict

log = logging.getLogger("rftbench")
BN_MODES = ("keep", "average", "recalibrate", "blend")
BN_ONLY = "row:bn_only"   # `detail` of the attribution rows (leaderboard row <method>_bn_only)
State = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------------------ cache keys
def robust_key(recipe: Mapping, corruption: str, severity: int, seed: int) -> dict:
    """The `cached_training` key of theta_rob[corruption]: the recipe of `ft.cached_finetune` (whose
    key is `{"finetune": recipe}`), the corrupted training data and the selection split."""
    return {"finetune": dict(recipe), "data": {"corruption": corruption, "severity": severity, "seed": seed},
            "select": f"ood_val/{corruption}"}


# --------------------------------------------------------------------------------------- experts
@dataclass
class Experts:
    """theta_init (a state), theta_std and theta_rob[c] (models), and how each was trained."""

    init: dict[str, torch.Tensor]
    clean: nn.Module
    robust: dict[str, nn.Module]
    table: pd.DataFrame


def seen_setup(suite: Suite) -> tuple[list[str], int, int]:
    """(seen corruption names, severity, seed) of a suite made for shift-aware methods."""
    names = suite.meta.get("seen_corruptions")
    if not names:
        raise ValueError(
            f"method=rws needs labelled corrupted data: suite {suite.name} declares no seen corruptions "
            "(suite.meta['seen_corruptions'] with ood_val/<corruption> splits)")
    missing = [f"ood_val/{c}" for c in names if f"ood_val/{c}" not in suite.splits]
    if missing:
        raise ValueError(f"suite {suite.name} lacks the corrupted validation splits {missing}")
    return list(names), int(suite.meta["seen_severity"]), int(suite.meta["seen_seed"])


def corrupted_train(suite: Suite, ctx: RunContext) -> dict[str, Split]:
    """The training set under each seen corruption (cached on disk)."""
    names, severity, seed = seen_setup(suite)
    return {c: C.corrupted_splits(suite.train, [c], severity, seed, ctx.cache_dir, role="train",
                                  name="train/{corruption}/{severity}")[c] for c in names}


def train_experts(model: nn.Module, suite: Suite, ctx: RunContext, recipe: Mapping,
                  train_sets: Mapping[str, Split]) -> Experts:
    """theta_std and every theta_rob[c], each fine-tuned from a copy of `model` (left unchanged)."""
    _, severity, seed = seen_setup(suite)
    init = state_of(model)
    rows = []

    def record(name: str, select: str, res: Adapted) -> nn.Module:
        rows.append({"expert": name, "select": select, "best_epoch": res.info.get("best_epoch"),
                     "converged": res.info.get("converged"),
                     "select_acc": res.val_acc, "cached": int(res.reused_time_s > 0),
                     "train_time_s": res.train_time_s, "reused_time_s": res.reused_time_s})
        return res.model.eval()

    clean = record("clean", "val", ft.cached_finetune(copy.deepcopy(model), suite, ctx, **recipe))
    robust = {}
    for c, train in bar(train_sets.items(), "RWS experts", total=len(train_sets)):
        data = Suite(suite.name, suite.num_classes, {"train": train, "val": suite[f"ood_val/{c}"]},
                     suite.upstream_classes, suite.meta)
        res = cached_training(copy.deepcopy(model), ctx, robust_key(recipe, c, severity, seed),
                              lambda m: ft.finetune(m, data, ctx, checkpoint_key=f"rws-{c}", **recipe)[0])
        robust[c] = record(c, f"ood_val/{c}", res)
    return Experts(init, clean, robust, pd.DataFrame(rows))


def seen_test_splits(suite: Suite, ctx: RunContext, n: int | None, seed: int) -> dict[str, Split]:
    """The ID test set (class-balanced subset of about `n`, all if None) under each seen corruption at
    the seen severity, corrupted with the test corruptions' `seed`: `ood_seen/<c>/<severity>`."""
    names, severity, _ = seen_setup(suite)
    test = suite["test"] if n is None else suite["test"].subset(balanced_subset(suite["test"].labels, n, seed))
    return C.corrupted_splits(test, names, severity, seed, ctx.cache_dir, role="ood", name="ood_seen/{corruption}/{severity}")


# -------------------------------------------------------------------------------------- patching
@dataclass
class Patcher:
    """Loads `target + sum_c coeffs[c] * signatures[c]` into a model, with the `bn` mode applied."""

    target: dict[str, torch.Tensor]
    bn: str
    robust: Mapping[str, State]            # robust states, for bn=average
    bn_data: Mapping[str, Split]           # corrupted training images, for bn=recalibrate
    bn_keys: Sequence[str]
    batch_size: int
    ctx: RunContext

    def load(self, model: nn.Module, signatures: Mapping[str, rws.Signature],
             coeffs: Mapping[str, float], bn_only: bool = False) -> nn.Module:
        """`target + sum_c coeffs[c] * signatures[c]` with the `bn` treatment of `coeffs`; with
        `bn_only` every weight stays the target's and only that BatchNorm treatment is applied."""
        state = rws.patch(self.target, signatures, {c: 0.0 for c in coeffs} if bn_only else coeffs)
        if self.bn == "average":
            state.update(rws.average_bn([self.robust[c] for c in coeffs], self.bn_keys))
        model.load_state_dict(state)
        weight = {"recalibrate": 1.0, "blend": blend_weight(coeffs)}.get(self.bn, 0.0)
        if weight > 0:
            parts = [self.bn_data[c] for c in coeffs]
            data = (Split("rws/bn", "train", "corruption", x=torch.cat([p.x for p in parts]), y=torch.cat([p.y for p in parts]))
                    if parts[0].in_memory else Split("rws/bn", "train", "corruption", transform=parts[0].transform,
                                                     dataset=ConcatDataset([p.dataset for p in parts])))
            rws.recalibrate_bn(model, batches(data, self.batch_size, shuffle=True, seed=self.ctx.seed,
                                              device=self.ctx.device))
            if weight < 1:  # the official blend of the old and re-estimated statistics
                new = model.state_dict()
                model.load_state_dict({**new, **{k: torch.lerp(state[k].to(new[k].device), new[k], weight)
                                                 for k in new if k.endswith(("running_mean", "running_var"))}})
        return model.eval()


def blend_weight(coeffs: Mapping[str, float]) -> float:
    """The official BatchNorm blend weight of a patch, min(1, alpha_off) with alpha_off = sum_c w_c
    and w_c = sqrt(|beta_c|) the official coefficient of our linear beta_c (module docstring)."""
    return min(1.0, sum(abs(b) ** 0.5 for b in coeffs.values()))


def choose(values: Sequence[float], scores: Sequence[float]) -> float:
    """The value with the best score (`rftbench.selection`; ties -> the smallest magnitude, closest
    to the target: candidates ordered by magnitude, then value)."""
    order = sorted(range(len(values)), key=lambda i: (abs(values[i]), values[i]))
    return select([values[i] for i in order], [scores[i] for i in order])


def signature_keys(model: nn.Module, k: int, bn: str) -> list[str]:
    """Keys a signature covers: the first `k` RWS layers, minus BatchNorm/downsample under `average`."""
    keys = rws.shallow_keys(model, k)
    if bn == "average":
        skip = set(rws.bn_keys(model))
        keys = [key for key in keys if key not in skip]
    return keys


def layer_names(model: nn.Module, k: int) -> list[str]:
    """A name for each of the first `k` RWS layers: the common module prefix of its keys."""
    return [os.path.commonprefix(names).rsplit(".", 1)[0] for names in rws.signature_layers(model)[:k]]


# ------------------------------------------------------------------------------------------ adapt
def adapt(model: nn.Module, suite: Suite, ctx: RunContext, *, recipe: dict, coeffs: Sequence[float],
          alphas: Sequence[float], k: int = 3, levels: int = 16, bn: str = "keep",
          recalibrate_batch_size: int = 128, seen_test: dict | None = None) -> Adapted:
    """RWS patch of the clean fine-tuned model with every seen signature (see the module docstring).

    `recipe`: keywords of `ft.finetune` (configs/recipe/finetune.yaml, as method=ft); `seen_test`:
    {n, seed} of the seen-corruption test splits (the test corruptions' subset size and seed).
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn={bn!r} not valid; choose one of {BN_MODES}")
    if not coeffs or not alphas:
        raise ValueError("coeffs and alphas must each hold at least one value")
    rws.code_bits(levels)
    if ctx.run_dir is None:
        raise ValueError("method=rws stores its signatures in ctx.run_dir, which is not set")
    names, severity, seed = seen_setup(suite)
    keys = signature_keys(model, k, bn)
    seen_test = {"n": None, "seed": 0, **(seen_test or {})}
    vals = {c: suite[f"ood_val/{c}"] for c in names}
    train_sets = corrupted_train(suite, ctx)

    experts = train_experts(model, suite, ctx, recipe, train_sets)
    clean_state = state_of(experts.clean)
    robust_states = {c: state_of(m) for c, m in experts.robust.items()}
    signatures = {c: rws.extract_signature(experts.init, clean_state, robust_states[c], keys) for c in names}
    sources = {"init": rws.state_digest(experts.init), "clean": rws.state_digest(clean_state)}
    files = save_signatures(ctx, signatures, levels, {
        "k": k, "layers": layer_names(model, k), "bn": bn, "severity": severity, "seed": seed,
        "source_init": sources["init"], "source_clean": sources["clean"]},
        {c: rws.state_digest(s) for c, s in robust_states.items()})

    patcher = Patcher(clean_state, bn, robust_states, train_sets, rws.bn_keys(model),
                      recalibrate_batch_size, ctx)
    work = copy.deepcopy(experts.clean)

    # per-corruption coefficient, chosen on ood_val/<c>
    sweep, chosen = [], {}
    for c in names:
        curve = []
        for coeff in coeffs:
            patcher.load(work, {c: signatures[c]}, {c: coeff})
            curve.append({"corruption": c, "severity": severity, "coeff": float(coeff),
                          "val_acc": accuracy_on(work, vals[c], ctx)})
        chosen[c] = choose([r["coeff"] for r in curve], [r["val_acc"] for r in curve])
        for r in curve:
            r["chosen"] = r["coeff"] == chosen[c]
        sweep += curve
        log.info("rws %s: coefficient %g chosen on ood_val/%s", c, chosen[c], c)

    # composition: beta_c = alpha / N, alpha chosen on the mean ood_val accuracy
    compose = []
    for alpha in alphas:
        patcher.load(work, signatures, rws.compose_coeffs(names, alpha))
        r = {"alpha": float(alpha), **{f"val_acc/{c}": accuracy_on(work, vals[c], ctx) for c in names}}
        r["val_acc"] = sum(r[f"val_acc/{c}"] for c in names) / len(names)
        r["id_val_acc"] = accuracy_on(work, suite.val, ctx)
        compose.append(r)
    alpha = choose([r["alpha"] for r in compose], [r["val_acc"] for r in compose])
    for r in compose:
        r["chosen"] = r["alpha"] == alpha
    log.info("rws composition of %d signatures: alpha %g chosen on the mean ood_val accuracy", len(names), alpha)
    final = patcher.load(copy.deepcopy(experts.clean), signatures, rws.compose_coeffs(names, alpha))

    def analysis(full: Suite) -> tuple[dict[str, pd.DataFrame], list[dict]]:
        """Test-set numbers, computed by the runner after the choices (never part of them): every
        sweep point's test accuracy on the seen corruptions (oracle columns), each signature alone at
        its chosen coefficient, the quantised signatures, and the final model on the seen-corruption
        test splits (`ood_seen/<c>/<severity>`)."""
        tests = seen_test_splits(full, ctx, seen_test["n"], seen_test["seed"])
        for r in sweep:
            patcher.load(work, {r["corruption"]: signatures[r["corruption"]]}, {r["corruption"]: r["coeff"]})
            r["test_acc"], r["test_selection"] = accuracy_on(work, tests[r["corruption"]], ctx), "oracle"
        for r in compose:
            patcher.load(work, signatures, rws.compose_coeffs(names, r["alpha"]))
            r["test_acc"] = mean_accuracy(work, [tests[c] for c in names], ctx)
            r["test_selection"] = "oracle"
        rows = []
        for c in names:  # each signature alone at its chosen coefficient
            patcher.load(work, {c: signatures[c]}, {c: chosen[c]})
            rows.append(_acc_row(work, tests[c], "acc_single", ctx))
        quantised = {c: rws.load_signature(files[c]["quantised"])[0] for c in names}
        patcher.load(work, quantised, rws.compose_coeffs(names, alpha))
        rows += [_acc_row(work, tests[c], "acc_quant", ctx) for c in names]
        rows.append(_acc_row(work, full["test"], "acc_quant", ctx))
        for c in names:
            rows += split_rows(tests[c], scored_logits(predict(final, tests[c], ctx), tests[c]))
        rows += bn_only_rows(patcher.load(work, signatures, rws.compose_coeffs(names, alpha), bn_only=True),
                             full, tests, ctx)
        for metric in ("acc", "acc_single", "acc_quant"):
            seen = [r["value"] for r in rows if r["metric"] == metric and r["split"].startswith("ood_seen/")]
            rows.append(row("ood_seen", f"{metric}_mean", sum(seen) / len(seen), shift="corruption"))
        return {"rws_sweep": pd.DataFrame(sweep), "rws_compose": pd.DataFrame(compose)}, rows

    info = {"k": k, "bn": bn, "levels": levels, "alpha": alpha, "n_seen": len(names),
            "seen_severity": severity, "selection": "ood_val",
            **{f"coeff/{c}": v for c, v in chosen.items()},
            **storage_info(signatures, levels, clean_state, files)}
    t = experts.table  # reused experts count with the time they took when trained
    if t["converged"].notna().all():  # every expert's training
        info["converged"] = int(t["converged"].min())
    return Adapted(final, val_acc=accuracy_on(final, suite.val, ctx), trainable_params=count_params(model),
                   train_time_s=float(t["train_time_s"].sum()), reused_time_s=float(t["reused_time_s"].sum()),
                   info=info, analysis=analysis,
                   tables={"rws_sweep": pd.DataFrame(sweep), "rws_compose": pd.DataFrame(compose),
                           "rws_experts": experts.table})


def bn_only_rows(model: nn.Module, full: Suite, seen_tests: Mapping[str, Split], ctx: RunContext) -> list[dict]:
    """The attribution row's metrics (`detail` BN_ONLY): val accuracy, every test/OOD split with the
    per-shift means, and the seen corruptions on the test set."""
    rows = [row("-", "val_acc", accuracy_on(model, full.val, ctx))]
    for s in [*full.eval_splits(), *seen_tests.values()]:
        rows += split_rows(s, scored_logits(predict(model, s, ctx), s))
    rows += summary_rows(rows, full.meta.get("headline_ood"))
    seen = [r["value"] for r in rows if r["metric"] == "acc" and r["split"].startswith("ood_seen/")]
    rows.append(row("ood_seen", "acc_mean", sum(seen) / len(seen), shift="corruption"))
    return [{**r, "detail": BN_ONLY} for r in rows]


def _acc_row(model: nn.Module, split: Split, metric: str, ctx: RunContext) -> dict:
    return row(split.name, metric, accuracy_on(model, split, ctx), shift=split.shift,
               corruption=split.corruption, severity=split.severity)


# --------------------------------------------------------------------------------------- storage
def save_signatures(ctx: RunContext, signatures: Mapping[str, rws.Signature], levels: int, meta: dict,
                    robust_sources: Mapping[str, str]) -> dict[str, dict[str, os.PathLike]]:
    """`<run>/signatures/<c>.safetensors` (full precision) and `<c>.q<levels>.safetensors` per corruption."""
    out = {}
    folder = ctx.run_dir / "signatures"
    for c, signature in signatures.items():
        m = {**meta, "corruption": c, "source_robust": robust_sources[c]}
        out[c] = {"full": rws.save_signature(folder / f"{c}.safetensors", signature, m),
                  "quantised": rws.save_signature(folder / f"{c}.q{levels}.safetensors", signature, m, levels)}
    return out


def storage_info(signatures: Mapping[str, rws.Signature], levels: int, model_state: State,
                 files: Mapping[str, Mapping[str, os.PathLike]]) -> dict:
    """Bytes of one signature (full precision, quantised) vs one full fp32 model copy, and the files."""
    one = next(iter(signatures.values()))
    full, quant = rws.signature_nbytes(one), rws.signature_nbytes(one, levels)
    model = rws.full_copy_nbytes(model_state)
    return {"signed_params": sum(t.numel() for t in one.values()),
            "storage/signature_bytes": full, "storage/signature_q_bytes": quant,
            "storage/model_bytes": model, "storage/ratio_full": model / full,
            "storage/ratio_q": model / quant,
            "storage/files_bytes": sum(os.path.getsize(f["full"]) for f in files.values()),
            "storage/files_q_bytes": sum(os.path.getsize(f["quantised"]) for f in files.values())}
