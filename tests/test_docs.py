"""The README fits on a page, and every relative link and #anchor in README.md and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, fence = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_fits_on_a_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading '#{anchor}' in {dest.name})")
    assert broken == [], f"{page.name}: broken links {broken}"


def test_the_checker_sees_a_broken_anchor(tmp_path: Path):
    page = tmp_path / "a.md"
    page.write_text("# Title\n## Some heading\n[ok](#some-heading) [bad](#nowhere) [file](b.md)\n")
    assert links(page) == ["#some-heading", "#nowhere", "b.md"]
    assert anchors(page) == {"title", "some-heading"}


# How the project was made is no fact about it: these phrases say it (the list is skipped in this file only).
PROCESS_WORDS = re.compile(
    r"\blent\b|\bsession \d|\b(?:next|gpu|device|work) sessions?\b|\bissues? #?\d+\b|\btickets?\b|\bwork items?\b"
    r"|\bdevice tool\b|\bgoals? (?:is |was )?(?:not )?met\b|\bagainst the goals\b|\bhelper \"\w+\"|\bdrawn by chance\b"
    r"|\bTODO\b|\bFIXME\b",
    re.IGNORECASE,
)
SCANNED = ("docs", "benchmarks", "florence_kit", "tests")


def process_words(text: str) -> list[str]:
    return [m.group(0) for m in PROCESS_WORDS.finditer(text)]


def test_no_file_speaks_of_how_the_project_was_made():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            text_file = path.is_file() and path.suffix in {".md", ".py", ".sh", ".yaml", ".txt"}
            if not text_file or path == Path(__file__):
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                found += [f"{path.relative_to(ROOT)}:{n}: {w}" for w in process_words(line)]
    assert found == [], "\n".join(found)


def test_the_process_word_check_sees_them():
    assert process_words("run on a lent H200 in session 4 (issue 16); goal met. TODO") == [
        "lent", "session 4", "issue 16", "goal met", "TODO"]
    assert process_words("an ONNX InferenceSession; a session-scoped fixture; it issues a warning; silent") == []
