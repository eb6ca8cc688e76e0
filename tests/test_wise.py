"""WiSE-FT and LP-FT: interpolation math, reuse of the cached fine-tuning, choice on val."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from rftbench.methods import ft
from rftbench.methods.wise import interpolate
from rftbench.run import execute, run_folder


def test_interpolate_endpoints_and_midpoint():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.equal(interpolate(a, b, 0.25)["w"], torch.tensor([1.0, 3.0]))
    assert interpolate(a, b, 0.5)["n"].item() == 7
    with pytest.raises(ValueError):
        interpolate(a, {"w": b["w"]}, 0.5)


def test_wise_reuses_the_ft_model_and_chooses_on_val(make_cfg, monkeypatch):
    assert execute(make_cfg("method=ft")) == "done"

    def no_training(*a, **k):
        raise AssertionError("WiSE-FT must reuse the cached fine-tuned model")

    monkeypatch.setattr(ft, "fit", no_training)
    cfg = make_cfg("method=wise", "method.adapt.alphas=[0.0,0.5,1.0]")
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    sweep = pd.read_csv(path / "wise_sweep.csv")
    assert list(sweep["alpha"]) == [0.0, 0.5, 1.0] and "ood/typed_acc" in sweep
    m = pd.read_csv(path / "metrics.csv")
    chosen = m[m["metric"] == "chosen/alpha"]["value"].item()
    best = sweep[sweep["val_acc"] == sweep["val_acc"].max()]["alpha"].min()
    assert chosen == best
    # alpha = 1 is the fine-tuned model: same val accuracy as the ft run chose
    ft_val = pd.read_csv(run_folder(make_cfg("method=ft")).path / "metrics.csv")
    ft_val = ft_val[ft_val["metric"] == "val_acc"]["value"].item()
    assert sweep[sweep["alpha"] == 1.0]["val_acc"].item() == pytest.approx(ft_val)


def test_lpft_runs_and_records_the_probe(make_cfg):
    cfg = make_cfg("method=lpft")
    assert execute(cfg) == "done"
    m = pd.read_csv(run_folder(cfg).path / "metrics.csv")
    assert {"chosen/probe_val_acc", "val_acc"} <= set(m["metric"])


def _suite_model_ctx(cfg):
    from pathlib import Path

    from rftbench.run import build_model, build_suite
    from rftbench.train import RunContext

    ctx = RunContext(cache_dir=Path(cfg.paths.cache), seed=cfg.seed, eval_batch_size=cfg.eval.batch_size,
                     spec={"test": "wise-endpoints", "head": cfg.suite.head_init})
    suite = build_suite(cfg, ctx)
    return suite, build_model(cfg, suite, ctx), ctx


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("head_init", ["auto", "random"])
def test_alpha_zero_is_the_start_and_one_the_end_bit_for_bit(make_cfg, head_init):
    """Zero-shot head: theta_0 with it vs its FT; new head: the LP model vs the LP-FT model."""
    import copy

    from rftbench.methods import lpft, wise
    from rftbench.methods.lp import probe

    cfg = make_cfg("method=wise", f"suite.head_init={head_init}")
    knobs = instantiate(cfg.method.adapt).keywords   # the optimizer partials, as the runner builds them
    recipe, probe_cfg = knobs["recipe"], knobs["probe_cfg"]
    suite, model, ctx = _suite_model_ctx(cfg)
    zeroshot = model.head_origin == "zeroshot"
    assert zeroshot == (head_init == "auto")
    if zeroshot:
        start = copy.deepcopy(model)
        end = ft.cached_finetune(copy.deepcopy(model), suite, ctx, **recipe).model
    else:
        start = probe(copy.deepcopy(model), suite, ctx, **probe_cfg)[0]
        end = lpft.adapt(copy.deepcopy(model), suite, ctx, recipe, probe_cfg).model
    assert not _same_state(start, end)
    for alpha, expected in ((0.0, start), (1.0, end)):
        got = wise.adapt(copy.deepcopy(model), suite, ctx, recipe, probe_cfg, alphas=[alpha])
        assert got.info["start_head_probe"] == int(not zeroshot)
        assert _same_state(got.model, expected)
        x = suite.val.subset(torch.arange(8)).x
        with torch.no_grad():
            assert torch.equal(got.model.eval()(x), expected.eval()(x))


def test_select_ood_val_uses_the_ood_val_splits_and_fails_clearly_without_them(make_cfg):
    from rftbench.methods import wise

    cfg = make_cfg("method=wise", "method.select=ood_val", "method.adapt.alphas=[0.0,1.0]")
    assert execute(cfg) == "done"
    sweep = pd.read_csv(run_folder(cfg).path / "wise_sweep.csv")
    chosen = pd.read_csv(run_folder(cfg).path / "metrics.csv").query("metric == 'chosen/alpha'")["value"].item()
    assert "ood_val_acc" in sweep and chosen == sweep.loc[sweep["ood_val_acc"].idxmax(), "alpha"]
    assert {"test_acc", "ood/typed_acc", "ood_acc_mean", "ood/corruption_acc_mean"} <= set(sweep)
    suite, _, _ = _suite_model_ctx(make_cfg("method=wise", "suite.build.seen_corruptions.names=[]"))
    with pytest.raises(ValueError, match="ood_val"):
        wise.ood_val_splits(suite)
