"""LEVI (reconstruction) — Roh et al., ICML 2024: frozen pre-trained backbone + small task model.

No public code exists; this is our reconstruction (docs/methods.md section 4), to be labelled
"LEVI (reconstruction)". A frozen backbone f is tapped at several stages; a small task-specific
model g is trained from scratch; one adapting layer per tap maps
[LayerNorm(pool(h_l)) ; LayerNorm(z)] (z = g's penultimate features) to logits; the prediction is
the mean of the per-tap logits. Only g and the adapting layers are trained.
"""
from __future__ import annotations

import copy
from typing import Sequence

import timm
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rftbench.backbones import Classifier, as_classifier
from rftbench.data.base import Suite, batches
from rftbench.methods.base import Adapted
from rftbench.train import RunContext, count_params, fit

DEFAULT_TAPS = ("layer2", "layer3", "layer4")


def make_task_model(width: int = 8) -> nn.Module:
    """A narrow timm resnet10t (stage widths w, 2w, 4w, 8w) mapping pixels to pooled features (B, 8w).

    Width 8 has 79,646 parameters: 6.5% of the digits backbone and 0.7% of ResNet-18.
    """
    channels = (width, 2 * width, 4 * width, 8 * width)
    return timm.create_model("resnet10t", pretrained=False, num_classes=0, channels=channels, stem_width=width)


