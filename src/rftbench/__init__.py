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
# The same CPU kernels on every x86-64 machine with AVX2 (Intel or AMD, with or without AVX-512):
# PyTorch's vectorised ops, oneDNN's convolutions and MKL's BLAS otherwise pick kernels per
# instruction set, whose floating-point sums round differently (the committed digits numbers moved
# by up to ~1 point between two machines). Read lazily by each library; set yours to override.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("MKL_CBWR", "AVX2")

from omegaconf import OmegaConf  # noqa: E402


def _corruptions(which: str = "benchmark") -> list[str]:
    from rftbench.data.corruptions import CORRUPTION_SETS

    if which not in CORRUPTION_SETS:
        raise ValueError(f"${{rftbench.corruptions:{which}}}: unknown set; valid: {', '.join(CORRUPTION_SETS)}")
    return list(CORRUPTION_SETS[which])


def _severities() -> list[int]:
    from rftbench.data.corruptions import SEVERITIES

    return list(SEVERITIES)


def _method_search(method: str) -> list[dict]:
    """The `search:` list of configs/method/<method>.yaml (one definition, e.g. soup's ingredients
    draw from ft's search space)."""
    from pathlib import Path

    import yaml

    from rftbench.identity import CONFIG_DIR

    path = Path(CONFIG_DIR) / "method" / f"{method}.yaml"
    if not path.exists():
        raise ValueError(f"${{rftbench.method_search:{method}}}: no method config {path}")
    return list(yaml.safe_load(path.read_text()).get("search") or [])


def register_resolvers() -> None:
    """Register `${rftbench.corruptions:...}`, `${rftbench.severities:}`, `${rftbench.plus_one:n}`
    (n + 1: the exclusive end of a sweep's `range`, e.g. experiment=bench_tuned's hp_seed 0..K) and
    `${rftbench.method_search:<method>}` (idempotent)."""
    if not OmegaConf.has_resolver("rftbench.corruptions"):
        OmegaConf.register_new_resolver("rftbench.corruptions", _corruptions)
    if not OmegaConf.has_resolver("rftbench.severities"):
        OmegaConf.register_new_resolver("rftbench.severities", _severities)
    if not OmegaConf.has_resolver("rftbench.plus_one"):
        OmegaConf.register_new_resolver("rftbench.plus_one", lambda n: int(n) + 1)
    if not OmegaConf.has_resolver("rftbench.method_search"):
        OmegaConf.register_new_resolver("rftbench.method_search", _method_search)


register_resolvers()
