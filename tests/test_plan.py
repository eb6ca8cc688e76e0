"""The plan of a sweep: its jobs with the run ids the runner uses, their status and cost estimate."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from rftbench.plan import _duration, estimate, plan, report
from rftbench.results import RunFolder, _start_time
from rftbench.run import CONFIG_DIR, execute, run_folder


def folder_of(row) -> RunFolder:
    return RunFolder(Path(row.folder).parents[3], row.suite, row.backbone, row.method, row.run_id)


def finish(folder: RunFolder, seed: int, adapt_s: float, eval_s: float, cfg) -> None:
    folder.start()
    folder.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # re-derives the run id
    folder.write_metrics([{"split": "-", "metric": "adapt_time_s", "value": adapt_s},
                          {"split": "-", "metric": "eval_time_s", "value": eval_s},
                          {"split": "test", "metric": "acc", "value": 0.5}], seed)
    folder.finish()


def test_plan_of_a_partly_finished_sweep(make_cfg, tmp_path, capsys):
    runs = tmp_path / "runs"
    overrides = ["experiment=tiny", f"paths.runs={runs}", "method=zeroshot,lp", "seed=0,1,2"]
    table = plan(overrides)
    assert list(table["status"]) == ["pending"] * 6
    assert list(table["overrides"]) == [f"method={m} seed={s}" for m in ("zeroshot", "lp") for s in (0, 1, 2)]
    # the same run folders the runner uses for these overrides
    for row in table.itertuples():
        cfg = make_cfg(f"method={row.method}", f"seed={row.seed}", runs=runs)
        assert row.folder == str(run_folder(cfg).path)

    z0, z1, z2, l0, l1, l2 = (folder_of(r) for r in table.itertuples())
    finish(z0, 0, 10.0, 2.0, make_cfg("method=zeroshot", "seed=0", runs=runs))
    finish(z1, 1, 20.0, 4.0, make_cfg("method=zeroshot", "seed=1", runs=runs))
    z2.start()
    z2.fail(ValueError("bad head"))
    holder = subprocess.Popen(["sleep", "60"])  # a live process computing l0
    try:
        l0.path.mkdir(parents=True)
        (l0.path / "config.yaml").write_text("seed: 0\n")
        (l0.path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                   "started": _start_time(holder.pid), "token": "t"}))
        l1.path.mkdir(parents=True)  # killed: a folder without done, error or live lock
        (l1.path / "config.yaml").write_text("seed: 1\n")

        table = plan(overrides)
        text = report(table)
    finally:
        holder.kill()
        holder.wait()
    print(text)
    assert list(table["status"]) == ["done", "done", "failed", "running", "incomplete", "pending"]
    # done: measured; zeroshot: its finished runs; lp (none finished): the cost model on perf.json
    assert list(table["est_s"])[:3] == [12.0, 24.0, 18.0]
    assert list(table["basis"])[:3] == ["measured", "measured", "2 runs, same suite/backbone/method"]
    assert all(b.startswith("perf.json ") for b in table["basis"][3:]) and (table["est_s"][3:] < 18).all()
    # without perf.json the lp rows fall back to any finished runs
    bare = plan(overrides, perf=tmp_path / "none.json")
    assert list(bare["est_s"]) == [12.0, 24.0, 18.0, 18.0, 18.0, 18.0]
    assert list(bare["basis"])[3:] == ["2 runs, any (no measurement for digits_resnet on cpu)"] * 3
    assert table.loc[2, "error"] == "ValueError: bad head"
    assert text.startswith("sweep plan: 6 jobs: 2 done, 1 failed, 1 running, 1 incomplete, 1 pending")
    assert f"to run: 4 jobs, estimated {_duration(table['est_s'][2:].sum())} of compute" in text
    assert "images to compute: " in text and "(4 jobs)" in text  # the jobs to run: 3 lp, the failed zeroshot
    assert f"failed: {z2.path}: ValueError: bad head" in text


def test_estimates_prefer_the_closest_finished_runs():
    costs = pd.DataFrame({"run_id": list("abcd"), "suite": ["s", "s", "t", "t"], "backbone": ["b", "c", "b", "b"],
                          "method": ["ft", "ft", "ft", "lp"], "seconds": [10.0, 30.0, 50.0, 7.0]})
    assert estimate(costs, "s", "b", "ft") == (10.0, "1 runs, same suite/backbone/method")
    assert estimate(costs, "u", "b", "ft") == (30.0, "3 runs, same method")
    assert estimate(costs, "u", "b", "ct") == (24.25, "4 runs, any")
    assert estimate(costs.iloc[:0], "u", "b", "ct")[1] == "no finished runs"


def test_plan_with_experiment_sweep_params_and_hp_seeds(tmp_path):
    """The jobs of `experiment=bench` come from its hydra.sweeper.params; hp_seed draws apply."""
    params = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / "bench.yaml").read_text())["hydra"]["sweeper"]["params"]
    methods, seeds = str(params["method"]).split(","), [int(s) for s in str(params["seed"]).split(",")]
    table = plan(["experiment=bench", f"paths.runs={tmp_path}"])
    assert len(table) == len(methods) * len(seeds) and table["run_id"].nunique() == len(table)
    assert set(table["method"]) == set(methods) and sorted(table["seed"].unique()) == seeds
    space = "hp_search=[{key:method.finetune.optimizer.lr,log_uniform:[1e-4,1e-1]}]"
    t = plan([f"paths.runs={tmp_path}", "method=ft", space, "hp_seed=1,2", "seed=0,1"])
    assert t["run_id"].nunique() == 4


def test_runner_plan_flag_prints_the_plan(tmp_path, make_cfg):
    cfg = make_cfg("method=zeroshot", runs=tmp_path)
    execute(cfg)
    res = subprocess.run([sys.executable, "-m", "rftbench.run", "-m", "experiment=tiny", f"paths.runs={tmp_path}",
                          "method=zeroshot", "seed=0,1", "device=cpu", "--plan"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("sweep plan: 2 jobs: 1 done, 1 pending")
    assert str(run_folder(cfg).path) in res.stdout and "measured" in res.stdout
    runs = [p.name for p in tmp_path.glob("*/*/*/*") if not p.relative_to(tmp_path).parts[0].startswith(".")]
    assert sorted(runs) == [run_folder(cfg).run_id]  # nothing ran (hidden .wandb/.hydra folders aside)



def test_bench_tuned_gives_every_method_the_defaults_and_exactly_k_draws(tmp_path):
    from omegaconf import OmegaConf

    from rftbench.sweep import sample_hparams

    exp = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / "bench_tuned.yaml").read_text())
    k = exp["tune"]["draws"]
    params = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / "bench.yaml").read_text())["hydra"]["sweeper"]["params"]
    methods, seeds = str(params["method"]).split(","), str(params["seed"]).split(",")
    table = plan(["experiment=bench_tuned", "tune.draws=2", f"paths.runs={tmp_path}"])
    assert len(table) == len(methods) * len(seeds) * 3 and table["run_id"].nunique() == len(table)
    table["hp_seed"] = table["overrides"].str.extract(r"hp_seed=(\d+)")[0].astype(int)
    per = table.groupby(["method", "seed"])["hp_seed"].apply(sorted)
    assert all(v == [0, 1, 2] for v in per) and set(table["method"]) == set(methods)
    # the full sweep (K = 8: 9 x 19 x 3 jobs) is the same expression with tune.draws=8 (not planned here:
    # composing its 513 jobs takes minutes)
    assert k == 8 and "${tune.draws}" in exp["hydra"]["sweeper"]["params"]["hp_seed"]
    # every trained method has a search space; draws change its values, and not with the trial seed
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for m in methods:
            base = compose("config", overrides=["experiment=bench", f"method={m}"])
            space = OmegaConf.to_container(base.method.search)
            assert (space == []) == (m in ("zeroshot", "soup")), m  # soup: its tuning is its ingredients
            a, b = (sample_hparams(compose("config", overrides=["experiment=bench", f"method={m}", "hp_seed=1",
                                                                f"seed={s}"])) for s in (0, 1))
            for spec in space:
                assert OmegaConf.select(a, spec["key"]) == OmegaConf.select(b, spec["key"])
                assert OmegaConf.select(a, spec["key"]) != OmegaConf.select(base, spec["key"]), (m, spec)


def test_search_space_is_not_part_of_the_run_id_and_ftp_draws_stay_valid():
    """Editing a method's search space leaves its runs' ids alone (only drawn values are work), and
    FTP's draws of k stay in [0, 1], the range its optimizer accepts."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rftbench.identity import run_id
    from rftbench.sweep import sample_hparams

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose("config", overrides=["experiment=bench", "method=ftp"])
        edited = compose("config", overrides=["experiment=bench", "method=ftp",
                                              "method.search=[{key: method.adapt.optimizer.lr, choice: [0.1]}]"])
        assert run_id(base) == run_id(edited)
        for hp_seed in range(1, 9):
            k = OmegaConf.select(sample_hparams(compose("config", overrides=[
                "experiment=bench", "method=ftp", f"hp_seed={hp_seed}"])), "method.adapt.optimizer.k")
            assert 0.0 <= k <= 1.0
