"""Leaderboard plots: what they draw (fit line, means over runs, chosen value) and which are written."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rftbench import plots
from rftbench.metrics import LogitFit
from rftbench.results import RunFolder

PNG = b"\x89PNG\r\n\x1a\n"


def runs_table() -> pd.DataFrame:
    return pd.DataFrame({"suite": ["digits"] * 4, "backbone": ["b", "b", "b", "c"],
                         "method": ["ft", "ft", "lp", "ft"], "run_id": list("wxyz"),
                         "id_test_acc": [0.9, 0.92, 0.7, 1.0], "ood_mean_acc": [0.3, 0.35, 0.5, 0.0]})


def add(root, method: str, run_id: str, tables: dict[str, pd.DataFrame], done: bool = True) -> None:
    folder = RunFolder(root, "digits", "b", method, run_id)
    folder.path.mkdir(parents=True)
    folder.write_text("config.yaml", "seed: 0\n")
    for name, t in tables.items():
        folder.write_table(name, t)
    if done:
        folder.finish()


def test_id_vs_ood_draws_runs_the_fit_and_the_diagonal():
    fit = LogitFit(slope=0.5, intercept=-1.0, n=5, clip=1e-3)
    fig = plots.id_vs_ood_figure(runs_table(), "digits", fit)
    ax = fig.axes[0]
    assert ax.get_xscale() == "logit" and ax.get_yscale() == "logit"
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(ax.collections) == 3 and len(points) == 4  # (method, backbone) groups; every run
    assert points.min() >= 1e-3 and points.max() <= 1 - 1e-3  # 0 and 1 clipped onto the logit axes
    diagonal, line = ax.lines
    assert np.allclose(diagonal.get_xdata(), diagonal.get_ydata())
    x = line.get_xdata()
    assert np.allclose(line.get_ydata(), np.clip(fit.predict(x), 1e-3, 1 - 1e-3))
    assert "n=5" in line.get_label()
    assert plots.id_vs_ood_figure(runs_table(), "cifar10", fit) is None


def test_sweep_curves_average_runs_and_mark_the_val_choice(tmp_path):
    beta = [0.5, 0.8, 0.95]
    add(tmp_path, "ct", "r1", {plots.CT_SWEEP: pd.DataFrame({"beta": beta, "val_acc": [0.5, 0.7, 0.6],
                                                             "test_acc": [0.4, 0.6, 0.7]})})
    add(tmp_path, "ct", "r2", {plots.CT_SWEEP: pd.DataFrame({"beta": beta, "val_acc": [0.5, 0.9, 0.6],
                                                             "test_acc": [0.6, 0.8, 0.9]})})
    add(tmp_path, "ct", "r3", {plots.CT_SWEEP: pd.DataFrame({"beta": beta, "val_acc": [1, 1, 1],
                                                             "test_acc": [1, 1, 1]})}, done=False)
    t = plots.sweep_tables(tmp_path, plots.CT_SWEEP)
    assert sorted(t["run_id"].unique()) == ["r1", "r2"]  # unfinished runs are not read
    ax = plots.curve_figure(t, "beta", "method", "t", "beta").axes[0]
    val, test, chosen = ax.lines
    assert list(test.get_xdata()) == beta and np.allclose(test.get_ydata(), [0.5, 0.7, 0.8])
    assert np.allclose(val.get_ydata(), [0.5, 0.8, 0.6])
    # each run's own choice, where it is on that run's validation curve (not one averaged line)
    assert list(chosen.get_xdata()) == [0.8, 0.8] and list(chosen.get_ydata()) == [0.7, 0.9]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ct (n=2 runs)", "validation accuracy", "test accuracy", "chosen on validation (one per run)"]
    styles = {h.get_label(): h.get_linestyle() for h in ax.get_legend().legend_handles}
    assert styles["validation accuracy"] == "--" and styles["test accuracy"] == "-"
    assert "standard error" in fig_caption(ax.figure)


def fig_caption(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts)


def test_the_chosen_column_wins_over_the_best_val():
    t = pd.DataFrame({"run_id": ["a"] * 3, "beta": [0.5, 0.8, 1.0], "val_acc": [0.7, 0.7, 0.6],
                      "chosen": [False, True, False]})
    assert plots.chosen_points(t, "beta").to_dict("records") == [{"beta": 0.8, "val_acc": 0.7}]
    assert plots.chosen_points(t.drop(columns="chosen"), "beta")["beta"].tolist() == [0.5]  # smallest on ties


def test_every_method_has_its_own_colour_and_marker_in_every_plot():
    from rftbench import style

    methods = list(style.METHODS)
    assert len(methods) >= 12 and len(set(style.METHODS.values())) == len(methods)
    assert len({s.marker for s in style.METHODS.values()}) == len(methods)
    assert style.method_style("new_method") == style.method_style("new_method")
    runs = pd.DataFrame({"suite": "s", "backbone": "b", "method": methods, "run_id": methods,
                         "id_test_acc": 0.9, "ood_mean_acc": 0.6})  # all on one spot
    ax = plots.id_vs_ood_figure(runs, "s", None).axes[0]
    looks = {(c.get_label(), tuple(np.round(c.get_facecolor()[0][:3], 3))) for c in ax.collections}
    assert len(looks) == len(methods)
    shifts = {tuple(np.round(c.get_offset_transform().transform((0.9, 0.6)), 1)) for c in ax.collections}
    assert len(shifts) == len(methods)  # coinciding points are drawn side by side, not on top
    assert all(np.allclose(c.get_offsets(), [[0.9, 0.6]]) for c in ax.collections)  # data unchanged
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "0.9" in ticks and not any("10^" in t for t in ticks)
    assert "one run" in fig_caption(ax.figure)


def test_plot_all_writes_what_there_is_data_for(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    fit = {"digits": LogitFit(1.0, 0.0, 3, 1e-3)}
    assert [p.name for p in plots.plot_all(runs_table(), fit, runs, out)] == ["id_vs_ood_digits.png"]
    add(runs, "ct", "r1", {plots.CT_SWEEP: pd.DataFrame({"beta": [0.5, 0.9], "val_acc": [0.5, 0.6],
                                                         "test_acc": [0.4, 0.5]})})
    add(runs, "rws", "r2", {plots.RWS_SWEEP: pd.DataFrame({"corruption": ["fog", "fog", "snow", "snow"],
                                                           "coeff": [0.0, 1.0, 0.0, 1.0],
                                                           "val_acc": [0.3, 0.5, 0.2, 0.4],
                                                           "test_acc": [0.3, 0.45, 0.2, 0.35]})})
    paths = plots.plot_all(runs_table().iloc[:0], {}, runs, out)
    assert [p.name for p in paths] == ["ct_beta_digits_b.png", "rws_coeff_digits_b.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    assert not list(out.glob(".*.tmp"))
    # rebuilt from runs without RWS: the old RWS plot goes, other files stay
    (out / "notes.png").write_bytes(PNG)
    (runs / "digits" / "b" / "rws" / "r2" / "done").unlink()
    paths = plots.plot_all(runs_table().iloc[:0], {}, runs, out)
    assert sorted(p.name for p in out.iterdir()) == ["ct_beta_digits_b.png", "notes.png"]


def test_tuned_plots_show_the_chosen_variants(tmp_path, monkeypatch):
    """With a board (a tuned sweep), the ID-vs-OOD plot colours the runs of the variants the table
    reports and draws the other variants as grey dots; the sweep curves use the chosen runs only."""
    runs = runs_table().assign(variant=["v1", "v2", "v9", "v1"])
    board = pd.DataFrame({"suite": ["digits"] * 3, "backbone": ["b", "b", "c"], "method": ["ft", "lp", "ft"],
                          "variant": ["v1", "v9", "v1"]})
    mask = plots.chosen_mask(runs, board)
    assert mask.tolist() == [True, False, True, True]
    ax = plots.id_vs_ood_figure(runs[mask], "digits", None, runs[~mask]).axes[0]
    grey, *coloured = ax.collections
    assert np.allclose(grey.get_offsets(), [[0.92, 0.35]]) and "not chosen" in grey.get_label()
    assert sum(len(c.get_offsets()) for c in coloured) == 3
    root = tmp_path / "runs"
    for run_id, level in (("w", 0.6), ("x", 0.9)):  # ft's chosen (w) and not chosen (x) runs
        add(root, "ct", run_id, {plots.CT_SWEEP: pd.DataFrame({"beta": [0.5, 0.9], "val_acc": [level, level],
                                                               "test_acc": [level, level]})})
    seen = []
    monkeypatch.setattr(plots, "curve_figure", lambda t, *a: seen.append(sorted(t["run_id"].unique())) or
                        plots.Figure())
    plots.plot_all(runs.assign(method="ct"), {}, root, tmp_path / "out", board.assign(method="ct"))
    assert seen == [["w"]]


def test_wise_curve_goes_from_the_start_to_the_fine_tuned_end(tmp_path):
    sweep = pd.DataFrame({"alpha": [0.0, 0.5, 1.0], "val_acc": [0.5, 0.8, 0.9],
                          "test_acc": [0.5, 0.8, 0.95], "ood_acc_mean": [0.9, 0.85, 0.6]})
    add(tmp_path, "wise", "r1", {plots.WISE_SWEEP: sweep})
    add(tmp_path, "wise", "r2", {plots.WISE_SWEEP: sweep.assign(test_acc=sweep["test_acc"] - 0.1)})
    fig = plots.wise_curve_figure(plots.sweep_tables(tmp_path, plots.WISE_SWEEP), "t")
    curve, start, end = fig.axes[0].lines
    assert list(curve.get_xdata()) == pytest.approx([0.45, 0.75, 0.9])   # mean over the two runs
    assert (start.get_xdata()[0], start.get_ydata()[0]) == pytest.approx((0.45, 0.9))
    assert (end.get_xdata()[0], end.get_ydata()[0]) == pytest.approx((0.9, 0.6))
    [path] = plots.plot_wise_curves(tmp_path, tmp_path / "out")
    assert path.name == "wise_digits_b.png" and path.read_bytes().startswith(PNG)
    assert plots.wise_curve_figure(sweep.drop(columns="test_acc"), "t") is None
