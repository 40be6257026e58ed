"""One self-contained HTML report per dataset version (:func:`build_report` from the
stage outputs; :func:`render_report` from plain rows).

Everything is inside the file: images are PNG data URIs (base64), training curves
are inline SVG, the style sheet is inline; there is no script and no reference to
any network address, so the report opens offline and can be archived with the
release. Sections, top to bottom:

1. a header with the dataset version and run facts (``meta``) and the findings in
   words (where synthetic data hurts, where the detector did not learn);
2. the sample grid: per (category, defect type) one block with the columns
   ``real | copy-paste | <other methods>``; each cell shows a crop around the mask
   of the plain image, the mask and the overlay, plus a small thumbnail of the whole
   image. Samples that failed their quality gate come first, captioned with the
   gate's reasons;
3. the detector's verdicts: per protocol (``mixed``: against ``real-only``;
   ``synthetic``: against copy-paste's set, or absolute numbers where there is no
   reference), category, method and metric the mean paired difference with its 95 %
   interval and the verdict in words (``helps`` / ``hurts`` / ``no measurable
   effect``), each naming its protocol and budget. A category whose detector did not
   learn gets that sentence and no ranking. A single-seed run (no ``comparisons``) is
   labelled as such;
4. realism scores per set (saturation, intensity distance, contrast against the
   real interquartile range, classifier two-sample test) with one line per score;
5. the quality table (FID / KID / IS / LPIPS / IC-LPIPS) with the backbone names;
6. the raw detector table (``real-only`` highlighted) and training curves (SVG).

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from defectforge.data.io import atomic_write_text, encode_png, read_image, read_mask
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.metrics.detection import DETECTION_KEYS
from defectforge.params.detector import REFERENCE_METHOD as REFERENCE

BASELINE = "real-only"
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

QUALITY_COLUMNS = (
    "defect_type", "method", "n_real", "n_fake", "fid", "kid_mean", "kid_std", "is_mean", "is_std",
    "lpips", "ic_lpips", "backbone", "lpips_backbone", "pass_rate",
)
DETECTOR_METRICS = DETECTION_KEYS
# columns of a row whose None value is explained by another key
_SKIP_KEY = {"fid": "fid_skipped", "kid_mean": "kid_skipped", "kid_std": "kid_skipped",
             "is_mean": "is_skipped", "is_std": "is_skipped", "lpips": "lpips_skipped",
             "ic_lpips": "ic_lpips_skipped", "image_auroc": "image_skipped", "image_ap": "image_skipped",
             "image_f1max": "image_skipped", "pixel_auroc": "pixel_skipped", "pixel_ap": "pixel_skipped",
             "pixel_f1max": "pixel_skipped", "aupro": "aupro_skipped"}


METRIC_NAMES = {"pixel_ap": "pixel AP", "aupro": "AUPRO", "image_auroc": "image AUROC", "image_ap": "image AP",
                "pixel_auroc": "pixel AUROC", "pixel_f1max": "pixel F1-max", "image_f1max": "image F1-max"}
VERDICTS = ("helps", "hurts", "no measurable effect", "detector did not learn")
NOT_LEARNED = "detector did not learn"


@dataclass
class Sample:
    """One grid entry: the image, its mask and, for synthetic samples, the quality gate's result."""

    image: np.ndarray
    mask: np.ndarray | None
    qc_pass: bool | None = None
    reasons: Sequence[str] = ()
    label: str = ""


@dataclass
class SampleGrid:
    """Samples of one (category, defect type): the real ones and each method's.

    Entries are :class:`Sample` or plain ``(image, mask)`` pairs. The methods are shown
    in the dict's order, except that ``copy-paste`` (the baseline) always comes first.
    """

    defect_type: str
    real: Sequence = ()
    synthetic: dict[str, Sequence] = field(default_factory=dict)


def as_sample(entry) -> Sample:
    """A :class:`Sample` from a Sample or an ``(image, mask)`` pair."""
    if isinstance(entry, Sample):
        return entry
    image, mask = entry[0], entry[1]
    return Sample(np.asarray(image), None if mask is None else np.asarray(mask))


def failures_first(entries: Sequence) -> list[Sample]:
    """The samples with the ones that failed their quality gate first (stable otherwise)."""
    samples = [as_sample(e) for e in entries]
    return sorted(samples, key=lambda s: 0 if s.qc_pass is False else 1)


def method_columns(methods: Sequence[str]) -> list[str]:
    """Method order of the grid: the reference baseline (``copy-paste``) first, then the others as given."""
    return [m for m in methods if m == REFERENCE] + [m for m in methods if m != REFERENCE]


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key, key)


PROTOCOL_WORDS = {"mixed": "real + synthetic defects + normal images in training",
                  "synthetic": "synthetic defects + normal images in training, no real defect image"}
BUDGET_WORDS = {"steps": "the same number of steps for every run, counted from the real training split",
                "epochs": "the same number of passes over each run's own training union"}


