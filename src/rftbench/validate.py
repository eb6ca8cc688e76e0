"""Config validation: bad values are rejected before any run folder is made or anything runs, with
one `ConfigError` naming the key, the value and the valid range.

Checked: the integer keys (`INTEGERS`), every evaluation key (`eval.*`: the attack's norms, eps,
tier and sizes, the batch size and the ECE bins), keys added with Hydra's `+` that the evaluation or
the method's `adapt` function would ignore or reject only after training (unknown `eval.*` keys,
compared with configs/eval/default.yaml; `method.adapt` keys that are not parameters of its
`_target_`), the feature store's keys (`features.store`, `features.max_gb`, `features.batch_size`),
`suite.decode` (cpu or cuda; cuda only where CUDA is available, for a run on the GPU),
a backbone pre-training recipe set for a backbone without one, and cache / runs
folders that are files (or under one). A `threads` value above the available cores is a warning,
not an error (it runs, only slower). `check_suite` runs right after the suite is built, before the
weights and any training: the checks that need its splits (train / val / test present, the attack
subset's images per class, classes without training images, empty or truncated image files)."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rftbench.attacks import NORMS, TIERS
from rftbench.identity import CONFIG_DIR
from rftbench.utils import available_cores, file_in_the_way

log = logging.getLogger("rftbench")

# key -> smallest valid value; each must be an integer
INTEGERS = {"seed": 0, "hp_seed": 0, "budget.epochs": 1, "budget.batch_size": 1, "budget.accumulate": 1,
            "eval.batch_size": 1, "features.batch_size": 1, "eval.ece_bins": 1, "eval.adversarial.n": 1,
            "eval.adversarial.seed": 0, "eval.adversarial.n_iter": 1, "eval.adversarial.n_target_classes": 1,
            "eval.adversarial.batch_size": 1}
EVAL_DEFAULTS = Path(CONFIG_DIR) / "eval" / "default.yaml"
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


class ConfigError(ValueError):
    """An invalid config value; the message names the key and what is valid."""


def _check_integers(cfg: DictConfig) -> None:
    for key, low in INTEGERS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")


def _check_known(node, reference, prefix: str) -> None:
    """Every key of `node` is a key of `reference` (recursively; list items against the first
    reference item): an unknown one (a typo, or a `+key` the code never reads) is an error."""
    if isinstance(node, DictConfig) and isinstance(reference, DictConfig):
        for key in node:
            if key not in reference:
                raise ConfigError(f"unknown key {prefix}.{key}: the evaluation does not read it; valid keys of "
                                  f"{prefix}: {', '.join(map(str, reference))} (configs/eval/default.yaml)")
            _check_known(node[key], reference[key], f"{prefix}.{key}")
    elif isinstance(node, ListConfig) and isinstance(reference, ListConfig) and len(reference):
        for i, item in enumerate(node):
            _check_known(item, reference[0], f"{prefix}[{i}]")


def _check_eval(cfg: DictConfig) -> None:
    ev = cfg.get("eval")
    if ev is None:
        return
    _check_known(ev, OmegaConf.load(EVAL_DEFAULTS), "eval")
    adv = ev.get("adversarial") or {}
    tier = adv.get("tier")
    if tier is not None and tier not in TIERS:
        raise ConfigError(f"eval.adversarial.tier must be one of {', '.join(TIERS)}, got {tier!r}")
    from rftbench.evaluate import SUBSETS

    if adv.get("subset") is not None and adv.get("subset") not in SUBSETS:
        raise ConfigError(f"eval.adversarial.subset must be one of {', '.join(SUBSETS)}, got {adv.get('subset')!r}")
    threats = adv.get("threats")
    if threats is None:
        return
    if not isinstance(threats, ListConfig):
        raise ConfigError(f"eval.adversarial.threats must be a list of {{norm, eps}}, got {threats!r}")
    for i, threat in enumerate(threats):
        key = f"eval.adversarial.threats[{i}]"
        if not isinstance(threat, DictConfig):
            raise ConfigError(f"{key} must be a {{norm, eps}} mapping, got {threat!r}")
        norm, eps = threat.get("norm"), threat.get("eps")
        if norm not in NORMS:
            raise ConfigError(f"{key}.norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or eps == float("inf"):
            raise ConfigError(f"{key}.eps must be a finite number > 0 (pixel units, e.g. 8/255 = 0.0314), "
                              f"got {eps!r}")


def _check_adapt(cfg: DictConfig) -> None:
    """`method.adapt` keys are keyword arguments of its `_target_`: one the function does not take
    would only fail after the data and model are built (or, with **kwargs, be ignored)."""
    adapt = OmegaConf.select(cfg, "method.adapt", default=None)
    if not isinstance(adapt, DictConfig) or "_target_" not in adapt:
        return
    from hydra.utils import get_method

    target = adapt["_target_"]
    try:
        params = inspect.signature(get_method(target)).parameters
    except Exception as exc:
        raise ConfigError(f"method.adapt._target_ {target!r} cannot be imported: {exc}") from exc
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in params if n not in ("model", "suite", "ctx")]
    for key in adapt:
        if key not in HYDRA_KEYS and key not in params:
            raise ConfigError(f"unknown key method.adapt.{key}: {target} takes no such argument; "
                              f"valid: {', '.join(valid)}")


def _check_features(cfg: DictConfig) -> None:
    node = cfg.get("features")
    if node is None:
        return
    unknown = sorted(set(node) - {"store", "max_gb", "batch_size"})
    if unknown:
        raise ConfigError(f"unknown key features.{unknown[0]}; valid keys of features: store, max_gb, batch_size")
    if not isinstance(node.get("store"), bool):
        raise ConfigError(f"features.store must be true or false, got {node.get('store')!r}")
    cap = node.get("max_gb")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise ConfigError(f"features.max_gb must be a number > 0 (GiB) or null (no cap), got {cap!r}")


def _check_checkpoint_every(cfg: DictConfig) -> None:
    value = cfg.get("checkpoint_every_s", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"checkpoint_every_s must be a number of seconds >= 0 (0: every epoch), got {value!r}")


def _check_decode(cfg: DictConfig) -> None:
    import torch

    from rftbench.data.folders import DECODE

    decode = OmegaConf.select(cfg, "suite.decode", default="cpu")
    if decode not in DECODE:
        raise ConfigError(f"suite.decode must be one of {', '.join(DECODE)}, got {decode!r}")
    if decode == "cuda" and not torch.cuda.is_available():
        raise ConfigError("suite.decode=cuda decodes JPEGs on the GPU, and CUDA is not available here "
                          "(torch.cuda.is_available() is False); use suite.decode=cpu")
    if decode == "cuda" and str(cfg.get("device", "auto")) == "cpu":
        raise ConfigError("suite.decode=cuda decodes on the GPU for a run on the GPU, and device=cpu; use "
                          "device=auto (or cuda), or suite.decode=cpu")


def _check_threads(cfg: DictConfig) -> None:
    threads, cores = cfg.get("threads"), available_cores()
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > cores:
        log.warning("threads=%d is more than the %d available cores: the run oversubscribes them and is "
                    "slower (threads=null uses the available cores)", threads, cores)


def _check_paths(cfg: DictConfig) -> None:
    """paths.cache and paths.runs must be folders (or creatable): not a file, nor under one."""
    for key, env in (("paths.cache", "RFTBENCH_CACHE"), ("paths.runs", None)):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        path = Path(str(value)).expanduser()
        blocker = file_in_the_way(path)
        if blocker is not None:
            where = f"{key}{f' (${env})' if env else ''} = {path}"
            what = "is a file" if blocker == path else f"is under the file {blocker}"
            raise ConfigError(f"{where} {what}; it must be a folder: point it at a directory")


def validate_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first invalid value of `cfg`; warn about `threads` above the cores."""
    _check_integers(cfg)
    _check_paths(cfg)
    _check_eval(cfg)
    _check_adapt(cfg)
    _check_features(cfg)
    _check_decode(cfg)
    _check_threads(cfg)
    _check_checkpoint_every(cfg)
    if OmegaConf.select(cfg, "backbone.source", default=None) == "timm":
        from rftbench.backbones import require_timm_model

        try:
            require_timm_model(str(cfg.backbone.arch))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    pretrain = OmegaConf.select(cfg, "backbone.pretrain", default=None)
    if pretrain is not None and "_target_" not in pretrain:
        keys = ", ".join(f"backbone.pretrain.{k}" for k in pretrain)
        raise ConfigError(
            f"{keys} set, but backbone {cfg.backbone.get('name')} has no pre-training recipe (backbone.pretrain "
            f"is null in its config); these keys come from an experiment preset for another backbone "
            f"(experiment=tiny is for backbone=digits_resnet): drop the preset or choose its backbone")


