"""Every config node fits the signature of the code it configures, so a typo in a key fails here.

As lightning-hydra-template's config tests do: compose every file of configs/method, configs/suite,
configs/backbone and configs/launcher, then bind each node to its target with
`inspect.signature(target).bind_partial(**node)` (an unknown key raises TypeError). The nodes the
runner calls (`method.adapt`, `suite.build`, `backbone.pretrain`, the backbone itself) are also
bound fully with what the runner adds, so a missing required key fails too. Nothing is built.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object
from omegaconf import OmegaConf

from rftbench.backbones import create_backbone
from rftbench.run import CONFIG_DIR
from rftbench.zoo import load_robustbench_model

CONFIGS = Path(CONFIG_DIR)
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))
SUITES = sorted(p.stem for p in (CONFIGS / "suite").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONFIGS / "launcher").glob("*.yaml"))
LOCAL_BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
ZOO_BACKBONES = sorted((CONFIGS / "backbone" / "robustbench").rglob("*.yaml"))
# Targets that take **kwargs and pass them on: the function that receives them.
FORWARDS: dict[str, str] = {}
# Plain dict arguments (no `_target_`) and the function that receives them as keywords.
DICT_ARGUMENTS = {"recipe": "rftbench.methods.ft.finetune", "probe_cfg": "rftbench.train.fit_probes"}
PLACEHOLDER = object()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["paths.runs=/nonexistent", "paths.cache=/nonexistent", *overrides])


def _signature(target: str) -> inspect.Signature:
    target = FORWARDS.get(target, target)
    signature = inspect.signature(get_object(target))
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        pytest.fail(f"{target} takes **kwargs, so a misspelt key would pass: add where they go to FORWARDS")
    return signature


def _keywords(node: dict) -> dict:
    return {k: v for k, v in node.items() if not k.startswith("_")}


def _bind_tree(node, path: str) -> int:
    """Bind every `_target_` node and every known dict argument under `node`; returns how many."""
    if isinstance(node, list):
        return sum(_bind_tree(v, f"{path}[{i}]") for i, v in enumerate(node))
    if not isinstance(node, dict):
        return 0
    n = 0
    if "_target_" in node:
        try:
            _signature(node["_target_"]).bind_partial(**_keywords(node))
        except TypeError as err:
            pytest.fail(f"{path} does not fit {node['_target_']}: {err}")
        n += 1
    for key, value in node.items():
        if key in DICT_ARGUMENTS and isinstance(value, dict) and "_target_" not in value:
            try:
                _signature(DICT_ARGUMENTS[key]).bind_partial(**_keywords(value))
            except TypeError as err:
                pytest.fail(f"{path}.{key} does not fit {DICT_ARGUMENTS[key]}: {err}")
            n += 1
        n += _bind_tree(value, f"{path}.{key}")
    return n


def _full_bind(node: dict, *args, **runner) -> None:
    """`node` plus what the runner passes binds completely: no unknown and no missing key."""
    _signature(node["_target_"]).bind(*args, **runner, **_keywords(node))


@pytest.mark.parametrize("method", METHODS)
def test_method_adapt_fits_its_target(method):
    cfg = OmegaConf.to_container(_compose(f"method={method}").method, resolve=True)
    assert _bind_tree(cfg, "method") >= 1
    _full_bind(cfg["adapt"], PLACEHOLDER, PLACEHOLDER, PLACEHOLDER)  # (model, suite, ctx)


@pytest.mark.parametrize("suite", SUITES)
def test_suite_build_fits_its_target(suite):
    cfg = OmegaConf.to_container(_compose(f"suite={suite}").suite, resolve=True)
    _bind_tree(cfg, "suite")
    _full_bind(cfg["build"], seed=0, cache_dir="/nonexistent")


def _bind_backbone(b: dict) -> None:
    create_backbone_signature = inspect.signature(create_backbone)
    extra = {k: b[k] for k in ("activation", "pretrained_tag") if k in b}
    create_backbone_signature.bind(name=b["arch"], source=b["source"], pretrained=b["pretrained"], mean=b["mean"],
                                   std=b["std"], kwargs=b["kwargs"], checkpoint=b["checkpoint"], num_classes=10,
                                   **extra)
    if b["source"] == "robustbench":
        inspect.signature(load_robustbench_model).bind(b["arch"], **b["kwargs"])


@pytest.mark.parametrize("backbone", LOCAL_BACKBONES)
def test_backbone_fits_create_backbone(backbone):
    # the generic configs need the model named on the command line
    required = {"timm": ["backbone.arch=resnet18"], "clip": ["backbone.arch=RN50", "backbone.pretrained_tag=openai"]}
    cfg = OmegaConf.to_container(_compose(f"backbone={backbone}", *required.get(backbone, [])).backbone, resolve=True)
    _bind_backbone(cfg)
    if cfg.get("pretrain"):
        _full_bind(cfg["pretrain"], backbone={}, cache_dir="/nonexistent")


def test_every_zoo_backbone_fits_the_zoo_loader():
    """The generated RobustBench configs, read as files (composing all of them would be slow)..."""
    assert len(ZOO_BACKBONES) > 100
    for path in ZOO_BACKBONES:
        node = OmegaConf.load(path)
        node.paths = {"models": "/nonexistent"}  # the one interpolation, ${paths.models}
        b = OmegaConf.to_container(node, resolve=True)
        name = path.relative_to(CONFIGS / "backbone").with_suffix("").as_posix()
        assert b["name"] == name, path
        assert (b["kwargs"]["dataset"], b["kwargs"]["threat_model"]) == tuple(name.split("/")[1:3]), path
        _bind_backbone(b)


@pytest.mark.parametrize("path", ZOO_BACKBONES[:: max(1, len(ZOO_BACKBONES) // 3)], ids=lambda p: p.stem)
def test_sampled_zoo_backbones_compose(path):
    """...and a sample of them composed as the runner does."""
    choice = path.relative_to(CONFIGS / "backbone").with_suffix("").as_posix()
    _bind_backbone(OmegaConf.to_container(_compose(f"backbone={choice}").backbone, resolve=True))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_fits_its_plugin_schema(launcher):
    """Hydra's launcher plugins take **kwargs; their keys are those of the plugin's registered schema."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"launcher={launcher}"], return_hydra_config=True)
    node = cfg.hydra.launcher
    target = get_object(node._target_)
    assert target is not None
    schema = ConfigStore.instance().load(f"hydra/launcher/{cfg.hydra.runtime.choices['hydra/launcher']}.yaml").node
    assert set(node) <= set(schema), sorted(set(node) - set(schema))
    assert cfg.launcher.name == launcher and isinstance(cfg.launcher.gpu_slots, bool)


def test_a_misspelt_key_fails_with_the_valid_keys():
    """A typo in `suite.build.*` (a key the builder does not take) fails before any work."""
    from rftbench.data.digits import build_digits

    build = OmegaConf.to_container(_compose("+suite.build.val_fractoin=0.3").suite.build, resolve=True)
    with pytest.raises(TypeError) as err:
        build_digits(**_keywords(build), seed=0)
    assert "suite.build" in str(err.value) and "val_fractoin" in str(err.value)
    assert "valid keys: seed, train_per_class, val_fraction" in str(err.value)
    with pytest.raises(ConfigCompositionException):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            compose("config", overrides=["launcher=joblib", "hydra.launcher.n_jobz=2"], return_hydra_config=True)
