"""The one fine-tuning loop every training method uses, plus feature caching and linear probes.

`fit` trains the parameters that require grad, evaluates on `val` after every epoch and restores the
best epoch (chosen on val only). Optimizers are partials from the config (`_target_` + `_partial_`),
called with the parameter list (and `exclude=` for optimizers that take it, e.g. FTP).
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rftbench.data.base import Split, batches, scored_logits
from rftbench.features import FeatureStore, batch_outputs
from rftbench.progress import bar
from rftbench.selection import Running

log = logging.getLogger("rftbench")


# The epoch the current training last finished, of how many, and the last epoch its checkpoint holds
# (the runner's interrupt message).
PROGRESS = {"epoch": 0, "epochs": 0, "saved": 0}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (or, for a linear probe, diverged)."""


# A probe whose chosen head has a val loss above this many times chance level (log of the number of
# classes) has diverged: worse than guessing by far, e.g. with a much too large probe.lr.
PROBE_DIVERGED = 10.0


def check_probe(head: nn.Module, val_feats: torch.Tensor, val_y: torch.Tensor, num_classes: int) -> None:
    """Raise `NonFiniteLossError` when the chosen probe head's val loss is not finite or diverged."""
    with torch.no_grad():
        loss = F.cross_entropy(head(val_feats).float(), val_y).item()
    chance = math.log(max(num_classes, 2))
    if not math.isfinite(loss) or loss > PROBE_DIVERGED * chance:
        raise NonFiniteLossError(
            f"linear probe diverged: val loss {loss:.3g} of the chosen head (chance level {chance:.2f}); "
            f"lower probe.lr")


@dataclass
class RunContext:
    """Where and how a run computes: device, seeds, cache and run folders, eval batch size."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache_dir: Path = Path(".")
    run_dir: Path | None = None
    eval_batch_size: int = 512
    num_workers: int = 0
    spec: dict = field(default_factory=dict)  # resolved backbone + suite + seed: the starting point
    store: FeatureStore = field(default_factory=FeatureStore)  # frozen features (default: in memory)
    accumulate: int = 1  # budget.accumulate: micro-batches per optimizer step of every `fit` of the run
    checkpoint_every_s: float = 0.0  # checkpoint_every_s: at most one epoch checkpoint per this many seconds

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cuda else model


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    optimizer: torch.optim.Optimizer | None = None
    n_val: int = 0  # validation images behind val_acc

    @property
    def converged(self) -> bool:
        """False when val accuracy was still rising when the budget ran out: the best val epoch is the
        last one and it beats every earlier epoch by more than one validation image (a one-image
        step at the end of the schedule, where the learning rate is ~0, is noise, not progress).
        One-epoch trainings count as converged."""
        if len(self.history) < 2 or self.best_epoch < self.history[-1]["epoch"]:
            return True
        before = max(h["val_acc"] for h in self.history[:-1])
        return self.n_val > 0 and self.history[-1]["val_acc"] - before <= 1.0 / self.n_val + 1e-9


def set_bn_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode (frozen running statistics)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def count_params(params: nn.Module | Iterable[torch.Tensor], *, trainable: bool = False) -> int:
    """The one parameter count: the elements of a module's parameters (or of a list of tensors or
    optimizer parameter groups), only those that require grad when `trainable`."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    flat = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return sum(t.numel() for t in flat if t.requires_grad or not trainable)


