"""index.html: static (no network), one section per suite/backbone, plots inline, rows linking to
their runs; the slow test sorts it in a real headless Chromium and keeps a screenshot."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rftbench import leaderboard as lb
from rftbench.identity import run_id_of
from rftbench.results import RunFolder

ACC = {"zeroshot": (0.50, 0.60), "lp": (0.70, 0.55), "ft": (0.82, 0.41), "ct": (0.83, 0.52), "rws": (0.60, 0.58)}


def make_runs(root: Path) -> None:
    for backbone in ("b1", "b2"):
        for method, (i, o) in ACC.items():
            for seed in range(3):
                config = {"seed": seed, "method": {"name": method}, "backbone": {"name": backbone}}
                f = RunFolder(root, "digits", backbone, method, run_id_of(config))  # named by its config
                f.path.mkdir(parents=True)
                f.write_text("config.yaml", yaml.safe_dump(config))
                d = 0.01 * seed + (0.05 if backbone == "b2" else 0)
                f.write_metrics([{"split": "test", "metric": "acc", "value": i + d},
                                 {"split": "ood", "metric": "acc_mean", "value": o + d},
                                 {"split": "-", "metric": "chosen/val_acc", "value": i}], seed)
                f.finish()


@pytest.fixture
def built(tmp_path) -> Path:
    runs, out = tmp_path / "runs", tmp_path / "results"
    make_runs(runs)
    lb.main(["--runs", str(runs), "--out", str(out)])
    return out


def test_index_is_static_sectioned_and_links_to_runs(built):
    page = (built / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # no network
    assert [m for m in re.findall(r"<h2[^>]*>([^<]+)</h2>", page)] == ["digits / b1", "digits / b2"]
    assert page.count('<table class="board">') == 2 and page.count("<tr><td") == 10
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert not src.startswith("/") and (built / src).is_file()
    links = re.findall(r'<a href="([^"]+/(?:config\.yaml|metrics\.csv))"', page)
    assert len(links) == 2 * 10 * 3  # two files per run, 3 runs per row
    assert all(not link.startswith("/") and (built / link).is_file() for link in links)
    ct0 = run_id_of({"seed": 0, "method": {"name": "ct"}, "backbone": {"name": "b1"}})
    assert f"../runs/digits/b1/ct/{ct0}/config.yaml" in links
    # the image of each section is its own backbone's or the suite's
    assert 'src="id_vs_ood_digits.png"' in page
    assert "The runs column links into ../runs/, the runs folder this page was built from" in page


def _chromium() -> tuple[str, str] | None:
    def find():
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
        return (browser, driver) if browser and Path(driver).exists() else None

    if find() is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], capture_output=True, timeout=600)
    return find()


@pytest.mark.slow
def test_index_sorts_in_headless_chromium(built, tmp_path):
    found = _chromium()
    if found is None:
        pytest.skip("no chromium/chromedriver and `apt-get install -y chromium chromium-driver` failed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1500,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        driver.get((built / "index.html").as_uri())
        table = driver.find_elements(By.CSS_SELECTOR, "table.board")[0]
        methods = lambda: [r.find_elements(By.TAG_NAME, "td")[0].text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert methods() == sorted(ACC)  # as written: by method
        header = next(h for h in table.find_elements(By.TAG_NAME, "th") if h.text.startswith("ood_mean_acc"))
        header.click()
        assert methods() == ["ft", "ct", "lp", "rws", "zeroshot"]  # ascending OOD mean
        header.click()
        assert methods() == ["zeroshot", "rws", "lp", "ct", "ft"]
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
        shot = tmp_path / "index.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
