"""The documentation lives in the repository: nothing points outside it, every docs/ link resolves."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "shared" + "/specs"  # design notes outside the repository (split so this file does not match)
PARENT = ".." + "/shared"
SEARCHED = ("src", "tests", "configs", "scripts", "docs", "README.md")


def _texts():
    for top in SEARCHED:
        path = ROOT / top
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".py", ".md", ".yaml", ".txt", ".toml"):
                yield f, f.read_text(errors="replace")


def test_nothing_points_outside_the_repository():
    hits = [f"{f.relative_to(ROOT)}:{i}" for f, text in _texts()
            for i, line in enumerate(text.splitlines(), 1) if OUTSIDE in line or PARENT in line]
    assert not hits, f"references to files outside the repository: {hits}"


def test_every_docs_reference_exists():
    for name in ("methods.md", "protocol.md", "adding-a-method.md"):
        assert (ROOT / "docs" / name).is_file(), name
    missing = {(str(f.relative_to(ROOT)), ref) for f, text in _texts()
               for ref in re.findall(r"docs/([\w.-]+\.md)", text) if not (ROOT / "docs" / ref).is_file()}
    assert not missing, missing


def test_section_references_exist():
    """"docs/<file>.md section N" in code and configs names a numbered heading of that file."""
    for f, text in _texts():
        for doc, n in re.findall(r"docs/([\w.-]+\.md) section (\d+)", text):
            headings = (ROOT / "docs" / doc).read_text()
            assert re.search(rf"^## {n}\. ", headings, re.M), f"{f.relative_to(ROOT)}: {doc} has no section {n}"


def test_readme_shows_the_committed_tables():
    """README.md's two leaderboards are the committed results/ files, verbatim
    (scripts/readme_tables.py rewrites them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    assert mod.synced(readme) == readme, "README.md's tables are out of date: python scripts/readme_tables.py"
    for path in mod.TABLES:
        assert (ROOT / path).read_text() in readme
