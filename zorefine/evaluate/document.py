"""A report as a list of blocks, written out as markdown and as one self-contained HTML page.

Reports are built once, from data, and rendered twice: markdown for terminals and diffs, HTML
(plots embedded as base64 PNG, no outside files or scripts) to open in a browser or attach.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    caption: str = ""


@dataclass
class Details:
    summary: str
    lines: list[str]


Block = Union[Heading, Paragraph, Bullets, Table, Image, Details]


def _bold(text: str) -> str:
    """``**x**`` spans to ``<b>x</b>``, after escaping."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


@dataclass
class Document:
    """A titled sequence of blocks."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> "Document":
        self.blocks.extend(blocks)
        return self

    def to_markdown(self, relative_to: Path | None = None) -> str:
        """Markdown; images are linked by path (relative to ``relative_to`` when given)."""
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                out += ["#" * block.level + " " + block.text, ""]
            elif isinstance(block, Paragraph):
                out += [block.text, ""]
            elif isinstance(block, Bullets):
                out += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                out.append("| " + " | ".join(block.header) + " |")
                out.append("|" + "---|" * len(block.header))
                out += ["| " + " | ".join(row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Image):
                target = block.path.name if relative_to is not None and block.path.parent == relative_to else str(block.path)
                out += [f"![{block.caption}]({target})", ""]
            elif isinstance(block, Details):
                out += [f"<details><summary>{block.summary}</summary>", ""]
                out += [f"- {line}" for line in block.lines]
                out += ["", "</details>", ""]
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        """One HTML page with every image embedded."""
        body: list[str] = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if isinstance(block, Heading):
                body.append(f"<h{block.level}>{_bold(block.text)}</h{block.level}>")
            elif isinstance(block, Paragraph):
                body.append(f"<p>{_bold(block.text)}</p>")
            elif isinstance(block, Bullets):
                body.append("<ul>" + "".join(f"<li>{_bold(item)}</li>" for item in block.items) + "</ul>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                rows = "".join("<tr>" + "".join(f"<td>{_bold(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, Image):
                body.append(_embedded_image(block))
            elif isinstance(block, Details):
                items = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in block.lines)
                body.append(f"<details><summary>{html.escape(block.summary)}</summary><ul>{items}</ul></details>")
        return _PAGE.format(title=html.escape(self.title), body="\n".join(body))

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.md`` and ``stem.html`` into ``directory``; returns both paths."""
        markdown_path, html_path = directory / f"{stem}.md", directory / f"{stem}.html"
        markdown_path.write_text(self.to_markdown(relative_to=directory))
        html_path.write_text(self.to_html())
        return markdown_path, html_path


def _embedded_image(image: Image) -> str:
    if not image.path.is_file():
        return f"<p><i>missing plot: {html.escape(str(image.path))}</i></p>"
    data = base64.b64encode(image.path.read_bytes()).decode("ascii")
    caption = f"<figcaption>{html.escape(image.caption)}</figcaption>" if image.caption else ""
    return f'<figure><img alt="{html.escape(image.caption)}" src="data:image/png;base64,{data}">{caption}</figure>'


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.85rem; }}
code {{ font-size: 0.8rem; }}
</style></head>
<body>
{body}
</body></html>
"""

