"""Sweeps: resumable multiruns through the launchers, concurrent writers, the run lock, per-epoch
checkpoints of a requeued run, hyper-parameter draws, GPU slots and the SLURM preset."""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from rftbench import sweep
from rftbench.data.base import Split
from rftbench.leaderboard import build
from rftbench.plan import plan, report
from rftbench.results import CHECKPOINTS, RunBusy, RunFolder, RunLock, _start_time
from rftbench.run import CONFIG_DIR, execute, run_folder, run_id
from rftbench.train import PROGRESS, RunContext, fit

TIMING = ("adapt_time_s", "eval_time_s", "eval_images_per_s")


def sweep_cmd(runs: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rftbench.run", "-m", "experiment=tiny", "device=cpu", f"paths.runs={runs}",
            *overrides]


def env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


def done_runs(runs: Path) -> dict[str, int]:
    """run folder -> mtime of its metrics.csv, for the finished runs under `runs`."""
    return {str(p.parent): (p.parent / "metrics.csv").stat().st_mtime_ns for p in runs.glob("*/*/*/*/done")}


def summary_counts(out: str) -> dict[str, int]:
    line = re.search(r"sweep summary: (\d+) jobs: (.*)", out)
    assert line, out[-3000:]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", line.group(2))} | {"jobs": int(line.group(1))}


