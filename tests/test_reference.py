"""Paper reference figures (configs/reference/, rftbench.reference): the docs table is generated from
them, and `rftbench.leaderboard --reference` prints a preset's finished runs beside them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from rftbench import leaderboard, reference
from rftbench.results import RunFolder
from rftbench.run import run_id_of

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("ood/imagenet_v2", "ood/imagenet_a", "ood/imagenet_r", "ood/imagenet_sketch")


def add_run(root: Path, suite: str, backbone: str, method: str, seed: int, accs: dict[str, float]) -> str:
    """A finished run folder with the given accuracies per split (fractions), as the runner writes it."""
    cfg = {"seed": seed, "method": {"name": method}, "suite": {"name": suite}, "backbone": {"name": backbone},
           "paths": {"runs": str(root)}, "device": "cpu"}
    run_id = run_id_of(cfg)
    folder = RunFolder(root, suite, backbone, method, run_id)
    folder.path.mkdir(parents=True)
    folder.write_text("config.yaml", yaml.safe_dump(cfg))
    rows = [{"split": s, "metric": "acc", "value": v, "selection": "val", "shift": "id" if s == "test" else "natural"}
            for s, v in accs.items()]
    rows += [{"split": "-", "metric": "val_acc", "value": 0.5, "selection": "val"},
             {"split": "ood/imagenet_v2", "metric": "acc", "value": 0.99, "selection": "oracle"}]
    folder.write_metrics(rows, seed)
    folder.finish()
    return run_id


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, base in enumerate((0.80, 0.82)):  # ft, 2 seeds: test 0.80 / 0.82, each OOD split lower by k/100
        add_run(root, "imagenet", "clip_vitb16", "ft", seed, {"test": base, **{s: base - (k + 1) / 10
                                                                                for k, s in enumerate(SPLITS)}})
    add_run(root, "imagenet", "clip_vitb16", "lp", 0, {"test": 0.7})       # not a method of the preset
    add_run(root, "digits", "clip_vitb16", "wise", 0, {"test": 0.9})       # not the preset's suite
    return root


def test_comparison_puts_our_rows_beside_the_papers(runs):
    from rftbench.leaderboard import build_all, checked_metrics

    table = reference.comparison(build_all(runs), checked_metrics(runs), str(runs), "wiseft_imagenet")
    ft = table[table["method"] == "ft"]
    assert list(ft["row"]) == ["paper: Vanilla FT", "ours (n=2)"]          # the paper's row first
    paper, ours = ft.iloc[0], ft.iloc[1]
    assert paper["test"] == 84.27 and paper["ood/imagenet_sketch"] == 48.28 and paper["mean"] == 63.58
    assert ours["test"] == pytest.approx(81.0)                              # mean of 80 and 82, in %
    expected = {s: 81.0 - 10.0 * (k + 1) for k, s in enumerate(SPLITS)}     # 71, 61, 51, 41 (oracle rows ignored)
    assert {s: ours[s] for s in SPLITS} == pytest.approx(expected)
    assert ours["mean"] == pytest.approx(61.0)  # the README's Average: ImageNet and the 4 shifts (81+71+61+51+41)/5
    assert set(table["method"]) == {"zeroshot", "ft", "wise", "tpgm_posthoc"}  # no lp, no digits' wise
    assert (table["row"].str.startswith("ours")).sum() == 1


def test_leaderboard_reference_option_prints_the_table_and_writes_nothing(runs, tmp_path, capsys):
    out = tmp_path / "results"
    leaderboard.main(["--runs", str(runs), "--out", str(out), "--reference", "wiseft_imagenet"])
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "| ft " in line]
    assert len(lines) == 2 and "84.27" in lines[0] and "63.58" in lines[0]
    assert "| ours (n=2)" in lines[1] and "81.00" in lines[1] and "61.00" in lines[1]  # ID and the Average
    assert "| V2 " in text and "Average (ImageNet + 4 shifts)" in text and "Not found (no published figure for this setting): flyp, soup." in text
    assert not out.exists()


def test_unknown_preset_is_one_line_naming_the_known_ones(runs):
    with pytest.raises(SystemExit, match="no reference figures for 'wiseft'.*known: ct_robustbench"):
        leaderboard.main(["--runs", str(runs), "--reference", "wiseft"])


def test_every_reference_file_is_well_formed():
    for preset in reference.presets():
        ref = reference.load(preset)
        assert ref["preset"] == preset and (ROOT / "configs" / "experiment" / f"{preset}.yaml").is_file()
        cols = set(ref["columns"])
        for row in ref["rows"]:
            assert set(row["values"]) == cols and row["source"], (preset, row)
            ood = [row["values"][c] for c in reference.mean_columns(ref)]
            assert row["mean"] == pytest.approx(sum(ood) / len(ood), abs=0.006), (preset, row["label"])


def test_protocol_table_is_generated_from_the_reference_files():
    spec = importlib.util.spec_from_file_location("reference_table", ROOT / "scripts" / "reference_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert mod.synced(text) == text, "docs/protocol.md's reference table is out of date: python scripts/reference_table.py"
    assert "| clip_rn50   | tpgm     | paper: TPGM" in text and "82.41" in text
