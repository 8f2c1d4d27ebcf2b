"""The pages a reader follows: every link of README.md and docs/ (and every docs/ link in a code
comment) reaches a file and a heading that exist, the README stays a first page, and no function of
a top-level file grows past 100 lines (issue #35)."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = sorted(ROOT.glob("*.py"))


def slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '#' inside code blocks is no heading
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_slug_follows_github():
    assert slug(" Flow files, and why there is a PNG codec (png16.py)") == "flow-files-and-why-there-is-a-png-codec-png16py"
    assert slug("Warping, occlusion and correlation (`warp.py`)") == "warping-occlusion-and-correlation-warppy"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_of_the_pages_reaches_a_file_and_a_heading(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading in {file.name}"


def test_every_docs_link_in_the_code_reaches_a_heading():
    found = 0
    for source in CODE:
        for path, anchor in re.findall(r"(docs/\w+\.md)#([\w-]+)", source.read_text()):
            found += 1
            assert anchor in anchors(ROOT / path), f"{source.name}: {path}#{anchor}: no such heading"
    assert found >= 5  # the comments that give a reason and link to its measurement


def test_the_readme_is_a_first_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 14_000
    order = ["## Quick start", "## What the main run prints and shows", "## Commands", "## From the papers to the code",
             "## Conventions", "## Glossary", "## What learns", "## Replication"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    for name in ("UL", "OE", "TC", "TCC_fix", "TCC_single", "TCC_multi", "OM", "UD", "EPE", "noc", "Fl", "F(a, a)",
                 "snippet", "IoU cat"):
        assert f"| {name}" in text or f"/ {name}" in text or f"**{name}**" in text, name
    for method in ("psp", "flow2seg", "efc", "flow"):
        assert f"python train.py --method {method}" in text, method
    for command in ("python evaluate.py", "python replicate.py", "python bench.py", "torchrun", "--dataset kitti",
                    "--dataset camvid", "--dataset cityscapes"):
        assert command in text, command


def test_no_function_of_a_top_level_file_is_over_100_lines():
    long = [f"{source.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for source in CODE for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert not long
