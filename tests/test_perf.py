"""scripts/perf.py (`make perf`): the timing rules, the report's layout, and a --quick run on the tiny preset."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("rftbench_perf_script", ROOT / "scripts" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_ratio_is_the_median_of_paired_ratios_and_the_row_says_so(perf):
    line = perf.Line("train/in_memory", "what", work=10, ours=[1.0, 2.0, 4.0], bare=[2.0, 2.0, 2.0], target=0.97)
    assert line.ratios == [2.0, 1.0, 0.5] and line.ratio == 1.0 and line.passed is True
    assert perf.row(line) == ("| train/in_memory | what | 5.0 images/s | 5.0 images/s | 1.000 | 0.500..2.000 | "
                              ">= 0.97 | - | pass |")
    slow = perf.Line("loader", "w", work=1, ours=[2.0], bare=[1.0], target=0.95)
    assert slow.passed is False and perf.row(slow).endswith("| 0.500 | 0.500..0.500 | >= 0.95 | - | fail |")
    gpu = perf.Line("gpu/x/train", "w", work=8, ours=[1.0], bare=[1.0], peak_gb=(1.234, 1.2))
    assert gpu.passed is None and perf.row(gpu).endswith("| 1.000 | 1.000..1.000 | - | 1.23 / 1.20 | - |")
    off = perf.Line("gpu/x/evaluate", "w", work=0, skipped="no CUDA")
    assert off.passed is None
    assert perf.row(off) == ("| gpu/x/evaluate | w | not measured | not measured | - | - | - | - | "
                             "not measured (no CUDA) |")


def test_paths_alternate_after_warm_up(perf):
    calls: list[str] = []
    s = perf.Settings(reps=4, warmup=2, min_time=1.0, line_budget=1e9)
    ours, bare = perf.interleaved(lambda: calls.append("A"), lambda: calls.append("B"), s)
    # warm-up A (sizes the samples) B, A B; then per sample ceil(1 s / a call's time) calls: A B / B A / ...
    text = "".join(calls)
    assert text.startswith("ABAB") and len(ours) == len(bare) == 4 and all(t > 0 for t in ours + bare)
    k = (len(text) - 4) // 8
    assert text[4:] == "A" * k + "B" * k + "B" * k + "A" * k + "A" * k + "B" * k + "B" * k + "A" * k


@pytest.mark.parametrize("budget,reps", [(1e9, 5), (12.0, 2), (0.0, 1)])
def test_samples_last_min_time_and_reps_fit_the_budget(perf, monkeypatch, budget, reps):
    clock = iter(range(1000))
    monkeypatch.setattr(perf.time, "perf_counter", lambda: float(next(clock)))
    calls: list[str] = []
    # the sizing call "takes" 1 s: 3 calls per sample, a repetition of both paths 6 s;
    # repetitions: within the budget, at least min_reps, at most reps
    s = perf.Settings(reps=5, min_reps=1, line_budget=budget, warmup=2, min_time=3.0)
    ours, bare = perf.interleaved(lambda: calls.append("A"), lambda: calls.append("B"), s)
    # each sample reads the clock twice (1 s apart): seconds per call = 1 / 3; the sizing call took
    # as long as min_time's third, so warm-up goes on (A B once more)
    assert len(ours) == len(bare) == reps and all(t == pytest.approx(1 / 3) for t in ours + bare)
    assert "".join(calls)[:4] == "ABAB" and len(calls) == 4 + 6 * reps


def test_streamed_copy_holds_the_same_pixels(perf):
    from rftbench.data.base import Split, batches

    x = torch.randint(0, 256, (5, 3, 4, 4)).float() / 255
    split = Split("train", "train", x=x, y=torch.arange(5))
    copy = perf.streamed(split)
    assert not copy.in_memory and copy.role == "train"
    xb, yb = next(batches(copy, 5))
    assert torch.equal(xb, x) and torch.equal(yb, torch.arange(5))


def test_no_reuse_gives_an_empty_store_and_keeps_the_rest(perf):
    from rftbench.train import RunContext

    ctx = RunContext(seed=3, eval_batch_size=7)
    ctx.store.counts["computed"] = 5
    fresh = perf.no_reuse(ctx)
    assert fresh.store is not ctx.store and not fresh.store.counts and not fresh.store.entries
    assert (fresh.seed, fresh.eval_batch_size) == (3, 7)


def test_png_tree_is_an_image_folder_with_rftbench_labels(perf, tmp_path):
    from rftbench.data.folders import class_folders

    perf.make_png_tree(tmp_path, 10, classes=3)
    folder = torchvision.datasets.ImageFolder(str(tmp_path))
    index = {p.name: i for i, p in enumerate(sorted(tmp_path.iterdir()))}
    assert sorted(index) == ["class0", "class1", "class2"]
    assert sorted((Path(p).name, y) for p, y in folder.samples) == \
        sorted((Path(p).name, y) for p, y in class_folders(tmp_path, index))
    sizes = {folder.loader(p).size for p, _ in folder.samples}
    assert len(folder) == 10 and all(36 <= w < 64 and 36 <= h < 64 for w, h in sizes)


ROW = re.compile(r"^\| (?P<key>[\w/]+) \| (?P<measures>[^|]+) \| (?P<ours>[^|]+) \| (?P<bare>[^|]+) \| "
                 r"(?P<ratio>[^|]+) \| (?P<spread>[^|]+) \| (?P<target>[^|]+) \| (?P<peak>[^|]+) \| "
                 r"(?P<result>[^|]+) \|$")


def test_quick_report_has_every_line_in_its_layout(perf, tmp_path):
    out = tmp_path / "perf.md"
    threads = torch.get_num_threads()
    try:
        # random weights (no pre-training: speed only), few small splits
        text = perf.main(["--quick", "--reps", "2", "--out", str(out), "experiment=tiny", "backbone.pretrain=null",
                          "eval.batch_size=64",
                          "suite.build.corruption.names=[fog]", "suite.build.corruption.severities=[1]",
                          "eval.adversarial.n=10", "eval.adversarial.n_iter=2"])
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    lines = text.splitlines()
    assert lines[0] == perf.REPORT_TITLE
    facts = dict(re.match(r"^- ([^:]+): (.*)$", ln).groups() for ln in lines if ln.startswith("- "))
    assert f"torch {torch.__version__}" in facts["versions"]
    assert f"torchvision {torchvision.__version__}" in facts["versions"]
    assert {"machine", "device", "date", "settings", "load average (1 min) at start / end"} <= set(facts)
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$", facts["date"])
    header = lines.index("| " + " | ".join(perf.COLUMNS) + " |")
    assert lines[header + 1] == "|" + "---|" * len(perf.COLUMNS)
    rows = [ROW.match(ln) for ln in lines[header + 2:] if ln.startswith("| ")]
    assert all(rows), [ln for ln in lines[header + 2:] if ln.startswith("| ")]
    gpu_keys = [f"gpu/{name}/{kind}" for name in perf.GPU_ARCHS for kind in ("train", "evaluate")]
    assert [r["key"] for r in rows] == [*perf.CPU_LINES, *gpu_keys, "gpu/decode"]
    targets = {"train/in_memory": ">= 0.97", "train/streamed": ">= 0.97", "evaluate": ">= 0.97",
               "autoattack": ">= 0.98", "loader": ">= 0.95", "store": ">= 2.00", "gpu/resnet50/train": ">= 0.95"}
    for r in rows:
        assert r["target"] == targets.get(r["key"], "-")
        if r["result"].startswith("not measured"):
            assert r["key"].startswith("gpu/") and not torch.cuda.is_available()
            assert r["result"] == "not measured (no CUDA)" and r["ours"] == r["bare"] == "not measured"
            continue
        assert re.match(r"^\d+\.\d images/s$", r["ours"]) and re.match(r"^\d+\.\d images/s$", r["bare"])
        ratio, (low, high) = float(r["ratio"]), map(float, r["spread"].split(".."))
        assert 0 < low <= ratio <= high
        expected = "-" if r["target"] == "-" else ("pass" if ratio >= float(r["target"][3:]) else "fail")
        assert r["result"] == expected
    met = re.search(r"^Targets met: (\d+) of (\d+) \((\d+) not measured\)\.$", text, re.M)
    assert met and int(met[2]) == len(targets)
    assert int(met[1]) == sum(r["result"] == "pass" for r in rows)
