"""The cost model of --plan (rftbench.costs): perf.json holds perf.md's figures, the images each method's
job computes on known sizes, the seconds from measured throughput, the preset headers' quoted figures."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rftbench import costs
from rftbench.identity import run_id
from rftbench.plan import plan, total_line
from rftbench.run import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
# the digits suite of experiment=bench (its built sizes): 20 per class, 77 test/OOD splits, 4 ood_val splits
DIGITS = costs.Sizes(train=200, val=216, test=719, eval=8519, ood_val=4 * 216, classes=10, source="built")
ATTACK = 50 * 1 * 20 * (1 + 3)  # eval.adversarial: 50 images, 1 threat, quick: APGD-CE + APGD-T (3 targets)


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("rftbench_perf_json", ROOT / "scripts" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def bench(method: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=bench", f"method={method}", "seed=0", *overrides])


def test_perf_json_holds_exactly_the_figures_of_perf_md(perf):
    md = (ROOT / "results" / "perf.md").read_text()
    committed = json.loads((ROOT / "results" / "perf.json").read_text())
    assert perf.perf_records(md) == committed
    lines = {r["line"]: r for r in committed["lines"]}
    rows = perf.report_rows(md)
    assert [r["line"] for r in rows] == list(lines)
    for cells in rows:  # every rate of the table, as a number
        want = None if cells["rftbench"] == "not measured" else float(cells["rftbench"].split()[0])
        assert lines[cells["line"]]["images_per_s"] == want
    assert {k: lines["train/in_memory"][k] for k in ("backbone", "device", "precision", "phase", "images_per_s")} == {
        "backbone": "digits_resnet", "device": "cpu", "precision": "fp32", "phase": "train", "images_per_s": 964.9}
    assert lines["evaluate"]["phase"] == "evaluate" and lines["evaluate"]["images_per_s"] == 5021.5
    assert lines["autoattack"]["attack"] == {"tier": "quick", "n_iter": 20, "n_target_classes": 3, "n": 50,
                                             "threats": [{"norm": "Linf", "eps": 0.03137}]}
    gpu = lines["gpu/vit_b16/train"]
    assert (gpu["backbone"], gpu["device"], gpu["precision"], gpu["images_per_s"]) == ("vit_b16", "cuda", "bf16", None)
    assert lines["store"]["date"] == "2026-12-04 21:44 UTC" and "AMD EPYC" in lines["store"]["machine"]


def test_a_measured_line_round_trips_through_the_report(perf):
    line = perf.Line("gpu/resnet50/train", "resnet50 224 px, bf16 + channels_last, `fit` 1 epoch", work=512,
                     ours=[0.5, 0.25, 0.5], bare=[0.5, 0.25, 0.5], target=0.95, peak_gb=(3.0, 2.9))
    head = "\n".join(["- machine: m", "- date: d", "- settings: 3 to 7 repetitions", "",
                      "| " + " | ".join(perf.COLUMNS) + " |", perf.row(line)])
    (record,) = perf.perf_records(head)["lines"]
    assert record["images_per_s"] == 1024.0 and record["ratio"] == 1.0 and record["target"] == 0.95
    assert (record["backbone"], record["device"], record["phase"], record["machine"]) == (
        "resnet50", "cuda", "train", "m")


def test_attack_passes_per_image():
    assert costs.attack_units({"tier": "quick", "n_iter": 20, "n_target_classes": 3}, 10) == 80
    assert costs.attack_units({"tier": "quick", "n_iter": 20, "n_target_classes": 3}, 2) == 40  # 1 other class
    # standard: APGD-CE 100 + APGD-T 9 x 100 + FAB-T 9 x 100 + Square 5,000 queries
    assert costs.attack_units({"tier": "standard"}, 10) == 100 + 900 + 900 + 5000
    assert costs.attack_work({"tier": "quick", "n_iter": 20, "n_target_classes": 3, "n": 50,
                              "threats": [{}, {}]}, 10) == 50 * 2 * 80


def work(method: str, *overrides: str, provided: bool = True, features_done: bool = False) -> dict[str, float]:
    cfg = bench(method, *overrides)
    given = {costs.training_key(cfg, "ft")} if provided else set()
    return costs.job_work(cfg, DIGITS, provided=given, features_done=features_done).images


def test_trained_methods_on_the_digits_bench():
    ft = work("ft")
    assert ft == {"train": 200 * 30, "extra": 0, "val": 216 * 30, "features": 0, "evaluate": 8519, "attack": ATTACK}
    # RWS: 4 corruption experts + the clean model (ft's: free when ft's job is in the sweep); its
    # coefficients (9) and compositions (9) on the 4 ood_val splits
    assert work("rws")["train"] == 4 * 6000 and work("rws", provided=False)["train"] == 5 * 6000
    assert work("rws")["val"] == 4 * 216 * 30 + (9 + 9) * 864
    # the soup's K = 4 ingredients, the first ft's model; candidate soups on val
    assert work("soup")["train"] == 3 * 6000 and work("soup", provided=False)["train"] == 4 * 6000
    assert work("soup", "method.adapt.ingredients=6")["train"] == 5 * 6000
    assert work("soup")["val"] == 3 * 216 * 30 + 4 * 216
    # post-hoc TPGM and WiSE-FT reuse ft's model: no training of their own
    posthoc = work("tpgm_posthoc")
    assert posthoc["train"] == 0 and posthoc["val"] == 0 and posthoc["extra"] == 200 * 64
    assert work("wise")["train"] == 0 and work("wise")["val"] == 11 * 216
    # TPGM trains on train minus its 10% slice, plus one radius step per step
    tpgm = work("tpgm")
    assert tpgm["train"] == pytest.approx(0.9 * 6000) and tpgm["extra"] == pytest.approx(0.9 * 6000)
    assert work("lpft")["train"] == 6000 and work("lpft")["features"] == 416


def test_surgical_trains_one_model_per_block():
    from rftbench.backbones import create_backbone
    from rftbench.methods.surgical import blocks

    cfg = bench("surgical")
    n = len(blocks(create_backbone("resnet10t", kwargs=OmegaConf.to_container(cfg.backbone.kwargs))))
    assert n == 5 and work("surgical")["train"] == n * 6000
    assert work("surgical", "method.adapt.block=last")["train"] == 6000


def test_frozen_backbone_methods_count_feature_rows_unless_stored():
    lp = work("lp")
    assert lp["train"] == 0 and lp["features"] == 416 + 8519 and lp["evaluate"] == 0
    assert work("lp", features_done=True)["features"] == 0
    assert work("zeroshot") == {"train": 0, "extra": 0, "val": 0, "features": 8519, "evaluate": 0, "attack": ATTACK}
    betas = 31  # 0.70 .. 0.99 and 1.0
    assert work("ct")["features"] == betas * 416 + betas * 719 + 8519
    assert work("ct", "method.adapt.oracle_test=false")["features"] == betas * 416 + 8519


def test_seconds_from_the_measured_figures():
    figures = costs.load_perf()
    images = work("ft")
    est, basis = costs.seconds(costs.Work(images), figures, "digits_resnet", "cpu")
    assert est == pytest.approx(6000 / 964.9 + (6480 + 8519) / 5021.5 + ATTACK / (119.2 * 80))
    assert basis == "perf.json train/in_memory 964.9 images/s + evaluate 5021.5 images/s + autoattack 119.2 images/s"
    assert costs.seconds(costs.Work(images), figures, "resnet50", "cuda")[1] == "no measurement for resnet50 on cuda"
    assert costs.seconds(costs.Work(images), figures, "tv_resnet50", "cpu")[1] == "no measurement for tv_resnet50 on cpu"


def test_cost_block_is_not_part_of_the_run_id():
    assert run_id(bench("ft")) == run_id(bench("ft", "method.cost.trainings=[{times:[7]}]"))
    assert run_id(bench("ft")) == run_id(bench("ft", "~method.cost"))


def test_imagenet_sizes_are_the_declared_release_counts():
    cfg = bench("ft", "suite=imagenet", "backbone=vit_b16")
    sizes = costs.suite_sizes(cfg)
    ood = 10_000 + 30_000 + 50_889 + 50_273 + 7_500  # V2, R, Sketch, ObjectNet (whole release), A
    assert (sizes.train, sizes.val, sizes.test, sizes.classes) == (1_281_167 - 10_000, 10_000, 50_000, 1000)
    assert sizes.eval == 50_000 + ood + 5000 * 15 * 5 and sizes.source == "declared"
    shots = costs.suite_sizes(bench("ft", "suite=imagenet", "backbone=vit_b16", "suite.build.shots=16"))
    assert shots.train == 16_000


def test_plan_counts_features_once_and_marks_stored_entries(tmp_path):
    """The first lp job computes the plain extractor's rows, the next reads them; with the store holding
    an entry for the suite and backbone, no job computes them."""
    common = ["experiment=tiny", f"paths.runs={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}", "device=cpu"]
    table = plan([*common, "method=lp", "seed=0,1"])
    assert table["features_images"].iloc[0] > 0 and table["features_images"].iloc[1] == 0
    assert table["basis"].iloc[1].startswith("perf.json") and table["est_s"].iloc[1] < table["est_s"].iloc[0]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*common, "method=lp"])
    entry = tmp_path / "cache" / "features" / "e1"
    entry.mkdir(parents=True)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    from rftbench.utils import stable_hash
    (entry / "entry.json").write_text(json.dumps({"backbone_id": stable_hash(backbone), "suite": "digits"}))
    stored = plan([*common, "method=lp", "seed=0,1"])
    assert list(stored["features_images"]) == [0, 0]
    assert "digits/digits_resnet: 1 entries" in stored.attrs["features"][0]


def test_estimates_are_within_a_factor_of_two_of_the_committed_bench_runs(tmp_path):
    """Each bench job planned from perf.json (measured on the same machine as the committed runs)
    against the committed leaderboard's mean adapt + eval seconds of its method."""
    methods = ["zeroshot", "ft", "rws", "soup", "tpgm", "surgical", "ct", "tpgm_posthoc"]
    table = plan(["experiment=bench", f"paths.runs={tmp_path}", f"paths.cache={tmp_path / 'cache'}",
                  f"method={','.join(methods)}", "seed=0", "device=cpu"])
    board = pd.read_csv(ROOT / "results" / "leaderboard.csv").set_index("method")
    for row in table.itertuples():
        measured = board.loc[row.method, "adapt_time_s"] + board.loc[row.method, "eval_time_s"]
        assert row.basis.startswith("perf.json"), row.basis
        assert 0.5 <= row.est_s / measured <= 2.0, (row.method, row.est_s, measured)


