"""One model of a human-readable page, rendered two ways: Markdown (report.md, comparison.md, the
energy page) and one self-contained HTML file with the same content (figures inlined). Every
report builds a `Page`: a title, a headline of two or three sentences that state the result, then
blocks; nothing else writes Markdown or HTML. Tables made with `table` format their numbers a
column at a time (geobench.formatting)."""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from pathlib import Path

from geobench import formatting
from geobench.files import atomic_write_text


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Paragraph:
    text: str  # inline Markdown: `code`, **bold**, *emphasis*


@dataclasses.dataclass
class Bullets:
    items: list[str]


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclasses.dataclass
class Terms:
    """What the page's names mean: term → definition, each defined once on the page."""

    definitions: dict[str, str]


@dataclasses.dataclass
class Figure:
    path: str  # relative to the page's directory
    caption: str


Block = Heading | Paragraph | Bullets | Table | Terms | Figure


@dataclasses.dataclass
class Page:
    title: str
    blocks: list[Block] = dataclasses.field(default_factory=list)
    headline: list[str] = dataclasses.field(default_factory=list)  # sentences, inline Markdown

    def add(self, *blocks: Block) -> Page:
        self.blocks.extend(blocks)
        return self


def table(header: list[str], rows: list[list[object]], caption: str = "") -> Table:
    """A table whose numbers are formatted a column at a time: one notation and one number of
    decimals per column; strings stay as they are, None is —."""
    columns = [formatting.column(list(values)) for values in zip(*rows)] if rows else []
    return Table(header, [list(cells) for cells in zip(*columns)], caption)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(page: Page) -> str:
    lines = [f"# {page.title}", ""]
    if page.headline:
        lines += ["> " + " ".join(page.headline), ""]
    for block in page.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"**{block.caption}**", ""]
            lines += ["| " + " | ".join(map(_cell, block.header)) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in block.rows] + [""]
        elif isinstance(block, Terms):
            lines += [f"- **{term}**: {text}" for term, text in block.definitions.items()] + [""]
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def inline_html(text: str) -> str:
    """Inline Markdown (`code`, **bold**, *emphasis*) as HTML, everything else escaped."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", out)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
         ".table{overflow-x:auto;margin:0 0 1em}table{border-collapse:collapse;font-size:0.9em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;white-space:nowrap}"
         "th{background:#eee}td.num,th.num{text-align:right}td.long{white-space:normal;min-width:18em}"
         "figure{margin:1em 0}img{max-width:100%}"
         "figcaption{font-style:italic;color:#444}code{background:#f4f4f4;padding:0 3px}"
         ".headline{font-size:1.1em;border-left:4px solid #4a7;padding:0.3em 0.8em;background:#f3faf5}"
         "dt{font-weight:bold;margin-top:0.3em}dd{margin:0 0 0 1.5em}")


# a cell that is a number (or missing): right-aligned, so a column's digits line up
NUMBER = re.compile(r"[-+]?(\d[\d,]*(\.\d+)?(e[-+]?\d+)?|nan|inf|—)( ± [\d.e-]+)?")
CLASS = {True: " class='num'", False: ""}
LONG = 40  # characters: a text cell longer than this wraps; shorter ones keep to one line


def cell_class(text: str, numeric_column: bool) -> str:
    if numeric_column or NUMBER.fullmatch(text):
        return CLASS[True]
    return " class='long'" if len(text) > LONG else ""


def to_html(page: Page, directory: Path) -> str:
    """The page as one HTML file: the same blocks as `markdown`, figures inlined as data URIs."""
    esc = inline_html
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(page.title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{esc(page.title)}</h1>"]
    if page.headline:
        parts.append(f"<p class='headline'>{esc(' '.join(page.headline))}</p>")
    for block in page.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            caption = f"<caption>{esc(block.caption)}</caption>" if block.caption else ""
            numeric = [bool(block.rows) and all(NUMBER.fullmatch(row[i]) for row in block.rows)
                       for i in range(len(block.header))]
            head = ("<tr>" + "".join(f"<th{CLASS[n]}>{esc(h)}</th>" for h, n in zip(block.header, numeric)) + "</tr>"
                    if any(block.header) else "")  # a key/value table has no header to show
            body = "".join("<tr>" + "".join(f"<td{cell_class(c, n)}>{esc(c)}</td>" for c, n in zip(row, numeric))
                           + "</tr>" for row in block.rows)
            parts.append(f"<div class='table'><table>{caption}{head}{body}</table></div>")
        elif isinstance(block, Terms):
            parts.append("<dl>" + "".join(f"<dt>{esc(term)}</dt><dd>{esc(text)}</dd>"
                                          for term, text in block.definitions.items()) + "</dl>")
        elif isinstance(block, Figure):
            data = base64.b64encode((directory / block.path).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(block.caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(page: Page, directory: Path, stem: str) -> tuple[Path, Path]:
    """`stem`.md and `stem`.html in `directory` (atomically)."""
    md, page_html = directory / f"{stem}.md", directory / f"{stem}.html"
    atomic_write_text(md, markdown(page))
    atomic_write_text(page_html, to_html(page, directory))
    return md, page_html
