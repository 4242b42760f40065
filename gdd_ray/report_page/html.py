"""The pieces every report page is made of: one self-contained HTML document (inline CSS, inline JS for
sortable tables, images as data: URIs), so a page is one file that reads offline, mailed or copied anywhere.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d232a; background: #f6f7f9; }
header { background: #1f3b57; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; } header p { margin: 2px 0 0; opacity: .85; }
main { padding: 8px 24px 40px; max-width: 1280px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 12px 16px; margin: 14px 0; }
h2 { font-size: 16px; margin: 0 0 8px; } h3 { font-size: 14px; margin: 10px 0 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #e6e8eb; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th.sortable { cursor: pointer; user-select: none; } th.sortable::after { content: " \\2195"; color: #98a2ad; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.big { font-size: 28px; font-weight: 600; } .muted { color: #6b7580; } .missing { color: #a35d00; }
.mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.pix { image-rendering: pixelated; width: 64px; height: 64px; margin: 1px; border: 1px solid #ccd; }
.plot { max-width: 100%; }
.bars { max-height: 460px; overflow-y: auto; }
.bar-row { display: grid; grid-template-columns: 220px 1fr 64px; gap: 8px; align-items: center; font-size: 12px; }
.bar-track { background: #eef0f3; height: 12px; border-radius: 2px; }
.bar { background: #3d7bbf; height: 12px; border-radius: 2px; } .bar.low { background: #c0504d; }
.gallery-row { display: flex; align-items: center; gap: 8px; margin: 2px 0; }
.gallery-row .name { width: 180px; font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.worst { display: flex; gap: 16px; flex-wrap: wrap; }
.worst > div { border: 1px solid #e6e8eb; border-radius: 4px; padding: 8px; width: 300px; }
details > summary { cursor: pointer; }
"""

# Click a header to sort by that column (numbers by value, the rest as text); a second click reverses.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-dir") !== "asc";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", asc ? "asc" : "desc");
      function key(row) {
        var cell = row.cells[col];
        var v = cell.getAttribute("data-v");
        if (v === null) { v = cell.textContent.trim(); }
        var n = parseFloat(v);
        return (v !== "" && !isNaN(n) && isFinite(v)) ? n : v.toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<link rel='icon' href='data:,'>"  # no favicon request: a file:// page must load nothing
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
        f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n<main>\n{body}\n</main>\n"
        f"<script>{SORT_JS}</script></body></html>\n"
    )


def section(title: str, inner: str, anchor: str = "") -> str:
    ident = f" id='{esc(anchor)}'" if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>\n{inner}\n</section>"


def missing(text: str) -> str:
    return f"<p class='missing'>{esc(text)}</p>"


def png(data: bytes, alt: str, cls: str = "", title: str = "") -> str:
    """An image inlined as a data: URI (PNG bytes as stored)."""
    b64 = base64.b64encode(data).decode()
    t = f" title='{esc(title)}'" if title else ""
    c = f" class='{cls}'" if cls else ""
    return f"<img{c} alt='{esc(alt)}'{t} src='data:image/png;base64,{b64}'>"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    sortable: bool = False,
    ident: str = "",
    numeric: Sequence[bool] | None = None,
) -> str:
    """A table; a cell is text (escaped), or (html, sort value) for rich cells."""
    numeric = numeric or [False] * len(headers)
    cls = " class='sortable'" if sortable else ""
    idattr = f" id='{esc(ident)}'" if ident else ""
    head = "".join(f"<th{' class=num' if n else ''}>{esc(h)}</th>" for h, n in zip(headers, numeric))
    out = [f"<table{cls}{idattr}><thead><tr>{head}</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for value, n in zip(row, numeric):
            td = "<td class='num'" if n else "<td"
            if isinstance(value, tuple):
                shown, key = value
                cells.append(f"{td} data-v='{esc(key)}'>{shown}</td>")
            else:
                cells.append(f"{td}>{esc(value)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def key_values(items: Iterable[tuple[str, Any]]) -> str:
    return table(["", ""], ((k, v) for k, v in items))


def bars(rows: Iterable[tuple[str, float | None, str]], low: float | None = None) -> str:
    """Horizontal bars, one per (label, value in 0..1, text); values under `low` are drawn red."""
    out = ["<div class='bars'>"]
    for label, value, text in rows:
        width = 0.0 if value is None else max(0.0, min(1.0, value)) * 100
        red = " low" if value is not None and low is not None and value < low else ""
        out.append(
            f"<div class='bar-row'><span title='{esc(label)}'>{esc(label)}</span>"
            f"<div class='bar-track'><div class='bar{red}' style='width:{width:.1f}%'></div></div>"
            f"<span class='num'>{esc(text)}</span></div>"
        )
    out.append("</div>")
    return "\n".join(out)


def percent(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f} ± {100 * std:.2f} %" if std is not None else f"{100 * value:.2f} %"
