"""FLYP, "Finetune like you pretrain" (Goyal, Kumar, Garg, Kolter & Raghunathan, CVPR 2023), for CLIP
backbones: both towers are fine-tuned with CLIP's contrastive loss between each training image and a
caption of its class; the classifier is then the zero-shot head of the tuned towers.

Per batch of images x_i with labels y_i: caption_i = a template drawn uniformly at random (per example,
per step) filled with the class name of y_i; with L2-normalised features u_i (image), v_j (text) and
the learned temperature s = exp(logit_scale), logits_ij = s <u_i, v_j> and the loss is
(CE(logits, arange) + CE(logits^T, arange)) / 2 (`clip_loss`, open_clip's `ClipLoss`). As in the
official code (plain `ClipLoss`, no labels), two images of the same class in a batch are negatives of
each other's captions. Every parameter of the open_clip model (image tower, text tower, logit_scale)
is trained by AdamW with the same weight decay, logit_scale included and not clamped, as in the
official code. After every epoch the evaluation head is rebuilt from the tuned text tower
(`rftbench.clip.zeroshot_head`: the start head's class names and templates, times the tuned
exp(logit_scale)); the epoch is chosen by the val accuracy of that head (`rftbench.train.fit`).

Deviations from the official code (locuslab/FLYP), with reasons:
- templates per example: the official ImageNet data has one row per (image, template) and draws
  batches from the shuffled rows, i.e. a uniformly random template per example; we draw it directly
  from the suite's templates (the start head's set, `rftbench.clip.prompts`), seeded by the run seed.
- warm-up in epochs (`warmup_epochs`) of the shared scheduler instead of 500 steps: the benchmark's
  budgets are a few hundred steps in all.
- the official code evaluates the rebuilt head on every evaluation set each epoch; here only val (the
  choice uses val only).
- not cached across runs: no other method reuses a FLYP model.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rftbench import clip
from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, freeze, unfreeze
from rftbench.train import RunContext, count_params, fit


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss of matched rows (normalised features, `scale` = exp(logit_scale))."""
    logits = scale * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def captions(labels: Sequence[int], names: Sequence[str], templates: Sequence[Callable[[str], str]],
             rng: random.Random) -> list[str]:
    """One caption per label: a uniformly drawn template filled with the class name."""
    return [templates[rng.randrange(len(templates))](names[int(y)]) for y in labels]


class FLYPModel(nn.Module):
    """The classifier and the full open_clip model (sharing the image tower) trained as one module;
    switching to eval mode rebuilds the classifier's head from the current text tower, so every
    evaluation (`fit`'s val accuracy, the restored best epoch) uses the tuned zero-shot head."""

    def __init__(self, classifier: Classifier, parts: clip.ClipParts, device: torch.device, seed: int):
        super().__init__()
        self.classifier, self.clip_model = classifier, parts.model
        self.parts, self.device, self.rng = parts, device, random.Random(seed)
        self.tokenizer = open_clip.get_tokenizer(parts.arch)

    def rebuild_head(self) -> None:
        head = clip.zeroshot_head(self.clip_model, self.parts.arch, self.parts.names, self.parts.templates,
                                  self.device)
        self.classifier.head = freeze(head.to(self.device))

    def train(self, mode: bool = True) -> "FLYPModel":
        super().train(mode)
        if not mode:
            self.rebuild_head()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        image = self.classifier.features(x)  # L2-normalised (rftbench.clip.ImageEncoder)
        text = captions(y.tolist(), self.parts.names, self.parts.templates, self.rng)
        text = self.clip_model.encode_text(self.tokenizer(text).to(x.device), normalize=True)
        return clip_loss(image.float(), text.float(), self.clip_model.logit_scale.exp())


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, optimizer: Callable, epochs: int,
          batch_size: int, scheduler: dict | None) -> Adapted:
    """Contrastive fine-tuning of both towers; the tuned zero-shot head of the best val epoch."""
    parts = getattr(model, "clip", None)
    if not isinstance(parts, clip.ClipParts):
        raise ValueError("method=flyp needs a CLIP backbone with a text tower (backbone=clip*, e.g. "
                         "backbone=clip_vitb16); this backbone has none")
    if parts.names is None:
        raise ValueError(f"method=flyp needs class names for captions; suite {suite.name} declares none")
    parts.model.to(ctx.device)
    flyp = FLYPModel(model, parts, ctx.device, ctx.seed)
    freeze(model.head)
    unfreeze(parts.model)
    params = [p for p in parts.model.parameters() if p.requires_grad]
    res = fit(flyp, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
              scheduler=scheduler, params=params, checkpoint_key="flyp",
              forward=lambda m, x: x, loss_fn=lambda x, y: flyp.loss(x, y))
    model.eval()
    return Adapted(model, val_acc=res.best_val_acc, trainable_params=count_params(params),
                   train_time_s=res.train_time_s, tables={"history": pd.DataFrame(res.history)},
                   info={"best_epoch": res.best_epoch, "converged": int(res.converged),
                         "logit_scale": float(parts.model.logit_scale.detach().exp())})