def _warmup_steps(cfg: dict, steps_per_epoch: int) -> int:
    """The scheduler's linear warm-up in optimizer steps: `warmup_steps`, or `warmup_epochs` x
    `steps_per_epoch` (rounded down); giving both is an error."""
    steps, epochs = cfg.get("warmup_steps"), cfg.get("warmup_epochs")
    if steps is not None and epochs is not None:
        raise ValueError(f"scheduler: give warmup_steps ({steps}) or warmup_epochs ({epochs}), not both; "
                         f"set the other to null")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"scheduler.warmup_steps must be an integer >= 0, got {steps!r}")
        return steps
    return int((epochs or 0) * steps_per_epoch)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: dict | None, epochs: int, steps_per_epoch: int):
    """Per-step LambdaLR from `{name: cosine|step|constant, warmup_epochs | warmup_steps, milestones,
    gamma}`: a linear warm-up (step s < W: factor (s + 1) / W) over W optimizer steps (`warmup_steps`,
    or `warmup_epochs` x steps per epoch), then the schedule; cosine spans the steps after the warm-up:
    0.5 (1 + cos(pi (s - W) / (T - W))) of T = epochs x steps per epoch steps in all."""
    cfg = dict(cfg or {"name": "constant"})
    name = cfg.get("name", "constant")
    total = max(1, epochs * steps_per_epoch)
    warm = _warmup_steps(cfg, steps_per_epoch)
    if name == "cosine":
        def f(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    elif name == "step":
        milestones = [m * steps_per_epoch for m in cfg.get("milestones", [])]
        gamma = cfg.get("gamma", 0.1)

        def f(step):
            if step < warm:
                return (step + 1) / warm
            return gamma ** sum(step >= m for m in milestones)
    elif name == "constant":
        def f(step):
            return (step + 1) / warm if step < warm else 1.0
    else:
        raise ValueError(f"unknown scheduler {name!r}; valid: cosine, step, constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def build_optimizer(optimizer: Callable, params: Sequence[nn.Parameter] | list[dict],
                    exclude: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """Call the configured optimizer partial; pass `exclude` to optimizers that accept it."""
    exclude = list(exclude)
    target = getattr(optimizer, "func", optimizer)
    if exclude and "exclude" in inspect.signature(target).parameters:
        return optimizer(params, exclude=exclude)
    return optimizer(params)


class StepHook(Protocol):
    """What `fit(after_step=...)` calls after every optimizer step, with a resumable state."""

    def __call__(self, model: nn.Module) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_accumulate(accumulate: int, batch_size: int) -> None:
    """`accumulate` must be an integer in [1, batch_size] (`budget.accumulate`)."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or not 1 <= accumulate <= batch_size:
        raise ValueError(f"budget.accumulate must be an integer from 1 to the batch size "
                         f"(budget.batch_size = {batch_size}), got {accumulate!r}")


def micro_batches(n: int, batch_size: int, accumulate: int) -> int:
    """How many micro-batches a batch of `n` images is split into: `accumulate` for a full batch, and
    for a shorter one (an epoch's last) the fewest that keep every micro-batch within a full batch's
    (ceil(accumulate * n / batch_size)), so that it is not cut into needlessly small pieces (a
    BatchNorm layer in train mode cannot normalise a micro-batch of one image)."""
    return -(-accumulate * n // batch_size)


def accumulate_gradients(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, ctx: RunContext, *,
                         forward: Callable, loss_fn: Callable, batch_size: int, accumulate: int) -> torch.Tensor:
    """Forward and backward of one batch as `micro_batches` micro-batches whose sizes differ by at
    most one, run one after another. Each micro-batch's loss is weighted by its share of the batch,
    so the summed gradient is the gradient of the batch's mean loss; returns that loss (detached,
    float32)."""
    parts = micro_batches(len(xb), batch_size, accumulate)
    if parts == 1:  # the plain step (the same numbers: the weight would be 1)
        with ctx.autocast():
            loss = loss_fn(forward(model, xb), yb)
        loss.backward()
        return loss.detach().float()
    total = torch.zeros((), device=xb.device)
    for xm, ym in zip(torch.tensor_split(xb, parts), torch.tensor_split(yb, parts)):
        with ctx.autocast():
            loss = loss_fn(forward(model, xm), ym) * (len(xm) / len(xb))
        loss.backward()
        total += loss.detach().float()
    return total


def fit(model: nn.Module, train: Split, val: Split, ctx: RunContext, *, optimizer: Callable,
        epochs: int, batch_size: int, scheduler: dict | None = None, params: list | None = None,
        checkpoint_key: str | None, exclude: Iterable[nn.Parameter] = (), loss_fn: Callable | None = None,
        forward: Callable | None = None, bn_eval: bool = False, label_smoothing: float = 0.0,
        select: str = "val", after_step: StepHook | None = None, accumulate: int | None = None,
        clip_grad_norm: float | None = None) -> FitResult:
    """Train `params` (default: every parameter that requires grad) and keep the best val epoch
    (`rftbench.selection`: ties -> the earlier epoch).

    `checkpoint_key` names this training's epoch checkpoints in the run folder (unique within a
    run, e.g. "ft" or "rws-expert-fog"; None: no checkpoints), so that a requeued attempt of the run
    continues it. A checkpoint is written after an epoch when `ctx.checkpoint_every_s` seconds have
    passed since the last one (0: every epoch), and always after the last epoch. `forward(model, x)` returns what `loss_fn(out, y)` consumes (default: logits and
    cross-entropy); `bn_eval` keeps BatchNorm statistics frozen (frozen-backbone methods);
    `select="last"` keeps the final epoch instead of the best val epoch. `after_step(model)` runs
    after every optimizer step (e.g. TPGM's projection); its `state_dict()` travels with the
    checkpoints, so a resumed training continues it too. `clip_grad_norm`: the gradient of every step
    rescaled to at most this L2 norm over all trained parameters before the optimizer step
    (`torch.nn.utils.clip_grad_norm_`; WiSE-FT's recipe clips at 1.0); None: no clipping.

    `batch_size` is the effective batch of one optimizer step; `accumulate` (default: the run's
    `budget.accumulate`, `ctx.accumulate`; a memory knob like `threads`, not part of the run id nor
    of a cached training's key) only splits each batch into that many micro-batches run forward and
    backward one after another
    (`micro_batches`; peak memory ~ batch_size / accumulate images). Data order, optimizer and
    scheduler steps and checkpoints are those of `accumulate=1`; the weights agree to float rounding,
    except where a batch statistic is computed per micro-batch (BatchNorm in train mode, in-batch
    contrastive losses): docs/protocol.md section 3.
    """
    accumulate = ctx.accumulate if accumulate is None else accumulate
    check_accumulate(accumulate, batch_size)
    if select not in ("val", "last"):
        raise ValueError(f"select must be 'val' or 'last', got {select!r}")
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be > 0 or null, got {clip_grad_norm!r}")
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]  # (param groups)
    forward = forward or (lambda m, x: m(x))
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing))
    opt = build_optimizer(optimizer, params, exclude)
    steps = math.ceil(len(train) / batch_size)
    sched = make_scheduler(opt, scheduler, epochs, steps)
    best, history = Running(), []
    t0, first, spent = time.perf_counter(), 1, 0.0
    ckpt, last_save = None, t0
    if ctx.run_dir is not None and checkpoint_key is not None:
        from rftbench.results import CHECKPOINTS
        from rftbench.utils import atomic_path, stable_hash, tensor_digest

        # keyed by name, starting weights and data: a checkpoint only resumes the very same training
        data = stable_hash([train.name, len(train), val.name, len(val)], length=8)
        ckpt = Path(ctx.run_dir) / CHECKPOINTS / f"{checkpoint_key}-{tensor_digest(*model.state_dict().values())}-{data}.pt"
        saved = None
        if ckpt.exists():
            try:
                saved = torch.load(ckpt, map_location=ctx.device, weights_only=True)
            except Exception as exc:  # unreadable: train from the start
                log.warning("cannot resume from %s (%s); training from the start", ckpt, exc)
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            best = Running(saved["best_epoch"], saved["best_acc"], saved["best_state"], saved["epoch"])
            history, first, spent = saved["history"], saved["epoch"] + 1, saved["train_time_s"]
            if after_step is not None:
                after_step.load_state_dict(saved["after_step"])
            torch.set_rng_state(saved["rng"].cpu())
            if ctx.cuda and "cuda_rng" in saved:
                torch.cuda.set_rng_state(saved["cuda_rng"].cpu())
            log.info("resumed from %s after epoch %d/%d", ckpt.name, saved["epoch"], epochs)
    PROGRESS.update(epoch=first - 1, epochs=epochs, saved=first - 1)
    for epoch in range(first, epochs + 1):
        model.train()
        if bn_eval:
            set_bn_eval(model)
        total = torch.zeros((), device=ctx.device)
        for xb, yb in bar(batches(train, batch_size, shuffle=True, seed=ctx.seed * 100_003 + epoch,
                                  num_workers=ctx.num_workers, device=ctx.device, augment=True),
                          f"epoch {epoch}/{epochs}", total=steps, unit="batch"):
            if ctx.cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            total += accumulate_gradients(model, xb, yb, ctx, forward=forward, loss_fn=loss_fn,
                                          batch_size=batch_size, accumulate=accumulate)
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(tensors, clip_grad_norm)
            opt.step()
            if after_step is not None:
                after_step(model)
            sched.step()
        train_loss = float(total) / steps
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"training loss is {train_loss} at epoch {epoch}; lower the learning rate "
                f"(optimizer.lr) or check the data")
        val_acc = accuracy_on(model, val, ctx)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc,
                        "lr": opt.param_groups[0]["lr"]})
        log.info("epoch %d/%d  loss %.4f  val_acc %.4f", epoch, epochs, train_loss, val_acc)
        PROGRESS["epoch"] = epoch
        if select == "last":
            best = Running(epoch, val_acc, _state_copy(model), epoch)
        elif best.offer(epoch, val_acc):
            best.payload = _state_copy(model)
        if ckpt is not None and (epoch == epochs or time.perf_counter() - last_save >= ctx.checkpoint_every_s):
            state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "best_state": best.payload, "best_acc": best.score,
                     "best_epoch": best.candidate, "history": history, "rng": torch.get_rng_state(),
                     "train_time_s": spent + time.perf_counter() - t0}
            if ctx.cuda:
                state["cuda_rng"] = torch.cuda.get_rng_state()
            if after_step is not None:
                state["after_step"] = after_step.state_dict()
            try:
                with atomic_path(ckpt) as tmp:
                    torch.save(state, tmp)
                last_save, PROGRESS["saved"] = time.perf_counter(), epoch
            except Exception as exc:  # never fail a run for its checkpoint
                log.warning("cannot save %s (%s); continuing without checkpoints", ckpt, exc)
                ckpt = None
    model.load_state_dict(best.payload)
    model.eval()
    return FitResult(best.candidate, best.score, history, spent + time.perf_counter() - t0, opt, n_val=len(val))


@torch.no_grad()
def predict(model: nn.Module, split: Split, ctx: RunContext, fn: Callable | None = None) -> torch.Tensor:
    """Stack `fn(model, x)` (default: logits) over a split, in order, as float32 on the CPU."""
    return torch.cat(batch_outputs(model, split, ctx, ctx.eval_batch_size, fn or (lambda m, x: m(x)), split.name))


def accuracy_on(model: nn.Module, split: Split, ctx: RunContext) -> float:
    """Accuracy on `split`, scored as the evaluation scores it (`rftbench.data.base.scored_logits`:
    ImageNet-R/A's class mask, ObjectNet's pooled classes)."""
    logits = scored_logits(predict(model, split, ctx), split)
    return (logits.argmax(1) == split.labels).float().mean().item()


def mean_accuracy(model: nn.Module, splits: Sequence[Split], ctx: RunContext) -> float:
    """The unweighted mean of `accuracy_on` over `splits` (e.g. a suite's `ood_val` splits)."""
    return sum(accuracy_on(model, s, ctx) for s in splits) / len(splits)


def extract_features(model: nn.Module, split: Split, ctx: RunContext) -> torch.Tensor:
    """Pooled features `model.features(x)` of a whole split (no augmentation) of a frozen backbone,
    through the run's feature store (`rftbench.features`: computed once, shared by runs)."""
    return ctx.store.features(model, split, ctx)


@dataclass
class ProbeResult:
    head: nn.Linear
    val_acc: float
    best_epoch: int


def fit_probes(train_feats: torch.Tensor, train_y: torch.Tensor, val_feats: torch.Tensor,
               val_y: torch.Tensor, num_classes: int, *, init: nn.Linear | None = None, lr: float = 1e-3,
               epochs: int = 20, batch_size: int = 32, warmup_epochs: int = 1, decay_epoch: int = 10,
               weight_decay: float = 0.0, seed: int = 0) -> list[ProbeResult]:
    """K linear probes trained at once, one per feature set: `train_feats` (K, N, D) and `val_feats`
    (K, Nv, D) share the labels. The CT paper's recipe: Adam, `warmup_epochs` of linear warm-up, lr
    x0.1 after `decay_epoch`, best epoch by val accuracy (`rftbench.selection`, ties -> the earlier
    epoch), every probe starting from `init` (default: a fresh nn.Linear) and seeing the same batches.

    The heads are stacked (K, C, D) and trained by one optimizer; the loss is the sum of the K
    probes' mean cross-entropies, so each probe's gradient, Adam update and chosen epoch are those
    of training it alone (`fit_probe` is this with K = 1). Runs on the features' device."""
    if train_feats.dim() != 3 or val_feats.dim() != 3 or len(train_feats) != len(val_feats):
        raise ValueError("fit_probes needs (K, N, D) train and val features with the same K")
    dev = train_feats.device
    k, n, d = train_feats.shape
    head = copy.deepcopy(init) if init is not None else nn.Linear(d, num_classes)
    head = head.to(dev).float()
    weight = head.weight.detach().expand(k, -1, -1).clone().requires_grad_(True)   # (K, C, D)
    bias = head.bias.detach().expand(k, -1).clone().requires_grad_(True)            # (K, C)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    steps = math.ceil(n / batch_size)
    sched = make_scheduler(opt, {"name": "step", "warmup_epochs": warmup_epochs,
                                 "milestones": [decay_epoch], "gamma": 0.1}, epochs, steps)
    gen = torch.Generator().manual_seed(seed)
    best = [Running() for _ in range(k)]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = torch.baddbmm(bias.unsqueeze(1), train_feats[:, idx], weight.transpose(1, 2))
            loss = F.cross_entropy(logits.reshape(-1, num_classes), train_y[idx].repeat(k),
                                   reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            pred = torch.baddbmm(bias.unsqueeze(1), val_feats, weight.transpose(1, 2)).argmax(2)
            accs = (pred == val_y).float().mean(1).tolist()
        for j, acc in enumerate(accs):
            if best[j].offer(epoch, acc):
                best[j].payload = (weight[j].detach().clone(), bias[j].detach().clone())
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError("linear probe loss is not finite; lower probe.lr")
    out = []
    for b in best:
        h = copy.deepcopy(head)
        with torch.no_grad():
            h.weight.copy_(b.payload[0])
            h.bias.copy_(b.payload[1])
        check_probe(h, val_feats[len(out)], val_y, num_classes)
        out.append(ProbeResult(h.eval().requires_grad_(True), b.score, b.candidate))
    return out


def fit_probe(train_feats: torch.Tensor, train_y: torch.Tensor, val_feats: torch.Tensor,
              val_y: torch.Tensor, num_classes: int, **recipe) -> ProbeResult:
    """One linear probe on cached (N, D) features: `fit_probes` with K = 1 (same keywords)."""
    return fit_probes(train_feats.unsqueeze(0), train_y, val_feats.unsqueeze(0), val_y, num_classes, **recipe)[0]
