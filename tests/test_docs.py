"""The documentation hangs together: every page under docs/ is reachable from docs/index.md by links, and every
relative link in README.md and docs/ names a file that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(page: Path) -> list[Path]:
    return [(page.parent / target).resolve() for target in LINK.findall(page.read_text())
            if not target.startswith(("http://", "https://", "mailto:"))]


def test_every_doc_page_is_reachable_from_the_index():
    seen, todo = set(), [ROOT / "docs" / "index.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo.extend(_links(page))
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages - seen == set()


def test_relative_links_name_existing_files():
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
              for target in _links(page) if not target.exists()]
    assert not broken, broken
