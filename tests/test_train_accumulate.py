"""Gradient accumulation in `rftbench.train.fit` (`budget.accumulate`) and step-based warm-up in
`make_scheduler` (`warmup_steps`).

`batch_size` stays the effective batch: accumulate=k only splits each batch into k micro-batches.
Without BatchNorm in train mode the weights agree with one big batch to float rounding (measured
~1e-7 of the largest weight; not bit-identical: the sums run in another order), and accumulate=1
is the plain loop. With BatchNorm in train mode the statistics are per micro-batch (docs/protocol.md).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from rftbench.data.base import Split
from rftbench.identity import run_id
from rftbench.results import CHECKPOINTS
from rftbench.train import NonFiniteLossError, RunContext, accumulate_gradients, fit, make_scheduler
from rftbench.validate import ConfigError, validate_config

# |w(accumulate=k) - w(accumulate=1)| <= TOL * max |w| after a few epochs (measured: <= 1.7e-7)
TOL = 2e-6


def _data(n: int, seed: int, role: str, shape=(3, 4, 4)) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1).mean(1) > 0).long() + (x.flatten(1)[:, 0] > 1).long()
    return Split(name=role, role=role, x=x, y=y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class CountSteps:
    """An `after_step` hook counting optimizer steps (resumable)."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, model: nn.Module) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2)


def _train(make, accumulate: int, *, n: int = 75, batch_size: int = 16, optimizer=SGD, **kw):
    model, hook = make(), CountSteps()
    torch.manual_seed(1)
    res = fit(model, _data(n, 1, "train"), _data(24, 2, "val"), RunContext(), optimizer=optimizer, epochs=3,
              batch_size=batch_size, scheduler={"name": "cosine", "warmup_steps": 2}, checkpoint_key=None,
              select="last", after_step=hook, accumulate=accumulate, **kw)
    return model, res, hook


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().flatten().float() for v in model.state_dict().values()])


# --- equivalence with one big batch -------------------------------------------------------------

@pytest.mark.parametrize("make,optimizer", [(_linear, SGD), (_mlp, SGD), (_mlp, ADAMW)])
def test_accumulation_matches_one_big_batch_to_float_rounding(make, optimizer):
    # 75 images, batch 16: 5 steps per epoch, the last batch of 11 (micro-batches 6, 5 / 4, 4, 3)
    ref, ref_res, ref_hook = _train(make, 1, optimizer=optimizer)
    w_ref = _flat(ref)
    for k in (2, 4):
        model, res, hook = _train(make, k, optimizer=optimizer)
        w = _flat(model)
        assert hook.steps == ref_hook.steps == 15  # optimizer steps: those of the big batch
        assert [h["lr"] for h in res.history] == [h["lr"] for h in ref_res.history]
        assert (w - w_ref).abs().max() <= TOL * w_ref.abs().max()
        for h, r in zip(res.history, ref_res.history):
            assert h["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
            assert h["val_acc"] == r["val_acc"]


def test_accumulate_1_is_the_plain_loop():
    """accumulate=1 is one forward/backward per batch: bit-identical to a hand-written loop."""
    model, hook = _linear(), CountSteps()
    train = _data(40, 1, "train")
    fit(model, train, _data(8, 2, "val"), RunContext(), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        epochs=1, batch_size=16, checkpoint_key=None, after_step=hook)
    ref = _linear()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0 * 100_003 + 1))  # fit's epoch-1 order
    for start in range(0, 40, 16):
        idx = order[start:start + 16]
        opt.zero_grad()
        nn.functional.cross_entropy(ref(train.x[idx]), train.y[idx]).backward()
        opt.step()
    assert hook.steps == 3
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch,batch_size,accumulate,sizes", [
    (16, 16, 4, [4, 4, 4, 4]), (10, 10, 4, [3, 3, 2, 2]), (16, 16, 16, [1] * 16),
    # an epoch's shorter last batch: the fewest micro-batches within a full batch's micro-batch size
    (11, 16, 4, [4, 4, 3]), (11, 16, 2, [6, 5]), (2, 16, 2, [2]), (3, 16, 8, [2, 1]),
])
def test_micro_batches_are_weighted_by_their_size(batch, batch_size, accumulate, sizes):
    """The summed gradient is the batch's mean-loss gradient, also for micro-batches of unequal size;
    the returned loss is the batch's."""
    model = _mlp()
    xb, yb = _data(batch, 3, "train").x, _data(batch, 3, "train").y
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seen = []

    def forward(m, x):
        seen.append(len(x))
        return m(x)

    got = accumulate_gradients(model, xb, yb, RunContext(), forward=forward, loss_fn=nn.functional.cross_entropy,
                               batch_size=batch_size, accumulate=accumulate)
    assert seen == sizes
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    for g, p in zip(full, model.parameters()):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