def check_suite(cfg: DictConfig, suite) -> None:
    """Checks that need the built suite, run before any training: a train, val and test split with
    images (`ConfigError` naming the suite's size keys), enough test images of every class for the
    class-balanced attack subset (naming `eval.adversarial.n`); classes without training images are a
    warning. Last, every image file of every split is checked for being empty or truncated
    (`rftbench.data.preflight.check_image_files`, remembered in `paths.cache`), so that a damaged test or
    OOD image fails the run before its training, naming the file and the split."""
    import torch

    size_keys = ", ".join(f"suite.build.{k}" for k in (cfg.suite.get("build") or {})
                          if any(w in str(k) for w in ("val", "test", "train", "per_class", "fraction")))
    for name in ("train", "val", "test"):
        if name not in suite.splits or len(suite.splits[name]) == 0:
            raise ConfigError(f"suite {suite.name} built no {name} split with images (splits: {sorted(suite.splits)}); "
                              f"every method trains on train, chooses on val and is scored on test: check "
                              f"{size_keys or 'the suite config'} and the data folder")
    counts = torch.bincount(torch.as_tensor(suite.train.labels).long(), minlength=suite.num_classes)
    empty = [int(c) for c in torch.nonzero(counts == 0).flatten()]
    if empty:
        names = suite.class_names or []
        shown = [f"{c} ({names[c]})" if c < len(names) and names[c] != str(c) else str(c) for c in empty[:10]]
        log.warning("suite %s: %d of %d classes have no training image (%s%s); they can only be predicted "
                    "through the pre-trained head", suite.name, len(empty), suite.num_classes, ", ".join(shown),
                    ", ..." if len(empty) > 10 else "")
    adv = cfg.eval.get("adversarial") or {}
    if adv.get("enabled") and adv.get("subset", "balanced") != "balanced":
        from rftbench.evaluate import attack_subset

        try:  # the first n / RobustBench's list: the images are there
            attack_subset(suite["test"], adv)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(str(exc)) from None
    elif adv.get("enabled"):
        n = int(adv["n"])
        test = torch.bincount(torch.as_tensor(suite["test"].labels).long(), minlength=suite.num_classes)
        present = test[test > 0]
        per_class = n // len(present) if n >= len(present) else 1
        if n >= len(present) and int(present.min()) < per_class:
            worst = int(torch.nonzero(test == present.min()).flatten()[0])
            fit = int(present.min()) * len(present)
            raise ConfigError(f"eval.adversarial.n={n} takes {per_class} test images of each of the {len(present)} "
                              f"classes, and class {worst} has {int(present.min())}: set eval.adversarial.n <= {fit} "
                              f"(or eval.adversarial.enabled=false)")
    from rftbench.data.preflight import check_image_files

    check_image_files(suite, OmegaConf.select(cfg, "paths.cache", default=None))
