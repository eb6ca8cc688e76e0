"""Copy the committed leaderboards into README.md (between their `<!-- begin PATH -->` and
`<!-- end PATH -->` markers), so the README shows exactly what `results/` holds.

    python scripts/readme_tables.py

tests/test_docs.py fails when README.md is out of date.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLES = ("results/leaderboard.md", "results/tuned/leaderboard.md")


def block(path: str) -> re.Pattern:
    return re.compile(rf"(<!-- begin {re.escape(path)} -->\n)(.*?)(<!-- end {re.escape(path)} -->)", re.S)


def synced(readme: str, repo: Path = REPO) -> str:
    """`readme` with every table block replaced by its file's current content."""
    for path in TABLES:
        pattern = block(path)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- begin {path} --> ... <!-- end {path} --> block")
        content = (repo / path).read_text()
        readme = pattern.sub(lambda m: m.group(1) + content + m.group(3), readme)
    return readme


def main() -> None:
    readme = REPO / "README.md"
    readme.write_text(synced(readme.read_text()))


if __name__ == "__main__":
    main()
