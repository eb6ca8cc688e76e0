"""The shape of the code: one selection rule, the method contract checked by the runner, no import
cycle, and methods that never read test or OOD data while they adapt (the "blind suite")."""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import rftbench
from rftbench import run as runner
from rftbench.data.base import Split
from rftbench.methods import zeroshot
from rftbench.methods.base import Adapted, ContractError
from rftbench.methods.ct_method import choose as ct_choose
from rftbench.methods.rws_method import choose as rws_choose
from rftbench.run import execute, run_folder
from rftbench.selection import Running, best_index, select

SRC = Path(rftbench.__file__).parent


# ------------------------------------------------------------------------------------- selection
def test_highest_score_wins_and_ties_go_to_the_first_candidate():
    assert select(["a", "b", "c"], [0.2, 0.9, 0.5]) == "b"
    assert select(["a", "b", "c"], [0.9, 0.5, 0.9]) == "a"
    assert select(["a", "b"], [math.nan, 0.1]) == "b" and select(["a", "b"], [None, None]) == "a"
    assert best_index([0.3, 0.7, 0.7]) == 1
    with pytest.raises(ValueError):
        select([], [])
    with pytest.raises(ValueError):
        select(["a"], [0.1, 0.2])
    run = Running()
    assert [run.offer(e, s) for e, s in [(1, 0.5), (2, 0.5), (3, 0.6), (4, 0.6)]] == [True, False, True, False]
    assert (run.candidate, run.score) == (3, 0.6)  # ties -> the earlier epoch


def test_each_caller_orders_its_candidates_conservative_first():
    assert ct_choose({0.8: 0.9, 0.9: 0.9, 1.0: 0.5}) == 0.9 and ct_choose({0.8: 0.9, 1.0: 0.9}) == 1.0
    assert rws_choose([-1.0, 0.0, 0.5], [0.4, 0.4, 0.4]) == 0.0 and rws_choose([-0.5, 0.5], [0.4, 0.4]) == -0.5
    users = {"train.py", "leaderboard.py", "methods/ct_method.py", "methods/wise.py", "methods/rws_method.py"}
    for rel in users:
        tree = ast.parse((SRC / rel).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "rftbench.selection" in imported, rel


# -------------------------------------------------------------------------------------- imports
def import_graph() -> dict[str, set[str]]:
    """rftbench module -> the rftbench modules it imports (at any level of the file)."""
    files = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in SRC.rglob("*.py")}
    graph = {m: set() for m in files}
    for m, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            graph[m] |= {n for n in names if n in files and n != m}
    return graph


def test_no_import_cycle_and_nothing_imports_the_entry_point():
    graph = import_graph()
    assert {m for m, deps in graph.items() if "rftbench.run" in deps} == set()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path[path.index(d):] + [d])}"
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


# ------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("returned", ["no_val_acc", "not_adapted"])
def test_a_method_breaking_the_contract_fails_the_run_naming_it(make_cfg, monkeypatch, returned):
    def broken(model, suite, ctx):
        if returned == "no_val_acc":
            return Adapted(model, val_acc=None, trainable_params=0)
        return {"model": model, "trainable_params": 0}

    monkeypatch.setattr(zeroshot, "adapt", broken)
    cfg = make_cfg("method=zeroshot")
    with pytest.raises(ContractError, match="method=zeroshot.*" + ("val_acc" if returned == "no_val_acc" else "Adapted")):
        execute(cfg)
    folder = run_folder(cfg)
    assert not folder.done and folder.status == "failed"
    assert "ContractError" in (folder.path / "error.txt").read_text()


# ---------------------------------------------------------------------------------- blind suite
class Sealed(Split):
    """A split whose data raises while `armed` (set by the test around `adapt`)."""

    armed = [False]

    def __getattribute__(self, name: str):
        if name in ("x", "y", "dataset", "labels") and type(self).armed[0]:
            raise AssertionError(f"adapt read the {object.__getattribute__(self, 'role')} split "
                                 f"{object.__getattribute__(self, 'name')!r}")
        return super().__getattribute__(name)


def seal(suite):
    """The suite with its test and OOD splits sealed (validation splits, ood_val included, stay open)."""
    splits = {k: Sealed(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.init})
              if s.role in ("test", "ood") else s
              for k, s in suite.splits.items()}
    return dataclasses.replace(suite, splits=splits)


FAST = ["budget.epochs=1"]
ALL = {"zeroshot": [], "lp": [], "ct": ["method.betas.values=[0.9]"], "ct_robust": ["method.betas.values=[0.9]"],
       "ft": [], "lpft": [], "wise": ["method.adapt.alphas=[0.0,1.0]"], "lora": [], "ftp": [],
       "ct_trainable": [], "levi": [],
       "rws": ["method.adapt.bn=keep", "method.adapt.coeffs=[0.0,1.0]", "method.adapt.alphas=[0.0,1.0]"],
       "l2sp": [], "mars_sp": [], "bitfit": [], "surgical": [], "surgical_rgn": [],
       "soup": ["method.adapt.ingredients=2"], "tpgm": [], "tpgm_posthoc": ["method.adapt.max_iters=5"]}
QUICK = {"zeroshot", "lp", "ct", "ct_robust"}  # the default run; `-m slow` runs them all


@pytest.mark.parametrize("method", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow) for m in ALL])
def test_no_method_reads_test_or_ood_data_while_adapting(make_cfg, monkeypatch, method):
    build_suite, instantiate = runner.build_suite, runner.instantiate

    def sealed_adapt(node, *args, **kwargs):
        fn = instantiate(node, *args, **kwargs)
        if args or kwargs:  # not the method's adapt
            return fn

        def adapt(**kw):
            Sealed.armed[0] = True
            try:
                return fn(**kw)
            finally:
                Sealed.armed[0] = False
        return adapt

    monkeypatch.setattr(runner, "build_suite", lambda cfg, ctx: seal(build_suite(cfg, ctx)))
    monkeypatch.setattr(runner, "instantiate", sealed_adapt)
    cfg = make_cfg(f"method={method}", *FAST, *ALL[method])
    assert execute(cfg) == "done"  # the runner evaluates (and runs the oracle analysis) after adapt
    m = pd.read_csv(run_folder(cfg).path / "metrics.csv")
    assert "test" in set(m["split"]) and 0 <= m[m["metric"] == "val_acc"]["value"].item() <= 1
    assert not Sealed.armed[0]


def test_sealed_split_raises_while_armed():
    s = Sealed("test", "test", x=torch.zeros(2, 1), y=torch.zeros(2, dtype=torch.long))
    Sealed.armed[0] = True
    try:
        with pytest.raises(AssertionError, match="test split 'test'"):
            len(s)
    finally:
        Sealed.armed[0] = False
    assert len(s) == 2
