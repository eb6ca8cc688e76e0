"""Every method of the benchmark runs end to end on the tiny preset and records its cost columns."""
from __future__ import annotations

import pandas as pd
import pytest

from rftbench.run import execute, run_folder


@pytest.mark.parametrize("method,expected", [
    ("lp", {"chosen/probe_epoch"}),
    ("lora", {"chosen/lora_layers", "chosen/rank"}),
    ("levi", {"chosen/flop_ratio", "chosen/task_model_params"}),
])
def test_method_runs_end_to_end(make_cfg, method, expected):
    cfg = make_cfg(f"method={method}")
    assert execute(cfg) == "done"
    m = pd.read_csv(run_folder(cfg).path / "metrics.csv")
    assert expected <= set(m["metric"])
    trainable = m[m["metric"] == "trainable_params"]["value"].item()
    frac = m[m["metric"] == "trainable_frac"]["value"].item()
    assert trainable > 0 and 0 < frac
    if method in ("lp", "lora"):
        assert frac < 0.05  # parameter-efficient methods train a small fraction
