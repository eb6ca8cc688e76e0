"""How far a method moved the pre-trained weights: per-tensor ||w - w0|| of the returned model.

The runner snapshots the backbone's parameters before `adapt` and compares the returned model's
parameters of the same name and shape with them (the head is left out: it is new for the suite).
Two norms per tensor, the ones the projection and regularisation methods constrain:

- `l2`: the Frobenius norm of w - w0 (L2-SP's penalty, TPGM's `l2` mode);
- `mars`: the maximum absolute row sum of w - w0 reshaped to (out, -1), i.e. the largest L1 norm of
  an output row (MARS-SP's norm, TPGM's and FTP's per-row L1 bound). A 1-D tensor (a normalisation
  scale) acts as a diagonal map, so its rows are its elements: max |w_i - w0_i|, as MARS-SP's
  `radius_norm` and TPGM's `mars` mode constrain it (FTP's rule takes a vector as one row instead).

`deviation.csv` holds one row per tensor that moved; the totals are recorded as `chosen/deviation_l2`
(the L2 norm over all backbone tensors together) and `chosen/deviation_mars` (the largest per-tensor
MARS norm). Methods that return a model whose parameters are renamed or replaced (e.g. CT's units)
are compared on the names that still match; methods that train nothing of the backbone have no table.
"""
from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn


def mars_norm(delta: torch.Tensor) -> float:
    """MARS-SP's norm (`rftbench.methods.mars_sp.mars`) of `delta`: a 1-D tensor's rows are its elements."""
    from rftbench.methods.mars_sp import mars

    return float(mars(delta)) if delta.numel() else 0.0


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating parameters of `model`'s backbone (everything but `model.head`), detached copies."""
    head = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if id(p) not in head and p.is_floating_point()}


def deviation_table(start: dict[str, torch.Tensor], model: nn.Module) -> pd.DataFrame:
    """One row per tensor of `start` that `model` holds under the same name and shape and that moved:
    param, numel, l2, mars, rel_l2 (= l2 / ||w0||)."""
    rows = []
    for name, p in model.named_parameters():
        w0 = start.get(name)
        if w0 is None or w0.shape != p.shape:
            continue
        delta = p.detach().to(w0.device, torch.float64) - w0.double()
        l2 = float(delta.norm())
        if l2 == 0.0:
            continue
        ref = float(w0.double().norm())
        rows.append({"param": name, "numel": p.numel(), "l2": l2, "mars": mars_norm(delta),
                     "rel_l2": l2 / ref if ref > 0 else math.inf})
    return pd.DataFrame(rows, columns=["param", "numel", "l2", "mars", "rel_l2"])


def totals(table: pd.DataFrame) -> dict[str, float]:
    """`deviation_l2` (L2 over all moved tensors together) and `deviation_mars` (largest MARS norm)."""
    if table.empty:
        return {}
    return {"deviation_l2": float(math.sqrt((table["l2"] ** 2).sum())),
            "deviation_mars": float(table["mars"].max())}