def comparable(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard without its wall-clock columns."""
    keep = [c for c in board.columns if "time_s" not in c and "per_s" not in c]
    return board[keep].reset_index(drop=True)


def no_leftovers(runs: Path) -> None:
    assert not [p for p in runs.rglob(".lock*")], "a lock file was left behind"
    assert not [p for p in runs.glob("*/*/*/*/.*.tmp")], "a temp file was left behind"


def in_progress(runs: Path) -> list[Path]:
    return [p.parent for p in runs.glob("*/*/*/*/config.yaml") if not (p.parent / "done").exists()]


def test_killed_sweep_resumes_and_matches_an_uninterrupted_sweep(make_cfg, tmp_path):
    execute(make_cfg("method=zeroshot", runs=tmp_path / "warm"))  # warm the artifact cache
    runs, ref = tmp_path / "runs", tmp_path / "ref"
    grid = ["method=zeroshot", "seed=0,1,2"]
    joblib = ["launcher=joblib", "hydra.launcher.n_jobs=1"]  # jobs one after another in a worker

    proc = subprocess.Popen(sweep_cmd(runs, *joblib, *grid), env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline and not (done_runs(runs) and in_progress(runs)):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep, mid-run: launcher and joblib worker
    proc.wait()
    first, half = done_runs(runs), in_progress(runs)
    assert 1 <= len(first) < 3 and half, "the sweep should have been killed during a run"

    table = plan(["experiment=tiny", "device=cpu", f"paths.runs={runs}", *joblib, *grid])
    print(report(table))  # the plan of the partly finished sweep
    assert set(table[table["status"] == "done"]["folder"]) == set(first)
    assert set(table[table["status"] == "incomplete"]["folder"]) == {str(p) for p in half}
    assert len(build(runs)) == 1 and build(runs).loc[0, "n_seeds"] == len(first)  # half-written: not counted

    again = subprocess.run(sweep_cmd(runs, *joblib, *grid), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert summary_counts(again.stdout) == {"jobs": 3, "done": 3 - len(first), "skipped": len(first), "failed": 0}
    second = done_runs(runs)
    assert len(second) == 3
    assert all(second[f] == stamp for f, stamp in first.items()), "a finished run was recomputed"

    uninterrupted = subprocess.run(sweep_cmd(ref, *grid), env=env(), capture_output=True, text=True, timeout=600)
    assert summary_counts(uninterrupted.stdout) == {"jobs": 3, "done": 3, "skipped": 0, "failed": 0}
    pd.testing.assert_frame_equal(comparable(build(runs)), comparable(build(ref)))
    no_leftovers(runs)
    # one offline W&B run per finished run, in one folder per sweep (the killed one and the resumed one)
    per_sweep = {d.name: len(list(d.glob("wandb/offline-run-*/run-*.wandb"))) for d in (runs / ".wandb").iterdir()}
    assert sorted(per_sweep.values()) == sorted([len(first), 3 - len(first)])


def test_concurrent_sweeps_compute_each_run_once_and_failures_do_not_stop_them(make_cfg, tmp_path):
    """A submitit_local sweep (its job processes run at once) and a basic-launcher sweep over the
    same runs in the opposite order, with failing jobs, share one runs folder."""
    runs = tmp_path / "runs"
    warm = make_cfg("method=zeroshot", runs=tmp_path / "warm")
    execute(warm)
    head = warm.suite.head_init  # the default again (same runs) and an invalid value (fails at once)
    off = "tracking.enabled=false"
    cmds = [sweep_cmd(runs, "launcher=submitit_local", "method=zeroshot", "seed=0,1", off),
            sweep_cmd(runs, "method=zeroshot", "seed=1,0", f"suite.head_init={head},bogus", off)]
    procs = [subprocess.Popen(c, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    logs = outs[0] + "".join(p.read_text() for p in runs.glob(".hydra/multirun/*/.submitit/*/*_log.*")) + outs[1]
    computed = re.findall(r"\bdone ([0-9a-f]{16}) ->", logs)
    assert len(computed) == 2 and len(set(computed)) == 2, "each run computed exactly once"
    local, basic = summary_counts(outs[0]), summary_counts(outs[1])
    assert procs[0].returncode == 0 and local["jobs"] == 2 and local["failed"] == 0
    assert local["done"] + local["skipped"] + local.get("busy", 0) == 2
    assert procs[1].returncode == 1 and basic["jobs"] == 4 and basic["failed"] == 2  # recorded, sweep went on
    assert basic["done"] + basic["skipped"] + basic.get("busy", 0) == 2
    assert local["done"] + basic["done"] >= 2  # `done`: finished during the sweep, by it or the other one
    assert len(list(runs.glob("*/*/*/*/error.txt"))) == 2
    folders = sorted(runs.glob("*/*/*/*/done"))
    assert len(folders) == 2
    reference = pd.read_csv(run_folder(warm).path / "metrics.csv")
    for done in folders:  # complete, uncorrupted metrics
        m = pd.read_csv(done.parent / "metrics.csv")
        assert list(m[["split", "metric"]].itertuples(index=False)) == list(
            reference[["split", "metric"]].itertuples(index=False))
        assert m["value"].notna().all()
    seed0 = pd.read_csv(run_folder(make_cfg("method=zeroshot", runs=runs)).path / "metrics.csv")
    keep = ~seed0["metric"].isin(TIMING)
    pd.testing.assert_frame_equal(seed0[keep].reset_index(drop=True), reference[keep].reset_index(drop=True))
    no_leftovers(runs)


@pytest.mark.slow
def test_submitit_local_sweep_killed_mid_training_continues_from_checkpoints(make_cfg, tmp_path):
    """The SLURM story on one machine: ft runs are killed mid-training, the rerun skips the finished
    runs and continues the ft runs from their last epoch; results equal an uninterrupted sweep."""
    import shutil

    execute(make_cfg("method=zeroshot", runs=tmp_path / "warm"))
    fresh_cache = tmp_path / "cache2"  # the reference trains ft itself (no shared cached model)
    shutil.copytree(os.environ["RFTBENCH_CACHE"], fresh_cache, ignore=shutil.ignore_patterns("models"))
    runs, ref = tmp_path / "runs", tmp_path / "ref"
    overrides = ["launcher=submitit_local", "method=zeroshot,ft", "seed=0,1", "budget.epochs=8"]
    proc = subprocess.Popen(sweep_cmd(runs, *overrides), env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if len(done_runs(runs)) >= 2 and list(runs.glob(f"*/*/ft/*/{CHECKPOINTS}/*.pt")):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = done_runs(runs)
    assert all("/zeroshot/" in f for f in first) and len(first) == 2
    again = subprocess.run(sweep_cmd(runs, *overrides), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and summary_counts(again.stdout) == {"jobs": 4, "done": 2, "skipped": 2, "failed": 0}
    logs = "".join(p.read_text() for p in runs.glob(".hydra/multirun/*/.submitit/*/*_log.*"))
    assert "resumed from fit1-" in logs
    assert not list(runs.glob(f"*/*/*/*/{CHECKPOINTS}"))
    e = {**env(), "RFTBENCH_CACHE": str(fresh_cache)}
    subprocess.run(sweep_cmd(ref, *overrides), env=e, check=True, capture_output=True, timeout=600)
    pd.testing.assert_frame_equal(comparable(build(runs)), comparable(build(ref)))


def test_summary_outcomes_and_exit_rule():
    """The summary's arithmetic: outcome from the status before and after, exit code rule."""
    assert [sweep.outcome(b, a) for b, a in [("done", "done"), ("pending", "done"), ("failed", "done"),
                                              ("pending", "failed"), ("incomplete", "running"),
                                              ("pending", "pending"), ("incomplete", "incomplete")]] == [
        "skipped", "done", "done", "failed", "busy", "incomplete", "incomplete"]
    jobs = [{"folder": f"r/{i}", "outcome": o} for i, o in enumerate(["done", "skipped", "busy"])]
    s = sweep.Summary(jobs)
    assert s.ok and s.text().startswith("sweep summary: 3 jobs: 1 done, 1 skipped, 0 failed, 1 busy")
    s = sweep.Summary(jobs + [{"folder": "r/9", "outcome": "failed", "error": "ValueError: x"}])
    assert not s.ok and "failed     r/9  ValueError: x" in s.text()
    assert not sweep.Summary([{"folder": "r/8", "outcome": "incomplete"}]).ok


# --- the run lock ----------------------------------------------------------------------------

def _foreign_lock(folder: RunFolder, **owner) -> None:
    import json

    folder.path.mkdir(parents=True, exist_ok=True)
    (folder.path / ".lock").write_text(json.dumps({"token": "someone-else", **owner}))


def test_lock_of_a_live_process_blocks_and_of_a_dead_one_is_taken_over(tmp_path):
    import socket

    from rftbench.run import run_id_of

    r1 = run_id_of({"x": 1})  # a complete run: its config.yaml re-derives its id
    folder = RunFolder(tmp_path, "s", "b", "m", r1)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _foreign_lock(folder, host=socket.gethostname(), pid=holder.pid, started=_start_time(holder.pid))
        with pytest.raises(RunBusy, match=f"pid {holder.pid}"):
            folder.start()
        assert folder.status == "running" and not (folder.path / "error.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    folder.start()  # the owner died: stale
    assert folder.lock.owner()["token"] == folder.lock.token
    folder.write_text("config.yaml", "x: 1\n")
    folder.write_metrics([{"split": "test", "metric": "acc", "value": 0.5}], 0)
    folder.finish()
    assert folder.status == "done" and not (folder.path / ".lock").exists()
    with pytest.raises(RunBusy, match="finished by another process"):
        RunFolder(tmp_path, "s", "b", "m", r1).start()


def test_lock_from_another_host_is_stale_only_without_heartbeat_or_for_the_same_slurm_job(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path, "s", "b", "m", "r2")
    _foreign_lock(folder, host="elsewhere", pid=1, job="77")
    with pytest.raises(RunBusy):
        folder.start()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a requeued attempt of the same SLURM job
    folder.start()
    folder.fail(RuntimeError("x"))
    monkeypatch.delenv("SLURM_JOB_ID")
    _foreign_lock(folder, host="elsewhere", pid=1, job="12")
    old = time.time() - RunLock.stale_s - 5
    os.utime(folder.path / ".lock", (old, old))  # its owner stopped refreshing it: lost node
    folder.start()
    folder.finish()


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "heartbeat_s", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()
    assert not lock.path.exists()


# --- per-epoch checkpoints: a requeued run continues ------------------------------------------

class Interrupted(Exception):
    pass


def _data(n: int, seed: int, role: str) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return Split(name=role, role=role, x=x, y=(x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _fit(model, ctx, calls: list, stop_at: int | None = None, key: str | None = "demo"):
    def loss(out, y):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise Interrupted
        return nn.functional.cross_entropy(out, y)

    torch.manual_seed(1)
    return fit(model, _data(40, 1, "train"), _data(24, 2, "val"), ctx, epochs=4, batch_size=8, loss_fn=loss,
               optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
               scheduler={"name": "cosine"}, checkpoint_key=key)


def test_interrupted_fit_continues_from_its_last_epoch_with_identical_results(tmp_path):
    ref = _model()
    ref_res = _fit(ref, RunContext(), [])
    ref_next = torch.rand(3)  # the global RNG after the fit (dropout draws included)
    assert not list(tmp_path.iterdir())

    with pytest.raises(Interrupted):  # killed during epoch 3 (5 steps per epoch)
        _fit(_model(), RunContext(run_dir=tmp_path), [], stop_at=12)
    assert len(list((tmp_path / CHECKPOINTS).glob("demo-*.pt"))) == 1
    _fit(_model(), RunContext(run_dir=tmp_path / "none"), [], key=None)  # no key: no checkpoints
    assert not (tmp_path / "none").exists()

    calls = []
    model = _model()
    res = _fit(model, RunContext(run_dir=tmp_path), calls)  # the requeued attempt
    assert torch.equal(torch.rand(3), ref_next)
    assert len(calls) == 10  # epochs 3 and 4 only
    assert res.history == ref_res.history and res.best_epoch == ref_res.best_epoch
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k

    calls = []
    again = _model()
    _fit(again, RunContext(run_dir=tmp_path), calls)  # a finished fit is restored, not retrained
    assert calls == [] and torch.equal(torch.rand(3), ref_next)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))


def test_checkpoint_every_s_throttles_epoch_checkpoints_and_resume_stays_exact(tmp_path, monkeypatch):
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: (saved.append(obj["epoch"]), real_save(obj, f, **kw)))
    ref = _model()
    _fit(ref, RunContext(), [])
    ticks = iter(range(10_000))  # fit's clock: each reading 1 s after the previous one
    monkeypatch.setattr("rftbench.train.time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    with pytest.raises(Interrupted):  # killed during epoch 4
        _fit(_model(), RunContext(run_dir=tmp_path, checkpoint_every_s=2.5), [], stop_at=17)
    assert saved == [3]  # not after epochs 1 and 2 (too soon), after 3; never the unfinished 4
    assert PROGRESS["epoch"] == 3 and PROGRESS["saved"] == 3
    saved.clear()
    calls, model = [], _model()
    _fit(model, RunContext(run_dir=tmp_path, checkpoint_every_s=1e9), calls)
    assert saved == [4] and len(calls) == 5  # resumed after epoch 3; the last epoch is always saved
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_the_interrupt_line_says_which_epoch_a_rerun_resumes_from(monkeypatch):
    from rftbench.run import interrupted_line

    monkeypatch.setitem(PROGRESS, "epochs", 30)
    monkeypatch.setitem(PROGRESS, "epoch", 7)
    monkeypatch.setitem(PROGRESS, "saved", 7)
    assert interrupted_line() == "interrupted after epoch 7/30; rerun the same command to resume"
    monkeypatch.setitem(PROGRESS, "saved", 5)
    assert interrupted_line() == ("interrupted after epoch 7/30 (its checkpoint holds epoch 5: checkpoint_every_s); "
                                  "rerun the same command to resume")


def test_checkpoints_survive_interrupts_and_failures_and_go_when_the_run_finishes(tmp_path):
    folder = RunFolder(tmp_path, "s", "b", "m", "r")
    folder.start()
    (folder.path / CHECKPOINTS).mkdir()
    (folder.path / CHECKPOINTS / "fit1-x.pt").write_text("x")
    folder.lock.release()  # killed: the next attempt keeps the checkpoints
    folder.start()
    assert (folder.path / CHECKPOINTS / "fit1-x.pt").exists()
    folder.fail(RuntimeError("boom"))  # failed (e.g. after training): the next attempt continues too
    folder.start()
    assert (folder.path / CHECKPOINTS / "fit1-x.pt").exists() and not (folder.path / "error.txt").exists()
    folder.finish()
    assert not (folder.path / CHECKPOINTS).exists()


# --- hyper-parameter seeds, GPU slots, launcher presets ---------------------------------------

LR = "method.finetune.optimizer.lr"
SPACE = f"hp_search=[{{key:{LR},log_uniform:[1e-4,1e-1]}},{{key:budget.batch_size,choice:[8,16,32]}}," \
        f"{{key:budget.epochs,int_uniform:[1,3]}}]"


def test_hp_seed_draws_independently_of_the_trial_seed(make_cfg):
    base = make_cfg("method=ft", SPACE)
    assert sweep.sample_hparams(base) is base  # hp_seed=0: the configured values
    draws = {}
    for hp in (1, 2):
        for seed in (0, 1):
            cfg = sweep.sample_hparams(make_cfg("method=ft", SPACE, f"hp_seed={hp}", f"seed={seed}"))
            draws[hp, seed] = (cfg.method.finetune.optimizer.lr, cfg.budget.batch_size, cfg.budget.epochs)
            assert cfg.method.adapt.recipe.optimizer.lr == cfg.method.finetune.optimizer.lr  # interpolations follow
    assert draws[1, 0] == draws[1, 1] and draws[2, 0] == draws[2, 1] and draws[1, 0] != draws[2, 0]
    lr, bs, ep = draws[1, 0]
    assert 1e-4 <= lr <= 1e-1 and bs in (8, 16, 32) and ep in (1, 2, 3) and isinstance(ep, int)
    a, b = (sweep.sample_hparams(make_cfg("method=ft", SPACE, f"hp_seed={h}")) for h in (1, 2))
    assert run_id(a) != run_id(b) and run_id(a) == run_id(sweep.sample_hparams(make_cfg("method=ft", SPACE, "hp_seed=1")))


def test_log_uniform_draws_are_uniform_in_log_space():
    rng = np.random.default_rng(0)
    x = np.log10([sweep.draw("log_uniform", [1e-4, 1e-1], rng) for _ in range(4000)])
    assert x.min() >= -4 and x.max() <= -1
    assert abs(x.mean() + 2.5) < 0.03 and abs(np.mean(x < -3) - 1 / 3) < 0.03
    counts = np.bincount([sweep.draw("int_uniform", [1, 3], rng) for _ in range(3000)], minlength=4)[1:]
    assert counts.min() > 900


def test_bad_hp_search_is_one_clear_error(make_cfg):
    with pytest.raises(ValueError, match="hp_search, which are empty"):
        sweep.sample_hparams(make_cfg("hp_seed=1", "~method.search"))
    assert sweep.sample_hparams(make_cfg("hp_seed=1", "method=zeroshot")).method.adapt  # search: [] -> defaults
    with pytest.raises(ValueError, match="not in the config"):
        sweep.sample_hparams(make_cfg("hp_seed=1", "hp_search=[{key:method.nope,uniform:[0,1]}]"))


def test_gpu_slots_are_exclusive_per_machine(tmp_path, make_cfg):
    k0, h0 = sweep.claim_slot(2, tmp_path)
    k1, h1 = sweep.claim_slot(2, tmp_path)
    assert {k0, k1} == {0, 1}
    h0.close()
    k2, h2 = sweep.claim_slot(2, tmp_path, poll_s=0.01)
    assert k2 == k0
    h1.close(), h2.close()
    cfg = make_cfg("launcher=joblib")
    with sweep.device_slot(cfg) as job:  # no GPUs here: unchanged
        assert job is cfg


def test_launcher_presets_compose_and_slurm_preset_makes_the_sbatch_script(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    targets = {}
    for name in ("basic", "joblib", "submitit_local", "submitit_slurm"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"launcher={name}", "hydra.launcher.partition=gpu",
                                               "hydra.launcher.gpus_per_node=1"]
                          if name == "submitit_slurm" else [f"launcher={name}"], return_hydra_config=True)
        targets[name] = cfg.hydra.launcher._target_.rsplit(".", 1)[1]
        assert cfg.launcher.name == name
    assert targets == {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_local": "LocalLauncher",
                       "submitit_slurm": "SlurmLauncher"}

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit only checks that srun exists
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    params = OmegaConf.to_container(cfg.hydra.launcher)  # as the Hydra plugin passes them on
    for key in ("_target_", "name", "submitit_folder"):
        params.pop(key)
    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = _make_sbatch_string(command="python job.py", folder=tmp_path / "sub", map_count=100,
                                 **executor._executor.parameters)
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=240", "--array=0-99%64", "--requeue",
                 "--cpus-per-task=8", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, line
    assert executor._executor.max_num_timeout == 10


def test_draws_of_a_method_without_search_space_are_not_run_again(make_cfg, tmp_path, capsys):
    """zeroshot has `search: []`: its hp_seed > 0 draws are hp_seed=0's run; the sweep skips them
    (no identical copies under other run ids) and the plan marks them `repeat`."""
    from rftbench import plan

    runs = tmp_path / "runs"
    assert sweep.repeats_defaults(make_cfg("method=zeroshot", "hp_seed=2"))
    assert not sweep.repeats_defaults(make_cfg("method=zeroshot", "hp_seed=0"))
    assert not sweep.repeats_defaults(make_cfg("method=lp", "hp_seed=2"))
    assert sweep.run_task(make_cfg("method=zeroshot", "hp_seed=1", f"paths.runs={runs}"),
                          lambda cfg: pytest.fail("ran a repeat")) == "skipped"
    table = plan.plan(["experiment=tiny", "method=zeroshot,lp", "hp_seed=0,1", f"paths.runs={runs}",
                       "device=cpu"])
    status = dict(zip(zip(table["method"], table["overrides"].str.contains("hp_seed=1")), table["status"]))
    assert status[("zeroshot", True)] == "repeat" and status[("zeroshot", False)] == "pending"
    assert status[("lp", True)] == "pending"
    assert "the sweep skips it" in plan.report(table)
