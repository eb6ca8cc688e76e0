"""Config validation: bad values are rejected before any run folder is made or anything runs, with
one `ConfigError` naming the key, the value and the valid range."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

# key -> smallest valid value; each must be an integer
INTEGERS = {"seed": 0, "hp_seed": 0, "budget.epochs": 1, "budget.batch_size": 1}


class ConfigError(ValueError):
    """An invalid config value; the message names the key and what is valid."""


def validate_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first invalid value of `cfg`."""
    for key, low in INTEGERS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    pretrain = OmegaConf.select(cfg, "backbone.pretrain", default=None)
    if pretrain is not None and "_target_" not in pretrain:
        keys = ", ".join(f"backbone.pretrain.{k}" for k in pretrain)
        raise ConfigError(
            f"{keys} set, but backbone {cfg.backbone.get('name')} has no pre-training recipe (backbone.pretrain "
            f"is null in its config); these keys come from an experiment preset for another backbone "
            f"(experiment=tiny is for backbone=digits_resnet): drop the preset or choose its backbone")
