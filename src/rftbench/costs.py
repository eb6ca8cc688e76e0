"""The cost model of `--plan`: the images one job computes, by phase, and its seconds from measured
throughput (results/perf.json, written by `make perf`). docs/protocol.md, "Cost estimates", states the
rules; in short:

- **split sizes**: the suite's sizes declared in the code (ImageNet's release counts,
  `rftbench.data.imagenet.PARTS`), else the built suite when its data is on disk (the embedded digits
  suite always), else unknown;
- **work** per job, in images, by phase: `train` (forward+backward images of the network trainings:
  train split x epochs each, `method.cost.trainings`), `extra` (other forward+backward images: TPGM's
  radius steps), `val` (inference: a val pass per training epoch and the selection sweeps of
  `method.cost.passes`), `features` (frozen-backbone feature rows: probes, CT's betas, and the
  evaluation of a frozen-backbone method), `evaluate` (every test/OOD split once) and `attack`
  (AutoAttack, forward+backward passes: images x iterations x restarts x targets the tier implies, every
  image attacked to the end: an upper bound). The method-specific counts are the `cost:` block of
  configs/method/<m>.yaml;
- **time**: each phase's images over the perf.json figure of the job's backbone and device that times
  that phase (`TIMED_BY`); a phase with work and no figure leaves the job without an estimate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from rftbench.utils import stable_hash

PERF_JSON = Path(__file__).resolve().parents[2] / "results" / "perf.json"
PHASES = ("train", "extra", "val", "features", "evaluate", "attack")
# perf.json phases that time each phase of the work, the first one measured wins: a feature row and an
# evaluation image are one forward pass; an attack iteration and a radius step one forward+backward
TIMED_BY = {"train": ("train",), "extra": ("train",), "val": ("evaluate",), "features": ("features", "evaluate"),
            "evaluate": ("evaluate",), "attack": ("attack", "train")}
IMAGENET = "rftbench.data.imagenet.build_imagenet"
STANDARD_ITERS, STANDARD_TARGETS, SQUARE_QUERIES = 100, 9, 5000  # AutoAttack's standard version (Linf, L2)


# ---- split sizes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Images per split group of one suite (and seed): `eval` sums every test/OOD split."""

    train: int
    val: int
    test: int
    eval: int
    ood_val: int
    classes: int
    source: str  # "declared" | "built"

    def of(self, name: str) -> int:
        return getattr(self, name)


def _limited(pool: int, classes: int, fraction: float | None, shots: int | None) -> int:
    """Training images kept of a pool by `suite.build.fraction` / `shots` (per class, `limit_per_class`)."""
    if shots is not None:
        return min(pool, int(shots) * classes)
    return pool if fraction is None else max(classes, round(float(fraction) * pool))


def declared_imagenet(build: Mapping) -> Sizes:
    """ImageNet from its declared release sizes: val_per_class of every class off train; evaluation on
    the val set, every listed shift (ObjectNet: the whole release) and ImageNet-C (corruption_n each)."""
    from rftbench.data.imagenet import PARTS

    classes = 1000
    val = int(build["val_per_class"]) * classes
    train = _limited(PARTS["train"].expected - val, classes, build.get("fraction"), build.get("shots"))
    test = PARTS["test"].expected
    corruption = int(build["corruption_n"]) * len(build["corruptions"]) * len(build["severities"])
    ood = sum(PARTS[f"ood/{name}"].expected for name in build["ood"])
    return Sizes(train, val, test, test + ood + corruption, 0, classes, "declared")


def built_sizes(cfg: DictConfig) -> Sizes:
    """The sizes of the suite as built for the job's seed (its data must be on disk)."""
    from hydra.utils import call

    suite = call(cfg.suite.build, seed=cfg.seed, cache_dir=str(cfg.paths.cache))
    count = lambda splits: sum(len(s) for s in splits)  # noqa: E731
    return Sizes(len(suite.train), len(suite.val), len(suite["test"]), count(suite.eval_splits()),
                 count(suite.by_role("ood_val")), suite.num_classes, "built")


