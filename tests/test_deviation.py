"""The deviation diagnostic: per-tensor L2 and MARS norms of w - w0, recorded by the runner."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from rftbench.deviation import deviation_table, mars_norm, snapshot, totals
from rftbench.run import execute, run_folder


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.head = nn.Linear(2, 2)


def test_mars_norm_is_the_largest_absolute_row_sum():
    d = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 1.0]])
    assert mars_norm(d) == 4.0
    assert mars_norm(torch.tensor([1.0, -2.0])) == 2.0  # a vector is a diagonal map: its rows are its elements
    assert mars_norm(torch.tensor(-1.5)) == 1.5
    assert mars_norm(torch.ones(2, 3, 2, 2)) == 12.0     # conv: (out, in * kh * kw)


def test_table_holds_the_moved_backbone_tensors_only():
    m = Tiny()
    start = snapshot(m)
    assert set(start) == {"body.weight", "body.bias"}  # the head is new: left out
    with torch.no_grad():
        m.body.weight.add_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 2.0]]))
        m.head.weight.add_(5.0)
    t = deviation_table(start, m)
    assert list(t["param"]) == ["body.weight"]  # the bias did not move
    assert t["l2"].item() == pytest.approx(3.0) and t["mars"].item() == pytest.approx(4.0)
    assert totals(t) == {"deviation_l2": pytest.approx(3.0), "deviation_mars": pytest.approx(4.0)}
    assert totals(deviation_table(start, Tiny())) != {}  # a different model: every tensor differs
    assert totals(deviation_table(start, m).iloc[0:0]) == {}


def test_runner_records_deviation_for_backbone_training_only(make_cfg):
    ft = make_cfg("method=ft", "budget.epochs=1")
    assert execute(ft) == "done"
    path = run_folder(ft).path
    table = pd.read_csv(path / "deviation.csv")
    assert len(table) and (table["l2"] > 0).all() and not table["param"].str.startswith("head").any()
    m = pd.read_csv(path / "metrics.csv")
    l2 = m[m["metric"] == "chosen/deviation_l2"]["value"].item()
    assert l2 == pytest.approx(float((table["l2"] ** 2).sum() ** 0.5), rel=1e-5)
    lp = make_cfg("method=lp")
    assert execute(lp) == "done"
    assert not (run_folder(lp).path / "deviation.csv").exists()  # frozen backbone: nothing moved


def test_the_mars_column_is_the_norm_mars_sp_bounds_for_every_tensor_kind():
    from rftbench.methods.mars_sp import project_tensor

    g = torch.Generator().manual_seed(0)
    for shape, radius in (((8,), 0.1), ((4, 3, 3, 3), 1.0), ((5, 7), 1.0)):  # norm scale, conv, linear
        w0 = torch.randn(shape, generator=g)
        w = project_tensor(w0 + torch.randn(shape, generator=g), w0, radius)
        assert mars_norm(w - w0) == pytest.approx(radius, rel=1e-5)  # on the ball's boundary, not above
