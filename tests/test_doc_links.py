"""Every relative link in the README and docs/ points at a file of the repository (results directories move:
arena/results -> a dated directory; a link left behind would 404 on GitHub and in the wheel's long description)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _relative_links(doc: Path):
    for m in LINK.finditer(doc.read_text(encoding="utf-8")):
        target = m.group(1)
        if "://" not in target and not target.startswith("mailto:"):
            yield target


def test_relative_links_in_readme_and_docs_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    links = {(d, t) for d in docs for t in _relative_links(d)}
    assert len(links) >= 10  # the pattern finds the links (the README links every docs page)
    broken = sorted(f"{d.relative_to(ROOT)} -> {t}" for d, t in links if not (d.parent / t).exists())
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see [a](missing/report.md#top) and [b](https://example.org) and [c](x.md)\n")
    assert list(_relative_links(doc)) == ["missing/report.md", "x.md"]
    assert not (tmp_path / "missing/report.md").exists()
