"""`method=rws` end to end: cached experts, signatures on disk, coefficients chosen on ood_val."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rftbench import metrics
from rftbench.backbones import create_backbone
from rftbench.data.base import Split
from rftbench.methods import ft, rws
from rftbench.methods.ft import cached_finetune
from rftbench.methods.rws_method import Patcher, choose, robust_key, signature_keys
from rftbench.run import build_model, build_suite, execute, run_folder, start_spec
from rftbench.train import RunContext, accuracy_on, predict

FAST = ("method=rws", "method.adapt.bn=keep", "budget.epochs=1", "method.adapt.coeffs=[0.0,1.0]", "method.adapt.alphas=[0.0,2.0]")


def test_rws_trains_with_the_recipe_of_method_ft(make_cfg):
    ft_cfg, rws_cfg = make_cfg("method=ft").method, make_cfg("method=rws").method
    recipe = OmegaConf.to_container(ft_cfg.adapt.recipe, resolve=True)
    assert OmegaConf.to_container(rws_cfg.adapt.recipe, resolve=True) == recipe
    key = robust_key({"epochs": 2}, "saturate", 5, 3)
    assert key == {"finetune": {"epochs": 2}, "data": {"corruption": "saturate", "severity": 5, "seed": 3},
                   "select": "ood_val/saturate"}


def test_choose_takes_the_best_score_and_breaks_ties_towards_zero():
    assert choose([0.0, 0.5, 1.0], [0.2, 0.4, 0.3]) == 0.5
    assert choose([-1.0, 0.0, 0.5, 1.0], [0.4, 0.1, 0.4, 0.4]) == 0.5
    assert choose([0.0, 2.0], [0.3, 0.3]) == 0.0


def test_rws_run_end_to_end(make_cfg, monkeypatch):
    cfg = make_cfg(*FAST)
    fit, folders = ft.fit, []
    monkeypatch.setattr("rftbench.methods.ft.fit", lambda *a, **kw: folders.append(kw["checkpoint_key"]) or fit(*a, **kw))
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    # each expert keeps its resume checkpoints apart (they all start from the same weights); the plain
    # fine-tune may come from the session cache when an earlier test trained the same recipe
    assert folders[-2:] == ["rws-speckle_noise", "rws-saturate"] and folders[:-2] in ([], ["finetune"])
    info = json.loads((path / "info.json").read_text())["info"]
    names = ["speckle_noise", "saturate"]  # the tiny preset's seen corruptions
    assert info["bn"] == "keep" and info["k"] == 3 and info["selection"] == "ood_val"

    # metrics: seen corruptions on the test set, labelled and kept out of the unseen corruption mean
    m = pd.read_csv(path / "metrics.csv")
    assert (m["detail"] == "row:bn_only").any()   # the attribution model's rows, apart
    m = m[m["detail"] != "row:bn_only"]
    acc = m[m["metric"] == "acc"]
    seen = acc[acc["split"].str.startswith("ood_seen/")]
    assert sorted(seen["split"]) == sorted(f"ood_seen/{c}/5" for c in names)
    assert set(seen["shift"]) == {"corruption"} and set(seen["corruption"]) == set(names)
    unseen = acc[acc["split"].str.startswith("ood/corruption/")]["value"]
    mean = m[(m["split"] == "ood/corruption") & (m["metric"] == "acc_mean")]["value"].item()
    assert mean == pytest.approx(unseen.mean())
    for metric in ("acc_single", "acc_quant"):
        assert set(m[m["metric"] == metric]["split"]) >= {f"ood_seen/{c}/5" for c in names}
    assert "test" in set(m[m["metric"] == "acc_quant"]["split"])

    # selection: each coefficient and alpha is the arg-max of its ood_val column
    sweep = pd.read_csv(path / "rws_sweep.csv")
    assert set(sweep["test_selection"]) == {"oracle"}
    for c in names:
        curve = sweep[sweep["corruption"] == c]
        assert info[f"coeff/{c}"] == choose(list(curve["coeff"]), list(curve["val_acc"]))
        assert curve[curve["chosen"]]["coeff"].tolist() == [info[f"coeff/{c}"]]
    comp = pd.read_csv(path / "rws_compose.csv")
    assert comp["val_acc"].to_numpy() == pytest.approx(comp[[f"val_acc/{c}" for c in names]].mean(axis=1).to_numpy())
    assert info["alpha"] == choose(list(comp["alpha"]), list(comp["val_acc"]))
    chosen = m[m["metric"] == "chosen/alpha"]["value"].item()
    assert chosen == info["alpha"]

    # signatures on disk, their metadata and the storage figures
    sig, meta = rws.load_signature(path / "signatures" / "saturate.safetensors")
    qsig, qmeta = rws.load_signature(path / "signatures" / "saturate.q16.safetensors")
    assert meta["k"] == 3 and meta["corruption"] == "saturate" and meta["levels"] is None and qmeta["levels"] == 16
    assert len(meta["layers"]) == 3 and meta["keys"] == qmeta["keys"]
    assert {"source_init", "source_clean", "source_robust"} <= set(meta)
    assert info["storage/signature_bytes"] == rws.signature_nbytes(sig)
    assert info["storage/signature_q_bytes"] == rws.signature_nbytes(sig, 16) < info["storage/signature_bytes"]
    assert info["storage/ratio_full"] == pytest.approx(info["storage/model_bytes"] / info["storage/signature_bytes"])
    assert info["signed_params"] == sum(t.numel() for t in sig.values())
    experts = pd.read_csv(path / "rws_experts.csv")
    assert experts["expert"].tolist() == ["clean", *names]
    assert experts["select"].tolist() == ["val", *(f"ood_val/{c}" for c in names)]
    assert experts["cached"].tolist() == [int(folders[0] != "finetune"), 0, 0]  # the clean one may be cached

    # other coefficient grids, same recipe: nothing is trained, the very same experts are signed;
    # with only coefficient 0 (bn=keep) the evaluated model is the clean fine-tuned model
    def no_training(*args, **kwargs):
        raise AssertionError("training was called although every expert is cached")

    monkeypatch.setattr("rftbench.methods.ft.fit", no_training)
    cfg0 = make_cfg(*FAST[:3], "method.adapt.coeffs=[0.0]", "method.adapt.alphas=[0.0]")
    assert execute(cfg0) == "done"
    path0 = run_folder(cfg0).path
    experts0 = pd.read_csv(path0 / "rws_experts.csv")
    assert experts0["cached"].tolist() == [1, 1, 1]
    assert experts0["best_epoch"].tolist() == experts["best_epoch"].tolist()
    run_info0 = json.loads((path0 / "info.json").read_text())
    assert run_info0["reused_time_s"] == pytest.approx(experts["train_time_s"].sum())
    assert run_info0["train_time_s"] == pytest.approx(experts["train_time_s"].sum())
    sig0, meta0 = rws.load_signature(path0 / "signatures" / "saturate.safetensors")
    assert meta0["source_clean"] == meta["source_clean"] and meta0["source_robust"] == meta["source_robust"]
    assert all(torch.equal(sig[k], sig0[k]) for k in sig)

    ctx = RunContext(cache_dir=Path(cfg0.paths.cache), seed=cfg0.seed, spec=start_spec(cfg0))
    suite = build_suite(cfg0, ctx)
    model = build_model(cfg0, suite, ctx)
    recipe = instantiate(cfg0.method.adapt).keywords["recipe"]
    clean = cached_finetune(model, suite, ctx, **recipe).model  # method=ft's cached model
    m0 = pd.read_csv(path0 / "metrics.csv").query("detail != 'row:bn_only'").set_index(["split", "metric"])["value"]
    logits = predict(clean, suite["test"], ctx)
    assert m0["test", "acc"] == pytest.approx(metrics.accuracy(logits, suite["test"].y), rel=1e-12)
    assert m0["test", "nll"] == pytest.approx(metrics.nll(logits, suite["test"].y), rel=1e-12)
    for c in names:  # the first run's coefficient-0 point is the clean model too
        zero = sweep[(sweep["corruption"] == c) & (sweep["coeff"] == 0.0)]["val_acc"].item()
        assert zero == accuracy_on(clean, suite[f"ood_val/{c}"], ctx)


def test_patcher_bn_modes_on_known_states():
    torch.manual_seed(0)
    model = create_backbone("resnet10t", num_classes=10, kwargs=dict(channels=(8, 16, 32, 64), stem_width=8))
    target = {k: v.clone() for k, v in model.state_dict().items()}
    robust = {c: {k: v + i + 1 if v.is_floating_point() else v for k, v in target.items()}
              for i, c in enumerate(["a", "b"])}
    x = torch.rand(12, 3, 32, 32)
    data = {c: Split(c, "train", "corruption", x=x + i, y=torch.zeros(12, dtype=torch.long))
            for i, c in enumerate(["a", "b"])}
    keys = signature_keys(model, 2, "keep")
    sigs = {c: {k: torch.full_like(target[k], 0.5) for k in keys} for c in robust}
    make = functools.partial(Patcher, target, robust=robust, bn_data=data, bn_keys=rws.bn_keys(model),
                             batch_size=5, ctx=RunContext())

    work = copy.deepcopy(model)
    make(bn="keep").load(work, sigs, {"a": 0.0, "b": 0.0})
    assert all(torch.equal(v, target[k]) for k, v in work.state_dict().items())
    make(bn="keep").load(work, sigs, {"a": 1.0, "b": 2.0})
    state = work.state_dict()
    key = keys[0]
    assert torch.allclose(state[key], target[key] + 1.5) and torch.equal(state["head.weight"], target["head.weight"])

    bn = rws.bn_keys(model)
    average_keys = signature_keys(model, 2, "average")
    assert set(average_keys) == set(keys) - set(bn) and len(average_keys) < len(keys)
    make(bn="average").load(work, {c: {k: s[k] for k in average_keys} for c, s in sigs.items()}, {"a": 0.0, "b": 0.0})
    state = work.state_dict()
    assert all(torch.allclose(state[k], target[k] + 1.5) for k in bn)  # mean of +1 and +2
    assert all(torch.equal(state[k], target[k]) for k in average_keys)

    make(bn="recalibrate").load(work, sigs, {"a": 0.0, "b": 0.0})
    images = torch.cat([data["a"].x, data["b"].x])  # both corruptions' training images
    with torch.no_grad():
        first = model.body.conv1[0](model.normalize(images))  # input of the first BatchNorm
    assert torch.allclose(work.body.conv1[1].running_mean, first.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(work.body.conv1[1].running_mean, target["body.conv1.1.running_mean"])
    assert all(torch.equal(p, target[k]) for k, p in work.named_parameters())


def test_blend_is_the_clean_model_at_zero_and_interpolates_the_statistics():
    from rftbench.methods.rws_method import blend_weight

    assert blend_weight({"a": 0.0, "b": 0.0}) == 0.0
    assert blend_weight({"a": 0.04}) == pytest.approx(0.2)          # official w = sqrt(beta)
    assert blend_weight({"a": 0.25, "b": 0.25}) == 1.0               # official alpha = 0.5 + 0.5
    assert blend_weight({"a": 4.0}) == 1.0
    torch.manual_seed(0)
    model = create_backbone("resnet10t", num_classes=10, kwargs=dict(channels=(8, 16, 32, 64), stem_width=8))
    target = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"a": Split("a", "train", "corruption", x=torch.rand(12, 3, 32, 32) + 1, y=torch.zeros(12, dtype=torch.long))}
    keys = signature_keys(model, 2, "blend")
    sigs = {"a": {k: torch.full_like(target[k], 0.5) for k in keys}}
    make = functools.partial(Patcher, target, robust={}, bn_data=data, bn_keys=rws.bn_keys(model),
                             batch_size=5, ctx=RunContext())
    work = copy.deepcopy(model)
    make(bn="blend").load(work, sigs, {"a": 0.0})      # coefficient 0: the clean model, bit for bit
    assert all(torch.equal(v, target[k]) for k, v in work.state_dict().items())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(work.eval()(x), model.eval()(x))
    full = copy.deepcopy(model)
    make(bn="recalibrate").load(full, sigs, {"a": 0.04})
    make(bn="blend").load(work, sigs, {"a": 0.04})     # official weight 0.2
    k = "body.conv1.1.running_mean"
    assert torch.allclose(work.state_dict()[k], 0.8 * target[k] + 0.2 * full.state_dict()[k], atol=1e-6)
    assert torch.equal(work.state_dict()[keys[0]], full.state_dict()[keys[0]])
    make(bn="blend").load(work, sigs, {"a": 1.0})       # weight 1: the full re-estimate
    make(bn="recalibrate").load(full, sigs, {"a": 1.0})
    assert all(torch.equal(v, full.state_dict()[key]) for key, v in work.state_dict().items())
    # bn_only: target weights, the same BatchNorm treatment as the patch
    make(bn="blend").load(work, sigs, {"a": 1.0}, bn_only=True)
    assert torch.equal(work.state_dict()[keys[0]], target[keys[0]])
    assert not torch.equal(work.state_dict()[k], target[k])


def test_bn_only_row_is_recorded_and_becomes_its_own_leaderboard_row(make_cfg):
    from rftbench.leaderboard import build

    cfg = make_cfg("method=rws", "method.adapt.bn=blend", "budget.epochs=1", "method.adapt.coeffs=[0.0,1.0]",
                   "method.adapt.alphas=[0.0,2.0]")
    assert execute(cfg) == "done"
    m = pd.read_csv(run_folder(cfg).path / "metrics.csv")
    attribution = m[m["detail"] == "row:bn_only"]
    assert {"val_acc", "acc", "acc_mean"} <= set(attribution["metric"])
    assert {"test", "ood/typed", "ood", "ood/corruption", "ood_seen"} <= set(attribution["split"])
    board = build(cfg.paths.runs)
    assert set(board["method"]) == {"rws", "rws_bn_only"}
    row = board.set_index("method").loc["rws_bn_only"]
    test_acc = attribution[(attribution["split"] == "test") & (attribution["metric"] == "acc")]["value"].item()
    assert row["id_test_acc"] == pytest.approx(test_acc) and row["n_seeds"] == 1
