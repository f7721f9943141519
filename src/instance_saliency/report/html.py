"""A single self-contained HTML report: summary, lesion viewer, per-lesion table, figures, notes.

The page embeds every PNG as a base64 ``data:`` URI and carries its CSS inline; it needs no
external file or network access, so it can be mailed or archived on its own and opened from
disk (``file://``, no server). With ``viewer`` data (:class:`~instance_saliency.report.viewer.
ViewerData`) it also holds an interactive lesion viewer: the bundled NiiVue
(``assets/niivue.umd.js``, BSD-2-Clause, ``assets/LICENSE-niivue.txt``; inlined gzip-compressed
and base64-encoded, unpacked by the browser's ``DecompressionStream``), the embedded volumes and
``assets/viewer.js``. Without JavaScript or WebGL2 the rest of the page reads as before.
All text coming from data (keys, values, lesion labels, captions, notes) is HTML-escaped.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import math
import numbers
from pathlib import Path

from ..errors import InputError
from .figures import _atomic_write

__all__ = ["write_report", "PNG_SIGNATURE"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.2em 2em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.3em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; position: sticky; top: 0; }
table.summary td, table.summary th { text-align: left; }
.scroll { overflow: auto; max-height: 32em; border: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; padding: 4px; border: 1px solid #e3e3e3; background: #fafafa; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 0.8em; color: #444; margin-top: 3px; max-width: 40em; }
.muted { color: #777; }
#isv-viewer { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
#isv-canvas { width: 640px; height: 640px; background: #000; display: block; }
#isv-controls { margin: 4px 0; font-size: 0.9em; }
#isv-controls label { margin-right: 1em; }
#isv-status { font-size: 0.85em; color: #333; max-width: 640px; min-height: 2.4em; }
#isv-table tbody tr { cursor: pointer; }
#isv-table tbody tr:hover { background: #eef5ff; }
#isv-table tr.isv-selected { background: #ffe9b3; }
#isv-table th { cursor: pointer; }
#isv-table th[data-dir="asc"]::after { content: " \\25B2"; }
#isv-table th[data-dir="desc"]::after { content: " \\25BC"; }
"""

_ASSETS = Path(__file__).resolve().parent / "assets"



