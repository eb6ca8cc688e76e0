"""Hydra entry point: compose -> run (skip if done) -> record.

    python -m rftbench.run backbone=digits_resnet method=ct suite=digits seed=0
    python -m rftbench.run -m method=ft,lp seed=0,1,2
    python -m rftbench.run -m launcher=joblib method=ft,lp seed=0,1,2      (configs/launcher/)
    python -m rftbench.run -m method=ft,lp seed=0,1,2 --plan               (what it would run)
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rftbench import deviation, sweep, tracking
from rftbench.backbones import Classifier, create_backbone, require_weights
from rftbench.data.base import Suite
from rftbench.evaluate import evaluate, row
from rftbench.identity import CONFIG_DIR, run_id, run_id_of, start_spec  # noqa: F401 (the runner's API)
from rftbench.features import FeatureStore
from rftbench.methods.base import Adapted, ContractError, validate
from rftbench.results import environment, run_folder
from rftbench.summary import summary_block
from rftbench.train import RunContext, count_params
from rftbench.utils import apply_threads, resolve_device, seed_everything
from rftbench.validate import check_suite, validate_config

log = logging.getLogger("rftbench")
HEAD_INITS = ("auto", "zeroshot", "random")


def call(node: DictConfig, **kwargs):
    """Call a `_target_` node with extra kwargs; its own exceptions propagate unwrapped."""
    return instantiate(node, _partial_=True, _convert_="all")(**kwargs)


def build_suite(cfg: DictConfig, ctx: RunContext) -> Suite:
    """The suite's splits, with the suite's augmentation and the backbone's evaluation transform."""
    from rftbench.backbones import input_spec
    from rftbench.transforms import attach

    suite = call(cfg.suite.build, seed=cfg.seed, cache_dir=str(ctx.cache_dir))
    return attach(suite, cfg.suite.train_transform, cfg.suite.eval_transform, input_spec(cfg.backbone),
                  cfg.suite.get("decode", "cpu"))


def resolve_workers(value: int | str) -> int:
    """`num_workers`: an int, or `auto` = one DataLoader worker per core but one (at most 16)."""
    if value == "auto":
        return max(0, min(16, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) - 1))
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"num_workers={value!r}: give a non-negative int or auto")
    return value


def feature_store(cfg: DictConfig) -> FeatureStore:
    """The run's frozen-feature store (`features`): under <paths.cache>/features, or in memory."""
    node = cfg.features
    root = Path(cfg.paths.cache) / "features" if node.store else None
    return FeatureStore(root, node.max_gb, node.batch_size)


def build_model(cfg: DictConfig, suite: Suite, ctx: RunContext) -> Classifier:
    """The pre-trained backbone with its head set up for the suite (`suite.head_init`)."""
    b = cfg.backbone
    head_init = cfg.suite.get("head_init", "auto")
    if head_init not in HEAD_INITS:
        raise ValueError(f"suite.head_init={head_init!r} not valid; choose one of {HEAD_INITS}")
    if b.source == "open_clip":  # CLIP: the zero-shot head comes from the text tower (rftbench.clip)
        from rftbench import clip

        return ctx.prepare(clip.build_model(b, suite, head_init, cfg.seed, ctx.device))
    matches = suite.upstream_classes is not None and b.get("upstream") == suite.meta.get("upstream")
    if head_init == "auto":  # the pre-trained head when it knows the suite's classes, else a new one
        head_init = "zeroshot" if matches else "random"
    checkpoint = b.checkpoint
    spec = dict(name=b.arch, source=b.source, pretrained=b.pretrained,
                mean=None if b.mean is None else list(b.mean), std=None if b.std is None else list(b.std),
                kwargs=OmegaConf.to_container(b.kwargs, resolve=True))
    if b.get("activation"):  # e.g. relu: the ReLU Swin of the CT paper
        spec["activation"] = b.activation
    if checkpoint is None and b.get("pretrain"):
        checkpoint = str(call(b.pretrain, backbone=spec, cache_dir=str(ctx.cache_dir)))
    if head_init == "zeroshot":
        if not matches:
            raise ValueError(
                f"suite.head_init=zeroshot needs a backbone pre-trained on the suite's upstream task "
                f"({suite.meta.get('upstream')!r}); backbone {b.name} has upstream {b.get('upstream')!r}. "
                f"Use suite.head_init=random")
        model = create_backbone(num_classes=_upstream_size(checkpoint),
                                checkpoint=checkpoint, **spec)
        rows = model.head.out_features
        if max(suite.upstream_classes) >= rows:
            raise ValueError(
                f"the zero-shot head takes rows {min(suite.upstream_classes)}..{max(suite.upstream_classes)} of the "
                f"pre-trained head, which has {rows} outputs (backbone.checkpoint={checkpoint}): the checkpoint "
                f"was not trained on {suite.meta.get('upstream')!r}. Use suite.head_init=random")
        head = torch.nn.Linear(model.num_features, suite.num_classes)
        with torch.no_grad():
            head.weight.copy_(model.head.weight[suite.upstream_classes])
            head.bias.copy_(model.head.bias[suite.upstream_classes])
        model.head = head
        model.head_origin = "zeroshot"
    else:
        model = create_backbone(num_classes=_upstream_size(checkpoint) if checkpoint else 1000,
                                checkpoint=checkpoint, **spec)
        torch.manual_seed(cfg.seed)
        model.head = torch.nn.Linear(model.num_features, suite.num_classes)
        model.head_origin = "random"
    return ctx.prepare(model)


