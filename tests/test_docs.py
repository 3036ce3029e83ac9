"""The docs stay true: current settings page, working links, real settings and commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gossipdqn.settings_doc import COMMAND, describe_settings, render_settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "experiments" / "README.md", ROOT / "launch" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)
SETTINGS = {s.key for s in describe_settings()}
SECTIONS = {key.split(".")[0] for key in SETTINGS if "." in key}
FILE_SUFFIXES = {"pt", "py", "md", "toml", "json", "jsonl", "png", "sbatch", "example", "pgid"}


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_settings_page_is_current() -> None:
    page = ROOT / "docs" / "settings.md"
    assert page.is_file(), f"docs/settings.md is missing; run `{COMMAND}`"
    assert page.read_text(encoding="utf-8") == render_settings(), (
        f"docs/settings.md is stale (gossipdqn/config.py changed); run `{COMMAND}`"
    )


def test_settings_page_has_every_setting_with_its_doc() -> None:
    text = render_settings()
    for s in describe_settings():
        assert f"| `{s.key}` |" in text and s.doc.replace("|", "\\|") in text, s.key
    assert "`learner.lr` | float | `0.002` | `>= 0.0` | Adam learning rate |" in text
    assert '`gossip.topology` | str | `"exponential"` | `"ring", "exponential"' in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {_slug(h) for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading #{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_settings_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    pattern = r"(?<![\w./-])(" + "|".join(sorted(SECTIONS)) + r")\.([a-z_][a-z0-9_]*)\b(?![.(/])"
    for section, key in re.findall(pattern, text):
        if key in FILE_SUFFIXES:
            continue
        assert f"{section}.{key}" in SETTINGS, (
            f"{page.relative_to(ROOT)} names {section}.{key}, which gossipdqn/config.py lacks"
        )


def _shell_commands(text: str) -> list[str]:
    """Every `gossipdqn ...` line of the page's bash blocks, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("gossipdqn "):
                commands.append(line)
    return commands


README_COMMANDS = _shell_commands((ROOT / "README.md").read_text(encoding="utf-8"))
DOC_COMMANDS = sorted({c for page in PAGES for c in _shell_commands(page.read_text("utf-8"))})


def test_readme_keeps_the_commands_ci_runs() -> None:
    """.ci/run installs `.[dev]` and runs `pytest`, as the README tells people to."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = re.search(r"```bash\n(.*?)```", readme, flags=re.S)
    assert quick_start is not None
    lines = [line.split("#")[0].strip() for line in quick_start.group(1).splitlines()]
    assert 'pip install -e ".[dev]"' in lines and "pytest" in lines
    assert "gossipdqn local -n 4" in README_COMMANDS


@pytest.mark.parametrize("command", DOC_COMMANDS)
def test_documented_commands_parse(command: str) -> None:
    from gossipdqn.cli import build_parser

    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"documented command does not parse (exit {e.code}): {command}")