def _fmt(value) -> str:
    """Plain-text rendering of a summary value (floats to 4 significant digits)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _float_format(x) -> str:
    return f"{x:.4g}"


def _embed_png(path) -> str:
    """Return a ``data:image/png;base64,...`` URI for a PNG file.

    Raises
    ------
    InputError
        The file is missing, unreadable or not a PNG.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"figure {p} cannot be read: {e.strerror}") from None
    if not data.startswith(PNG_SIGNATURE):
        raise InputError(f"figure {p} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _split_figures(figures) -> list:
    """Group ``(caption, path[, section])`` items by section, keeping first-seen order."""
    sections: dict = {}
    for i, item in enumerate(figures):
        try:
            item = tuple(item)
        except TypeError:
            raise InputError(f"figure {i} must be (caption, png_path[, section]), "
                             f"got {item!r}") from None
        if len(item) == 2:
            caption, path = item
            section = "Figures"
        elif len(item) == 3:
            caption, path, section = item
        else:
            raise InputError(f"figure {i} must be (caption, png_path[, section]), got {item!r}")
        sections.setdefault(str(section), []).append((str(caption), path))
    return list(sections.items())


@functools.lru_cache(maxsize=1)
def _niivue_gz_b64() -> str:
    """The bundled NiiVue UMD script, gzip-compressed (deterministically) and base64-encoded."""
    try:
        js = (_ASSETS / "niivue.umd.js").read_bytes()
    except OSError as e:  # a broken installation
        raise InputError(f"the bundled viewer script is missing ({e.strerror}); reinstall "
                         "instance-saliency or use --no-figures") from None
    return base64.b64encode(gzip.compress(js, compresslevel=9, mtime=0)).decode("ascii")


def _json_script(obj) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` sequence)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _viewer_table(viewer: dict) -> str:
    """The viewer's lesion table (sortable, clickable), from the viewer payload."""
    esc = html.escape
    peak_cols = []
    for m in viewer.get("methods", []):
        for les in viewer["lesions"]:
            for k in les["peaks"]:
                if k.startswith(m + "_") and k not in peak_cols:
                    peak_cols.append(k)
    head = ["label", "status", "source", "voxels", "volume (mm³)", "prob max"] + [
        c.replace("_peak_", " peak ").replace("_", " ") for c in peak_cols]
    out = ["<table id=\"isv-table\" class=\"lesions\"><thead><tr>"]
    out += [f"<th>{esc(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>\n")

    def num(v, fmt="{:.4g}"):
        if v is None:
            return "<td data-sort=\"NaN\">NaN</td>"
        return f"<td data-sort=\"{v!r}\">{esc(fmt.format(v))}</td>"

    for les in viewer["lesions"]:
        out.append(f"<tr data-label=\"{int(les['label'])}\"><td>{int(les['label'])}</td>"
                   f"<td>{esc(les['status'])}</td><td>{esc(les['source'])}</td>"
                   f"<td>{int(les['voxels'])}</td>")
        out.append(num(les["volume_mm3"]) + num(les["prob_max"]))
        out.append("".join(num(les["peaks"].get(c)) for c in peak_cols))
        out.append("</tr>\n")
    out.append("</tbody></table>")
    return "".join(out)


def _viewer_html(viewer: dict) -> str:
    """The viewer section: controls, canvas, lesion table, embedded data and scripts."""
    js = (_ASSETS / "viewer.js").read_text(encoding="utf-8")
    return (
        "<h2>Lesion viewer</h2>\n"
        "<p class=\"muted\">Click a lesion row: the crosshair moves to its centroid and its map "
        "is shown over the chosen background (signed saliency: red positive, blue negative, "
        "one colour scale per lesion; outlines: green TP, orange FP, purple FN). Click a "
        "column header to sort. Click in a view to move the crosshair, scroll to zoom, "
        "right-drag to adjust contrast. Background grey levels are for display only.</p>\n"
        "<div id=\"isv-controls\"><label>background <select id=\"isv-background\"></select>"
        "</label><label>method <select id=\"isv-method\"></select></label>"
        "<label>saliency of <select id=\"isv-channel\"></select></label>"
        "<label><input type=\"checkbox\" id=\"isv-outlines\" checked> lesion outlines</label>"
        "</div>\n"
        "<div id=\"isv-viewer\"><div><canvas id=\"isv-canvas\" width=\"640\" "
        "height=\"640\"></canvas><div id=\"isv-status\">loading the viewer…</div></div>\n"
        f"<div class=\"scroll\">{_viewer_table(viewer)}</div></div>\n"
        f"<script type=\"application/json\" id=\"isv-data\">{_json_script(viewer)}</script>\n"
        f"<script type=\"application/octet-stream\" id=\"isv-niivue\">{_niivue_gz_b64()}"
        "</script>\n"
        f"<script>\n{js}</script>\n")


def _links_html(links) -> str:
    """A section of links: ``(section, [(text, href or None, note), ...])``."""
    from urllib.parse import quote

    esc = html.escape
    section, items = links
    out = [f"<h2>{esc(str(section))}</h2>\n<ul class=\"links\">\n"]
    for text, href, note in items:
        t = esc(str(text))
        link = (f"<a href=\"{esc(quote(str(href), safe='/#.-_~'), quote=True)}\">{t}</a>"
                if href else f"{t} <span class=\"muted\">(no report)</span>")
        out.append(f"<li>{link}{(' — ' + esc(str(note))) if note else ''}</li>\n")
    out.append("</ul>\n")
    return "".join(out)


def write_report(out_html, title: str, summary: dict, table, figures=(), notes=(),
                 viewer: dict | None = None, links=None,
                 table_title: str = "Lesion instances") -> Path:
    """Write a self-contained HTML report (embedded PNGs, inline CSS, optional lesion viewer).

    Parameters
    ----------
    out_html : path
        File to write; its folder is created if needed. Written atomically (temporary file in
        the same folder, then rename): if anything fails, an existing file is left untouched.
    title : str
        Page title and heading.
    summary : dict
        Key/value pairs shown first. Floats are shown to 4 significant digits; dicts and lists
        are flattened to text (``{"TP": 3}`` -> ``TP: 3``).
    table : pandas.DataFrame or None
        Per-lesion table (one row per lesion), shown in full with floats to 4 significant
        digits and NaN as ``NaN``. ``None`` or an empty table shows "no lesion instances".
    table_title : str
        Heading of the table (its row count is appended).
    figures : sequence of (str, path) or (str, path, str)
        ``(caption, png_path)`` pairs, optionally with a section name as third element
        (default section ``"Figures"``). Each section is a heading followed by a wrapping
        grid of the figures at their natural size, in the given order.
    notes : sequence of str
        Free-text notes, listed at the end.
    viewer : dict, optional
        :meth:`instance_saliency.report.viewer.ViewerData.payload`: adds the interactive
        lesion viewer after the summary (embedded volumes, bundled NiiVue, no network).
    links : (str, sequence of (str, str or None, str)), optional
        ``(section, items)``: a list of links after the summary, each item ``(text, href,
        note)`` with ``href`` relative to the page (``None``: text only, marked "no report").

    Returns
    -------
    pathlib.Path
        ``out_html``.

    Raises
    ------
    InputError
        A figure is missing or not a PNG, or a figure item is malformed.
    OutputError
        The folder of ``out_html`` cannot be created or written into.
    """
    out_html = Path(out_html)
    sections = _split_figures(figures)
    esc = html.escape
    if summary is None:
        summary = {}
    if isinstance(notes, str):
        notes = [notes]
    notes = [str(n) for n in notes]

    def write(f):
        def w(text: str) -> None:
            f.write(text.encode("utf-8"))

        w("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
        w(f"<title>{esc(str(title))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n")
        w(f"<h1>{esc(str(title))}</h1>\n")

        w("<h2>Summary</h2>\n")
        if summary:
            w("<table class=\"summary\">\n")
            for k, v in summary.items():
                w(f"<tr><th>{esc(str(k))}</th><td>{esc(_fmt(v))}</td></tr>\n")
            w("</table>\n")
        else:
            w("<p class=\"muted\">no summary</p>\n")

        if links is not None:
            w(_links_html(links))

        if viewer is not None:
            w(_viewer_html(viewer))

        n_rows = 0 if table is None else len(table)
        w(f"<h2>{esc(table_title)} ({n_rows})</h2>\n")
        if n_rows:
            body = table.to_html(index=False, escape=True, float_format=_float_format,
                                 na_rep="NaN", border=0, classes="lesions")
            w(f"<div class=\"scroll\">\n{body}\n</div>\n")
        else:
            w("<p class=\"muted\">no lesion instances</p>\n")

        for section, items in sections:
            w(f"<h2>{esc(section)}</h2>\n<div class=\"grid\">\n")
            for caption, path in items:
                uri = _embed_png(path)
                w(f"<figure><img src=\"{uri}\" alt=\"{esc(caption)}\">"
                  f"<figcaption>{esc(caption)}</figcaption></figure>\n")
            w("</div>\n")

        if notes:
            w("<h2>Notes</h2>\n<ul>\n")
            for n in notes:
                w(f"<li>{esc(n)}</li>\n")
            w("</ul>\n")
        w("</body>\n</html>\n")

    return _atomic_write(out_html, write)