def _upstream_size(checkpoint: str | None) -> int:
    from rftbench.backbones import load_state

    if checkpoint is None:
        return 1000
    state = load_state(checkpoint)
    key = next((k for k in state if k.endswith("head.weight")
                or k in ("fc.weight", "head.weight", "head.fc.weight", "classifier.weight")), None)
    if key is None:
        raise ValueError(f"cannot find the classifier weights in checkpoint {checkpoint}")
    return state[key].shape[0]


def execute(cfg: DictConfig) -> str:
    """Run one configuration into its run folder. Returns 'skipped' or 'done'; raises on failure
    after recording the error (the folder never gets `done`)."""
    validate_config(cfg)
    folder = run_folder(cfg)
    if folder.done:
        log.info("skip %s: already done (%s)", folder.run_id, folder.path)
        return "skipped"
    if folder.damage() is not None:
        log.warning("redoing damaged run %s: %s", folder.path, folder.damage())
    if cfg.backbone.get("pretrained") and cfg.backbone.get("checkpoint") is None:
        require_weights(cfg.backbone.arch, cfg.backbone.source)  # offline: fail now, not after the data
    folder.start()
    folder.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        threads = apply_threads(cfg.get("threads"), (cfg.get("launcher") or {}).get("parallel_jobs", 1))
        device = resolve_device(cfg.device)
        ctx = RunContext(device=device, seed=cfg.seed, cache_dir=Path(cfg.paths.cache),
                         run_dir=folder.path, eval_batch_size=cfg.eval.batch_size,
                         num_workers=resolve_workers(cfg.num_workers), spec=start_spec(cfg),
                         store=feature_store(cfg), accumulate=cfg.budget.get("accumulate", 1),
                         checkpoint_every_s=float(cfg.get("checkpoint_every_s", 0)))
        try:
            ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only shared cache: entries are read, new ones not stored
            from rftbench.utils import cache_unwritable

            cache_unwritable(ctx.cache_dir, exc)
        log.info("run %s: %s / %s / %s seed %d on %s", folder.run_id, cfg.suite.name, cfg.backbone.name,
                 cfg.method.name, cfg.seed, device)
        seed_everything(cfg.seed)
        suite = build_suite(cfg, ctx)
        check_suite(cfg, suite)  # before the weights and any training
        model = build_model(cfg, suite, ctx)
        n_params, head_origin = count_params(model), model.head_origin
        start_weights = deviation.snapshot(model)
        adapt = instantiate(cfg.method.adapt)
        seed_everything(cfg.seed)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        adapted: Adapted = validate(adapt(model=model, suite=suite, ctx=ctx), cfg.method.name)
        # a reused cached training counts with the time it took when it ran
        adapt_time = time.perf_counter() - t0 + adapted.reused_time_s
        tables = dict(adapted.tables)
        moved = deviation.deviation_table(start_weights, adapted.model)
        del start_weights
        if adapted.frozen_backbone and not moved.empty:
            raise ContractError(f"method={cfg.method.name}: Adapted.frozen_backbone is set but the backbone's "
                                f"weights changed ({len(moved)} tensors); fix the method's adapt function")
        if not moved.empty:  # a method that trained the backbone: how far it moved (rftbench.deviation)
            tables["deviation"] = moved
            adapted.info = {**adapted.info, **deviation.totals(moved)}
        if adapted.analysis is not None:  # oracle analysis: after the choice, test splits allowed
            extra_tables, extra_rows = adapted.analysis(suite)
            tables.update(extra_tables)
            adapted.rows = [*adapted.rows, *extra_rows]
        rows = evaluate(adapted.model, suite, ctx, OmegaConf.to_container(cfg.eval, resolve=True),
                        frozen_backbone=adapted.frozen_backbone)
        rows += [row("-", "val_acc", adapted.val_acc),
                 row("-", "trainable_params", adapted.trainable_params),
                 row("-", "trainable_frac", adapted.trainable_params / max(n_params, 1)),
                 row("-", "adapt_time_s", adapt_time),
                 row("-", "train_time_s", adapted.train_time_s),
                 row("-", "n_train", len(suite.train))]
        if ctx.cuda:
            rows.append(row("-", "peak_mem_gb", torch.cuda.max_memory_allocated() / 2**30))
        if adapted.select_score is not None:  # the objective the method chose by (the leaderboard ranks by it)
            rows.append(row("-", "select_score", adapted.select_score,
                            detail=json.dumps({"objective": adapted.select_by})))
        rows += adapted.rows
        if "converged" in adapted.info:  # 0: a training's best val epoch was its last (rftbench.train.fit)
            rows.append(row("-", "converged", adapted.info["converged"]))
        rows += [row("-", f"chosen/{k}", v) for k, v in adapted.info.items()
                 if k != "converged" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for name, table in tables.items():
            folder.write_table(f"{name}.csv", table)
        folder.write_json("info.json", {"info": adapted.info, "suite": suite.meta, "val_acc": adapted.val_acc,
                                        "trainable_params": adapted.trainable_params,
                                        "total_params": n_params, "adapt_time_s": adapt_time,
                                        "train_time_s": adapted.train_time_s,
                                        "reused_time_s": adapted.reused_time_s, "head_origin": head_origin})
        folder.write_metrics(rows, cfg.seed)
        folder.write_json("env.json", environment(str(device), threads))
        if ctx.store.records:  # which frozen-feature rows the run computed and which it reused
            folder.write_json("features.json", ctx.store.summary())
        tracking.log_run(cfg, folder)
        folder.finish()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: no error recorded: the rerun resumes (status incomplete)
        folder.lock.release()
        raise
    except Exception as exc:
        folder.fail(exc)
        exc.error_file = folder.path / "error.txt"  # named by the one-line console report
        log.error("run %s failed: %s: %s (details: %s)", folder.run_id, type(exc).__name__, exc,
                  folder.path / "error.txt")
        raise
    log.info("done %s -> %s", folder.run_id, folder.path)
    print(summary_block(pd.read_csv(folder.path / "metrics.csv", dtype={"run_id": str}), folder.path), flush=True)
    return "done"


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that runs end the way Ctrl-C ends them."""


def _terminate(signum, frame) -> None:
    raise Interrupted()


def interrupted_line() -> str:
    """The one line an interrupted run prints: how far its training got and how to resume."""
    from rftbench.train import PROGRESS

    if not PROGRESS["epochs"]:
        return "interrupted; rerun the same command to resume"
    done, saved = PROGRESS["epoch"], PROGRESS["saved"]
    resume = "" if saved == done else f" (its checkpoint holds epoch {saved}: checkpoint_every_s)"
    return f"interrupted after epoch {done}/{PROGRESS['epochs']}{resume}; rerun the same command to resume"


sweep.register_resolvers()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    return sweep.run_task(cfg, execute)


def main() -> None:
    """The command line: one run, or with -m a sweep that ends with a summary and exits 1 if a run
    failed; `--plan` lists the sweep's jobs and their status instead of running them;
    `rftbench data verify|download suite=...` checks or fetches a suite's data (`rftbench.data`)."""
    if sys.argv[1:2] == ["data"]:
        from rftbench.data.__main__ import main as data_main

        sys.exit(data_main(sys.argv[2:]))
    if "--plan" in sys.argv[1:]:
        from rftbench.plan import main as plan_main

        plan_main([a for a in sys.argv[1:] if a not in ("--plan", "-m", "--multirun")])
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        hydra_main()
    except KeyboardInterrupt as exc:  # Ctrl-C (exit 130) or SIGTERM (143): one line, locks released
        print(interrupted_line(), file=sys.stderr, flush=True)
        sys.exit(143 if isinstance(exc, Interrupted) else 130)
    if sweep.LAST is not None and not sweep.LAST.ok:
        sys.exit(1)


if __name__ == "__main__":
    # through the importable module, so that launchers pickle the task by reference, not by value
    from rftbench.run import main as run_main

    run_main()
