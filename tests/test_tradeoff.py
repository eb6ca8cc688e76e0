"""The digits suite keeps its point (docs/protocol.md): full fine-tuning wins on handwriting (ID test)
and loses typed digits (held-out fonts) relative to the zero-shot model."""
from __future__ import annotations

import pytest

from rftbench import leaderboard
from rftbench.run import execute


@pytest.mark.slow
def test_ft_beats_zeroshot_in_distribution_and_loses_typed_digits(make_cfg, tmp_path):
    runs = tmp_path / "runs"
    for method in ("zeroshot", "ft"):
        for seed in (0, 1, 2):
            execute(make_cfg(f"method={method}", f"seed={seed}", "eval.adversarial.enabled=false",
                             experiment=None, runs=runs))
    board = leaderboard.build(runs).set_index("method")
    assert (board["n_seeds"] == 3).all()
    ft, zs = board.loc["ft"], board.loc["zeroshot"]
    assert ft["id_test_acc"] > zs["id_test_acc"] + 0.1
    assert ft["ood_domain_acc"] < zs["ood_domain_acc"] - 0.05
