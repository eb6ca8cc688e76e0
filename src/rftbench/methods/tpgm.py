"""TPGM (Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023):
the projection math. Each constrained tensor w (pre-trained value w0) is pulled toward w0 by

    w_proj = w0 + clamp(relu(r) / (n + 1e-8), 0, 1) * (w - w0)

with one learnable radius r per tensor and n the deviation norm of `norm`:
- "mars": per output row (slices along dim 0; a 0-D / 1-D tensor's rows are its elements), the L1
  norm of (w - w0), so every row ends with L1 deviation <= r;
- "l2": the whole tensor's L2 norm of (w - w0), so the tensor ends with L2 deviation <= r.

As in the authors' code (PotatoTian/TPGM, utils/tpgm.py): n is a constant (no gradient), the
gradient reaches w_proj only through the ratio relu(r) / (n + 1e-8) (the deviation (w - w0) is
detached), and before each use r is clipped in place: r <= 0 -> 1e-8, and r above every row's
norm (ratio > 1 everywhere) -> max n. The first projection of a tensor starts r at min(n) / 2.

Status: only the math is implemented here; the training methods (tpgm, tpgm_posthoc) are not yet.
"""
from __future__ import annotations

import torch
from torch import Tensor

NORMS = ("mars", "l2")
EPS = 1e-8


def deviation_norms(w: Tensor, w0: Tensor, norm: str) -> Tensor:
    """The detached deviation norm(s) of `w - w0`: per-row L1 (keepdim, broadcastable to w) for
    "mars", the tensor's L2 norm (0-D) for "l2"."""
    if norm not in NORMS:
        raise ValueError(f"TPGM norm must be one of {NORMS}, got {norm!r}")
    t = (w - w0).detach()
    if norm == "l2":
        return torch.linalg.vector_norm(t)
    if t.dim() > 1:
        return t.abs().sum(dim=tuple(range(1, t.dim())), keepdim=True)
    return t.abs()


@torch.no_grad()
def clip_radius_(radius: Tensor, norms: Tensor) -> Tensor:
    """The authors' clip, in place: r <= 0 -> 1e-8; r / (n + 1e-8) > 1 for every row -> max n."""
    if radius.item() <= 0:
        radius.fill_(EPS)
    if (torch.relu(radius) / (norms + EPS)).min() > 1:
        radius.copy_(norms.max())
    return radius


def project_tensor(w: Tensor, w0: Tensor, radius: Tensor, norm: str) -> Tensor:
    """w0 + clamp(relu(r) / (n + 1e-8), 0, 1) * (w - w0).detach(), after `clip_radius_(r, n)`
    (so r ends in [1e-8, max n]); differentiable in `radius` only."""
    norms = deviation_norms(w, w0, norm)
    clip_radius_(radius, norms)
    ratio = torch.clamp(torch.relu(radius) / (norms + EPS), 0.0, 1.0)
    return w0.detach() + (w - w0).detach() * ratio
