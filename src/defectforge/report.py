"""One self-contained HTML report per dataset version.

Everything is inside the file: images are PNG data URIs (base64), training curves
are inline SVG, the style sheet is inline; there is no script and no reference to
any network address, so the report opens offline and can be archived with the
release. Sections:

1. a header with the dataset version and run facts (``meta``);
2. per defect type, a grid of real vs synthetic samples (one row per source: the
   real defect images, then each method), each thumbnail with its mask overlaid;
3. the quality table (FID / KID / IS / LPIPS / IC-LPIPS) with the backbone names
   beside the numbers and skipped metrics shown with their reason;
4. the detector table with the ``real-only`` baseline row highlighted and every
   other row's difference to the baseline of the same defect type;
5. training curves (per-epoch loss and validation metrics) as SVG line charts.

Example::

    >>> import numpy as np
    >>> im = np.zeros((16, 16, 3), np.uint8); m = np.zeros((16, 16), bool); m[4:8, 4:8] = True
    >>> html = render_report(title="demo", grids=[SampleGrid("crack", [(im, m)], {"copy-paste": [(im, m)]})])
    >>> "data:image/png;base64," in html and "http" not in html
    True
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from defectforge.data.io import atomic_write_text, encode_png

BASELINE = "real-only"
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

QUALITY_COLUMNS = (
    "defect_type", "method", "n_real", "n_fake", "fid", "kid_mean", "kid_std", "is_mean", "is_std",
    "lpips", "ic_lpips", "backbone", "lpips_backbone", "pass_rate",
)
DETECTOR_METRICS = (
    "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro",
)
# columns of a row whose None value is explained by another key
_SKIP_KEY = {"fid": "fid_skipped", "kid_mean": "kid_skipped", "kid_std": "kid_skipped",
             "is_mean": "is_skipped", "is_std": "is_skipped", "lpips": "lpips_skipped",
             "ic_lpips": "ic_lpips_skipped", "image_auroc": "image_skipped", "image_ap": "image_skipped",
             "image_f1max": "image_skipped", "pixel_auroc": "pixel_skipped", "pixel_ap": "pixel_skipped",
             "pixel_f1max": "pixel_skipped", "aupro": "aupro_skipped"}


@dataclass
class SampleGrid:
    """Samples of one defect type: real (image, mask) pairs and each method's pairs."""

    defect_type: str
    real: Sequence[tuple[np.ndarray, np.ndarray]] = ()
    synthetic: dict[str, Sequence[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


def _esc(x) -> str:
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


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _cell(row: dict, key: str, extra: str = "") -> str:
    v = row.get(key)
    if v is None and row.get(_SKIP_KEY.get(key, "")):
        reason = row[_SKIP_KEY[key]]
        return f'<td class="skipped" title="{_esc(reason)}">skipped<br><small>{_esc(reason)}</small></td>'
    cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    return f"<td{cls}>{_esc(_fmt(v))}{extra}</td>"


def _table(rows: Sequence[dict], columns: Sequence[str], row_class=None, extra=None) -> str:
    if not rows:
        return "<p><em>No rows.</em></p>"
    cols = [c for c in columns if any(c in r for r in rows)]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cls = row_class(r) if row_class else ""
        cells = "".join(_cell(r, c, extra(r, c) if extra else "") for c in cols)
        body.append(f'<tr{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def svg_line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str,
                   width: int = 420, height: int = 220) -> str:
    """Inline SVG line chart: one polyline per named series of (x, y) points."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        return f"<p><em>{_esc(title)}: no data.</em></p>"
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
             f'role="img" aria-label="{_esc(title)}">',
             f'<text x="{ml}" y="14" class="ct">{_esc(title)}</text>',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{ml - 4}" y="{sy(yv) + 4:.1f}" class="ax" text-anchor="end">{yv:.3g}</text>')
    parts.append(f'<text x="{ml}" y="{height - 8}" class="ax">{x0:g}</text>')
    parts.append(f'<text x="{ml + pw}" y="{height - 8}" class="ax" text-anchor="end">{x1:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 8}" class="ax" text-anchor="middle">epoch</text>')
    for i, (name, s) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
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
        parts.append(f'<text x="{ml + pw + 26}" y="{ly}" class="ax">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.skipped{color:#a60;font-size:12px} td.skipped small{color:#777}
tr.baseline td{background:#fff6cc;font-weight:600}
.delta{display:block;font-size:11px;font-weight:400} .up{color:#1a7f37} .down{color:#c62828}
.grid{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.grid figure{margin:0;text-align:center;font-size:11px}
.grid img{display:block;width:112px;height:auto;image-rendering:pixelated;border:1px solid #ddd}
.src{font-weight:600;margin:.6em 0 .2em}
.note{background:#eef4ff;border-left:4px solid #4a7bd0;padding:.5em .8em;font-size:13px}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dl.meta dt{font-weight:600} .chart{margin:4px 12px 4px 0} .ct{font-size:13px;font-weight:600}
.ax{font-size:10px;fill:#444} .charts{display:flex;flex-wrap:wrap}
"""


def _grid_section(g: SampleGrid, max_per_row: int) -> str:
    out = [f"<h3>{_esc(g.defect_type)}</h3>"]
    sources = [("real", g.real)] + list(g.synthetic.items())
    for name, pairs in sources:
        figs = []
        for i, (im, m) in enumerate(list(pairs)[:max_per_row]):
            area = int(np.asarray(m).astype(bool).sum()) if m is not None else 0
            figs.append(f'<figure><img src="{png_data_uri(overlay(im, m))}" alt="{_esc(name)} {i}">'
                        f"<figcaption>{area} px</figcaption></figure>")
        body = "".join(figs) if figs else "<em>no samples</em>"
        out.append(f'<div class="src">{_esc(name)} ({len(pairs)})</div><div class="grid">{body}</div>')
    return "".join(out)


def _detector_section(rows: Sequence[dict], baseline: str) -> str:
    def key(r):
        return r.get("defect_type", "")

    base = {key(r): r for r in rows if r.get("run") == baseline}

    def row_class(r):
        return "baseline" if r.get("run") == baseline else ""

    def extra(r, c):
        b = base.get(key(r))
        if c not in DETECTOR_METRICS or b is None or r is b:
            return ""
        v, bv = r.get(c), b.get(c)
        if not isinstance(v, (int, float)) or not isinstance(bv, (int, float)):
            return ""
        d = v - bv
        cls = "up" if d > 0 else "down" if d < 0 else ""
        return f'<span class="delta {cls}">{d:+.4f}</span>'

    cols = ["defect_type", "run", "n_train", "n_synthetic", *DETECTOR_METRICS, "seconds", "seed", "epochs"]
    extra_cols = sorted({k for r in rows for k in r} - set(cols) - {v for v in _SKIP_KEY.values()})
    note = (f'<p class="note">Highlighted: the <b>{_esc(baseline)}</b> baseline (U-Net on the real training '
            "split only). Small numbers under a value: difference to that baseline for the same defect type. "
            "All runs share seed, budget and architecture and are evaluated on the same held-out real test split. "
            "AdaBLDM's IAP/IAP90 are not reported: the seed text does not define them.</p>")
    return note + _table(rows, cols + extra_cols, row_class=row_class, extra=extra)


def render_report(
    *,
    title: str,
    grids: Sequence[SampleGrid] = (),
    quality_rows: Sequence[dict] = (),
    detector_rows: Sequence[dict] = (),
    curves: dict[str, Sequence[dict]] | None = None,
    baseline: str = BASELINE,
    meta: dict | None = None,
    notes: Sequence[str] = (),
    max_per_row: int = 8,
) -> str:
    """The report as one HTML string (see the module docstring for the sections).

    Args:
        quality_rows: :func:`~defectforge.metrics.quality.compute_quality` dicts, each
            with ``defect_type`` and ``method`` added (and optionally ``pass_rate``).
        detector_rows: :func:`~defectforge.detector.evaluate_detector` dicts, each with
            ``run`` (``real-only``, ``copy-paste``, a method name) and ``defect_type``.
        curves: run name -> per-epoch rows (``epoch``, ``loss``, ``val_*``).
    """
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    if meta:
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(_fmt(v))}</dd>" for k, v in meta.items())
        parts.append(f'<dl class="meta">{items}</dl>')
    for n in notes:
        parts.append(f'<p class="note">{_esc(n)}</p>')

    parts.append("<h2>Samples: real vs synthetic</h2>")
    if grids:
        parts.append("<p>Masks are overlaid in red; captions give the mask area in pixels.</p>")
        parts.extend(_grid_section(g, max_per_row) for g in grids)
    else:
        parts.append("<p><em>No samples.</em></p>")

    parts.append("<h2>Image quality</h2>")
    names = sorted({str(r.get(k)) for r in quality_rows for k in ("backbone", "lpips_backbone") if r.get(k)})
    if names:
        parts.append(f"<p>Backbones: {', '.join(f'<code>{_esc(n)}</code>' for n in names)}.</p>")
    if any(n.startswith("random-") for n in names):
        parts.append('<p class="note">Backbones named <code>random-…</code> are seeded, randomly initialised '
                     "networks (no pretrained weights are available offline). Their FID/KID/LPIPS rank methods "
                     "against each other on the same data and are <b>not comparable with published numbers</b>.</p>")
    qcols = list(QUALITY_COLUMNS) + sorted(
        {k for r in quality_rows for k in r} - set(QUALITY_COLUMNS) - set(_SKIP_KEY.values())
        - {"size", "kid_subset_size", "is_splits", "ic_lpips_clusters"})
    parts.append(_table(quality_rows, qcols))

    parts.append("<h2>Detector (U-Net) on held-out real images</h2>")
    parts.append(_detector_section(detector_rows, baseline) if detector_rows else "<p><em>No runs.</em></p>")

    parts.append("<h2>Training curves</h2>")
    if curves:
        ykeys = []
        for rows in curves.values():
            for r in rows:
                for k, v in r.items():
                    if k not in ("epoch", "lr", "seconds") and isinstance(v, (int, float)) and k not in ykeys:
                        ykeys.append(k)
        charts = [svg_line_chart({run: [(r.get("epoch", i + 1), r.get(k)) for i, r in enumerate(rows)]
                                  for run, rows in curves.items()}, title=k) for k in ykeys]
        parts.append(f'<div class="charts">{"".join(charts)}</div>')
    else:
        parts.append("<p><em>No curves.</em></p>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | Path, **kwargs) -> Path:
    """Render with :func:`render_report` and write atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report(**kwargs))
    return path