def missing_data(suite: Mapping) -> str | None:
    """The first part of the suite's data that `rftbench data verify` does not find, or None."""
    from rftbench.data.verify import verify

    for check in verify(suite):
        if check.status != "found":
            return f"{check.part} {check.status} at {check.path}"
    return None


_SIZES: dict[str, Sizes | str] = {}
NO_SIZES = "none declared in the code, no data on disk"


def suite_sizes(cfg: DictConfig) -> Sizes | str:
    """The job's split sizes (memoized per suite config and seed), or why they are unknown
    (`NO_SIZES`: `rftbench data verify` misses a part)."""
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    key = stable_hash({"suite": suite, "seed": int(cfg.seed)})
    if key not in _SIZES:
        target = suite["build"]["_target_"]
        if target == IMAGENET:
            _SIZES[key] = declared_imagenet(suite["build"])
        else:
            missing = missing_data(suite)  # an embedded suite (digits) has nothing to miss
            _SIZES[key] = NO_SIZES if missing else _built_or_reason(cfg)
    return _SIZES[key]


def _built_or_reason(cfg: DictConfig) -> Sizes | str:
    try:
        return built_sizes(cfg)
    except Exception as exc:  # data on disk but not buildable: the plan says why, the run will too
        return f"building it failed: {type(exc).__name__}: {exc}"


# ---- the factors of a cost block -----------------------------------------------------------------

def _blocks(cfg: DictConfig) -> float:
    """Surgical fine-tuning's trainings: one per block with block=auto (the backbone's architecture built
    with random weights, no download), else one."""
    if OmegaConf.select(cfg, "method.adapt.block") != "auto":
        return 1.0
    from rftbench.backbones import create_backbone
    from rftbench.methods.surgical import blocks

    b = cfg.backbone
    model = create_backbone(str(b.arch), source=str(b.source), pretrained=False,
                            kwargs=OmegaConf.to_container(b.kwargs, resolve=True) if b.get("kwargs") else None)
    return float(len(blocks(model)))


def _betas(cfg: DictConfig) -> float:
    from rftbench.methods.ct_method import beta_grid

    return float(len(beta_grid(OmegaConf.to_container(cfg.method.betas, resolve=True))))


COUNTS: dict[str, Callable[[DictConfig], float]] = {"betas": _betas, "blocks": _blocks}


def factor(cfg: DictConfig, spec: Any) -> float:
    """One factor of a cost term: a number or bool; `@name` (a `COUNTS` rule); `key` (a config value: a
    number, a bool as 0/1, a list as its length); `key=value` (1 if equal, else 0); `/x` (1 / x);
    `1-x` (1 - x)."""
    if isinstance(spec, (bool, int, float)):
        return float(spec)
    spec = str(spec)
    if spec.startswith("@"):
        return COUNTS[spec[1:]](cfg)
    if spec.startswith("/"):
        return 1.0 / factor(cfg, spec[1:])
    if spec.startswith("1-"):
        return 1.0 - factor(cfg, spec[2:])
    if "=" in spec:
        key, want = spec.split("=", 1)
        return float(str(OmegaConf.select(cfg, key)) == want)
    value = OmegaConf.select(cfg, spec, throw_on_missing=True)
    if isinstance(value, (ListConfig, list)):
        return float(len(value))
    if not isinstance(value, (bool, int, float)):
        raise ValueError(f"method.cost factor {spec!r} is {value!r}: not a number, bool or list")
    return float(value)


def product(cfg: DictConfig, specs: Any) -> float:
    """The product of a list of factors (one factor alone is a list of one)."""
    specs = specs if isinstance(specs, (list, ListConfig)) else [specs]
    return math.prod(factor(cfg, s) for s in specs)


# ---- work ---------------------------------------------------------------------------------------

@dataclass
class Work:
    """The images one job computes, by phase (`PHASES`)."""

    images: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, phase: str, images: float) -> None:
        self.images[phase] += images


