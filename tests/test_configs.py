"""Every config option composes; unknown choices fail with the list of valid ones."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rftbench.run import CONFIG_DIR, run_id

GROUPS = {g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml"))
          for g in ("backbone", "method", "suite", "eval", "experiment")}
# choices with required values (`???`): what a user must pass with them
REQUIRED = {("backbone", "timm"): ["backbone.arch=resnet18"],
            ("backbone", "clip"): ["backbone.arch=RN50", "backbone.pretrained_tag=openai"]}


@pytest.mark.parametrize("group,choice", [(g, c) for g, cs in GROUPS.items() for c in cs])
def test_every_choice_composes_and_resolves(make_cfg, group, choice):
    if group == "experiment":
        from test_presets import skip_without_suites

        skip_without_suites(choice)
    cfg = make_cfg(f"{group}={choice}", *REQUIRED.get((group, choice), []),
                   experiment=None if group == "experiment" else "tiny")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.method.name and cfg.suite.name and cfg.backbone.name
    if group in ("backbone", "method", "suite"):  # generic backbones are named <choice>/<arch>...
        assert cfg[group].name == choice or cfg[group].name.startswith(f"{choice}/")


def test_every_method_with_every_suite_composes(make_cfg):
    for method in GROUPS["method"]:
        for suite in GROUPS["suite"]:
            OmegaConf.to_container(make_cfg(f"method={method}", f"suite={suite}", experiment=None), resolve=True)


@pytest.mark.parametrize("group", ["method", "suite", "backbone"])
def test_unknown_choice_lists_valid_options(make_cfg, group):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(f"{group}=nope")
    msg = str(err.value)
    assert "nope" in msg and all(c in msg for c in GROUPS[group])


def test_run_id_ignores_cosmetic_keys(make_cfg, tmp_path):
    a = make_cfg()
    b = make_cfg(runs=tmp_path / "elsewhere")
    assert run_id(a) == run_id(b)
    assert run_id(a) != run_id(make_cfg("seed=1"))
    assert run_id(a) != run_id(make_cfg("method=lp"))
