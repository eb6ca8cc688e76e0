"""The leaderboard from run folders: mean +- SE and n, noise flags, effective robustness with its
recorded baseline set, hyper-parameter variants chosen on validation, CSV/Markdown/LaTeX."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from rftbench import leaderboard as lb
from rftbench.results import RunFolder
from rftbench.run import run_id_of


def add_run(root, method: str, seed: int, id_acc: float, ood_acc: float, *, val: float = 0.5, ece: float = 0.1,
            lr: float = 0.01, backbone: str = "b", extra: dict | None = None,
            select: tuple[float, str] | None = None) -> str:
    cfg = {"seed": seed, "method": {"name": method, "lr": lr}, "suite": {"name": "digits"},
           "backbone": {"name": backbone}, "paths": {"runs": str(root)}, "device": "cpu", **(extra or {})}
    run_id = run_id_of(cfg)  # as the runner names it (the leaderboard checks)
    folder = RunFolder(root, "digits", backbone, method, run_id)
    folder.path.mkdir(parents=True)
    folder.write_text("config.yaml", yaml.safe_dump(cfg))
    folder.write_metrics([{"split": "test", "metric": "acc", "value": id_acc, "selection": "val"},
                          {"split": "ood", "metric": "acc_mean", "value": ood_acc, "selection": "val"},
                          {"split": "test", "metric": "ece", "value": ece, "selection": "val"},
                          {"split": "-", "metric": "val_acc", "value": val, "selection": "val"},
                          {"split": "ood", "metric": "acc_mean", "value": 0.99, "selection": "oracle"},
                          *([{"split": "-", "metric": "select_score", "value": select[0], "selection": "val",
                              "detail": json.dumps({"objective": select[1]})}] if select else [])], seed)
    folder.finish()
    return run_id


def logit(p):
    p = np.clip(np.asarray(p, float), 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


ACC = {  # method -> (ID accuracies over seeds 0..2, OOD accuracies)
    "zeroshot": ([0.50, 0.50, 0.50], [0.60, 0.60, 0.60]),
    "lp": ([0.70, 0.71, 0.72], [0.55, 0.56, 0.54]),
    "ft": ([0.80, 0.82, 0.84], [0.40, 0.42, 0.41]),
    "ct": ([0.81, 0.83, 0.85], [0.52, 0.50, 0.55]),
}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for method, (ids, oods) in ACC.items():
        for seed, (i, o) in enumerate(zip(ids, oods)):
            add_run(root, method, seed, i, o, ece=0.05 if method == "ct" else 0.1 + 0.01 * seed)
    return root


def row(board, method):
    return board.set_index("method").loc[method]


def test_mean_se_and_n_per_row(runs):
    board = lb.build(runs)
    assert list(board["method"]) == ["ct", "ft", "lp", "zeroshot"]
    for method, (ids, oods) in ACC.items():
        r = row(board, method)
        assert r["n_seeds"] == 3 and r["n_variants"] == 1
        assert r["id_test_acc"] == pytest.approx(np.mean(ids))
        assert r["id_test_acc_se"] == pytest.approx(np.std(ids, ddof=1) / math.sqrt(3))
        assert r["ood_mean_acc"] == pytest.approx(np.mean(oods))  # oracle rows never counted


def test_effective_robustness_against_the_recorded_baselines(runs):
    res = lb.build_all(runs)
    base_id = sum((ACC[m][0] for m in lb.BASELINES), [])
    base_ood = sum((ACC[m][1] for m in lb.BASELINES), [])
    slope, intercept = np.polyfit(logit(base_id), logit(base_ood), 1)
    ids, oods = map(np.array, ACC["ct"])
    expected = oods - 1 / (1 + np.exp(-(slope * logit(ids) + intercept)))
    assert row(res.board, "ct")["effective_robustness"] == pytest.approx(expected.mean())
    assert row(res.board, "ct")["effective_robustness_se"] == pytest.approx(expected.std(ddof=1) / math.sqrt(3))
    fit = res.er_fits.set_index("suite").loc["digits"]
    assert fit["baselines"] == "ft,lp,zeroshot" and fit["n_points"] == 9
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    recorded = set(fit["baseline_runs"].split(";"))
    assert len(recorded) == 9 and not any(r.startswith("ct-") for r in recorded)
    # other baselines, other fit; fewer than 2 distinct points: no effective robustness, no crash
    assert lb.build_all(runs, ("lp", "ft"), min_methods=2).er_fits.loc[0, "n_points"] == 6
    assert lb.build_all(runs, ("zeroshot",), min_methods=1).board["effective_robustness"].isna().all()


def test_differences_within_noise_are_flagged(runs):
    board = lb.build(runs)
    flags = board.set_index("method")["id_test_acc_within_noise"]
    # ct is best (0.83); ft is 0.01 below with SE 0.0115 each: within sqrt(2) * 0.0115; lp is not
    assert flags.to_dict() == {"ct": True, "ft": True, "lp": False, "zeroshot": False}
    ece = board.set_index("method")["ece_within_noise"]  # lower is better
    assert ece.to_dict() == {"ct": True, "ft": False, "lp": False, "zeroshot": False}
    md = lb.display_table(board).set_index("method")
    assert md.loc["ct", "id_test_acc"] == "**83.0 ± 1.2**" and md.loc["ft", "id_test_acc"] == "**82.0 ± 1.2**"
    assert md.loc["lp", "id_test_acc"] == "71.0 ± 0.6"


def test_one_seed_flags_only_the_best(tmp_path):
    root = tmp_path / "runs"
    add_run(root, "ft", 0, 0.80, 0.4)
    add_run(root, "ct", 0, 0.801, 0.4)
    flags = lb.build(root).set_index("method")["id_test_acc_within_noise"]
    assert flags.to_dict() == {"ct": True, "ft": False}


def test_hyper_parameter_variants_are_not_seeds_and_val_chooses(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        add_run(root, "ft", seed, 0.80 + 0.01 * seed, 0.4, val=0.90, lr=0.01)
        add_run(root, "ft", seed, 0.95, 0.3, val=0.80, lr=0.1)  # better on test, worse on val
    res = lb.build_all(root)
    r = row(res.board, "ft")
    assert r["n_seeds"] == 3 and r["n_variants"] == 2
    assert r["id_test_acc"] == pytest.approx(0.81)
    assert len(res.variants) == 2 and sorted(res.variants["n_seeds"]) == [3, 3]


def test_tuned_tables_show_the_values_chosen_on_val(tmp_path):
    """A tuned sweep's Markdown/LaTeX rows say how many variants there were and which values won
    (on val); a single-variant table (make bench) has neither column."""
    root = tmp_path / "runs"
    search = {"search": [{"key": "method.lr", "log_uniform": [1e-4, 1e-1]}]}
    for seed in range(2):
        add_run(root, "ft", seed, 0.80, 0.4, val=0.90, lr=0.0031622, extra={"method": {"name": "ft", "lr": 0.0031622, **search}})
        add_run(root, "ft", seed, 0.95, 0.3, val=0.80, lr=0.1, extra={"method": {"name": "ft", "lr": 0.1, **search}})
        add_run(root, "lp", seed, 0.70, 0.5)
    board = lb.build(root)
    md = lb.display_table(board).set_index("method")
    assert md.loc["ft", "chosen on val"] == "lr 0.0032" and md.loc["ft", "n_variants"] == 2
    assert md.loc["lp", "chosen on val"] == "-" and md.loc["lp", "n_variants"] == 1
    assert r"chosen on val" in lb.display_table(board, "tex").columns
    single = tmp_path / "single"
    add_run(single, "ft", 0, 0.80, 0.4)
    assert "chosen on val" not in lb.display_table(lb.build(single)).columns
    assert lb.chosen_hparams(pd.Series({"hp/a.k": 3.0, "hp/b.k": 0.5, "hp/c.rank": 8})) == "a.k 3, b.k 0.5, rank 8"
    lpft = pd.Series({"hp/method.probe.lr": 0.0026, "hp/method.finetune.optimizer.lr": 0.027,
                      "hp/method.finetune.optimizer.weight_decay": 0.00019})
    assert lb.chosen_hparams(lpft) == "probe.lr 0.0026, optimizer.lr 0.027, weight_decay 0.00019"


def test_a_derived_row_takes_its_parents_variant(tmp_path):
    """RWS's `bn_only` row is the ablation of the very runs the `rws` row reports: it takes the
    variant `rws` chose on val, even where another variant's bn_only val accuracy is higher."""
    root = tmp_path / "runs"
    for seed in range(2):
        for lr, val, bn_val in ((0.01, 0.90, 0.70), (0.1, 0.80, 0.95)):
            run = add_run(root, "rws", seed, 0.9, 0.5, val=val, lr=lr)
            folder = RunFolder(root, "digits", "b", "rws", run)
            m = pd.read_csv(folder.path / "metrics.csv")
            extra = pd.DataFrame([{**m.iloc[0].to_dict(), "split": "-", "metric": "val_acc", "value": bn_val,
                                   "detail": "row:bn_only"},
                                  {**m.iloc[0].to_dict(), "split": "test", "metric": "acc", "value": lr,
                                   "detail": "row:bn_only"}])
            pd.concat([m, extra]).to_csv(folder.path / "metrics.csv", index=False)
    board = lb.build(root).set_index("method")
    assert board.loc["rws", "val_acc"] == pytest.approx(0.90)
    assert board.loc["rws_bn_only", "variant"] == board.loc["rws", "variant"]
    assert board.loc["rws_bn_only", "id_test_acc"] == pytest.approx(0.01)  # the lr 0.01 runs' bn_only rows
    assert board.loc["rws_bn_only", "val_acc"] == pytest.approx(0.70)


