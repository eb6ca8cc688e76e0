"""`method=ftp` end to end: the head is excluded, every other tensor stays within gamma of W0."""
from __future__ import annotations

import pandas as pd

from rftbench.run import execute, run_folder


def test_ftp_run_records_gammas_and_respects_them(make_cfg):
    cfg = make_cfg("method=ftp", "budget.epochs=1")  # one epoch: the kept state is the last one
    assert execute(cfg) == "done"
    path = run_folder(cfg).path
    g = pd.read_csv(path / "gamma.csv")
    assert len(g) > 0 and not g["param"].str.startswith("head.").any()
    assert (g["gamma"] >= 1e-8 * (1 - 1e-6)).all()  # CSV round trip
    # float32 rows: the L1 sum of p - W0 carries rounding of order numel * eps32 * |W|
    assert (g["max_row_l1_to_w0"] <= g["gamma"] * (1 + 1e-4) + 1e-6).all()
    m = pd.read_csv(path / "metrics.csv")
    assert "chosen/mean_gamma" in set(m["metric"])
