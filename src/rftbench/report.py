"""`index.html`: the leaderboard as one static page beside leaderboard.csv/.md/.tex.

No server and no network: the page is plain HTML with an inline script (no CDN). One section per
(suite, backbone) with its table (click any header to sort, again to reverse), its plots inline
(relative `<img>` paths) and, per row, links to the `config.yaml` and `metrics.csv` of the runs
behind it (paths relative to the output folder).
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path

import pandas as pd

from rftbench.utils import write_text_atomic

INDEX = "index.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.board { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1em; }
table.board th, table.board td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
table.board th { background: #f0f0f0; cursor: pointer; user-select: none; }
table.board th.asc::after { content: " \\25B2"; } table.board th.desc::after { content: " \\25BC"; }
table.board td.key { text-align: left; } table.board tr:nth-child(even) td { background: #fafafa; }
.plots img { max-width: 48%; margin: 4px; border: 1px solid #ddd; } .note { color: #555; font-size: 12px; }
"""
SCRIPT = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  const asc = !th.classList.contains('asc');
  table.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
  th.classList.add(asc ? 'asc' : 'desc');
  const key = tr => tr.cells[col].dataset.v;
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    if (x === '' || y === '') return (x === '') - (y === '');  // empty cells last either way
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return asc ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll('table.board th').forEach(th => th.addEventListener('click', () => sortBy(th)));
"""


def _cell(text: str, sort_value, css: str = "") -> str:
    v = "" if sort_value is None or (isinstance(sort_value, float) and math.isnan(sort_value)) else sort_value
    cls = f' class="{css}"' if css else ""
    return f'<td{cls} data-v="{html.escape(str(v), quote=True)}">{text}</td>'


def _run_links(runs: pd.DataFrame, row: pd.Series, runs_root: Path, out_dir: Path) -> str:
    mine = runs[(runs["suite"] == row["suite"]) & (runs["backbone"] == row["backbone"])
                & (runs["method"] == row["method"])]
    if "variant" in runs and "variant" in row:
        mine = mine[mine["variant"] == row["variant"]]
    links = []
    for r in mine.sort_values("seed").itertuples():
        folder = runs_root / str(r.suite) / str(r.backbone).replace("/", "_") / str(r.method) / str(r.run_id)
        rel = Path(os.path.relpath(folder, out_dir)).as_posix()
        links.append(f'seed {r.seed}: <a href="{html.escape(rel)}/config.yaml">config</a> '
                     f'<a href="{html.escape(rel)}/metrics.csv">metrics</a>')
    return "<br>".join(links)


def section(board: pd.DataFrame, runs: pd.DataFrame, display: pd.DataFrame, runs_root: Path, out_dir: Path,
            plots: list[str]) -> str:
    """One (suite, backbone): the table (display text, raw values to sort by) and its plots."""
    cols = [c for c in display.columns if c not in ("suite", "backbone")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "<th>runs</th>"
    body = []
    for i, row in board.iterrows():
        cells = []
        for c in cols:
            text = html.escape(str(display.loc[i, c]))
            if text.startswith("**") and text.endswith("**"):
                text = f"<b>{text[2:-2]}</b>"
            raw = row[c] if c in row.index else display.loc[i, c]
            cells.append(_cell(text, raw, "key" if c == "method" else ""))
        cells.append(_cell(_run_links(runs, row, runs_root, out_dir), "", "key"))
        body.append("<tr>" + "".join(cells) + "</tr>")
    imgs = "".join(f'<a href="{html.escape(p)}"><img src="{html.escape(p)}" alt="{html.escape(p)}"></a>' for p in plots)
    return (f'<table class="board"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<div class="plots">{imgs}</div>' if imgs else ""))


def write_index(board: pd.DataFrame, runs: pd.DataFrame, display: pd.DataFrame, runs_root: str | Path,
                out_dir: str | Path, plot_paths: list[Path], note: str) -> Path:
    """Write `<out_dir>/index.html`; `display` is the Markdown display table of `board` (same
    index), `plot_paths` the plots written into `out_dir` (each shown in the section whose suite
    and backbone its name carries)."""
    out_dir, runs_root = Path(out_dir), Path(runs_root)
    names = [Path(p).name for p in plot_paths]
    parts = []
    for (suite, backbone), g in board.groupby(["suite", "backbone"], sort=True):
        safe = [str(suite), str(backbone).replace("/", "_")]
        mine = [n for n in names if n == f"id_vs_ood_{safe[0]}.png" or n.endswith(f"_{safe[0]}_{safe[1]}.png")]
        parts.append(f'<h2 id="{html.escape(safe[0])}-{html.escape(safe[1])}">{html.escape(str(suite))} / '
                     f'{html.escape(str(backbone))}</h2>'
                     + section(g, runs, display.loc[g.index], runs_root, out_dir, mine))
    where = Path(os.path.relpath(runs_root, out_dir)).as_posix()
    runs_note = (f" The runs column links into {where}/, the runs folder this page was built from: the "
                 "links work where that folder exists (beside the runs, not in a bare clone).")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>rftbench leaderboard</title>"
            f"<style>{STYLE}</style></head><body><h1>rftbench leaderboard</h1>"
            f'<p class="note">{html.escape(note + runs_note)} Click a column header to sort. Tables as CSV: '
            '<a href="leaderboard.csv">leaderboard.csv</a>, <a href="leaderboard_variants.csv">variants</a>, '
            '<a href="effective_robustness.csv">effective robustness fits</a>.</p>'
            + "".join(parts) + f"<script>{SCRIPT}</script></body></html>\n")
    path = out_dir / INDEX
    write_text_atomic(path, page)
    return path
