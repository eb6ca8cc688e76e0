"""Curvature Tuning in the runner: the beta grid and choice, steering CT (vs LP), trainable CT
(frozen backbone and BatchNorm), robustness mode (beta chosen without test data)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

import rftbench.run as runner
from rftbench.backbones import Classifier, Normalize
from rftbench.data.base import Split, Suite
from rftbench.methods import ct_method
from rftbench.methods.base import state_of
from rftbench.methods.ct import CTU, TrainableCTU
from rftbench.methods.ct_method import beta_grid, choose
from rftbench.methods.lp import probe
from rftbench.run import build_model, build_suite, execute, run_folder
from rftbench.train import RunContext, accuracy_on, fit_probe, fit_probes

GRID = "method.betas.values=[0.8,0.9,0.95]"
SWEEP_COLUMNS = ["beta", "val_acc", "test_acc"]


pytestmark = pytest.mark.usefixtures("single_thread")


class Stop(Exception):
    """Raised by a stand-in to stop a method once it has shown its arguments."""


def metric(m: pd.DataFrame, split: str, name: str, selection: str = "val") -> float:
    sel = m[(m["split"] == split) & (m["metric"] == name) & (m["selection"] == selection)]
    return sel["value"].item()


def val_argmax(table: pd.DataFrame) -> float:
    """The beta with the best val accuracy, ties -> larger beta (computed independently)."""
    best = table["val_acc"].max()
    return table.loc[table["val_acc"] == best, "beta"].max()


def suite_and_model(cfg):
    ctx = RunContext(cache_dir=Path(cfg.paths.cache), seed=cfg.seed, eval_batch_size=cfg.eval.batch_size)
    suite = build_suite(cfg, ctx)
    return suite, build_model(cfg, suite, ctx), ctx


def test_default_grid_is_thirty_exact_two_decimal_values_plus_one(make_cfg):
    grid = beta_grid(make_cfg("method=ct").method.betas)
    assert grid == [round(0.70 + 0.01 * i, 2) for i in range(30)] + [1.0]
    assert 0.73 in grid and 0.99 in grid and grid == sorted(grid)
    assert beta_grid([0.9, 0.8, 0.9, 1.0]) == [0.8, 0.9, 1.0]
    assert beta_grid({"start": 0.5, "stop": 0.6, "step": 0.05}) == [0.5, 0.55, 0.6, 1.0]
    assert beta_grid({"start": 0.7, "stop": 0.97, "step": 0.04}) == [0.7, 0.74, 0.78, 0.82, 0.86, 0.9, 0.94, 1.0]
    assert beta_grid(make_cfg("method=ct", GRID).method.betas) == [0.8, 0.9, 0.95, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta_grid([0.5, 1.2])
    with pytest.raises(ValueError, match="step > 0"):
        beta_grid({"start": 0.7, "stop": 0.9, "step": 0})


def test_choose_takes_best_val_and_breaks_ties_toward_relu():
    assert choose({0.7: 0.5, 0.8: 0.9, 0.9: 0.9, 1.0: 0.6}) == 0.9
    assert choose({0.7: 0.95, 0.8: 0.9, 1.0: 0.6}) == 0.7
    assert choose({0.8: 0.9, 1.0: 0.9}) == 1.0


@pytest.mark.parametrize("n,batch_size,weight_decay,lr", [(200, 32, 0.0, 1e-3), (203, 21, 0.01, 1e-2), (10, 32, 0.0, 0.1)])
def test_batched_probes_are_per_beta_fit_probe(n, batch_size, weight_decay, lr):
    """The CT sweep's probes trained as one batched problem equal training each alone (bit for bit
    on CPU): stacked heads, one optimizer, the sum of the per-probe mean losses."""
    gen = torch.Generator().manual_seed(n)
    k = 4
    x, xv = torch.randn(k, n, 24, generator=gen).relu(), torch.randn(k, 40, 24, generator=gen).relu()
    y, yv = torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 5, (40,), generator=gen)
    init = torch.nn.Linear(24, 5)
    init_weight = init.weight.detach().clone()
    kw = dict(init=init, lr=lr, epochs=6, batch_size=batch_size, decay_epoch=3, weight_decay=weight_decay, seed=3)
    batched = fit_probes(x, y, xv, yv, 5, **kw)
    assert len(batched) == k
    for j, got in enumerate(batched):
        ref = fit_probe(x[j], y, xv[j], yv, 5, **kw)
        assert (got.val_acc, got.best_epoch) == (ref.val_acc, ref.best_epoch)
        assert torch.equal(got.head.weight, ref.head.weight) and torch.equal(got.head.bias, ref.head.bias)
        assert not got.head.training
    assert torch.equal(init.weight, init_weight)  # init is not modified
    assert len({(float(p.head.weight.detach().sum()), p.best_epoch) for p in batched}) > 1  # the probes differ


def test_ct_run_chooses_beta_on_val_and_is_never_below_lp(make_cfg):
    cfg = make_cfg("method=ct", GRID)
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    table = pd.read_csv(path / "beta_sweep.csv")
    assert list(table.columns[:3]) == SWEEP_COLUMNS
    assert table["beta"].tolist() == [0.8, 0.9, 0.95, 1.0]
    assert table["test_acc"].between(0, 1).all() and (table["test_acc_selection"] == "oracle").all()
    m = pd.read_csv(path / "metrics.csv")
    beta = metric(m, "-", "chosen/beta")
    assert beta in table["beta"].tolist() and beta == val_argmax(table)
    assert table.loc[table["chosen"], "beta"].tolist() == [beta]
    chosen = table[table["beta"] == beta].iloc[0]
    # the evaluated model is the CT model at the chosen beta with that beta's probe
    assert metric(m, "-", "val_acc") == pytest.approx(chosen["val_acc"])
    assert metric(m, "test", "acc") == pytest.approx(chosen["test_acc"])
    assert metric(m, "test", "acc", "oracle") == pytest.approx(table["test_acc"].max())
    assert metric(m, "-", "chosen/coeff") == 0.5 and metric(m, "-", "chosen/ct_sites") > 0
    assert metric(m, "-", "trainable_params") == 256 * 10 + 10  # the head only
    info = json.loads((path / "info.json").read_text())["info"]
    assert info["beta"] == beta

    # beta = 1 is plain LP with the same probe: same val accuracy, so CT's choice is never below LP
    suite, model, ctx = suite_and_model(cfg)
    _, lp_val_acc, _ = probe(model, suite, ctx, **cfg.method.probe)
    assert table.loc[table["beta"] == 1.0, "val_acc"].item() == lp_val_acc
    assert chosen["val_acc"] >= lp_val_acc


def test_ct_selection_reads_train_and_val_only(make_cfg):
    cfg = make_cfg("method=ct", GRID)
    suite, model, ctx = suite_and_model(cfg)
    blind = replace(suite, splits={k: suite.splits[k] for k in ("train", "val")})
    kwargs = dict(betas=[0.8, 0.9, 0.95], probe_cfg=dict(cfg.method.probe))
    a = ct_method.adapt(model, blind, ctx, oracle_test=False, **kwargs)
    b = ct_method.adapt(model, suite, ctx, oracle_test=True, **kwargs)
    assert a.info == b.info and a.val_acc == b.val_acc
    assert a.tables["beta_sweep"]["test_acc"].isna().all() and not a.rows and a.analysis is None
    assert b.tables["beta_sweep"]["test_acc"].isna().all()  # oracle column: only in the runner's analysis
    tables, rows = b.analysis(suite)
    assert tables["beta_sweep"]["test_acc"].between(0, 1).all() and rows[0]["selection"] == "oracle"
    pd.testing.assert_series_equal(a.tables["beta_sweep"]["val_acc"], b.tables["beta_sweep"]["val_acc"])
    assert {m.beta for m in b.model.modules() if isinstance(m, CTU)} == {b.info["beta"]}


def test_probe_memory_splits_the_batch_without_changing_results(make_cfg, monkeypatch):
    """`probe_memory_gb` bounds the features held for one batched probe (ImageNet-scale train sets):
    a budget below one beta's features probes the betas one at a time, with the same heads, epochs
    and choice bit for bit; it is not part of the run id."""
    cfg = make_cfg("method=ct", GRID)
    suite, model, ctx = suite_and_model(cfg)
    batches = []
    monkeypatch.setattr(ct_method, "fit_probes", lambda tr, *a, **k: batches.append(len(tr)) or fit_probes(tr, *a, **k))
    kwargs = dict(betas=[0.8, 0.9, 0.95], probe_cfg=dict(cfg.method.probe), oracle_test=False)
    whole = ct_method.adapt(model, suite, ctx, probe_memory_gb=None, **kwargs)
    one_by_one = ct_method.adapt(model, suite, ctx, probe_memory_gb=1e-9, **kwargs)
    assert batches == [4, 1, 1, 1, 1]
    assert whole.info == one_by_one.info and whole.val_acc == one_by_one.val_acc
    pd.testing.assert_frame_equal(whole.tables["beta_sweep"], one_by_one.tables["beta_sweep"])
    assert torch.equal(whole.model.head.weight, one_by_one.model.head.weight)
    assert runner.run_id(make_cfg("method=ct", GRID, "method.adapt.probe_memory_gb=0.5")) == runner.run_id(cfg)


def test_ct_trainable_trains_ct_and_head_only(make_cfg, monkeypatch):
    seen = {}

    def recording_build_model(cfg, suite, ctx):
        model = build_model(cfg, suite, ctx)
        seen["before"] = state_of(model)
        return model

    def recording_evaluate(model, *args, **kwargs):
        seen["adapted"] = model
        return runner_evaluate(model, *args, **kwargs)

    runner_evaluate = runner.evaluate
    monkeypatch.setattr(runner, "build_model", recording_build_model)
    monkeypatch.setattr(runner, "evaluate", recording_evaluate)
    cfg = make_cfg("method=ct_trainable")
    assert execute(cfg) == "done"
    m = pd.read_csv(run_folder(cfg).path / "metrics.csv")

    before, model = seen["before"], seen["adapted"]
    after = model.state_dict()
    backbone = [k for k in before if not k.startswith("head.")]
    assert any(k.endswith("running_var") for k in backbone)
    for k in backbone:  # weights and BatchNorm buffers bit for bit
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["head.weight"], before["head.weight"])  # the head trained

    units = [u for u in model.modules() if isinstance(u, TrainableCTU)]
    assert len(units) == metric(m, "-", "chosen/ct_sites") > 0
    betas = torch.cat([torch.sigmoid(u.r) for u in units])
    coeffs = torch.cat([torch.sigmoid(u.q) for u in units])
    assert not torch.allclose(betas, torch.full_like(betas, torch.sigmoid(torch.tensor(1.386)).item()))
    assert metric(m, "-", "chosen/mean_beta") == pytest.approx(betas.mean().item())
    assert metric(m, "-", "chosen/mean_coeff") == pytest.approx(coeffs.mean().item())
    n_ct = sum(2 * u.num_channels for u in units)
    assert metric(m, "-", "trainable_params") == n_ct + 256 * 10 + 10
    history = pd.read_csv(run_folder(cfg).path / "history.csv")
    assert metric(m, "-", "val_acc") == history["val_acc"].max()


def test_ct_trainable_lr_schedule_maps_the_paper_to_the_budget(make_cfg, monkeypatch):
    calls = {}

    def fake_fit(*args, **kwargs):
        calls.update(kwargs)
        raise Stop

    monkeypatch.setattr(ct_method, "fit", fake_fit)
    cfg = make_cfg("method=ct_trainable", "budget.epochs=20")
    suite, model, ctx = suite_and_model(cfg)
    with pytest.raises(Stop):
        instantiate(cfg.method.adapt)(model=model, suite=suite, ctx=ctx)
    assert calls["epochs"] == 20 and calls["bn_eval"] is True
    assert calls["scheduler"] == {"name": "step", "milestones": [10], "gamma": 0.1, "warmup_epochs": 1}
    groups = calls["params"]
    assert [g.get("lr") for g in groups] == [0.1, None]  # CT params at 0.1, the head at Adam's 1e-3
    assert calls["optimizer"].keywords["lr"] == 1e-3
    assert all(p.requires_grad for g in groups for p in g["params"])


def objective_argmax(table: pd.DataFrame) -> float:
    """The beta with the best val objective, ties -> larger beta (computed independently)."""
    best = table["val_objective"].max()
    return table.loc[table["val_objective"] == best, "beta"].max()


def test_ct_robust_select_clean_is_the_old_rule_without_test_data(make_cfg):
    cfg = make_cfg("method=ct_robust", GRID, "method.select=clean")
    suite, model, ctx = suite_and_model(cfg)
    zeroshot_val = accuracy_on(model, suite.val, ctx)
    blind = replace(suite, splits={k: suite.splits[k] for k in ("train", "val")})
    a = instantiate(cfg.method.adapt)(model=model, suite=blind, ctx=ctx, oracle_test=False)
    table = a.tables["beta_sweep"]
    assert table["beta"].tolist() == [0.8, 0.9, 0.95, 1.0] and a.trainable_params == 0
    assert table.loc[table["beta"] == 1.0, "val_acc"].item() == zeroshot_val  # beta 1: the model as is
    assert a.info["beta"] == val_argmax(table) and a.val_acc >= zeroshot_val
    assert a.info["select_objective"] == a.val_acc == accuracy_on(a.model, suite.val, ctx)
    assert (table["val_objective"] == table["val_acc"]).all() and table["test_acc"].isna().all()


def test_ct_robust_runs_end_to_end_with_the_robust_choice_in_info_and_leaderboard(make_cfg, tmp_path):
    from rftbench import leaderboard

    cfg = make_cfg("method=ct_robust", GRID, "method.val_attack.n=40")
    assert cfg.method.select == "robust"  # the default
    assert cfg.method.adapt.val_attack.threats == cfg.eval.adversarial.threats
    suite, model, ctx = suite_and_model(cfg)
    blind = replace(suite, splits={k: suite.splits[k] for k in ("train", "val")})
    a = instantiate(cfg.method.adapt)(model=model, suite=blind, ctx=ctx, oracle_test=False)
    table = a.tables["beta_sweep"]
    assert a.info["beta"] == objective_argmax(table) and a.info["select_n"] == 40
    assert table["val_objective"].tolist() == table["val_robust_acc/Linf/0.0313725"].tolist()

    assert execute(cfg) == "done"  # end to end: the same choice (common random numbers), oracle apart
    path = run_folder(cfg).path
    full = pd.read_csv(path / "beta_sweep.csv")
    pd.testing.assert_series_equal(full["val_objective"], table["val_objective"])
    assert full["test_objective"].between(0, 1).all() and full["test_acc"].between(0, 1).all()
    info = json.loads((path / "info.json").read_text())
    chosen = info["info"]
    assert chosen["beta"] == a.info["beta"] and chosen["select"] == "robust"
    assert chosen["select_objective"] == full.loc[full["chosen"], "val_objective"].item()
    assert 0 < chosen["select_time_s"] <= info["adapt_time_s"]
    m = pd.read_csv(path / "metrics.csv")
    assert metric(m, "-", "chosen/beta") == chosen["beta"]
    assert metric(m, "-", "chosen/select_objective") == pytest.approx(chosen["select_objective"])
    assert metric(m, "-", "select_objective", "oracle") == pytest.approx(full["test_objective"].max())
    assert metric(m, "test", "acc") == pytest.approx(full.loc[full["chosen"], "test_acc"].item())

    variants = leaderboard.build_all(cfg.paths.runs).variants
    row = variants[variants["method"] == "ct_robust"].iloc[0]
    assert row["chosen/beta"] == chosen["beta"]
    assert row["chosen/select_objective"] == pytest.approx(chosen["select_objective"])
    assert row["chosen/select_time_s"] == pytest.approx(chosen["select_time_s"])


def test_ct_robust_select_corruption_uses_the_ood_val_splits(make_cfg):
    cfg = make_cfg("method=ct_robust", GRID, "method.select=corruption")
    suite, model, ctx = suite_and_model(cfg)
    blind = replace(suite, splits={k: v for k, v in suite.splits.items() if v.role in ("train", "val", "ood_val")})
    a = instantiate(cfg.method.adapt)(model=model, suite=blind, ctx=ctx, oracle_test=False)
    table = a.tables["beta_sweep"]
    ood_val = suite.by_role("ood_val")
    assert len(ood_val) == 2 and a.info["beta"] == objective_argmax(table)
    expected = sum(accuracy_on(a.model, s, ctx) for s in ood_val) / len(ood_val)
    assert a.info["select_objective"] == pytest.approx(expected)
    no_ood_val = replace(suite, splits={k: suite.splits[k] for k in ("train", "val")})
    with pytest.raises(ValueError, match="ood_val"):
        instantiate(cfg.method.adapt)(model=model, suite=no_ood_val, ctx=ctx, oracle_test=False)
    with pytest.raises(ValueError, match="method.select='best'"):
        instantiate(cfg.method.adapt)(model=model, suite=suite, ctx=ctx, select="best")


# --------------------------------------------------------------------------- adversarially trained ReLU net

EPS = 0.15  # Linf, pixels in [0, 1]
SMALL_GRID = [0.5, 0.7, 0.8, 0.85, 0.9, 0.95]


def digits_suite() -> Suite:
    """scikit-learn's 8x8 digits in [0, 1]: 1000 train, 400 val, 397 test (fixed split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    parts = {"train": perm[:1000], "val": perm[1000:1400], "test": perm[1400:]}
    return Suite("digits8", 10, {k: Split(k, k, x=x[i], y=y[i]) for k, i in parts.items()})