def pool_tap(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> spatial mean; (B, N, D) tokens -> token 0 (CLS); (B, D) unchanged."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 3:
        return h[:, 0]
    if h.dim() == 2:
        return h
    raise ValueError(f"cannot pool a tapped output of shape {tuple(h.shape)}")


class AdaptingLayer(nn.Module):
    """[LayerNorm(h) ; LayerNorm(z)] -> Linear -> ReLU -> Linear -> logits."""

    def __init__(self, tap_dim: int, z_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.norm_h = nn.LayerNorm(tap_dim)
        self.norm_z = nn.LayerNorm(z_dim)
        self.mlp = nn.Sequential(nn.Linear(tap_dim + z_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.norm_h(h), self.norm_z(z)], dim=1))


class LEVI(nn.Module):
    """Frozen `backbone` tapped at `taps` (submodule names of `backbone.body`, dotted paths allowed)
    + a task model trained from scratch + one adapting layer per tap; predicts the mean of their logits.

    The backbone is deep-copied, frozen and kept in eval mode (BatchNorm statistics fixed) even under
    `LEVI.train()`. `task_model` maps pixels in [0, 1] to features (B, D) (default
    `make_task_model()`); it must have fewer than `max_task_ratio` times the backbone's parameters
    (None disables the check). Tap and feature sizes are read off one probe forward pass on zeros of
    shape (1, *input_size). The new parts are put on the backbone's device.
    """

    def __init__(
        self,
        backbone: Classifier,
        num_classes: int,
        taps: Sequence[str] = DEFAULT_TAPS,
        task_model: nn.Module | None = None,
        hidden: int = 256,
        input_size: tuple[int, int, int] = (3, 224, 224),
        max_task_ratio: float | None = 0.1,
    ):
        super().__init__()
        taps = tuple(taps)
        if not taps:
            raise ValueError("LEVI needs at least one tap")
        backbone = as_classifier(backbone)  # a plain timm/torchvision model works too
        body = backbone.body
        modules = dict(body.named_modules())
        missing = [t for t in taps if not t or t not in modules]
        if missing:
            stages = [name for name, _ in body.named_children()]
            raise ValueError(
                f"backbone body {type(body).__name__} has no stage(s) {missing} to tap for LEVI; "
                f"available stages: {stages} (taps name submodules of backbone.body, dotted paths allowed)"
            )
        self.backbone = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.taps = taps
        device = next(self.backbone.parameters()).device
        self.task_model = (task_model if task_model is not None else make_task_model()).to(device)
        ratio = count_params(self.task_model) / count_params(self.backbone)
        if max_task_ratio is not None and ratio >= max_task_ratio:
            raise ValueError(
                f"LEVI task model has {ratio:.3f}x the backbone's parameters; it must stay below "
                f"{max_task_ratio} (use a narrower task model or raise max_task_ratio)"
            )
        tap_dims, z_dim = self._probe(torch.zeros(1, *input_size, device=device))
        self.adapters = nn.ModuleList(AdaptingLayer(d, z_dim, hidden, num_classes) for d in tap_dims).to(device)

    def _probe(self, x: torch.Tensor) -> tuple[list[int], int]:
        was_training = self.task_model.training
        self.task_model.eval()
        with torch.no_grad():
            tap_dims = [h.shape[1] for h in self.tap_features(x)]
            z = self.task_model(x)
        self.task_model.train(was_training)
        if z.dim() != 2:
            raise ValueError(f"LEVI task model must return features (B, D), got shape {tuple(z.shape)}")
        return tap_dims, z.shape[1]

    def train(self, mode: bool = True) -> LEVI:
        super().train(mode)
        self.backbone.eval()
        return self

    def tap_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled outputs of the tapped backbone stages, in `taps` order (no gradient)."""
        outputs: dict[str, torch.Tensor] = {}
        body = self.backbone.body

        def hook(name: str):
            return lambda module, args, output: outputs.__setitem__(name, output)

        handles = [body.get_submodule(name).register_forward_hook(hook(name)) for name in self.taps]
        try:
            with torch.no_grad():
                self.backbone.features(x)
        finally:
            for handle in handles:
                handle.remove()
        not_run = [name for name in self.taps if name not in outputs]
        if not_run:
            raise ValueError(f"LEVI tap(s) {not_run} are not called by the backbone's forward pass")
        return [pool_tap(outputs[name]) for name in self.taps]

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-tap logits, one (B, num_classes) tensor per tap."""
        z = self.task_model(x)
        return [adapter(h, z) for adapter, h in zip(self.adapters, self.tap_features(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.forward_all(x)).mean(dim=0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The task model's and the adapting layers' parameters."""
        return [*self.task_model.parameters(), *self.adapters.parameters()]

    def extra_inference_cost(self, example_input: torch.Tensor) -> dict[str, float]:
        """FLOPs (torch FlopCounterMode: matmuls and convolutions) and parameter counts of LEVI
        against the backbone alone (body + its own head) on `example_input`."""
        was_training = self.training
        self.eval()
        try:
            backbone_flops = _count_flops(self.backbone, example_input)
            levi_flops = _count_flops(self, example_input)
        finally:
            self.train(was_training)
        return {
            "backbone_flops": backbone_flops,
            "levi_flops": levi_flops,
            "flop_ratio": levi_flops / backbone_flops,
            "backbone_params": count_params(self.backbone),
            "task_model_params": count_params(self.task_model),
            "adapter_params": count_params(self.adapters),
            "trainable_params": count_params(self.trainable_parameters()),
        }


def _count_flops(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def levi_loss(per_tap_logits: Sequence[torch.Tensor], y: torch.Tensor, mean_weight: float = 1.0) -> torch.Tensor:
    """Mean over taps of CE(logits_l, y) + mean_weight * CE(mean_l logits_l, y)."""
    per_tap = torch.stack([F.cross_entropy(logits, y) for logits in per_tap_logits]).mean()
    return per_tap + mean_weight * F.cross_entropy(torch.stack(list(per_tap_logits)).mean(dim=0), y)


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, taps: Sequence[str], task_width: int,
          hidden: int, mean_weight: float, max_task_ratio: float | None, optimizer, epochs: int,
          batch_size: int, scheduler: dict | None = None) -> Adapted:
    """`method=levi` — LEVI (reconstruction): frozen backbone tapped at `taps`, a from-scratch task
    model and one adapting layer per tap, trained with the shared loop on `levi_loss`."""
    example = next(batches(suite.train, 16, device=ctx.device))[0]
    levi = LEVI(model, suite.num_classes, taps=taps, task_model=make_task_model(task_width), hidden=hidden,
                input_size=tuple(example.shape[1:]), max_task_ratio=max_task_ratio)
    levi = ctx.prepare(levi)
    params = levi.trainable_parameters()
    res = fit(levi, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
              scheduler=scheduler, params=params, forward=lambda m, x: m.forward_all(x),
              loss_fn=lambda outs, y: levi_loss(outs, y, mean_weight), checkpoint_key="levi")
    cost = levi.extra_inference_cost(example[:1])
    info = {"best_epoch": res.best_epoch, "converged": int(res.converged), "flop_ratio": cost["flop_ratio"],
            "task_model_params": cost["task_model_params"], "adapter_params": cost["adapter_params"]}
    return Adapted(levi.eval(), val_acc=res.best_val_acc, trainable_params=count_params(params),
                   train_time_s=res.train_time_s, info=info, tables={"history": pd.DataFrame(res.history)})
