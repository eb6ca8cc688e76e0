"""LoRA baseline (through `peft`): low-rank adapters on the backbone body, head fully trained.

Defaults follow the CT paper's comparison (docs/methods.md section 5): rank 1, alpha 1, every Conv2d and
Linear of the backbone body. The head is never adapted: it stays a plain, fully trainable
`nn.Linear`. Base weights are frozen; BatchNorm running statistics are frozen too as long as the
training loop keeps BatchNorm in eval mode (`rftbench.train.fit(..., bn_eval=True)`).
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Sequence

import pandas as pd
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from rftbench.backbones import Classifier, as_classifier
from rftbench.data.base import Suite, batches
from rftbench.methods.base import Adapted
from rftbench.train import RunContext, count_params, fit

LORA_TARGET_TYPES: dict[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}


def _unsupported_conv(module: nn.Module) -> str | None:
    """Why peft's Conv2d LoRA cannot represent `module`, or None if it can."""
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups != 1:
        return f"groups={module.groups}"
    if any(d != 1 for d in module.dilation):
        return f"dilation={module.dilation}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode}"
    return None


def lora_target_names(body: nn.Module, targets: Sequence[str] = ("Conv2d", "Linear")) -> list[str]:
    """Qualified names of the modules of `body` that `apply_lora` adapts.

    Conv2d layers that peft's conv LoRA cannot represent (grouped, dilated or non-zero padding)
    are skipped with a warning.
    """
    unknown = [t for t in targets if t not in LORA_TARGET_TYPES]
    if unknown:
        raise ValueError(f"unknown LoRA target type(s) {unknown}; valid: {sorted(LORA_TARGET_TYPES)}")
    types = tuple(LORA_TARGET_TYPES[t] for t in targets)
    names, skipped = [], []
    for name, module in body.named_modules():
        if not name or not isinstance(module, types):
            continue
        reason = _unsupported_conv(module)
        if reason is None:
            names.append(name)
        else:
            skipped.append(f"{name} ({reason})")
    if skipped:
        warnings.warn(f"LoRA skips {len(skipped)} conv layer(s) peft cannot adapt: {', '.join(skipped)}")
    return names


def apply_lora(
    model: Classifier,
    rank: int = 1,
    alpha: float = 1.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("Conv2d", "Linear"),
) -> Classifier:
    """A copy of `model` (a `Classifier`, or a plain timm/torchvision model with a final
    `nn.Linear`, split by `rftbench.backbones.as_classifier`) as a `Classifier` with peft LoRA on
    every `targets`-type layer of its body.

    Trainable: the LoRA A/B weights and the head. Frozen: every other parameter. `model` is not
    modified. At initialisation (B = 0) the copy computes exactly the same function as `model`.
    """
    model = copy.deepcopy(as_classifier(model))
    names = lora_target_names(model.body, targets)
    if not names:
        raise ValueError(f"backbone body {type(model.body).__name__} has no {list(targets)} layers to adapt")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$",
        bias="none",
    )
    model.body = inject_adapter_in_model(config, model.body)
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B weights of `model`."""
    return [p for layer in lora_layers(model).values() for d in (layer.lora_A, layer.lora_B) for p in d.parameters()]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (after `apply_lora`: LoRA A/B and the head)."""
    return [p for p in model.parameters() if p.requires_grad]


def verify_lora_targets(model: nn.Module, example_input: torch.Tensor, seed: int = 0) -> list[str]:
    """Check that every LoRA layer changes the output of `model` wherever its base weight does.

    Per layer, the base weight and then the LoRA A and B weights are perturbed by seeded Gaussian
    noise (random, so a following normalisation cannot cancel it) and restored exactly. A layer
    whose base weight changes the output but whose LoRA does not is bypassed (e.g. a forward that
    reads `layer.weight` through a functional call, as torchvision Swin does): RuntimeError naming
    those layers. Returns the names of the layers whose LoRA changes the output; layers that do not
    affect the output even through their base weight on this input (e.g. behind a zero-initialised
    BatchNorm scale) are left out, with a warning.
    """
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError(f"{type(model).__name__} has no LoRA layers")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    effective, dead, inert = [], [], []
    try:
        with torch.no_grad():
            ref = model(example_input)
            tol = 1e-5 * (1.0 + ref.abs().max().item())

            def changes_output(weights: list[torch.Tensor]) -> bool:
                saved = [w.detach().clone() for w in weights]
                try:
                    for w in weights:
                        w.add_(torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device))
                    return not bool(((model(example_input) - ref).abs() <= tol).all())  # NaN counts as a change
                finally:
                    for w, s in zip(weights, saved):
                        w.copy_(s)

            for name, layer in layers.items():
                lora_weights = [p for d in (layer.lora_A, layer.lora_B) for p in d.parameters()]
                if changes_output(lora_weights):
                    effective.append(name)
                elif changes_output([layer.get_base_layer().weight]):
                    dead.append(name)
                else:
                    inert.append(name)
    finally:
        model.train(was_training)
    if dead:
        raise RuntimeError(
            f"LoRA has no effect on the output for {len(dead)} of {len(layers)} layer(s): {', '.join(dead)} "
            "(their base weights do: the forward pass uses them directly, bypassing the LoRA wrapper)"
        )
    if inert:
        warnings.warn(
            f"{len(inert)} LoRA layer(s) do not affect the output on this input, not even through their base "
            f"weights: {', '.join(inert)}"
        )
    return effective


def merge_lora(model: Classifier) -> Classifier:
    """A plain copy of `model` with the LoRA updates merged into the base weights (no LoRA modules).

    Same outputs as `model` up to float rounding and the same inference cost as the base model; all
    parameters of the result are trainable, as for a freshly built backbone. `model` is not modified.
    """
    model = copy.deepcopy(model)
    for name, layer in lora_layers(model).items():
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return model.requires_grad_(True)


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, rank: int, alpha: float, dropout: float,
          targets: Sequence[str], optimizer, epochs: int, batch_size: int,
          scheduler: dict | None = None) -> Adapted:
    """`method=lora`: LoRA on the backbone body + the full head, trained with the shared loop (BatchNorm
    statistics frozen), merged into the weights for evaluation (the base model's inference cost)."""
    lora = ctx.prepare(apply_lora(model, rank=rank, alpha=alpha, dropout=dropout, targets=targets))
    example = next(batches(suite.train, 16, device=ctx.device))[0]
    adapted_layers = verify_lora_targets(lora, example)
    n = count_params(trainable_parameters(lora))
    res = fit(lora, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
              scheduler=scheduler, params=trainable_parameters(lora), bn_eval=True, checkpoint_key="lora")
    info = {"best_epoch": res.best_epoch, "converged": int(res.converged), "lora_layers": len(lora_layers(lora)),
            "lora_layers_effective": len(adapted_layers), "rank": rank}
    return Adapted(ctx.prepare(merge_lora(lora)).eval(), val_acc=res.best_val_acc, trainable_params=n,
                   train_time_s=res.train_time_s, info=info, tables={"history": pd.DataFrame(res.history)})