def adversarially_trained_mlp(train: Split, eps: float = EPS, epochs: int = 40, seed: int = 0) -> Classifier:
    """A 64-128-128-10 ReLU MLP trained with PGD (3 steps, random start) at Linf `eps`."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    model = Classifier(body, nn.Linear(128, 10), Normalize([0.0], [1.0]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(train))
        for i in range(0, len(train), 50):
            xb, yb = train.x[order[i:i + 50]], train.y[order[i:i + 50]]
            delta = (torch.rand_like(xb) * 2 - 1) * eps
            for _ in range(3):
                delta.requires_grad_(True)
                grad, = torch.autograd.grad(F.cross_entropy(model((xb + delta).clamp(0, 1)), yb), delta)
                delta = (delta.detach() + eps / 2 * grad.sign()).clamp(-eps, eps)
            opt.zero_grad()
            F.cross_entropy(model((xb + delta).clamp(0, 1)), yb).backward()
            opt.step()
    model.head_origin = "zeroshot"  # it fits the task as is
    return model.eval()


def test_ct_robust_picks_the_most_robust_beta_where_clean_accuracy_is_flat():
    suite = digits_suite()
    model = adversarially_trained_mlp(suite.train)
    ctx = RunContext(device=torch.device("cpu"), seed=0)
    attack = dict(n=100, tier="quick", seed=0, threats=[{"norm": "Linf", "eps": EPS}], n_iter=10,
                  n_target_classes=2, batch_size=256)
    kw = dict(betas=SMALL_GRID, val_attack=attack, oracle_test=False)
    robust_run = ct_method.adapt_robust(model, suite, ctx, select="robust", **kw)
    clean_run = ct_method.adapt_robust(model, suite, ctx, select="clean", **kw)
    rob, cln = robust_run.tables["beta_sweep"], clean_run.tables["beta_sweep"]
    print(rob[["beta", "val_acc", "val_objective"]].to_string())

    pd.testing.assert_series_equal(rob["val_acc"], cln["val_acc"])
    assert rob["val_acc"].max() - rob["val_acc"].min() <= 0.02  # clean val accuracy: flat (within 8 of 400 images)
    assert rob["val_objective"].max() - rob["val_objective"].min() >= 0.05  # robust val accuracy: not
    # select=clean is today's rule: best clean val accuracy, ties -> larger beta
    assert clean_run.info["beta"] == val_argmax(cln) == ct_method.choose(dict(zip(cln["beta"], cln["val_acc"])))
    # select=robust: the beta with the best robust val accuracy of the sweep
    assert robust_run.info["select_objective"] == rob["val_objective"].max()
    assert robust_run.info["beta"] == objective_argmax(rob)
    assert robust_run.info["beta"] != clean_run.info["beta"]
    chosen = rob.loc[rob["beta"] == clean_run.info["beta"], "val_objective"].item()
    assert chosen < robust_run.info["select_objective"]  # the clean choice is less robust on val
    # common random numbers: measuring the chosen model again gives the same figure
    again = ct_method.select_objective("robust", suite, ctx, attack, "val")(robust_run.model)
    assert again["objective"] == robust_run.info["select_objective"]


def test_ct_robust_refuses_a_random_head(make_cfg):
    cfg = make_cfg("method=ct_robust", GRID, "suite.head_init=random")
    with pytest.raises(ValueError, match="already fits the task"):
        execute(cfg)
