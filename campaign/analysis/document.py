"""A report as a short list of typed blocks, each rendered to Markdown and to HTML, so the two
files always say the same thing and no Markdown parser is needed to make the HTML."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Characters that would start Markdown markup (code, emphasis, raw HTML, table cells); an
# underscore only at a word boundary, so names such as resnet18_text stay readable.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*<|]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; }
th { background: #f3f3f3; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
figure { margin: 0; }
.gallery { display: grid; grid-template-columns: repeat(auto-fit, minmax(30rem, 1fr));
           gap: 0.5rem; }
details { margin: 0.4rem 0; }
summary { cursor: pointer; font-weight: 600; }
"""


def _markdown_text(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), text)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2

    def markdown(self) -> str:
        return f"{'#' * self.level} {_markdown_text(self.text)}"

    def html(self) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class Paragraph:
    text: str

    def markdown(self) -> str:
        return _markdown_text(self.text)

    def html(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]

    def markdown(self) -> str:
        return "\n".join(f"- {_markdown_text(item)}" for item in self.items)

    def html(self) -> str:
        items = "".join(f"<li>{html.escape(item)}</li>" for item in self.items)
        return f"<ul>{items}</ul>"


@dataclass(frozen=True)
class Table:
    """Text cells; every column after the first is right-aligned (they hold numbers)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(_markdown_text(cell) for cell in cells) + " |"

        rule = "|---|" + "---:|" * (len(self.header) - 1)
        return "\n".join([line(self.header), rule, *(line(row) for row in self.rows)])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class Image:
    """A picture beside the report file, by relative path; in HTML its ``png`` bytes inline
    where given, so that the page stands alone (mailed, or opened from anywhere)."""

    path: str
    alt: str
    png: bytes | None = None

    def markdown(self) -> str:
        return f"![{_markdown_text(self.alt)}]({self.path.replace(' ', '%20')})"

    def html(self) -> str:
        source = html.escape(self.path)
        if self.png is not None:
            source = "data:image/png;base64," + base64.b64encode(self.png).decode()
        return f'<figure><img src="{source}" alt="{html.escape(self.alt)}"></figure>'


@dataclass(frozen=True)
class Gallery:
    """Pictures side by side (in HTML; one after the other in Markdown)."""

    images: tuple[Image, ...]

    def markdown(self) -> str:
        return "\n\n".join(image.markdown() for image in self.images)

    def html(self) -> str:
        return f'<div class="gallery">{"".join(i.html() for i in self.images)}</div>'


@dataclass(frozen=True)
class Details:
    """Blocks a reader opens on demand: folded in HTML, under a heading in Markdown."""

    summary: str
    blocks: tuple[Heading | Paragraph | Bullets | Table | Image, ...]

    def markdown(self) -> str:
        inner = "\n\n".join(block.markdown() for block in self.blocks)
        return f"### {_markdown_text(self.summary)}\n\n{inner}"

    def html(self) -> str:
        inner = "\n".join(block.html() for block in self.blocks)
        return f"<details><summary>{html.escape(self.summary)}</summary>\n{inner}\n</details>"


Block = Heading | Paragraph | Bullets | Table | Image | Gallery | Details


def to_markdown(blocks: Sequence[Block]) -> str:
    return "\n\n".join(block.markdown() for block in blocks) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A standalone page: inline style, no scripts, nothing fetched from elsewhere."""
    body = "\n".join(block.html() for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
