"""The report's content as blocks (headings, paragraphs, lists, tables, figures) and its rendering as
Markdown (figures linked) and as one self-contained HTML page (figures inline as base64 PNG)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Report:
    """The report's content as blocks (heading, paragraph, figure, table, list) plus what was skipped."""

    blocks: list[tuple] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("list", items))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))


def fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA:
        return ""
    if isinstance(v, bool | np.bool_):
        return str(bool(v)).lower()
    if isinstance(v, int | np.integer):
        return str(v)
    if isinstance(v, float | np.floating):
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(empty)_"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = [
        "| " + " | ".join(fmt(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join([head, sep, *rows])


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>"
        for r in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(rep: Report, out: Path) -> str:
    """The report as Markdown; figures are linked by their path relative to `out`."""
    lines: list[str] = []
    for b in rep.blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "list":
            lines += [f"- {i}" for i in b[1]] + [""]
        elif b[0] == "table":
            lines += [_md_table(b[1]), ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1].relative_to(out).as_posix()})", "", f"*{b[2]}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def render_html(rep: Report, title: str) -> str:
    """The report as one self-contained HTML page with every figure inline (base64 PNG)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{font-style:italic;font-size:13px}",
        "</style></head><body>",
    ]
    for b in rep.blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            parts.append(_html_table(b[1]))
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
