"""Write one backbone config per RobustBench model-zoo entry:
configs/backbone/robustbench/<dataset>/<threat>/<name>.yaml, so that
`backbone=robustbench/cifar10/Linf/Carmon2019Unlabeled` composes. Re-run after a robustbench upgrade.

    .venv/bin/python scripts/robustbench_configs.py
"""
from __future__ import annotations

from pathlib import Path

from rftbench.attacks import import_robustbench

TEMPLATE = """\
# RobustBench model zoo: {name} ({dataset}, {threat}); takes [0, 1] pixels, normalises inside.
# Loaded from ${{paths.models}}/{dataset}/{threat}/{name}.pt (no download; see README).
name: robustbench/{dataset}/{threat}/{name}
arch: {name}
source: robustbench
pretrained: true
checkpoint: null
mean: [0.0, 0.0, 0.0]
std: [1.0, 1.0, 1.0]
kwargs: {{dataset: {dataset}, threat_model: {threat}, model_dir: "${{paths.models}}"}}
upstream: {dataset}
pretrain: null
"""


def main() -> None:
    import_robustbench()
    from robustbench.model_zoo import model_dicts

    root = Path(__file__).resolve().parents[1] / "configs" / "backbone" / "robustbench"
    n = 0
    for dataset, by_threat in model_dicts.items():
        for threat, models in by_threat.items():
            folder = root / dataset.value / threat.value
            folder.mkdir(parents=True, exist_ok=True)
            for name in models:
                (folder / f"{name}.yaml").write_text(
                    TEMPLATE.format(name=name, dataset=dataset.value, threat=threat.value))
                n += 1
    print(f"wrote {n} configs under {root}")


if __name__ == "__main__":
    main()
