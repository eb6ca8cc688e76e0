"""rftbench: a reproducible benchmark suite for robust fine-tuning.

Importing the package registers the config resolvers that let the YAML refer to the one Python
definition of the corruption lists (`rftbench.data.corruptions`) instead of copying them:
`${rftbench.corruptions:}` (the 15 ImageNet-C benchmark corruptions), `${rftbench.corruptions:extra}`
(the 4 held-out ones, for shift-aware methods), `${rftbench.corruptions:all}` and
`${rftbench.severities:}` (1..5).
"""
from __future__ import annotations

import os

# OpenMP threads (PyTorch's CPU pools) yield instead of spin-waiting when the cores are shared with
# other processes: spinning made a run up to 5x slower beside one busy process. Read by OpenMP when
# torch loads it, so it is set here, before any rftbench module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from omegaconf import OmegaConf  # noqa: E402


def _corruptions(which: str = "benchmark") -> list[str]:
    from rftbench.data.corruptions import CORRUPTION_SETS

    if which not in CORRUPTION_SETS:
        raise ValueError(f"${{rftbench.corruptions:{which}}}: unknown set; valid: {', '.join(CORRUPTION_SETS)}")
    return list(CORRUPTION_SETS[which])


def _severities() -> list[int]:
    from rftbench.data.corruptions import SEVERITIES

    return list(SEVERITIES)


def register_resolvers() -> None:
    """Register `${rftbench.corruptions:...}`, `${rftbench.severities:}` and `${rftbench.plus_one:n}`
    (n + 1: the exclusive end of a sweep's `range`, e.g. experiment=bench_tuned's hp_seed 0..K)
    (idempotent)."""
    if not OmegaConf.has_resolver("rftbench.corruptions"):
        OmegaConf.register_new_resolver("rftbench.corruptions", _corruptions)
    if not OmegaConf.has_resolver("rftbench.severities"):
        OmegaConf.register_new_resolver("rftbench.severities", _severities)
    if not OmegaConf.has_resolver("rftbench.plus_one"):
        OmegaConf.register_new_resolver("rftbench.plus_one", lambda n: int(n) + 1)


register_resolvers()
