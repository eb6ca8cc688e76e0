"""Model soups (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022): average the weights of K
fine-tuned models ("ingredients") of one starting point.

- ingredients: ingredient 0 is method=ft's recipe as configured, ingredient k > 0 the ft recipe
  drawn for hp_seed=k from ft's own search space (`ingredient_search`, the keys of
  configs/method/ft.yaml, drawn by `rftbench.sweep.sample_hparams`), each trained by
  `rftbench.methods.ft.cached_finetune`: the very cached models of method=ft at those hp_seeds;
- uniform soup: the plain mean of the ingredients' states;
- greedy soup (the paper's recipe): ingredients sorted by val accuracy (descending, ties -> the
  lower index), each added if the soup's val accuracy does not drop;
- averaging: floating tensors (BatchNorm running statistics included) averaged, integer buffers
  from the first ingredient of the soup.

Deviations from the official code (mlfoundations/model-soups): the ingredients come from the
benchmark's own fine-tuning search space and budget (the paper: its CLIP hyper-parameter grid), and
greedy keeps an ingredient on equal val accuracy ("does not drop"; the official code adds on >=,
the same).
"""
from __future__ import annotations

import copy
import functools

import pandas as pd
import torch
from omegaconf import OmegaConf

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, state_of
from rftbench.methods.ft import cached_finetune
from rftbench.train import RunContext, accuracy_on

KINDS = ("greedy", "uniform")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of floating tensors over `states`; integer tensors from the first state."""
    if not states:
        raise ValueError("a soup needs at least one ingredient")
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point()
            else v.clone() for k, v in states[0].items()}


def greedy(order: list[int], score) -> list[int]:
    """The greedy soup: `order` (ingredients by val accuracy, best first); ingredient i joins if
    `score(soup + [i]) >= score(soup)`. Returns the chosen ingredient indices."""
    soup = [order[0]]
    best = score(soup)
    for i in order[1:]:
        s = score(soup + [i])
        if s >= best:
            soup, best = soup + [i], s
    return soup


def _with(recipe: dict, path: list[str], value) -> dict:
    """`recipe` with `value` at `path` (through partials' keywords), copied."""
    recipe = dict(recipe)
    node = recipe[path[0]]
    if len(path) == 1:
        recipe[path[0]] = value
    elif isinstance(node, functools.partial):
        rest = dict(node.keywords)
        rest = _with(rest, path[1:], value)
        recipe[path[0]] = functools.partial(node.func, *node.args, **rest)
    else:
        recipe[path[0]] = _with(node, path[1:], value)
    return recipe


def ingredient_recipe(recipe: dict, search: list[dict], hp_seed: int) -> dict:
    """ft's recipe drawn for `hp_seed` (keys `method.finetune.<path>`), as `sample_hparams` draws it."""
    from rftbench.sweep import sample_hparams

    prefix = "method.finetune."
    cfg = OmegaConf.create({"hp_seed": hp_seed, "method": {"search": search}})
    for spec in search:
        if not spec["key"].startswith(prefix):
            raise ValueError(f"soup ingredient_search key {spec['key']!r} must start with {prefix!r}")
        OmegaConf.update(cfg, spec["key"], 0.0, merge=True)
    drawn = sample_hparams(cfg)
    for spec in search:
        recipe = _with(recipe, spec["key"][len(prefix):].split("."), OmegaConf.select(drawn, spec["key"]))
    return recipe


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, recipe: dict, ingredient_search: list[dict],
          ingredients: int, kind: str) -> Adapted:
    """K ingredients (ft at hp_seed 0..K-1), the uniform and greedy soups; `kind` is returned."""
    if kind not in KINDS:
        raise ValueError(f"soup kind={kind!r} not valid; choose one of {KINDS}")
    if ingredients < 1:
        raise ValueError("soup ingredients must be >= 1")
    start = state_of(model)
    trained, states = [], []
    for k in range(ingredients):
        model.load_state_dict(start)
        r = recipe if k == 0 else ingredient_recipe(recipe, ingredient_search, k)
        trained.append(cached_finetune(model, suite, ctx, **r))
        states.append(state_of(model))
    work = copy.deepcopy(model).eval()

    def score(idx: list[int]) -> float:
        work.load_state_dict(average([states[i] for i in idx]))
        return accuracy_on(work, suite.val, ctx)

    accs = [t.val_acc for t in trained]
    order = sorted(range(ingredients), key=lambda i: -accs[i])
    taken = greedy(order, score)
    greedy_acc, uniform_acc = score(taken), score(list(range(ingredients)))
    chosen = taken if kind == "greedy" else list(range(ingredients))
    work.load_state_dict(average([states[i] for i in chosen]))
    table = pd.DataFrame({"ingredient": list(range(ingredients)), "val_acc": accs,
                          "taken": [int(i in taken) for i in range(ingredients)]})
    soups = pd.DataFrame({"soup": ["greedy", "uniform"], "val_acc": [greedy_acc, uniform_acc]})
    return Adapted(work, val_acc=greedy_acc if kind == "greedy" else uniform_acc,
                   trainable_params=trained[0].trainable_params,
                   train_time_s=sum(t.train_time_s for t in trained),
                   reused_time_s=sum(t.reused_time_s for t in trained),
                   tables={"soup_ingredients": table, "soup_val": soups},
                   info={"kind": kind, "n_taken": len(taken), "greedy_val_acc": greedy_acc,
                         "uniform_val_acc": uniform_acc,
                         "converged": int(all(t.info.get("converged", 1) for t in trained))})
