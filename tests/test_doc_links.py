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


def _broken_links(docs, root: Path) -> list[str]:
    return sorted(f"{d.relative_to(root)} -> {t}" for d in docs for t in set(_relative_links(d))
                  if not (d.parent / t).exists())


def test_relative_links_in_readme_and_docs_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert sum(1 for d in docs for _ in _relative_links(d)) >= 10  # the pattern finds the links
    broken = _broken_links(docs, ROOT)
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see [a](missing/report.md#top) and [b](https://example.org) and [c](x.md)\n")
    assert list(_relative_links(doc)) == ["missing/report.md", "x.md"]
    assert _broken_links([doc], tmp_path) == ["x.md -> missing/report.md"]