# ---- the preset headers quote what --plan prints --------------------------------------------------

def _preset_costs():
    spec = importlib.util.spec_from_file_location("preset_costs", Path(CONFIG_DIR).parent / "scripts" / "preset_costs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SLOW_PRESETS = ("ct_transfer", "bench_tuned")  # composing their 312 / 513 jobs takes a minute or more


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PRESETS else p
                                    for p in _preset_costs().PRESETS])
def test_preset_header_quotes_the_cost_model(preset, tmp_path):
    mod = _preset_costs()
    table = mod.preset_plan(preset, tmp_path)
    path = Path(CONFIG_DIR) / "experiment" / f"{preset}.yaml"
    assert mod.rewritten(preset, table) == path.read_text(), \
        f"{path.name}'s cost paragraph is out of date: python scripts/preset_costs.py {preset}"
    text = mod.paragraph(preset, table)
    assert costs.totals_line(table) in text
    if mod.PRESETS[preset] == "cpu":  # a measured CPU estimate
        assert table["est_s"].notna().all() and total_line(table) in text
    else:  # no GPU figure: no estimate, and the header says which figure it waits for
        assert table["est_s"].isna().all() and "not measured: results/perf.md has no gpu/" in text


def test_every_method_has_a_cost_block():
    for path in sorted((Path(CONFIG_DIR) / "method").glob("*.yaml")):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"method={path.stem}"])
        assert re.fullmatch(r"\w+", path.stem) and costs.method_cost(cfg) is not None, path.stem