def test_outputs_csv_markdown_latex_and_plots(runs, tmp_path):
    out = tmp_path / "results"
    lb.main(["--runs", str(runs), "--out", str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["effective_robustness.csv", "id_vs_ood_digits.png", "index.html", "leaderboard.csv", "leaderboard.md",
                     "leaderboard.tex", "leaderboard_variants.csv"]
    csv = pd.read_csv(out / "leaderboard.csv")
    assert {"n_seeds", "id_test_acc", "id_test_acc_se", "id_test_acc_within_noise", "effective_robustness",
            "variant", "n_variants"} <= set(csv.columns)
    tex = (out / "leaderboard.tex").read_text()
    assert r"id\_test\_acc" in tex and r"\textbf{83.0 $\pm$ 1.2}" in tex and "**" not in tex
    assert "bold: the best" in (out / "leaderboard.md").read_text()
    assert (out / "id_vs_ood_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def number_like_run_ids() -> list[tuple[dict, str]]:
    """Two configs differing only in the seed whose run ids read as numbers (digits with one 'e';
    digits only)."""
    found = {}
    for seed in range(200_000):
        cfg = {"seed": seed, "method": {"name": "ft"}}
        rid = run_id_of(cfg)
        for kind, pattern in (("float", r"[1-9]\d*e\d+"), ("int", r"[1-9]\d+")):
            if kind not in found and re.fullmatch(pattern, rid):
                found[kind] = (cfg, rid)
        if len(found) == 2:
            return [found["float"], found["int"]]
    raise AssertionError("no number-like run ids found")


def test_run_ids_that_look_like_numbers_stay_strings(tmp_path):
    root = tmp_path / "runs"
    for cfg, run_id in number_like_run_ids():
        seed = cfg["seed"]
        folder = RunFolder(root, "digits", "b", "ft", run_id)
        folder.path.mkdir(parents=True)
        folder.write_text("config.yaml", yaml.safe_dump(cfg))
        folder.write_metrics([{"split": "test", "metric": "acc", "value": 0.5 + seed / 10}], seed)
        folder.finish()
    res = lb.build_all(root, ("ft",))
    assert sorted(res.runs["run_id"]) == sorted(run_id for _, run_id in number_like_run_ids())
    assert res.board.loc[0, "n_seeds"] == 2 and res.board.loc[0, "n_variants"] == 1


def test_runs_recorded_before_the_val_acc_field_are_chosen_by_chosen_val_acc(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        add_run(root, "ft", seed, 0.80, 0.4, val=0.9, lr=0.01)
        add_run(root, "ft", seed, 0.95, 0.3, val=0.8, lr=0.1)
    for path in root.rglob("metrics.csv"):  # as written before: the val accuracy as chosen/val_acc
        m = pd.read_csv(path)
        m.loc[m["metric"] == "val_acc", "metric"] = "chosen/val_acc"
        m.to_csv(path, index=False)
    assert row(lb.build_all(root).board, "ft")["id_test_acc"] == pytest.approx(0.80)
def test_effective_robustness_needs_enough_baseline_points(runs, caplog):
    # two baseline methods (default needs 3 methods x 3 seeds): no fit, an empty column and a warning
    res = lb.build_all(runs, ("lp", "ft"))
    assert res.board["effective_robustness"].isna().all() and res.er_fits.empty
    assert "needs 3 baseline methods with >= 3 runs each" in caplog.text
    # three methods but one seed fewer than required: still none
    assert lb.build_all(runs, min_seeds=4).board["effective_robustness"].isna().all()
    assert lb.build_all(runs).board["effective_robustness"].notna().all()
    md = lb.display_table(lb.build(runs, ("lp", "ft")))
    assert "effective_robustness" not in md.columns  # an empty column is not shown


def test_no_plus_minus_zero_for_one_seed_or_no_spread(runs, tmp_path):
    md = lb.display_table(lb.build(runs)).set_index("method")
    assert md.loc["zeroshot", "id_test_acc"] == "50.0"  # three seeds, identical values
    assert md.loc["zeroshot", "n_seeds"] == 3
    root = tmp_path / "one"
    add_run(root, "ft", 0, 0.8, 0.4)
    md = lb.display_table(lb.build(root)).set_index("method")
    assert md.loc["ft", "id_test_acc"] == "**80.0**" and "±" not in "".join(md.loc["ft"].astype(str))


def test_ood_worst_is_the_worst_individual_ood_result(tmp_path):
    """Hand-built metrics: two domain splits and two corruptions at two severities each."""
    root = tmp_path / "runs"
    config = {"seed": 0, "method": {"name": "ft"}}
    folder = RunFolder(root, "s", "b", "ft", run_id_of(config))  # a folder named by its config's id
    folder.path.mkdir(parents=True)
    folder.write_text("config.yaml", yaml.safe_dump(config))
    splits = [("ood/mnistm", "domain", None, None, 0.70), ("ood/svhn", "domain", None, None, 0.60),
              ("ood/c/fog/1", "corruption", "fog", 1, 0.90), ("ood/c/fog/5", "corruption", "fog", 5, 0.30),
              ("ood/c/blur/1", "corruption", "blur", 1, 0.80), ("ood/c/blur/5", "corruption", "blur", 5, 0.62)]
    rows = [{"split": s, "shift": sh, "corruption": c, "severity": sev, "metric": "acc", "value": v}
            for s, sh, c, sev, v in splits]
    from rftbench.evaluate import summary_rows
    rows += summary_rows(rows)
    summary = {(r["split"], r["metric"]): r["value"] for r in rows}
    # corruption means: fog 0.60, blur 0.71; the worst individual result is fog's 0.60 or svhn's 0.60
    assert summary["ood/corruption", "acc_mean"] == pytest.approx(0.655)
    assert summary["ood", "acc_mean"] == pytest.approx((0.70 + 0.60 + 0.655) / 3)
    assert summary["ood", "acc_worst"] == pytest.approx(0.60)
    # not the worst of [domain splits, corruption mean] alone and not the worst single severity (0.30)
    rows = [r for r in rows if r["metric"] != "acc_worst"]
    rows[1]["value"] = 0.75  # svhn better: the worst is now fog's mean over severities
    folder.write_metrics([{**r, "selection": "val"} for r in rows], 0)
    folder.finish()
    board = lb.build(root, ())
    assert board.loc[0, "ood_worst_acc"] == pytest.approx(0.60)
    assert board.loc[0, "corruption_acc"] == pytest.approx(0.655)


def test_unconverged_rows_get_a_dagger_and_levi_its_reconstruction_label(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        for method in ("ft", "lora", "levi"):
            run_id = add_run(root, method, seed, 0.8, 0.4)
            folder = RunFolder(root, "digits", "b", method, run_id)
            m = pd.read_csv(folder.path / "metrics.csv")
            converged = 0.0 if (method == "lora" and seed == 1) else 1.0
            m.loc[len(m)] = {**m.iloc[0].to_dict(), "split": "-", "metric": "converged", "value": converged}
            m.to_csv(folder.path / "metrics.csv", index=False)
    board = lb.build(root)
    assert row(board, "lora")["converged"] == 0.5 and row(board, "ft")["converged"] == 1.0
    md, tex = lb.display_table(board), lb.display_table(board, "tex")
    assert sorted(md["method"]) == ["ft", "levi (reconstruction)", "lora †"]
    assert r"lora \dag{}" in set(tex["method"])
    assert set(board["method"]) == {"ft", "levi", "lora"}   # the CSV keeps the method ids


def test_tuned_variants_are_picked_on_val_and_listed_with_their_drawn_values(tmp_path):
    root = tmp_path / "runs"
    search = [{"key": "method.lr", "log_uniform": [1e-4, 1e-1]}]
    for hp_seed, lr, test_acc, val in ((0, 0.01, 0.80, 0.70), (1, 0.003, 0.95, 0.60), (2, 0.05, 0.85, 0.90)):
        for seed in range(2):
            run_id = add_run(root, "lora", seed, test_acc, 0.4, val=val, lr=lr, extra={"hp_seed": hp_seed})
            folder = RunFolder(root, "digits", "b", "lora", run_id)
            cfg = yaml.safe_load((folder.path / "config.yaml").read_text())
            cfg["method"]["search"] = search
            new = RunFolder(root, "digits", "b", "lora", run_id_of(cfg))  # the folder its config names
            folder.path.rename(new.path)
            new.write_text("config.yaml", yaml.safe_dump(cfg))
            m = pd.read_csv(new.path / "metrics.csv").assign(run_id=new.run_id)
            m.to_csv(new.path / "metrics.csv", index=False)
    res = lb.build_all(root)
    r = row(res.board, "lora")
    assert r["id_test_acc"] == pytest.approx(0.85) and r["hp/method.lr"] == pytest.approx(0.05)  # val-best, not test-best
    out = tmp_path / "results"
    lb.write(res.board, out, res)
    variants = pd.read_csv(out / "leaderboard_variants.csv")
    assert sorted(variants["hp/method.lr"]) == pytest.approx([0.003, 0.01, 0.05]) and set(variants["n_seeds"]) == {2}


def test_variants_are_ranked_by_the_objective_their_method_chose_by(tmp_path, caplog):
    """ct_robust select=robust records its robust val objective (Adapted.select_score): the variant
    with the better robust objective wins although its clean val accuracy is lower; variants that
    chose by different objectives fall back to val_acc, with a warning."""
    root = tmp_path / "runs"
    for seed in range(2):
        add_run(root, "ct_robust", seed, 0.80, 0.4, val=0.90, lr=0.01, select=(0.30, "robust_val_objective"))
        add_run(root, "ct_robust", seed, 0.70, 0.5, val=0.85, lr=0.1, select=(0.45, "robust_val_objective"))
        add_run(root, "wise", seed, 0.80, 0.4, val=0.90, lr=0.01, select=(0.30, "ood_val_acc"))
        add_run(root, "wise", seed, 0.70, 0.5, val=0.85, lr=0.1)  # chose by val_acc
    res = lb.build_all(root)
    r = row(res.board, "ct_robust")
    assert r["id_test_acc"] == pytest.approx(0.70) and r["select_by"] == "robust_val_objective"
    assert r["select_score"] == pytest.approx(0.45)
    assert row(res.board, "wise")["id_test_acc"] == pytest.approx(0.80)  # by val_acc: 0.90 > 0.85
    assert "chose by different objectives" in caplog.text


def test_the_effective_robustness_fit_uses_the_baselines_chosen_variants(tmp_path):
    root = tmp_path / "runs"
    for method, (ids, oods) in ACC.items():
        for seed, (i, o) in enumerate(zip(ids, oods)):
            add_run(root, method, seed, i, o)
            if method == "lp":  # a worse draw on val, far off the line: not part of the fit
                add_run(root, method, seed, 0.2, 0.9, val=0.1, lr=0.5)
    res = lb.build_all(root)
    used = set(res.er_fits.iloc[0]["baseline_runs"].split(";"))
    lp_runs = res.runs[res.runs["method"] == "lp"]
    assert used.isdisjoint(set(lp_runs[lp_runs["id_test_acc"] == 0.2]["run_id"]))
    assert len(used) == 9  # zeroshot, lp, ft: 3 seeds each


def test_provenance_names_lock_commit_and_cpu_of_each_row(tmp_path):
    """Each row's lock, commit and CPU model come from its runs' env.json, and the table's note names
    them: the same code gives other numbers on another CPU model, so a table says where it was made."""
    root = tmp_path / "runs"
    for seed, cpu in enumerate(["AMD EPYC", "AMD EPYC", "Intel(R) Xeon(R) Processor"]):
        rid = add_run(root, "ft", seed, 0.8, 0.4)
        env = {"lock": "abc", "git": {"commit": "1234567890abcdef", "dirty": False}, "cpu": cpu}
        RunFolder(root, "digits", "b", "ft", rid).write_text("env.json", json.dumps(env))
    add_run(root, "lp", 0, 0.7, 0.5)  # no env.json: unknown
    board = lb.build(root).set_index("method")
    assert board.loc["ft", "cpu"] == "AMD EPYC;Intel(R) Xeon(R) Processor"
    assert board.loc["ft", "commit"] == "1234567890ab" and board.loc["lp", "cpu"] == "unknown"
    note = lb.provenance_note(board.reset_index())
    assert note == ("Produced by locked environment (requirements.lock sha256) abc, unknown; rftbench commit "
                    "1234567890ab, unknown; CPU AMD EPYC, Intel(R) Xeon(R) Processor, unknown.")
