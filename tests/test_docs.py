"""The documentation stays true to the code: links resolve, every configuration key is
documented, the README stays one screen and gives the test command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from deltanmf.workflow.config import compose

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "resources" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: outside this repository
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = [_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)]
            if anchor not in headings:
                broken.append(target)
    assert not broken, f"{page.name}: links to missing files or headings: {broken}"


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_configuration_key_is_documented():
    config = OmegaConf.to_container(compose(), resolve=False)
    page = (ROOT / "docs" / "configuration.md").read_text()
    # the logger's constructor arguments are Lightning's, documented there
    keys = [k for k in _leaves(config) if not k.startswith("logger.")]
    assert len(keys) > 50
    missing = [k for k in keys if f"`{k.rsplit('.', 1)[-1]}" not in page and f"{k}" not in page]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def test_readme_is_one_screen_and_gives_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() in readme, "the README's test command must be the one .ci/run runs"
    pinned = re.search(r"pip install .*(torch==[\d.]+)", "\n".join(ci)).group(1)
    assert f"pip install {pinned}" in readme, "the README installs the torch that CI installs"