def attack_units(settings: Mapping, classes: int | None) -> float:
    """Forward+backward passes per image of one AutoAttack at `settings` (tier, n_iter, n_target_classes):
    quick = APGD-CE + APGD-T (n_iter per target), one restart each; standard = APGD-CE, APGD-T and FAB-T
    (100 iterations, 9 targets) and Square (5,000 queries, counted as passes). Targets are capped at the
    classes - 1 the attack can aim at."""
    cap = (lambda t: min(t, classes - 1)) if classes else (lambda t: t)  # noqa: E731
    if settings["tier"] == "standard":
        targets = cap(STANDARD_TARGETS)
        return STANDARD_ITERS * (1 + 2 * targets) + SQUARE_QUERIES
    return int(settings["n_iter"]) * (1 + cap(int(settings["n_target_classes"])))


def attack_work(settings: Mapping, classes: int | None) -> float:
    """Forward+backward passes of one attack setting over its images and threats."""
    return int(settings["n"]) * len(settings["threats"]) * attack_units(settings, classes)


def method_cost(cfg: DictConfig) -> dict:
    """The method's `cost:` block (configs/method/<m>.yaml), resolved against the job config."""
    node = OmegaConf.select(cfg, "method.cost")
    if node is None:
        raise ValueError(f"method={cfg.method.name} has no cost block (configs/method/{cfg.method.name}.yaml)")
    return OmegaConf.to_container(node, resolve=False)


def training_key(cfg: DictConfig, method: str | None = None) -> tuple:
    """What a cached fine-tuning is shared by: suite, backbone, seed and recipe (`method.finetune`)."""
    recipe = OmegaConf.to_container(cfg.method.finetune, resolve=True) if "finetune" in cfg.method else None
    return (method or str(cfg.method.name), str(cfg.suite.name), str(cfg.backbone.name), int(cfg.seed),
            stable_hash(recipe))


def job_work(cfg: DictConfig, sizes: Sizes, *, provided: set[tuple] = frozenset(),
             features_done: bool = False) -> Work:
    """The images the job computes: its trainings (of a `reuse` term, one training is not counted when
    `provided` holds that method's training of the same start and recipe: another job of the sweep
    makes it), its passes (feature passes not counted when `features_done`: the store or an earlier
    job has them), its evaluation and its attacks."""
    cost, work = method_cost(cfg), Work()
    epochs = factor(cfg, cost.get("epochs", "budget.epochs"))
    share = product(cfg, cost.get("train_share", [1]))
    for term in cost.get("trainings", []):
        reused = bool(term.get("reuse")) and training_key(cfg, term["reuse"]) in provided
        n = product(cfg, term.get("times", [1])) - reused
        work.add("train", n * epochs * share * sizes.train)
        work.add("val", n * epochs * sizes.val)
    for term in cost.get("passes", []):
        if term["phase"] == "features" and features_done:
            continue
        images = sum(sizes.of(s) for s in term["splits"]) if "splits" in term else product(cfg, term["images"])
        work.add(term["phase"], images * product(cfg, term.get("times", [1])))
    frozen = bool(cost.get("frozen_eval", False))
    if not (frozen and features_done):
        work.add("features" if frozen else "evaluate", sizes.eval)
    adv = OmegaConf.to_container(cfg.eval.adversarial, resolve=True)
    if adv["enabled"]:
        work.add("attack", attack_work(adv, sizes.classes))
    for term in cost.get("attacks", []):
        settings = OmegaConf.to_container(OmegaConf.select(cfg, term["settings"]), resolve=True)
        work.add("attack", attack_work(settings, sizes.classes) * product(cfg, term.get("times", [1])))
    return work


def extractor_key(cfg: DictConfig) -> tuple | None:
    """What a job's frozen features are shared by (suite, backbone, extractor), None without any."""
    kind = method_cost(cfg).get("extractor")
    if kind is None:
        return None
    grid = OmegaConf.to_container(cfg.method.betas, resolve=True) if kind == "betas" else None
    return (str(cfg.suite.name), stable_hash(OmegaConf.to_container(cfg.backbone, resolve=True)), kind,
            stable_hash(grid))