def test_batchnorm_in_train_mode_differs_and_bn_eval_does_not():
    """With BatchNorm in train mode each micro-batch is normalised by its own statistics: a
    different training (as in every accumulation scheme); with bn_eval=True it is rounding only."""
    def run(accumulate: int, **kw) -> torch.Tensor:
        model = _bn_net()
        torch.manual_seed(1)
        fit(model, _data(48, 1, "train", (3, 6, 6)), _data(8, 2, "val", (3, 6, 6)), RunContext(),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1), epochs=2, batch_size=16, checkpoint_key=None,
            select="last", accumulate=accumulate, **kw)
        return _flat(model)

    ref, per_micro_batch = run(1), run(4)
    assert (per_micro_batch - ref).abs().max() > 1e-3 * ref.abs().max()
    ref, frozen = run(1, bn_eval=True), run(4, bn_eval=True)
    assert (frozen - ref).abs().max() <= TOL * ref.abs().max()


# --- validation, faults and resume --------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 17, 1.5, True, "2"])
def test_accumulate_must_be_an_integer_from_1_to_the_batch_size(bad):
    with pytest.raises(ValueError, match=r"budget\.accumulate must be an integer from 1 to the batch size "
                                         r"\(budget\.batch_size = 16\)"):
        _train(_linear, bad)


def test_config_validation_rejects_accumulate_below_1(make_cfg):
    with pytest.raises(ConfigError, match=r"budget\.accumulate must be an integer >= 1, got 0"):
        validate_config(make_cfg("budget.accumulate=0"))


def test_non_finite_loss_is_caught_in_any_micro_batch():
    def loss(out, y):
        value = nn.functional.cross_entropy(out, y)
        return value * math.nan if len(y) == 3 else value  # only the last micro-batch of the last batch

    with pytest.raises(NonFiniteLossError, match="training loss is nan at epoch 1"):
        _train(_linear, 4, loss_fn=loss)


class Interrupted(Exception):
    pass


def _resumable(run_dir, accumulate: int, calls: list, stop_at: int | None = None):
    def loss(out, y):
        calls.append(len(y))
        if len(calls) == stop_at:
            raise Interrupted
        return nn.functional.cross_entropy(out, y)

    model, hook = _mlp(), CountSteps()
    torch.manual_seed(1)
    res = fit(model, _data(40, 1, "train"), _data(24, 2, "val"), RunContext(run_dir=run_dir), optimizer=SGD,
              epochs=4, batch_size=8, loss_fn=loss, scheduler={"name": "cosine", "warmup_steps": 3},
              checkpoint_key="demo", after_step=hook, accumulate=accumulate)
    return model, res, hook


def test_resume_with_accumulation_equals_the_uninterrupted_run(tmp_path):
    ref, ref_res, ref_hook = _resumable(None, 2, [])
    with pytest.raises(Interrupted):  # killed in epoch 3: 5 steps x 2 micro-batches per epoch
        _resumable(tmp_path, 2, [], stop_at=25)
    assert len(list((tmp_path / CHECKPOINTS).glob("demo-*.pt"))) == 1
    calls = []
    model, res, hook = _resumable(tmp_path, 2, calls)
    assert calls == [4] * 20  # epochs 3 and 4 only, in micro-batches of 4
    assert hook.steps == ref_hook.steps == 20
    assert res.history == ref_res.history and res.best_epoch == ref_res.best_epoch
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


# --- configs and run identity -------------------------------------------------------------------

def test_method_ft_reads_the_runs_accumulate_and_trains_batchnorm(make_cfg, monkeypatch, tmp_path):
    """method=ft's configured adapt (recipe -> model cache -> finetune -> fit) with accumulate=2 on
    the run's context, on a BatchNorm network: 50 images in batches of 16, so the last batch of 2
    stays one micro-batch (BatchNorm in train mode cannot normalise a single image)."""
    from hydra.utils import instantiate

    from rftbench import train
    from rftbench.data.base import Suite
    from rftbench.methods import ft

    seen = []
    real = train.micro_batches
    monkeypatch.setattr(train, "micro_batches", lambda n, b, k: seen.append(k) or real(n, b, k))
    cfg = make_cfg("method=ft")
    suite = Suite("toy", 3, {"train": _data(50, 1, "train", (3, 6, 6)), "val": _data(8, 2, "val", (3, 6, 6))})
    adapted = instantiate(cfg.method.adapt)(_bn_net(), suite, RunContext(cache_dir=tmp_path, accumulate=2))
    assert set(seen) == {2} and cfg.budget.batch_size == 16 and adapted.info["best_epoch"] >= 1
    assert ft.fit is fit


def test_the_runner_passes_budget_accumulate_to_every_fit_of_the_run(make_cfg, monkeypatch):
    """The run's context carries budget.accumulate (fit's default), built before the data."""
    from rftbench import run

    seen = []

    def stop(cfg, ctx):
        seen.append(ctx.accumulate)
        raise RuntimeError("stop after the context")
    monkeypatch.setattr(run, "build_suite", stop)
    with pytest.raises(RuntimeError, match="stop after the context"):
        run.execute(make_cfg("method=ft", "budget.accumulate=4"))
    assert seen == [4]