def protocol_tag(row: dict) -> str:
    """``protocol mixed vs real-only, budget steps`` for a detector row that records them
    (comparisons, learned entries, absolute rows); '' for rows of a run made before."""
    protocol = row.get("protocol")
    if not protocol:
        return ""
    ref = row.get("reference")
    tag = f"protocol {protocol}" + (f" vs {ref}" if ref else "")
    return tag + (f", budget {row['budget']}" if row.get("budget") else "")


def describe_comparison(row: dict, learned: dict | None = None) -> str:
    """One sentence for one row of the detector's ``comparisons``.

    >>> describe_comparison({"method": "inversion", "metric": "pixel_ap", "mean_diff": 0.01, "ci_low": -0.02,
    ...                      "ci_high": 0.04, "n_seeds": 3, "verdict": "no measurable effect"})
    'inversion: no measurable effect on pixel AP (Δ +0.010, 95 % CI [-0.020, +0.040], 3 seeds)'
    """
    method, metric = row.get("method", "?"), metric_name(str(row.get("metric", "?")))
    if row.get("defect_type") not in (None, "", "all"):
        method = f"{method} ({row['defect_type']})"
    verdict = row.get("verdict")
    tag = protocol_tag(row)
    if verdict == NOT_LEARNED or (learned is not None and learned.get("learned") is False):
        return f"{method}: {metric} not measured: the detector did not learn on this category" + (f" ({tag})" if tag else "")
    numbers = f"Δ {signed(row.get('mean_diff'))}, 95 % CI [{signed(row.get('ci_low'))}, {signed(row.get('ci_high'))}]"
    seeds = row.get("n_seeds")
    if seeds is not None:
        numbers += f", {seeds} seed{'s' if seeds != 1 else ''}"
    if tag:
        numbers += f"; {tag}"
    if verdict == "hurts":
        words = f"hurts {metric}"
    elif verdict == "helps":
        words = f"helps {metric}"
    elif verdict == "no measurable effect":
        words = f"no measurable effect on {metric}"
    else:
        words = f"{verdict or 'no verdict'} on {metric}"
    return f"{method}: {words} ({numbers})"


def not_learned_sentence(category: str, info: dict) -> str:
    """The plain sentence for a category whose detector did not learn (no ranking follows)."""
    auroc = info.get("image_auroc_real_only")
    bits = [protocol_tag(info)] if protocol_tag(info) else []
    if isinstance(auroc, (int, float)) and "AUROC" not in str(info.get("reason", "")):
        bits.append(f"real-only image AUROC {auroc:.3f}")
    if info.get("reason"):
        bits.append(str(info["reason"]))
    extra = f" ({'; '.join(bits)})" if bits else ""
    return (f"The detector did not learn on {category}{extra}, so its numbers say nothing about the synthetic data; "
            "no method is ranked on this category.")