def extractors_needed(cfg: DictConfig) -> int:
    """Feature-store entries the job's features need: one per extractor (CT: one per beta)."""
    kind = method_cost(cfg).get("extractor")
    return 0 if kind is None else int(_betas(cfg)) if kind == "betas" else 1


# ---- throughput and time -------------------------------------------------------------------------

def load_perf(path: str | Path | None = PERF_JSON) -> list[dict]:
    """The measured lines of perf.json (an absent file: none)."""
    if path is None or not Path(path).is_file():
        return []
    return [r for r in json.loads(Path(path).read_text())["lines"] if r.get("images_per_s")]


def figure(perf: list[dict], backbone: str, device: str, phase: str) -> dict | None:
    """The first measured perf.json line of (backbone, device) that times `phase` (`TIMED_BY`)."""
    for wanted in TIMED_BY[phase]:
        for r in perf:
            if r["backbone"] == backbone and r["device"] == device and r["phase"] == wanted:
                return r
    return None


def rate(line: dict) -> float:
    """Images per second of `line`; an attack line's in forward+backward passes: its images/s times the
    passes per image of the attack it measured."""
    if line["phase"] == "attack":
        return line["images_per_s"] * attack_units(line["attack"], None)
    return line["images_per_s"]


def perf_name(cfg: DictConfig) -> str:
    """The perf.json backbone whose throughput times `cfg`'s backbone: `backbone.perf_as` (a backbone of
    the same architecture and input size, e.g. tv_resnet50 timed as resnet50), else its own name."""
    return str(cfg.backbone.get("perf_as") or cfg.backbone.name)


def seconds(work: Work, perf: list[dict], backbone: str, device: str) -> tuple[float, str]:
    """Estimated seconds of `work` on (backbone, device) and what the estimate is based on."""
    if not any(r["backbone"] == backbone and r["device"] == device for r in perf):
        return math.nan, f"no measurement for {backbone} on {device}"
    total, used = 0.0, {}
    for phase, images in work.images.items():
        if not images:
            continue
        line = figure(perf, backbone, device, phase)
        if line is None:
            return math.nan, f"no measurement of {phase} for {backbone} on {device}"
        total += images / rate(line)
        used[line["line"]] = line["images_per_s"]
    return total, "perf.json " + " + ".join(f"{k} {v:g} images/s" for k, v in used.items())


def job_device(cfg: DictConfig) -> str:
    """The device type the job runs on (device=auto: CUDA when this machine has it)."""
    device = str(cfg.device)
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def short(n: float) -> str:
    """An image count as printed: 3 significant digits, 1.27e7 style above 10,000."""
    return f"{n:,.0f}" if n < 1e4 else f"{n:.3g}".replace("e+0", "e").replace("e+", "e")


def totals_line(table) -> str:
    """The images the cost model counts over the plan's jobs to run: the --plan line the preset headers
    quote."""
    todo = table[~table["status"].isin(["done", "repeat"])]
    known = todo[todo["unknown"] == ""]
    reasons = sorted(set(todo.loc[todo["unknown"] != "", "unknown"]))
    parts = []
    if len(known):
        infer = sum(known[f"{p}_images"].sum() for p in ("val", "features", "evaluate"))
        parts.append(f"{short(known['train_images'].sum() + known['extra_images'].sum())} training images "
                     f"(forward+backward), {short(infer)} inference images (val, features, evaluation), "
                     f"{short(known['attack_images'].sum())} AutoAttack forward+backward passes ({len(known)} jobs)")
    for why in reasons:
        jobs = todo[todo["unknown"] == why]
        parts.append(f"{len(jobs)} jobs without counts ({', '.join(sorted(set(jobs['suite'])))}: {why})")
    return "images to compute: " + ("; ".join(parts) or "none")
