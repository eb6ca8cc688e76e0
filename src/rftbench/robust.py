"""RobustBench / AutoAttack adapters: adversarial attacks, corruption test sets, the model zoo.

Importing this module imports neither robustbench nor AutoAttack; `import_robustbench()` and
`import_autoattack()` do, on first use.

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
  Zenodo) and its CIFAR-C loader hard-codes 10,000 images per severity. `load_robustbench_model`,
  `load_cifar_c` and `load_imagenet_c` check the files first and raise FileNotFoundError naming
  the expected path and where to get the data; they never download.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rftbench.data.base import balanced_subset  # noqa: F401  (re-exported)
from rftbench.metrics import CORRUPTIONS

NORMS = ("Linf", "L2")
TIERS = ("quick", "standard")
SEVERITIES = (1, 2, 3, 4, 5)
QUICK_N_ITER = 50
QUICK_N_TARGET_CLASSES = 3
IMAGENET_C_N_MAX = 5000

_CIFAR_C = {  # dataset -> (folder, Zenodo record that holds <folder>.tar)
    "cifar10": ("CIFAR-10-C", "https://zenodo.org/records/2535967"),
    "cifar100": ("CIFAR-100-C", "https://zenodo.org/records/3555552"),
}
_IMAGENET_C_URL = "https://zenodo.org/records/2235448"
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


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: str = "Linf",
    eps: float = 8 / 255,
    tier: str = "quick",
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    n_iter: int = QUICK_N_ITER,
    n_target_classes: int = QUICK_N_TARGET_CLASSES,
) -> AttackResult:
    """AutoAttack robust accuracy of `model` on `images` (pixels in [0, 1]) within an `eps` ball.

    The model must take pixels in [0, 1] and normalise inside; `eps` is in pixel units.
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
            clean_pred = _predict(model, images, batch_size, device)
            with torch.no_grad():
                num_classes = model(images[:1].to(device)).shape[1]
            adversary = _adversary(model, norm, eps, tier, seed, device, n_iter, n_target_classes, num_classes)
            _, adv_pred = adversary.run_standard_evaluation(images, labels, batch_size=batch_size)
    finally:
        model.train(was_training)
    return AttackResult(
        robust_acc=(adv_pred.cpu() == labels).float().mean().item(),
        clean_acc=(clean_pred == labels).float().mean().item(),
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


# --------------------------------------------------------------------------- corruption test sets

class CorruptionSplits(Mapping):
    """Read-only mapping (corruption, severity) -> (images in [0, 1] NCHW float32, int64 labels).

    Each split is read from disk when it is accessed (the full sets do not fit in memory).
    """

    def __init__(self, keys: Sequence[tuple[str, int]], load: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]):
        self._keys = dict.fromkeys(keys)
        self._load = load

    def __getitem__(self, key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._keys:
            raise KeyError(key)
        return self._load(*key)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_severities(severities: Sequence[int]) -> list[int]:
    severities = [int(s) for s in severities]
    if not set(severities) <= set(SEVERITIES):
        raise ValueError(f"severities must be in {SEVERITIES}, got {severities}")
    return severities


def _missing(path: Path, what: str, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: expected {path}. {how}")


def load_cifar_c(
    root: str | Path,
    dataset: str = "cifar10",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int | None = None,
) -> CorruptionSplits:
    """CIFAR-10-C / CIFAR-100-C splits from `<root>/CIFAR-10-C/<corruption>.npy` (or CIFAR-100-C).

    Each `<corruption>.npy` is uint8 (5N, H, W, 3), severities 1..5 stacked in blocks of N (N is
    10,000 for the released files), with `labels.npy` of length 5N (or N). A split holds the first
    `n_examples` images of its severity block (all N when None), as RobustBench does.
    """
    if dataset not in _CIFAR_C:
        raise ValueError(f"unknown CIFAR-C dataset {dataset!r}; valid: {', '.join(_CIFAR_C)}")
    severities = _check_severities(severities)
    folder, url = _CIFAR_C[dataset]
    data_dir = Path(root) / folder
    how = f"Download {folder}.tar from {url} and extract it into {Path(root)}."
    if not data_dir.is_dir():
        raise _missing(data_dir, f"{folder} folder", how)
    labels_path = data_dir / "labels.npy"
    if not labels_path.is_file():
        raise _missing(labels_path, f"{folder} labels", how)
    labels = np.load(labels_path)
    per_severity = {}
    for corruption in corruptions:
        path = data_dir / f"{corruption}.npy"
        if not path.is_file():
            raise _missing(path, f"{folder} corruption {corruption!r}", how)
        images = np.load(path, mmap_mode="r")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) % 5:
            raise ValueError(f"{path}: expected uint8 images of shape (5N, H, W, 3), got {images.dtype} {images.shape}")
        if len(labels) not in (len(images), len(images) // 5):
            raise ValueError(f"{labels_path} has {len(labels)} labels; expected {len(images)} or {len(images) // 5}")
        per_severity[corruption] = len(images) // 5

    def load(corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_total = per_severity[corruption]
        n = n_total if n_examples is None else min(n_examples, n_total)
        start = (severity - 1) * n_total
        images = np.load(data_dir / f"{corruption}.npy", mmap_mode="r")[start:start + n]
        y = labels[start:start + n] if len(labels) == 5 * n_total else labels[:n]
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(255)
        return x.contiguous(), torch.from_numpy(np.asarray(y)).long()

    return CorruptionSplits([(c, s) for c in corruptions for s in severities], load)


def _robustbench_helper_file(name: str) -> Path:
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("robustbench is not installed; it provides the ImageNet-C 5,000-image list")
    return Path(spec.submodule_search_locations[0]) / "helper_files" / name


def _imagenet_c_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize([224, 224]), transforms.ToTensor()])


def load_imagenet_c(
    root: str | Path,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int = IMAGENET_C_N_MAX,
    transform: Callable | None = None,
) -> CorruptionSplits:
    """ImageNet-C splits from `<root>/<corruption>/<severity>/<wnid>/<file>.JPEG`, RobustBench's protocol.

    A split holds the first `n_examples` (at most 5,000) images of RobustBench's fixed list
    (robustbench/helper_files/imagenet_test_image_ids.txt), labelled with the standard ImageNet
    class indices and resized to 224x224 (RobustBench's `Res224`) unless `transform` is given.
    """
    from PIL import Image

    if not 0 < n_examples <= IMAGENET_C_N_MAX:
        raise ValueError(f"n_examples must be in 1..{IMAGENET_C_N_MAX} (RobustBench's list), got {n_examples}")
    severities = _check_severities(severities)
    transform = transform or _imagenet_c_transform()
    files = _robustbench_helper_file("imagenet_test_image_ids.txt").read_text().split()[:n_examples]
    class_index = json.loads(_robustbench_helper_file("imagenet_class_to_id_map.json").read_text())
    labels = torch.tensor([class_index[f.split("/")[0]] for f in files])
    how = f"Download ImageNet-C from {_IMAGENET_C_URL} and extract the corruption folders into {Path(root)}."
    for corruption in corruptions:
        for severity in severities:
            folder = Path(root) / corruption / str(severity)
            if not folder.is_dir():
                raise _missing(folder, f"ImageNet-C {corruption} severity {severity}", how)

    def load(corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for name in files:
            path = Path(root) / corruption / str(severity) / name
            if not path.is_file():
                raise _missing(path, "ImageNet-C image", how)
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        return torch.stack(images), labels.clone()

    return CorruptionSplits([(c, s) for c in corruptions for s in severities], load)


# --------------------------------------------------------------------------- model zoo

def _zoo_entry(name: str, dataset: str, threat_model: str):
    rb = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    datasets = [d.value for d in BenchmarkDataset]
    if dataset not in datasets:
        raise ValueError(f"unknown RobustBench dataset {dataset!r}; valid: {', '.join(datasets)}")
    dataset_ = BenchmarkDataset(dataset)
    threat_models = [t.value for t in model_dicts[dataset_]] + (["corruptions_3d"] if dataset == "imagenet" else [])
    if threat_model not in threat_models:
        raise ValueError(f"unknown threat model {threat_model!r} for {dataset}; valid: {', '.join(threat_models)}")
    threat_model_ = ThreatModel(threat_model.replace("_3d", ""))  # the zoo keeps 3D-CC models under corruptions
    zoo = model_dicts[dataset_][threat_model_]
    if name not in zoo:
        raise ValueError(f"unknown RobustBench model {name!r} for {dataset}/{threat_model}; valid: {', '.join(zoo)}")
    return rb, zoo[name], dataset_, threat_model_


def robustbench_checkpoint_paths(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                                 model_dir: str | Path = "models") -> list[Path]:
    """The files `load_robustbench_model` reads for a zoo entry (RobustBench's own layout)."""
    import timm

    _, entry, dataset_, threat_model_ = _zoo_entry(name, dataset, threat_model)
    base = Path(model_dir) / dataset_.value / threat_model_.value
    if dataset_.value == "imagenet" and "Standard" in name:
        # RobustBench builds these from torchvision's ImageNet weights (resnet50(pretrained=True)).
        from torchvision.models import ResNet50_Weights

        return [Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet50_Weights.IMAGENET1K_V1.url).name]
    if timm.is_model(_timm_name(name, dataset_, threat_model_)) or not isinstance(entry["gdrive_id"], list):
        return [base / f"{name}.pt"]
    return [base / f"{name}.pt_m{i}.pt" for i in range(len(entry["gdrive_id"]))]


def _timm_name(name: str, dataset_, threat_model_) -> str:
    return f"{name.lower().replace('-', '_')}_{dataset_.value.lower()}_{threat_model_.value.lower()}"


def load_robustbench_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | Path = "models") -> nn.Module:
    """A RobustBench model-zoo model (eval mode; takes pixels in [0, 1]) from local checkpoint files.

    Files live where RobustBench puts them (`<model_dir>/<dataset>/<threat_model>/<name>.pt`, see
    `robustbench_checkpoint_paths`); a missing file raises FileNotFoundError instead of a download.
    Entries RobustBench serves through timm (e.g. Debenedetti2022Light_XCiT-*) are built with timm
    from the same `<name>.pt` file (the file at the entry's timm `url`).
    """
    import timm

    rb, entry, dataset_, threat_model_ = _zoo_entry(name, dataset, threat_model)
    paths = robustbench_checkpoint_paths(name, dataset, threat_model, model_dir)
    for path in paths:
        if not path.is_file():
            raise _missing(path, f"RobustBench checkpoint of {name} ({dataset}, {threat_model})",
                           "Fetch it on a machine with internet access with robustbench.utils.load_model"
                           f"({name!r}, model_dir=..., dataset={dataset!r}, threat_model={threat_model!r}) "
                           "and copy it there.")
    timm_name = _timm_name(name, dataset_, threat_model_)
    if timm.is_model(timm_name):
        from robustbench.utils import DATASET_CLASSES

        model = timm.create_model(timm_name, pretrained=True, num_classes=DATASET_CLASSES[dataset_],
                                  pretrained_cfg_overlay=dict(file=str(paths[0])))
        return model.eval()
    return rb.load_model(name, model_dir=str(model_dir), dataset=dataset_, threat_model=threat_model_).eval()
