"""Model soups: averaging, the greedy rule, ft's draws, cache reuse, end to end."""
from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rftbench.methods import soup
from rftbench.run import execute, run_folder
from rftbench.sweep import sample_hparams


def test_uniform_soup_is_the_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    out = soup.average([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert out["n"].item() == 3 and out["n"].dtype == a["n"].dtype  # integer buffers from the first


def test_greedy_takes_ingredients_that_do_not_drop_val():
    # soup val acc as a function of the set: 2 helps, 1 hurts, 3 keeps it equal (taken)
    table = {(0,): 0.6, (0, 2): 0.7, (0, 1, 2): 0.5, (0, 2, 3): 0.7}
    assert soup.greedy([0, 2, 1, 3], lambda idx: table[tuple(sorted(idx))]) == [0, 2, 3]


def test_ingredient_search_is_fts_search(make_cfg):
    soup_search = [dict(s) for s in make_cfg("method=soup").method.adapt.ingredient_search]
    assert soup_search == [dict(s) for s in OmegaConf.to_container(make_cfg("method=ft").method.search)]
    assert len(soup_search) == 2


def test_ingredient_draws_equal_ft_draws(make_cfg):
    for k in (1, 2, 3):
        ft = sample_hparams(make_cfg("method=ft", f"hp_seed={k}"))
        base = make_cfg("method=soup")
        recipe = instantiate(base.method.adapt, _convert_="all").keywords["recipe"]
        search = [dict(s) for s in base.method.adapt.ingredient_search]
        drawn = soup.ingredient_recipe(recipe, search, k)
        assert drawn["optimizer"].keywords["lr"] == ft.method.finetune.optimizer.lr
        assert drawn["optimizer"].keywords["weight_decay"] == ft.method.finetune.optimizer.weight_decay
        assert drawn["optimizer"].keywords["momentum"] == ft.method.finetune.optimizer.momentum


def test_soup_end_to_end_reuses_ft(make_cfg, single_thread, monkeypatch):
    import pandas as pd

    from rftbench.methods import ft as ft_module

    ft = sample_hparams(make_cfg("method=ft", "hp_seed=1", "budget.epochs=1"))
    assert execute(ft) == "done"
    lrs, real = [], ft_module.finetune

    def counted(*args, **kwargs):
        lrs.append(kwargs["optimizer"].keywords["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ft_module, "finetune", counted)
    cfg = make_cfg("method=soup", "method.adapt.ingredients=2", "budget.epochs=1")
    assert execute(cfg) == "done"
    assert ft.method.finetune.optimizer.lr not in lrs  # ingredient 1 = ft's cached model at hp_seed=1
    ing = pd.read_csv(run_folder(cfg).path / "soup_ingredients.csv")
    assert len(ing) == 2 and ing["taken"].sum() >= 1
    assert set(pd.read_csv(run_folder(cfg).path / "soup_val.csv")["soup"]) == {"greedy", "uniform"}