def test_the_run_id_follows_the_effective_batch_not_the_split(make_cfg):
    """budget.accumulate is a memory knob (like threads): the same run id for any split of the same
    effective batch (budget.batch_size), another one for another batch size."""
    assert make_cfg().budget.accumulate == 1
    assert run_id(make_cfg("budget.accumulate=2")) == run_id(make_cfg())
    assert run_id(make_cfg("budget.batch_size=32")) != run_id(make_cfg())


# --- warm-up in optimizer steps -----------------------------------------------------------------

def _factors(cfg: dict, epochs: int, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg, epochs, steps_per_epoch)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_after_step_warm_up_is_the_standard_formula():
    # 10 steps, 6 of warm-up: (s + 1) / 6, then 0.5 (1 + cos(pi (s - 6) / 4))
    got = _factors({"name": "cosine", "warmup_steps": 6}, epochs=2, steps_per_epoch=5)
    want = [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 0.5 + 0.25 * math.sqrt(2), 0.5, 0.5 - 0.25 * math.sqrt(2)]
    assert got == pytest.approx(want, abs=1e-12)
    # WiSE-FT's cosine_lr (500 warm-up steps), at a few steps of a 2,000-step run
    long = _factors({"name": "cosine", "warmup_steps": 500}, epochs=4, steps_per_epoch=500)
    assert long[0] == pytest.approx(1 / 500) and long[499] == pytest.approx(1.0)
    assert long[500] == pytest.approx(1.0) and long[1250] == pytest.approx(0.5)
    assert long[1999] == pytest.approx(0.5 * (1 + math.cos(math.pi * 1499 / 1500)))


def test_warmup_steps_with_step_and_constant_schedules():
    assert _factors({"name": "constant", "warmup_steps": 4}, 1, 6) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    step = _factors({"name": "step", "warmup_steps": 2, "milestones": [1], "gamma": 0.1}, 2, 3)
    assert step == pytest.approx([0.5, 1.0, 1.0, 0.1, 0.1, 0.1])
    # warm-up of 0 steps: the plain schedule; warmup_epochs=1 of 5 steps is warmup_steps=5
    assert _factors({"name": "cosine", "warmup_steps": 0}, 1, 4) == _factors({"name": "cosine"}, 1, 4)
    assert _factors({"name": "cosine", "warmup_epochs": 1}, 3, 5) == \
        _factors({"name": "cosine", "warmup_epochs": None, "warmup_steps": 5}, 3, 5)


@pytest.mark.parametrize("cfg,match", [
    ({"name": "cosine", "warmup_epochs": 0, "warmup_steps": 500},
     r"give warmup_steps \(500\) or warmup_epochs \(0\), not both"),
    ({"name": "cosine", "warmup_steps": -1}, r"scheduler\.warmup_steps must be an integer >= 0, got -1"),
    ({"name": "cosine", "warmup_steps": 2.5}, r"scheduler\.warmup_steps must be an integer >= 0, got 2\.5"),
])
def test_bad_warm_up_is_an_error_naming_the_keys(cfg, match):
    with pytest.raises(ValueError, match=match):
        _factors(cfg, 1, 4)


def test_clip_grad_norm_rescales_each_steps_gradient_to_the_bound():
    """One SGD step (lr 1, no momentum) with clip_grad_norm=c moves the weights by exactly the
    gradient rescaled to norm c (when it is larger), over all trained parameters together."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5) * 10, torch.randint(0, 3, (16,))
    split = Split("train", "train", x=x, y=y)
    model = nn.Linear(5, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 0.5
    fit(model, split, split, RunContext(), optimizer=functools.partial(torch.optim.SGD, lr=1.0), epochs=1,
        batch_size=16, checkpoint_key=None, select="last", clip_grad_norm=0.5)
    moved = torch.sqrt(sum(((start[k] - v) ** 2).sum() for k, v in model.state_dict().items()))
    assert moved == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        fit(model, split, split, RunContext(), optimizer=functools.partial(torch.optim.SGD, lr=1.0), epochs=1,
            batch_size=16, checkpoint_key=None, clip_grad_norm=0.0)


@pytest.mark.parametrize("make", [_linear, _mlp])
def test_four_micro_batches_of_8_are_one_batch_of_32_to_1e_6(make):
    """The issue's check: one optimizer step of batch 32 as 4 x 8 accumulated equals the one-batch step
    (plain SGD, lr 1: the weight change is the gradient itself) to 1e-6, on a model without BatchNorm."""
    def step(accumulate: int) -> torch.Tensor:
        model = make()
        before = _flat(model)
        torch.manual_seed(1)
        fit(model, _data(32, 1, "train"), _data(8, 2, "val"), RunContext(),
            optimizer=functools.partial(torch.optim.SGD, lr=1.0), epochs=1, batch_size=32,
            checkpoint_key=None, select="last", accumulate=accumulate)
        return _flat(model) - before
    one, four = step(1), step(4)
    assert one.abs().max() > 1e-3  # the step did something
    assert (four - one).abs().max() <= 1e-6
