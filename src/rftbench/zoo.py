"""The RobustBench model zoo as backbones, loaded from local checkpoint files (never downloaded).

robustbench itself is imported through `rftbench.attacks.import_robustbench` (its import shims).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rftbench.attacks import import_robustbench
from rftbench.utils import missing_file

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


def robustbench_checkpoint_paths(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> list[Path]:
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


def load_robustbench_model(name: str, dataset: str, threat_model: str, model_dir: str | Path) -> nn.Module:
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
            raise missing_file(path, f"RobustBench checkpoint of {name} ({dataset}, {threat_model})",
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
