"""Write each preset header's cost paragraph (configs/experiment/<preset>.yaml, from "# Expected " to
the last "#   " line after it) from what `--plan` prints now: the cost model (`rftbench.costs`) on
results/perf.json's measured throughput, so that the headers quote measurements, not guesses.

    python scripts/preset_costs.py                 # every preset of PRESETS
    python scripts/preset_costs.py bench ct_transfer

tests/test_costs.py fails when a header is out of date (after `make perf` or a change of the rules).
"""
from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd

from rftbench import costs
from rftbench.identity import CONFIG_DIR
from rftbench.plan import plan, total_line

# preset -> the device its estimate is for (the digits presets run on the CPU)
PRESETS = {"bench": "cpu", "bench_tuned": "cpu", "compare_all": "cpu", "ct_transfer": "cuda",
           "ct_robustbench": "cuda", "ftp_domainnet": "cuda", "wiseft_imagenet": "cuda", "rws_cifar10c": "cuda"}


def preset_plan(preset: str, root: Path) -> pd.DataFrame:
    """The preset's plan with empty runs/cache folders and no data (sizes: declared, or digits built)."""
    return plan([f"experiment={preset}", f"paths.runs={root / 'runs'}", f"paths.cache={root / 'cache'}",
                 f"paths.data={root / 'no-data'}", f"device={PRESETS[preset]}"])


def paragraph(preset: str, table: pd.DataFrame) -> str:
    """The header's cost paragraph as plain text (unwrapped)."""
    cmd = f"`python -m rftbench.plan experiment={preset} device={PRESETS[preset]}`"
    counted = costs.totals_line(table)
    if table["est_s"].notna().any():
        where = "on the CPU" if PRESETS[preset] == "cpu" else "on the GPU"
        return (f"Expected cost {where} (an estimate from measured throughput, results/perf.json: what {cmd} "
                f"prints): {total_line(table)}; {counted}.")
    wanted = sorted({f"{PRESETS[preset]}/{name}" if PRESETS[preset] == "cpu" else f"gpu/{name}"
                     for name in table["timed_as"]})
    return (f"Expected GPU cost: not measured: results/perf.md has no {' / '.join(wanted)} figure yet; {cmd} "
            f"prints the estimate once `make perf` has measured one on a GPU. Counted without a GPU: {counted}.")


def wrap(text: str) -> list[str]:
    return [line + "\n" for line in textwrap.wrap(text, width=105, initial_indent="# ", subsequent_indent="#   ",
                                                  break_on_hyphens=False, break_long_words=False)]


def header_span(lines: list[str]) -> tuple[int, int]:
    """The cost paragraph's lines [start, end): from "# Expected " through its "#   " continuation lines."""
    start = next(i for i, line in enumerate(lines) if line.startswith("# Expected "))
    end = start + 1
    while end < len(lines) and lines[end].startswith("#   "):
        end += 1
    return start, end


def rewritten(preset: str, table: pd.DataFrame) -> str:
    path = Path(CONFIG_DIR) / "experiment" / f"{preset}.yaml"
    lines = path.read_text().splitlines(keepends=True)
    start, end = header_span(lines)
    return "".join(lines[:start] + wrap(paragraph(preset, table)) + lines[end:])


def main(presets: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets or list(PRESETS):
            (Path(CONFIG_DIR) / "experiment" / f"{preset}.yaml").write_text(
                rewritten(preset, preset_plan(preset, Path(tmp))))
            print(f"configs/experiment/{preset}.yaml: cost paragraph written")


if __name__ == "__main__":
    main(sys.argv[1:])
