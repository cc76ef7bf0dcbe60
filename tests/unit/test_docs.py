"""The docs a reader can find: a short README that keeps the two commands on top, every relative link in it and
in docs/ pointing at a file and a heading that exist, a code map naming only what is there, and the site
building with `mkdocs build --strict`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """Every relative link of the page whose file or heading does not exist, as 'page: target (why)'."""
    problems = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not checked offline
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"{page.name}: {target} (no file {linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            problems.append(f"{page.name}: {target} (no heading with the anchor #{anchor} in {linked.name})")
    return problems


def test_every_relative_link_points_at_a_file_and_a_heading_that_exist() -> None:
    problems = [problem for page in _pages() for problem in broken_links(page)]
    assert not problems, "fix these links (or the headings they name):\n" + "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## The part, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#the-part-with-code) [self](#page) `[in code](nowhere.md)`\n\n"
        "```\n[in a block](nowhere.md)\n```\n\n[gone](nowhere.md) [moved](other.md#the-old-part) [web](https://x.y/z)\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "nowhere.md (no file" in problems[0] and "#the-old-part" in problems[1]


def test_the_readme_is_short_and_keeps_the_two_commands_on_top() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the detail into a page of docs/"
    top = "\n".join(lines[:10])
    assert "make demo" in top and "make test" in top, "README.md must show `make demo` and `make test` on top"
    assert "Running on Kubernetes: [docs/kubernetes.md](docs/kubernetes.md)" in README.read_text()


def test_every_page_of_docs_is_in_the_index_and_the_site_nav() -> None:
    index = (DOCS / "index.md").read_text()
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not list {page.name}: add a row for it"
        assert f": {page.name}" in nav, f"mkdocs.yml's nav does not list {page.name}: add it"


def test_the_code_map_names_only_files_that_exist_and_every_package() -> None:
    block = FENCE.search((DOCS / "code-map.md").read_text())
    assert block, "docs/code-map.md has no tree"
    stack: list[tuple[int, str]] = []
    named = set()
    for line in block.group(0).splitlines()[1:-1]:
        match = re.match(r"^( *)(\S+\.py|\S+/)(?:\s|$)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(part for _, part in stack) + name
        named.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, name))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"docs/code-map.md names what does not exist: {missing}; update the map"
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "src" / "ferry").rglob("__init__.py")}
    unnamed = sorted(packages - named)
    assert not unnamed, f"docs/code-map.md does not name the packages {unnamed}; add them"


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mkdocs is not installed: pip install -c constraints.txt -e '.[test]'")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_site_builds_with_mkdocs_strict(tmp_path: Path) -> None:
    result = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    assert (tmp_path / "site" / "operations.html").exists()


def test_mkdocs_strict_fails_on_a_broken_anchor(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as index:
        index.write("\nSee [the part that moved](operations.md#a-heading-nobody-wrote).\n")
    result = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "a-heading-nobody-wrote" in result.stdout + result.stderr
