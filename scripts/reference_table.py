"""Write every paper preset's reported figures (configs/reference/*.yaml) into docs/protocol.md,
between `<!-- begin reference -->` and `<!-- end reference -->`.

    python scripts/reference_table.py

tests/test_reference.py fails when docs/protocol.md is out of date.
"""
from __future__ import annotations

import re
from pathlib import Path

from rftbench.reference import docs_table

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
BLOCK = re.compile(r"(<!-- begin reference -->\n)(.*?)(<!-- end reference -->)", re.S)


def synced(text: str) -> str:
    """`text` with its reference block replaced by the current figures."""
    if not BLOCK.search(text):
        raise SystemExit("docs/protocol.md has no <!-- begin reference --> ... <!-- end reference --> block")
    return BLOCK.sub(lambda m: m.group(1) + docs_table() + m.group(3), text)


def main() -> None:
    PROTOCOL.write_text(synced(PROTOCOL.read_text()))


if __name__ == "__main__":
    main()
