"""WiSE-FT and LP-FT: interpolation math, reuse of the cached fine-tuning, choice on val."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

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