def signed(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "?"
    if 0 < abs(v) < 0.0005:  # an interval end just off 0 must not read as 0 (it decides the verdict)
        return f"{v:+.1e}"
    return f"{v:+.3f}"


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
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1500px}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.skipped{color:#a60;font-size:12px} td.skipped small{color:#777}
tr.baseline td{background:#fff6cc;font-weight:600}
.delta{display:block;font-size:11px;font-weight:400} .up{color:#1a7f37} .down{color:#c62828}
table.samples td{padding:2px}
.sample{margin:0 0 4px 0;font-size:11px;border:2px solid transparent;padding:1px}
.sample.fail{border-color:#c62828;background:#fdecea}
.sample .row{display:flex;gap:2px;align-items:flex-start}
.sample img{display:block;width:84px;height:84px;image-rendering:pixelated;border:1px solid #ddd}
.sample img.thumb{width:42px;height:auto}
.sample figcaption{max-width:300px} .sample .why{color:#c62828}
.note{background:#eef4ff;border-left:4px solid #4a7bd0;padding:.5em .8em;font-size:13px}
.warn{background:#fdecea;border-left:4px solid #c62828;padding:.5em .8em;font-size:13px}
.v-hurts{color:#c62828;font-weight:600} .v-helps{color:#1a7f37;font-weight:600} .v-none{color:#555}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dl.meta dt{font-weight:600} .chart{margin:4px 12px 4px 0} .ct{font-size:13px;font-weight:600}
.ax{font-size:10px;fill:#444} .charts{display:flex;flex-wrap:wrap}
"""


def _crops(s: Sample) -> list[np.ndarray]:
    """Plain image, mask and overlay, each cropped around the mask; then the whole overlay."""
    from defectforge.metrics.quality import crop_around_mask

    img = np.asarray(s.image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    h, w = img.shape[:2]
    m = np.zeros((h, w), bool) if s.mask is None else np.asarray(s.mask).astype(bool)
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    mask_rgb = np.repeat((m.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
    ov = overlay(img, m)
    focus = largest_component(m)
    return [crop_around_mask(x, focus, context=2.5, min_side=32) for x in (img, mask_rgb, ov)] + [ov]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The mask's largest 8-connected component: a mask of blobs far apart (a crack in pieces
    from top to bottom) has an empty bounding-box centre, and a crop there would show nothing."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _sample_cell(s: Sample, name: str) -> str:
    crop_img, crop_mask, crop_ov, whole = _crops(s)
    kinds = (("image", crop_img), ("mask", crop_mask), ("overlay", crop_ov))
    imgs = "".join(f'<img src="{png_data_uri(x, 96)}" alt="{_esc(name)} {k}" title="{k} (crop around the mask)">'
                   for k, x in kinds)
    imgs += f'<img class="thumb" src="{png_data_uri(whole, 48)}" alt="{_esc(name)} whole" title="whole image">'
    area = int(np.asarray(s.mask).astype(bool).sum()) if s.mask is not None else 0
    cap = [f"{_esc(s.label)} " if s.label else "", f"{area} px"]
    if s.qc_pass is False:
        why = ", ".join(str(r) for r in s.reasons) or "no reason recorded"
        cap.append(f' <span class="why">QC fail: {_esc(why)}</span>')
    cls = "sample fail" if s.qc_pass is False else "sample"
    return f'<figure class="{cls}"><div class="row">{imgs}</div><figcaption>{"".join(cap)}</figcaption></figure>'


def _grid_section(g: SampleGrid, max_per_cell: int) -> str:
    """One block: columns real | copy-paste | other methods; rows of samples, failures first."""
    columns = [("real", g.real)] + [(m, g.synthetic[m]) for m in method_columns(list(g.synthetic))]
    cells, heads = [], []
    for name, entries in columns:
        ordered = failures_first(entries)
        n_fail = sum(s.qc_pass is False for s in ordered)
        heads.append(f"<th>{_esc(name)} <small>({len(ordered)} samples"
                     f"{f', {n_fail} fail QC' if n_fail else ''})</small></th>")
        cells.append(ordered[:max_per_cell])
    rows = []
    for i in range(max((len(c) for c in cells), default=0)):
        tds = "".join(f"<td>{_sample_cell(c[i], name) if i < len(c) else ''}</td>" for (name, _), c in zip(columns, cells))
        rows.append(f"<tr>{tds}</tr>")
    body = "".join(rows) or f'<tr><td colspan="{len(columns)}"><em>no samples</em></td></tr>'
    return (f'<h3>{_esc(g.defect_type)}</h3><table class="samples"><thead><tr>{"".join(heads)}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _verdict_class(verdict) -> str:
    return {"hurts": "v-hurts", "helps": "v-helps"}.get(verdict, "v-none")


def detector_findings(detector: dict | None) -> list[tuple[str, str]]:
    """(kind, sentence) findings of a detector details dict, worst first: the categories whose
    detector did not learn, the rows where synthetic data hurts, then the ones where it helps.
    ``kind`` is ``not-learned``, ``hurts``, ``helps`` or ``single-seed``."""
    if not detector:
        return []
    out = []
    by_protocol = learned_by_protocol(detector)
    for protocol, learned in by_protocol.items():
        for category, info in sorted(learned.items()):
            if isinstance(info, dict) and info.get("learned") is False:
                out.append(("not-learned", not_learned_sentence(category, info)))
    if "comparisons" not in detector:
        if detector.get("per_category") or detector.get("mean"):
            out.append(("single-seed", "The detector ran one seed per condition: its differences are within "
                        "seed-to-seed noise and are not a ranking of the methods."))
        return out
    skip = {(q, c) for q, learned in by_protocol.items() for c, info in learned.items() if isinstance(info, dict) and info.get("learned") is False}
    rows = detector.get("comparisons") or []
    rows = [r for r in rows if r.get("defect_type") in (None, "", "all")] or rows  # the whole test set when there
    for kind in ("hurts", "helps"):
        for r in rows:
            if r.get("verdict") == kind and (r.get("protocol", "mixed"), r.get("category")) not in skip:
                out.append((kind, f"{r.get('category')}: {describe_comparison(r)}"))
    return out


def learned_by_protocol(detector: dict) -> dict[str, dict]:
    """``{protocol: {category: learned entry}}`` of a details dict (one made before protocols
    were recorded: its ``learned``, as ``mixed``)."""
    if isinstance(detector.get("learned_by_protocol"), dict):
        return detector["learned_by_protocol"]
    return {"mixed": detector.get("learned") or {}}


def protocol_heading(detector: dict, protocol: str) -> str:
    """The words naming a protocol, its reference and the budget, e.g. ``Protocol mixed (real +
    synthetic defects + normal images in training), against real-only; budget steps (...)``."""
    ref = (detector.get("references") or {}).get(protocol)
    budget = detector.get("training_budget")
    against = f"against {ref}" if ref else "no reference run (copy-paste is not among the methods): absolute numbers only"
    return (f"Protocol {protocol} ({PROTOCOL_WORDS.get(protocol, protocol)}), {against}; "
            f"budget {budget} ({BUDGET_WORDS.get(budget, budget)})")


def resolution_words(r: dict) -> str:
    """The detector's resolution of one category in words, e.g. ``scale 0.43, 64 px patches, batch norm,
    score pool 5 (images' short side 253 px, smallest defects 11.8 px across)``."""
    scale = f"short side {r.get('size')} px" if r.get("scale") is None else f"scale {r['scale']}"
    patch = "whole images" if r.get("patch") is None else f"{r['patch']} px patches"
    src = ""
    if isinstance(r.get("short_side_px"), (int, float)):
        d = r.get("defect_px")
        src = f" (images' short side {r['short_side_px']:.0f} px" + (f", smallest defects {d:.1f} px across)" if isinstance(d, (int, float)) else ")")
    return f"{scale}, {patch}, {r.get('norm')} norm, score pool {r.get('score_pool')}{src}"


def absolute_sentence(row: dict) -> str:
    """One line of a run's absolute number: ``perlin: pixel AP 0.123, 95 % CI [...], 3 seeds; protocol synthetic, budget epochs``."""
    lo, hi = row.get("ci_low"), row.get("ci_high")
    ci = f"95 % CI [{lo:.3f}, {hi:.3f}]" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else "95 % CI unbounded"
    mean = row.get("mean")
    mean = f"{mean:.3f}" if isinstance(mean, (int, float)) else "?"
    return f"{row.get('run')}: {metric_name(str(row.get('metric')))} {mean}, {ci}, {row.get('n_seeds')} seeds; {protocol_tag(row)}"


def _verdict_section(detector: dict) -> str:
    """Per protocol and category: the comparisons in words and as a table; 'did not learn' with
    no ranking; a protocol without a reference run: its absolute numbers."""
    comparisons = detector.get("comparisons")
    if comparisons is None:
        return ('<p class="warn">This detector run has <b>one seed per condition</b> and no confidence intervals. '
                "Differences between the numbers in the raw table below are within seed-to-seed noise: "
                "they are <b>not to be ranked</b>.</p>")
    if "protocols" not in detector:  # a run made before protocols were recorded: mixed, real-only reference
        return _protocol_verdicts(comparisons, detector.get("learned") or {})
    parts = ['<p class="note">Each row: the mean paired difference (same seed, same budget rule) of a method\'s run '
             "against its protocol's reference on the held-out real test images, with its 95 % interval over the seeds. "
             "<b>helps</b> / <b>hurts</b>: the interval lies above / below 0; <b>no measurable effect</b>: it "
             "contains 0.</p>"]
    if detector.get("resolution"):
        parts.append("<p>Detector resolution, per category (chosen from its real training images where params say auto): "
                     + "; ".join(f"{_esc(c)}: {_esc(resolution_words(r))}" for c, r in detector["resolution"].items()) + ".</p>")
    for protocol in detector["protocols"]:
        parts.append(f'<h3>{_esc(protocol_heading(detector, protocol))}</h3>')
        if (detector.get("references") or {}).get(protocol) is None:
            rows = [r for r in detector.get("absolute") or [] if r.get("protocol") == protocol and r.get("defect_type") == "all"]
            parts.append("<p>No comparison: the mean of each run over the seeds with its 95 % interval.</p>")
            parts.append("<ul>" + "".join(f"<li>{_esc(r.get('category'))}: {_esc(absolute_sentence(r))}</li>" for r in rows) + "</ul>"
                         if rows else "<p><em>No runs.</em></p>")
            continue
        parts.append(_protocol_verdicts([r for r in comparisons if r.get("protocol", "mixed") == protocol],
                                        learned_by_protocol(detector).get(protocol) or {}, level=4, note=False))
    return "".join(parts)


def _protocol_verdicts(comparisons: list[dict], learned: dict, level: int = 3, note: bool = True) -> str:
    parts = ['<p class="note">Each row: the mean paired difference (same seed, same budget) of real + synthetic '
             "against real-only on the held-out real test images, with its 95 % interval over the seeds. "
             "<b>helps</b> / <b>hurts</b>: the interval lies above / below 0; <b>no measurable effect</b>: it "
             "contains 0.</p>"] if note else []
    categories = sorted({str(r.get("category")) for r in comparisons} | set(learned))
    for category in categories:
        parts.append(f"<h{level}>{_esc(category)}</h{level}>")
        info = learned.get(category) or {}
        rows = [r for r in comparisons if str(r.get("category")) == category]
        if info.get("learned") is False or any(r.get("verdict") == NOT_LEARNED for r in rows):
            parts.append(f'<p class="warn">{_esc(not_learned_sentence(category, info))}</p>')
            continue
        if info.get("reason"):
            parts.append(f"<p>The detector learned on this category: {_esc(info['reason'])}.</p>")
        elif isinstance(info.get("image_auroc_real_only"), (int, float)):
            parts.append(f"<p>The detector learned on this category: real-only image AUROC "
                         f"{info['image_auroc_real_only']:.3f}.</p>")
        hurts = [r for r in rows if r.get("verdict") == "hurts"]
        if hurts:
            items = "".join(f"<li>{_esc(describe_comparison(r))}</li>" for r in hurts)
            parts.append(f'<div class="warn"><b>Synthetic data hurts the detector here:</b><ul>{items}</ul></div>')
        body = []
        tagged = any(r.get("protocol") for r in rows)
        for r in rows:
            v = r.get("verdict")
            dt = r.get("defect_type")
            body.append(
                f"<tr><td>{_esc(r.get('method'))}</td><td>{_esc('all' if dt in (None, '') else dt)}</td>"
                f"<td>{_esc(metric_name(str(r.get('metric'))))}</td>"
                f'<td class="num">{signed(r.get("mean_diff"))}</td>'
                f'<td class="num">[{signed(r.get("ci_low"))}, {signed(r.get("ci_high"))}]</td>'
                f'<td class="num">{_esc(r.get("n_seeds", "?"))}</td>'
                + (f"<td>{_esc(r.get('protocol'))}</td><td>{_esc(r.get('budget'))}</td>" if tagged else "")
                + f'<td class="{_verdict_class(v)}">{_esc(v)}</td></tr>')
        if body:
            ref = next((r.get("reference") for r in rows if r.get("reference")), BASELINE)
            parts.append(f"<table><thead><tr><th>method</th><th>defect type</th><th>metric</th><th>mean Δ vs {_esc(ref)}</th>"
                         "<th>95 % CI</th><th>seeds</th>" + ("<th>protocol</th><th>budget</th>" if tagged else "")
                         + f"<th>verdict</th></tr></thead><tbody>{''.join(body)}</tbody></table>")
            parts.append("<ul>" + "".join(f"<li>{_esc(describe_comparison(r))}</li>" for r in rows) + "</ul>")
        else:
            parts.append("<p><em>No comparisons for this category.</em></p>")
    return "".join(parts)


REALISM_KEYS = ("saturation", "saturation_real", "intensity_distance", "contrast_median", "contrast_real_iqr",
                "c2st_accuracy", "c2st_real_vs_real", "speckle_ratio")
SPECKLE_FLAG = 2.0  # a set whose median speckle is over this x its reals' is marked in the table
REALISM_EXPLAINED = (
    ("saturated share", "share of in-mask pixels at the ends of the value range (a channel ≤ 3 or ≥ 252); "
     "in brackets the same share over the real defects of the type."),
    ("intensity distance", "distance between synthetic and real defects in per-sample statistics (in-mask mean "
     "and spread, contrast against a ring around the mask, edge sharpness); 0 = the same profile."),
    ("contrast", "median in-mask contrast (in-mask mean minus ring mean) of the set against the real defects' "
     "interquartile range; 'inside' means within it."),
    ("speckle", "median pixel-scale noise inside the masks (what a 3x3 median filter removes) over that of the "
     "real defects of the type; 1 = as noisy as real, several times more = leftover sampler noise or confetti."),
    ("C2ST accuracy", "held-out accuracy of a small cross-validated classifier told to separate real defect crops "
     "from these; 0.5 = indistinguishable, 1.0 = always told apart. References: a real-vs-real split "
     "(what 'indistinguishable' reads as on this little data) and copy-paste of the same type."),
)


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _pct(v) -> str:
    v = _num(v)
    return "—" if v is None else f"{100 * v:.1f} %"


def _g(v) -> str:
    v = _num(v)
    return "—" if v is None else f"{v:.3g}"


def contrast_inside(row: dict) -> bool | None:
    """Whether a set's median contrast lies within the real defects' interquartile range."""
    c, iqr = _num(row.get("contrast_median")), row.get("contrast_real_iqr")
    if c is None or not isinstance(iqr, (list, tuple)) or len(iqr) != 2 or None in (_num(iqr[0]), _num(iqr[1])):
        return None
    return iqr[0] <= c <= iqr[1]


def _set_label(r: dict) -> str:
    category, defect = str(r.get("category", "")), str(r.get("defect_type", ""))
    return defect if not category or defect.startswith(f"{category}/") else f"{category}/{defect}"


def _realism_section(sets: Sequence[dict]) -> str:
    rows = [r for r in sets if any(k in r for k in REALISM_KEYS)]
    if not rows:
        return "<p><em>This run's quality stage wrote no realism scores.</em></p>"
    c2st_cp = {(r.get("category"), r.get("defect_type")): r.get("c2st_accuracy") for r in rows if r.get("method") == REFERENCE}
    expl = "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in REALISM_EXPLAINED)
    body = []
    for r in rows:
        iqr = r.get("contrast_real_iqr")
        iqr_s = f"[{_g(iqr[0])}, {_g(iqr[1])}]" if isinstance(iqr, (list, tuple)) and len(iqr) == 2 else "—"
        inside = contrast_inside(r)
        inside_s = "" if inside is None else (" inside" if inside else ' <span class="v-hurts">outside</span>')
        cp = c2st_cp.get((r.get("category"), r.get("defect_type")))
        refs = f"real-vs-real {_g(r.get('c2st_real_vs_real'))}"
        if r.get("method") != REFERENCE:
            refs += f", copy-paste {_g(cp)}"
        sat = _num(r.get("saturation"))
        sat_cls = ' class="v-hurts"' if sat is not None and sat > max(0.01, (_num(r.get("saturation_real")) or 0) * 2) else ""
        speck = _num(r.get("speckle_ratio"))
        sp_cls = ' class="v-hurts"' if speck is not None and speck > SPECKLE_FLAG else ""
        body.append(
            f"<tr><td>{_esc(_set_label(r))}</td><td>{_esc(r.get('method'))}</td>"
            f"<td{sat_cls}>{_pct(sat)} <small>(real {_pct(r.get('saturation_real'))})</small></td>"
            f'<td class="num">{_g(r.get("intensity_distance"))}</td>'
            f"<td>{_g(r.get('contrast_median'))} <small>(real IQR {iqr_s})</small>{inside_s}</td>"
            f"<td>{_g(r.get('c2st_accuracy'))} <small>({refs})</small></td>"
            f"<td{sp_cls}>{_g(r.get('speckle_ratio'))}</td></tr>")
    per_method = "".join(f"<li>{_esc(realism_sentence(m, v))}</li>" for m, v in realism_by_method(rows).items())
    return (f"<ul class=\"note\">{expl}</ul><p>Per method:</p><ul>{per_method}</ul><table><thead><tr><th>set</th><th>method</th><th>saturated share</th>"
            "<th>intensity distance</th><th>contrast median</th><th>C2ST accuracy</th><th>speckle (× real)</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def realism_by_method(sets: Sequence[dict]) -> dict[str, dict]:
    """Per method, the realism scores over its sets: mean saturation (and the real one), mean
    C2ST accuracy (and the real-vs-real and copy-paste references over the same defect
    types), mean intensity distance, and in how many sets the contrast lies in the real IQR."""
    rows = [r for r in sets if any(k in r for k in REALISM_KEYS)]
    cp = {(r.get("category"), r.get("defect_type")): _num(r.get("c2st_accuracy")) for r in rows if r.get("method") == REFERENCE}

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, dict] = {}
    methods = method_columns(list(dict.fromkeys(str(r.get("method")) for r in rows)))
    for m in methods:
        mine = [r for r in rows if str(r.get("method")) == m]
        inside = [contrast_inside(r) for r in mine]
        out[m] = {
            "sets": len(mine),
            "saturation": mean(_num(r.get("saturation")) for r in mine),
            "saturation_real": mean(_num(r.get("saturation_real")) for r in mine),
            "intensity_distance": mean(_num(r.get("intensity_distance")) for r in mine),
            "c2st_accuracy": mean(_num(r.get("c2st_accuracy")) for r in mine),
            "c2st_real_vs_real": mean(_num(r.get("c2st_real_vs_real")) for r in mine),
            "c2st_copy_paste": None if m == REFERENCE else mean(cp.get((r.get("category"), r.get("defect_type"))) for r in mine),
            "contrast_inside": sum(1 for i in inside if i), "contrast_known": sum(1 for i in inside if i is not None),
        }
    return out


def realism_sentence(method: str, r: dict) -> str:
    """One line of a method's realism scores (see :func:`realism_by_method`).

    >>> realism_sentence("inversion", {"sets": 2, "saturation": 0.0, "saturation_real": 0.0, "c2st_accuracy": 0.6,
    ...     "c2st_real_vs_real": 0.5, "c2st_copy_paste": 0.7, "intensity_distance": 0.8, "contrast_inside": 1, "contrast_known": 2})
    'inversion: saturated in-mask share 0.0 % (real 0.0 %); C2ST accuracy 0.6 (0.5 = indistinguishable; real-vs-real 0.5, copy-paste 0.7); intensity distance 0.8; contrast within the real IQR in 1 of 2 sets (mean over 2 sets)'
    """
    bits = []
    if r.get("saturation") is not None:
        bits.append(f"saturated in-mask share {_pct(r['saturation'])} (real {_pct(r.get('saturation_real'))})")
    if r.get("c2st_accuracy") is not None:
        refs = [f"real-vs-real {_g(r.get('c2st_real_vs_real'))}"]
        if r.get("c2st_copy_paste") is not None:
            refs.append(f"copy-paste {_g(r['c2st_copy_paste'])}")
        bits.append(f"C2ST accuracy {_g(r['c2st_accuracy'])} (0.5 = indistinguishable; {', '.join(refs)})")
    if r.get("intensity_distance") is not None:
        bits.append(f"intensity distance {_g(r['intensity_distance'])}")
    if r.get("contrast_known"):
        k = r["contrast_known"]
        bits.append(f"contrast within the real IQR in {r['contrast_inside']} of {k} set{'' if k == 1 else 's'}")
    n = r.get("sets", 0)
    return f"{method}: {'; '.join(bits) or 'no realism scores'} (mean over {n} set{'' if n == 1 else 's'})"


def _detector_section(rows: Sequence[dict], baseline: str, unlearned: set[str] = frozenset(), single_seed: bool = False) -> str:
    def key(r):
        return r.get("defect_type", "")

    base = {key(r): r for r in rows if r.get("run") == baseline}

    def row_class(r):
        return "baseline" if r.get("run") == baseline else ""

    def extra(r, c):
        b = base.get(key(r))
        if c not in DETECTOR_METRICS or b is None or r is b or key(r) in unlearned or r.get("protocol", "mixed") != "mixed":
            return ""  # differences to real-only in the mixed protocol only (the synthetic one has its own reference)
        v, bv = r.get(c), b.get(c)
        if not isinstance(v, (int, float)) or not isinstance(bv, (int, float)):
            return ""
        d = v - bv
        cls = "" if single_seed else "up" if d > 0 else "down" if d < 0 else ""
        return f'<span class="delta {cls}">{d:+.4f}</span>'

    cols = ["defect_type", "run", "n_train", "n_synthetic", *DETECTOR_METRICS, "seconds", "seed", "epochs"]
    extra_cols = sorted({k for r in rows for k in r} - set(cols) - {v for v in _SKIP_KEY.values()})
    note = (f'<p class="note">Highlighted: the <b>{_esc(baseline)}</b> baseline (U-Net on the real training '
            "split only). Rows name their <b>protocol</b> and <b>budget</b> where the run recorded them; "
            "<code>synthetic/&lt;method&gt;</code>: trained on that method's samples and the real normal images only. "
            "Small numbers under a value: difference to that baseline for the same category in the mixed protocol "
            "(left out where the detector did not learn). The verdicts above, not these raw numbers, say whether "
            "a method helps. AdaBLDM's IAP/IAP90 are not reported: the seed text does not define them.</p>")
    return note + _table(rows, cols + extra_cols, row_class=row_class, extra=extra)


def render_report(
    *,
    title: str,
    grids: Sequence[SampleGrid] = (),
    quality_rows: Sequence[dict] = (),
    detector_rows: Sequence[dict] = (),
    detector: dict | None = None,
    curves: dict[str, Sequence[dict]] | None = None,
    baseline: str = BASELINE,
    meta: dict | None = None,
    notes: Sequence[str] = (),
    max_per_cell: int = 4,
) -> str:
    """The report as one HTML string (see the module docstring for the sections).

    Args:
        grids: one :class:`SampleGrid` per (category, defect type), shown at the top.
        quality_rows: :func:`~defectforge.metrics.quality.compute_quality` dicts, each
            with ``defect_type`` and ``method`` added (and optionally ``pass_rate`` and the
            realism keys ``saturation``, ``c2st_accuracy``, ...).
        detector_rows: raw per-run rows, each with ``run`` (``real-only``, a method) and
            ``defect_type`` (the category).
        detector: the detector stage's details dict; its ``comparisons`` and ``learned``
            give the verdicts (absent ``comparisons``: a single-seed run, said so).
        curves: run name -> per-epoch rows (``epoch``, ``loss``, ``val_*``).
        max_per_cell: samples shown per grid column (failures first).
    """
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    if meta:
        items = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(_fmt(v))}</dd>" for k, v in meta.items())
        parts.append(f'<dl class="meta">{items}</dl>')
    findings = detector_findings(detector)
    if findings:
        items = "".join(f'<li class="{"v-helps" if k == "helps" else "v-hurts" if k != "single-seed" else ""}">'
                        f"{_esc(t)}</li>" for k, t in findings)
        parts.append(f'<div class="{"warn" if any(k != "helps" for k, _ in findings) else "note"}">'
                     f"<b>Findings of the detector:</b><ul>{items}</ul></div>")
    for n in notes:
        parts.append(f'<p class="note">{_esc(n)}</p>')

    parts.append("<h2>Samples: real vs synthetic</h2>")
    if grids:
        parts.append("<p>Each cell: the plain image, the mask and the overlay (mask in red), cropped around the mask, "
                     "then the whole image. Samples that failed their quality gate come first, framed in red with "
                     f"the gate's reasons. At most {max_per_cell} samples per column.</p>")
        parts.extend(_grid_section(g, max_per_cell) for g in grids)
    else:
        parts.append("<p><em>No samples.</em></p>")

    unlearned = {c for c, i in ((detector or {}).get("learned") or {}).items() if isinstance(i, dict) and i.get("learned") is False}
    single_seed = bool(detector_rows) and (detector is None or "comparisons" not in detector)
    parts.append("<h2>Does the synthetic data help the detector?</h2>")
    if detector:
        parts.append(_verdict_section(detector))
    elif detector_rows:
        parts.append(_verdict_section({}))
    else:
        parts.append("<p><em>No detector runs.</em></p>")

    parts.append("<h2>Realism of the synthetic defects</h2>")
    parts.append(_realism_section(quality_rows))

    parts.append("<h2>Image quality</h2>")
    names = sorted({str(r.get(k)) for r in quality_rows for k in ("backbone", "lpips_backbone") if r.get(k)})
    if names:
        parts.append(f"<p>Backbones: {', '.join(f'<code>{_esc(n)}</code>' for n in names)}.</p>")
    if any(n.startswith("random-") for n in names):
        parts.append('<p class="note">Backbones named <code>random-…</code> are seeded, randomly initialised '
                     "networks (no pretrained weights are available offline). Their FID/KID/LPIPS rank methods "
                     "against each other on the same data and are <b>not comparable with published numbers</b>.</p>")
    qcols = list(QUALITY_COLUMNS) + sorted(
        {k for r in quality_rows for k in r} - set(QUALITY_COLUMNS) - set(_SKIP_KEY.values()) - set(REALISM_KEYS)
        - {"size", "kid_subset_size", "is_splits", "ic_lpips_clusters"})
    parts.append(_table(quality_rows, qcols))

    parts.append("<h2>Detector (U-Net) on held-out real images: raw numbers</h2>")
    if detector_rows:
        parts.append(_detector_section(detector_rows, baseline, unlearned, single_seed))
    else:
        parts.append("<p><em>No runs.</em></p>")

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


# ----------------------------------------------------------------------------- from stage outputs
def method_order(present: Sequence[str], methods: Sequence[str] | None = None) -> list[str]:
    """The grid's method columns: ``copy-paste`` first, then ``methods`` (``generate.methods``;
    default: the registry's order), then any other method present, sorted."""
    from defectforge.methods import registered_methods

    order = list(methods) if methods is not None else registered_methods()
    known = [m for m in order if m in present]
    rest = sorted(m for m in present if m not in known)
    out = known + rest
    return method_columns(out)


def _reasons(value) -> tuple[str, ...]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ()
    return tuple(str(v) for v in value)


def _qc(value) -> bool | None:
    return None if value is None or pd.isna(value) else bool(value)


def sample_grids(manifest, split, *, per_cell: int = 4, methods: Sequence[str] | None = None) -> list[SampleGrid]:
    """One :class:`SampleGrid` per (category, defect type) of the synthetic manifest.

    ``real``: the split's real defects of the type, held-out test images first, then
    training ones. Each method's samples keep their quality-gate result; the ones that
    failed come first and at most ``per_cell`` are read per column.
    """
    root = Path(manifest_info(manifest)["dataset_root"])
    src_root = Path(manifest_info(split)["dataset_root"])
    syn = read_manifest(manifest).to_pandas().sort_values("sample_id")
    real = read_manifest(split).to_pandas()
    real = real[(real["defect_type"] != "good") & real["mask_path"].notna()]
    real = real.assign(_order=(real["split"] != "test").astype(int)).sort_values(["_order", "image_id"], kind="stable")
    if "qc_pass" not in syn:
        syn = syn.assign(qc_pass=None)
    if "qc_reasons" not in syn:
        syn = syn.assign(qc_reasons=None)
    grids = []
    for (category, defect), group in syn.groupby(["category", "defect_type"], sort=True):
        rr = real[(real["category"] == category) & (real["defect_type"] == defect)].head(per_cell)
        synthetic = {}
        for method in method_order(list(group["method"].unique()), methods):
            g = group[group["method"] == method]
            g = g.assign(_fail=g["qc_pass"].map(lambda v: 0 if _qc(v) is False else 1)).sort_values(["_fail", "sample_id"], kind="stable")
            synthetic[method] = [
                Sample(read_image(root / r.image_path), read_mask(root / r.mask_path), _qc(r.qc_pass), _reasons(r.qc_reasons), r.sample_id[:12])
                for r in g.head(per_cell).itertuples()
            ]
        grids.append(
            SampleGrid(
                defect_type=f"{category} / {defect}",
                real=[Sample(read_image(src_root / r.image_path), read_mask(src_root / r.mask_path), label=f"{r.split} {Path(r.image_path).stem}") for r in rr.itertuples()],
                synthetic=synthetic,
            )
        )
    return grids


def build_report(
    path: str | os.PathLike,
    *,
    title: str,
    manifest: str | os.PathLike,
    split: str | os.PathLike,
    metrics: dict,
    detector_dir: str | os.PathLike | None = None,
    per_cell: int = 4,
    methods: Sequence[str] | None = None,
) -> Path:
    """One self-contained HTML file: the sample grid per (category, defect type) at the top
    (real | copy-paste | other methods; plain image, mask, overlay; failures first), the
    detector's verdicts, the realism scores, the quality table (backbones named), the raw
    detector table and the detector's training curves."""
    syn = read_manifest(manifest).to_pandas()
    grids = sample_grids(manifest, split, per_cell=per_cell, methods=methods)
    quality_rows = [dict(r, defect_type=f"{r['category']}/{r['defect_type']}") for r in (metrics.get("quality") or {}).get("sets", {}).values()]
    detector_rows, curves = [], {}
    det = metrics.get("detector") or {}
    for category, runs in (det.get("per_category") or {}).items():
        for run, m in runs.items():
            if isinstance(m, dict):
                detector_rows.append({"defect_type": category, "run": run, "n_train": m.get("train_real"), "n_synthetic": m.get("train_synthetic"),
                                      **{k: v for k, v in m.items() if not isinstance(v, (dict, list))}})
    if detector_dir is not None and (Path(detector_dir) / "curves.csv").is_file():
        c = pd.read_csv(Path(detector_dir) / "curves.csv")
        for (category, run), g in c.groupby(["category", "run"], sort=True):  # several seeds: their mean loss per epoch
            curves[f"{category}/{run}"] = g.groupby("epoch", as_index=False)["loss"].mean().to_dict(orient="records")
    meta = {"samples": len(syn), "methods": ", ".join(method_order(list(syn["method"].unique()), methods))}
    if "qc_pass" in syn:
        meta["qc_pass"] = f"{int(syn['qc_pass'].fillna(False).sum())} / {len(syn)}"
    return write_report(path, title=title, grids=grids, quality_rows=quality_rows, detector_rows=detector_rows, detector=det or None,
                        curves=curves, meta=meta, max_per_cell=per_cell)

