"""The documentation keeps up with the code: every config key is documented, no removed key is,
and every relative link in README.md and docs/*.md points at a file that exists."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from zorefine.config.schema import ZorefineConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGURATION = REPO / "docs" / "configuration.md"
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# Code spans that look like `group.key` but name a file (the refine summary is `refine.json`).
_FILE_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".md", ".png", ".html", ".py", ".sh", ".csv")


def _nested_dataclass(cls: type, field: dataclasses.Field) -> type | None:
    """The dataclass type of ``field`` if it holds one (string annotations resolved)."""
    try:
        hint = typing.get_type_hints(cls).get(field.name)
    except Exception:  # an annotation that cannot be resolved here: fall back to the default
        hint = None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = field.default
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return type(default)
    return None


def _walk(cls: type, prefix: str = "") -> tuple[list[str], list[str]]:
    """(every leaf key, every nested-dataclass node key) of a config dataclass, dotted."""
    leaves: list[str] = []
    nodes: list[str] = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        nested = _nested_dataclass(cls, field)
        if nested is None:
            leaves.append(key)
        else:
            nodes.append(key)
            sub_leaves, sub_nodes = _walk(nested, key + ".")
            leaves += sub_leaves
            nodes += sub_nodes
    return leaves, nodes


LEAF_KEYS, NODE_KEYS = _walk(ZorefineConfig)
GROUPS = [node for node in NODE_KEYS if "." not in node]


def _without_code_blocks(text: str) -> str:
    return _FENCE.sub("", text)


def test_walk_finds_the_nested_groups() -> None:
    # A guard for the walk itself: the groups and the engine's settings are descended into.
    assert {"model", "data", "align", "analyze", "refine", "evaluate", "model.builtin", "refine.zo"} <= set(NODE_KEYS)
    assert {"stages", "seed", "resume", "refine.zo.eps", "model.builtin.hidden_size", "evaluate.sigmas"} <= set(LEAF_KEYS)


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row outside code blocks."""
    rows = []
    for line in _without_code_blocks(text).splitlines():
        line = line.strip()
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_config_key_is_documented() -> None:
    # Each key must head a row of its own: `| `refine.zo.eps` | default | what it does |`.
    documented = {
        span for row in _table_rows(CONFIGURATION.read_text(encoding="utf-8")) for span in _CODE_SPAN.findall(row[0])
    }
    missing = [key for key in LEAF_KEYS if key not in documented]
    assert not missing, (
        "config keys not documented in docs/configuration.md (add a table row whose first cell is "
        "the key as a code span, e.g. `refine.zo.eps`): " + ", ".join(missing)
    )


def test_configuration_tables_name_only_real_keys() -> None:
    known = set(LEAF_KEYS) | set(NODE_KEYS)
    key_like = re.compile(r"(?:%s)(?:\.\w+)+" % "|".join(map(re.escape, GROUPS)))
    unknown = []
    for row in _table_rows(CONFIGURATION.read_text(encoding="utf-8")):
        for span in _CODE_SPAN.findall(" | ".join(row)):
            key = span.split("=", 1)[0].strip().lstrip("+")
            if key.endswith(_FILE_SUFFIXES) or not key_like.fullmatch(key):
                continue
            if key not in known:
                unknown.append(key)
    assert not unknown, (
        "docs/configuration.md describes keys the config does not have (removed or renamed?): "
        + ", ".join(sorted(set(unknown)))
    )


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in _HEADING.findall(_without_code_blocks(path.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        seen = counts.get(slug, 0)
        counts[slug] = seen + 1
        anchors.add(slug if seen == 0 else f"{slug}-{seen}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _without_code_blocks(path.read_text(encoding="utf-8")))
    links = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        links.append(target)
    return links


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files(doc: Path) -> None:
    broken = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: " + ", ".join(broken)


def test_docs_folder_is_linked_from_the_readme() -> None:
    readme_links = {target.partition("#")[0] for target in _relative_links(REPO / "README.md")}
    unlinked = [p.name for p in DOC_FILES[1:] if f"docs/{p.name}" not in readme_links]
    assert not unlinked, "docs pages the README's Documentation section does not link: " + ", ".join(unlinked)
