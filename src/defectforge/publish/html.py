"""HTML and SVG building blocks of the report: escaping, number cells, tables with
explained gaps, PNG data URIs, mask overlays and inline line charts. No network
address, no script: what they build opens offline.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Sequence

import numpy as np
from PIL import Image

from defectforge.data.codec import encode_png

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

# columns of a row whose None value is explained by another key
SKIP_KEY = {"fid": "fid_skipped", "kid_mean": "kid_skipped", "kid_std": "kid_skipped",
             "is_mean": "is_skipped", "is_std": "is_skipped", "lpips": "lpips_skipped",
             "ic_lpips": "ic_lpips_skipped", "image_auroc": "image_skipped", "image_ap": "image_skipped",
             "image_f1max": "image_skipped", "pixel_auroc": "pixel_skipped", "pixel_ap": "pixel_skipped",
             "pixel_f1max": "pixel_skipped", "aupro": "aupro_skipped"}



def esc(x) -> str:
    return html.escape(str(x), quote=True)


def overlay(image: np.ndarray, mask: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """uint8 image with the mask tinted red and its boundary drawn in pure red."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    out = img.astype(np.float32).copy()
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != img.shape[:2]:
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
                (img.shape[1], img.shape[0]), Image.NEAREST)) > 127
        red = np.array([255.0, 0.0, 0.0])
        out[m] = (1 - alpha) * out[m] + alpha * red
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        out[m & ~inner] = red
    return out.clip(0, 255).astype(np.uint8)


def png_data_uri(image: np.ndarray, max_side: int = 128) -> str:
    """A PNG data URI of the image, downscaled so its longer side is at most ``max_side``."""
    im = Image.fromarray(np.asarray(image))
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    return "data:image/png;base64," + base64.b64encode(encode_png(np.asarray(im))).decode("ascii")


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def cell(row: dict, key: str, extra: str = "", said: frozenset = frozenset()) -> str:
    """One ``<td>``: the value, or "skipped" with the reason where ``SKIP_KEY`` explains a gap
    (the reason in small print, unless it is in ``said``: a reason shared by every row is
    stated once above the table, see :func:`shared_skips`)."""
    v = row.get(key)
    if v is None and row.get(SKIP_KEY.get(key, "")):
        reason = str(row[SKIP_KEY[key]])
        small = "" if reason in said else f"<br><small>{esc(reason)}</small>"
        return f'<td class="skipped" title="{esc(reason)}">skipped{small}</td>'
    cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    return f"<td{cls}>{esc(fmt(v))}{extra}</td>"


def shared_skips(rows: Sequence[dict], columns: Sequence[str]) -> dict[str, str]:
    """``{column: reason}`` for every column that every row skips for one and the same reason."""
    out = {}
    for c in columns:
        k = SKIP_KEY.get(c)
        reasons = {str(r.get(k)) if r.get(c) is None and r.get(k) else None for r in rows}
        if k and rows and len(reasons) == 1 and None not in reasons:
            out[c] = reasons.pop()
    return out


def table(rows: Sequence[dict], columns: Sequence[str], row_class=None, extra=None) -> str:
    """A table of the ``columns`` any row has. A column that every row skips for one reason
    is left out and its reason said once, above the table."""
    if not rows:
        return "<p><em>No rows.</em></p>"
    skipped = shared_skips(rows, columns)
    cols = [c for c in columns if any(c in r for r in rows) and c not in skipped]
    by_reason: dict[str, list[str]] = {}
    for c, reason in skipped.items():
        by_reason.setdefault(reason, []).append(c)
    note = "".join(f'<p class="skipped">Not computed for any row: {esc(", ".join(cs))} ({esc(reason)}).</p>'
                   for reason, cs in by_reason.items())
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cls = row_class(r) if row_class else ""
        cells = "".join(cell(r, c, extra(r, c) if extra else "") for c in cols)
        body.append(f'<tr{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{cells}</tr>')
    return f"{note}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def svg_line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str,
                   width: int = 420, height: int = 220) -> str:
    """Inline SVG line chart: one polyline per named series of (x, y) points."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        return f"<p><em>{esc(title)}: no data.</em></p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    ml, mr, mt, mb = 48, 110, 22, 28
    pw, ph = width - ml - mr, height - mt - mb

    def sx(x):
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return mt + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{esc(title)}">',
             f'<text x="{ml}" y="14" class="ct">{esc(title)}</text>',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{ml - 4}" y="{sy(yv) + 4:.1f}" class="ax" text-anchor="end">{yv:.3g}</text>')
    parts.append(f'<text x="{ml}" y="{height - 8}" class="ax">{x0:g}</text>')
    parts.append(f'<text x="{ml + pw}" y="{height - 8}" class="ax" text-anchor="end">{x1:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 8}" class="ax" text-anchor="middle">epoch</text>')
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in s if y is not None and math.isfinite(y)]
        if not good:
            continue
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{poly}"/>')
        for x, y in good:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>')
        ly = mt + 12 + 14 * i
        parts.append(f'<line x1="{ml + pw + 8}" y1="{ly - 4}" x2="{ml + pw + 22}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{ml + pw + 26}" y="{ly}" class="ax">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1340px}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.skipped{color:#a60;font-size:12px} td.skipped small{color:#777} p.skipped{color:#a60;font-size:13px}
tr.baseline td{background:#fff6cc;font-weight:600}
.delta{display:block;font-size:11px;font-weight:400} .up{color:#1a7f37} .down{color:#c62828}
table.samples td{padding:2px}
.sample{margin:0;font-size:11px;border:2px solid transparent;padding:1px}
table.samples th{white-space:nowrap;font-size:12px}
.sample.fail{border-color:#c62828;background:#fdecea}
.sample .row{display:flex;gap:2px;align-items:flex-start}
.sample img{display:block;width:64px;height:64px;image-rendering:pixelated;border:1px solid #ddd}
.sample img.thumb{width:32px;height:auto}
.sample figcaption{max-width:236px} .sample .why{color:#c62828}
.note{background:#eef4ff;border-left:4px solid #4a7bd0;padding:.5em .8em;font-size:13px}
.warn{background:#fdecea;border-left:4px solid #c62828;padding:.5em .8em;font-size:13px}
.v-hurts{color:#c62828;font-weight:600} .v-helps{color:#1a7f37;font-weight:600} .v-none{color:#555}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dl.meta dt{font-weight:600} .chart{margin:4px 12px 4px 0} .ct{font-size:13px;font-weight:600}
.ax{font-size:10px;fill:#444} .charts{display:flex;flex-wrap:wrap}
"""
