"""The project stands on its own: no citation of documents that do not ship with it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"seed §|REFERENCE §|REFERENCE\.md|\.\./shared|/work/shared|shared/seeds")
ANCHOR = re.compile(r"docs/method\.md#([\w-]+)")


def _project_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "frogwatch").rglob("*.py"))]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name]
    for extra in ("BENCHMARKS.md", "DEVELOPERS.md", "examples", "benchmarks"):
        p = ROOT / extra
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".py", ".md"))
    return files


def test_no_citation_of_documents_outside_the_project():
    hits = []
    for path in _project_files():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "cite docs/method.md instead:\n" + "\n".join(hits)


def test_every_method_anchor_cited_exists():
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', method))
    assert {"alpha", "tpl", "relevance", "budget", "blend", "global", "columns"} <= anchors
    for path in _project_files():
        for anchor in ANCHOR.findall(path.read_text(encoding="utf-8")):
            assert anchor in anchors, f"{path.relative_to(ROOT)} cites a missing anchor #{anchor}"
    for anchor in re.findall(r"\]\(#([\w-]+)\)", method):  # the page's own links
        assert anchor in anchors, anchor
