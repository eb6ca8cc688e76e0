"""AutoAttack robust accuracy (`attack`) and the import shims for robustbench and AutoAttack.

Importing this module imports neither robustbench nor AutoAttack; `import_robustbench()` and
`import_autoattack()` do, on first use. The RobustBench model zoo is in `rftbench.zoo`, the
CIFAR-C / ImageNet-C loaders in `rftbench.data.corruption_sets`.

Packaging (robustbench 1.1.1, pyautoattack 0.2.0, setuptools 80, timm 1.0.31; checked by running):
- robustbench imports the module `autoattack` (robustbench/eval.py: `from autoattack import
  AutoAttack`, `from autoattack.state import EvaluationState`; eval.py is imported by
  robustbench/__init__.py, so plain `import robustbench` fails). Its declared dependency
  `pyautoattack` installs the module `pyautoattack`. When no `autoattack` module is importable,
  `import_robustbench()` registers `pyautoattack` and each of its loaded submodules under the name
  `autoattack` in `sys.modules` before importing robustbench.
- robustbench/loaders.py imports `pkg_resources` (only for `resource_filename`). With the pinned
  setuptools<81 it imports (with a deprecation UserWarning, silenced here); if it is missing
  (setuptools>=81) a stand-in module providing `resource_filename` is registered instead.
- robustbench pins timm==1.0.9 and gdown==5.1.0 and is installed with --no-deps; it imports and
  builds its models with timm 1.0.31 (its timm deprecation warnings are silenced on import).
- pyautoattack 0.2.0 changed AutoAttack's API (keyword-only `attacks=`/`seed=`, no `log_path`,
  `run_standard_evaluation(x, y, batch_size=...)` returns `(x_adv, y_adv)`), so
  `robustbench.eval.benchmark` (which passes `log_path=` and `bs=`) fails with it. rftbench never
  calls it: `attack()` drives pyautoattack's AutoAttack directly.
- robustbench downloads what is missing (model checkpoints from Google Drive, CIFAR-C from
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

NORMS = ("Linf", "L2")
TIERS = ("quick", "standard")
_QUIET_IMPORT = (
    (UserWarning, r"pkg_resources is deprecated"),
    (FutureWarning, r"Importing from timm\.models\."),
    (DeprecationWarning, r"Importing from timm\.models\."),
)


# --------------------------------------------------------------------------- imports

def import_autoattack() -> types.ModuleType:
    """The AutoAttack implementation rftbench uses: the `pyautoattack` package."""
    return importlib.import_module("pyautoattack")


def _alias_autoattack() -> None:
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    import_autoattack()
    importlib.import_module("pyautoattack.state")
    for name, module in list(sys.modules.items()):
        if name == "pyautoattack" or name.startswith("pyautoattack."):
            sys.modules["autoattack" + name[len("pyautoattack"):]] = module


def _resource_filename(package: str, resource: str) -> str:
    return str(Path(importlib.import_module(package).__file__).parent / resource)


def _provide_pkg_resources() -> None:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, message="pkg_resources is deprecated")
            importlib.import_module("pkg_resources")
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename
        sys.modules["pkg_resources"] = shim


def import_robustbench() -> types.ModuleType:
    """`import robustbench`, after making its imports resolvable (see the module docstring)."""
    if "robustbench" in sys.modules:
        return sys.modules["robustbench"]
    _alias_autoattack()
    _provide_pkg_resources()
    with warnings.catch_warnings():
        for category, message in _QUIET_IMPORT:
            warnings.filterwarnings("ignore", category=category, message=message)
        return importlib.import_module("robustbench")



# --------------------------------------------------------------------------- attacks

@dataclass
class AttackResult:
    """Robust accuracy of one AutoAttack evaluation and what is needed to reproduce it.

    `version` is the pyautoattack version; `attacks` the attacks run in order; `n_iter` and
    `n_target_classes` the APGD iterations and APGD-T target classes actually used.
    """

    robust_acc: float
    clean_acc: float
    n: int
    norm: str
    eps: float
    tier: str
    seed: int
    version: str
    attacks: list[str]
    n_iter: int
    n_target_classes: int


def _adversary(model: nn.Module, norm: str, eps: float, tier: str, seed: int, device: torch.device,
               n_iter: int, n_target_classes: int, num_classes: int):
    aa = import_autoattack()
    if tier == "standard":
        adversary = aa.AutoAttack(model, norm=norm, eps=eps, seed=seed, device=device, version="standard")
    else:
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        adversary = aa.AutoAttack(model, attacks=["apgd-ce", "apgd-t"], norm=norm, eps=eps, seed=seed,
                                  device=device, version="custom")
        common = dict(n_restarts=1, n_iter=n_iter, eps=eps, norm=norm, eot_iter=1, rho=0.75, seed=seed,
                      device=device, logger=adversary.logger)
        adversary.apgd = APGDAttack(model, loss="ce", **common)
        adversary.apgd_targeted = APGDAttack_targeted(model, n_target_classes=n_target_classes, **common)
    # targeted attacks need a class other than the true and the predicted one per target
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
    return adversary


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def clean_correct(images: torch.Tensor, labels: torch.Tensor, x_adv: torch.Tensor, y_adv: torch.Tensor) -> torch.Tensor:
    """Which images the model classified correctly before the attack, read off AutoAttack's own clean
    pass (no second one): `run_standard_evaluation` attacks only the correctly classified images,
    returns the clean prediction in `y_adv` for every image it did not break and changes `x_adv` only
    where it broke one, so an image was correct iff it is still correct or was moved."""
    moved = (x_adv.cpu() != images).flatten(1).any(1)
    return (y_adv.cpu() == labels) | moved


def attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: str,
    eps: float,
    tier: str,
    seed: int,
    n_iter: int,
    n_target_classes: int,
    batch_size: int,
    device: str | torch.device | None = None,
) -> AttackResult:
    """AutoAttack robust accuracy of `model` on `images` (pixels in [0, 1]) within an `eps` ball.

    The model must take pixels in [0, 1] and normalise inside; `eps` is in pixel units. The
    settings have no defaults here: the runner passes `eval.adversarial` (configs/eval/).
    `tier="quick"`: APGD-CE then APGD-T (`n_iter` iterations, `n_target_classes` targets, one
    restart each); `tier="standard"`: AutoAttack's standard version (APGD-CE, APGD-T, FAB-T,
    Square), where `n_iter`/`n_target_classes` are ignored. The model runs in eval mode (its mode
    is restored afterwards). The random starts use `seed`, so every model is attacked with the same
    random numbers (common random numbers; reproducible); the caller's global RNG state is kept.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if tier not in TIERS:
        raise ValueError(f"unknown attack tier {tier!r}; valid: {', '.join(TIERS)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0), got {len(images)} images and {len(labels)} labels")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("attack inputs must be pixels in [0, 1] (the model normalises inside), "
                         f"got values in [{images.min().item():.3f}, {images.max().item():.3f}]")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images = images.detach().float().cpu()
    labels = labels.detach().long().cpu()
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_cuda_indices(device)):
            with torch.no_grad():
                num_classes = model(images[:1].to(device)).shape[1]
            adversary = _adversary(model, norm, eps, tier, seed, device, n_iter, n_target_classes, num_classes)
            x_adv, adv_pred = adversary.run_standard_evaluation(images, labels, batch_size=batch_size)
    finally:
        model.train(was_training)
    return AttackResult(
        robust_acc=(adv_pred.cpu() == labels).float().mean().item(),
        clean_acc=clean_correct(images, labels, x_adv, adv_pred).float().mean().item(),
        n=len(labels),
        norm=norm,
        eps=float(eps),
        tier=tier,
        seed=seed,
        version=import_autoattack().__version__,
        attacks=list(adversary.attacks_to_run),
        n_iter=adversary.apgd.n_iter,
        n_target_classes=adversary.apgd_targeted.n_target_classes,
    )

