"""Copy the committed leaderboards into README.md (between their `<!-- begin PATH -->` and
`<!-- end PATH -->` markers), so the README shows exactly what `results/` holds.

    python scripts/readme_tables.py           # rewrite README.md
    python scripts/readme_tables.py --check   # exit 1 when README.md is out of date

tests/test_docs.py checks the same thing.
"""
from __future__ import annotations

import argparse
import re
import sys
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when out of date")
    args = ap.parse_args()
    readme = REPO / "README.md"
    text = readme.read_text()
    new = synced(text)
    if args.check:
        if new != text:
            sys.exit("README.md's tables differ from results/: run python scripts/readme_tables.py")
        return
    readme.write_text(new)


if __name__ == "__main__":
    main()
