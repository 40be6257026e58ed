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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from defectforge.data.codec import read_image, read_mask
from defectforge.data.files import atomic_write_text
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.metrics.detection import DETECTION_KEYS
from defectforge.publish.findings import (BASELINE, NOT_LEARNED, REALISM_EXPLAINED, REALISM_KEYS, REFERENCE, SPECKLE_FLAG,
                                          sig3, finite, percent, absolute_sentence, contrast_inside, describe_comparison,
                                          detector_findings, learned_by_protocol, method_columns, metric_name,
                                          not_learned_sentence, protocol_heading, realism_by_method, realism_sentence,
                                          resolution_words, signed)
from defectforge.publish.html import CSS, esc, fmt, table, overlay, png_data_uri, svg_line_chart

QUALITY_COLUMNS = (
    "defect_type", "method", "n_real", "n_fake", "fid", "kid_mean", "kid_std", "is_mean", "is_std",
    "lpips", "ic_lpips", "backbone", "lpips_backbone", "pass_rate",
)
DETECTOR_METRICS = DETECTION_KEYS


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


def _crops(s: Sample) -> list[np.ndarray]:
    """Plain image, mask and overlay, each cropped around the mask; then the whole overlay."""
    from defectforge.metrics.fidelity import crop_around_mask

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
    imgs = "".join(f'<img src="{png_data_uri(x, 64)}" alt="{esc(name)} {k}" title="{k} (crop around the mask)">'
                   for k, x in kinds)
    imgs += f'<img class="thumb" src="{png_data_uri(whole, 32)}" alt="{esc(name)} whole" title="whole image">'
    area = int(np.asarray(s.mask).astype(bool).sum()) if s.mask is not None else 0
    cap = [f"{esc(s.label)} " if s.label else "", f"{area} px"]
    if s.qc_pass is False:
        why = ", ".join(str(r) for r in s.reasons) or "no reason recorded"
        cap.append(f' <span class="why">QC fail: {esc(why)}</span>')
    cls = "sample fail" if s.qc_pass is False else "sample"
    return f'<figure class="{cls}"><div class="row">{imgs}</div><figcaption>{"".join(cap)}</figcaption></figure>'


def _grid_section(g: SampleGrid, max_per_cell: int) -> str:
    """One block: a row per source (real, copy-paste, other methods), its samples side by side,
    failures first; narrow enough for a laptop screen whatever the number of methods."""
    sources = [("real", g.real)] + [(m, g.synthetic[m]) for m in method_columns(list(g.synthetic))]
    rows = []
    for name, entries in sources:
        ordered = failures_first(entries)
        n_fail = sum(s.qc_pass is False for s in ordered)
        head = (f"<th>{esc(name)}<br><small>{len(ordered)} sample{'' if len(ordered) == 1 else 's'}"
                f"{f', {n_fail} fail QC' if n_fail else ''}</small></th>")
        cells = "".join(f"<td>{_sample_cell(s, name)}</td>" for s in ordered[:max_per_cell])
        rows.append(f"<tr>{head}{cells or '<td><em>no samples</em></td>'}</tr>")
    return f'<h3>{esc(g.defect_type)}</h3><table class="samples"><tbody>{"".join(rows)}</tbody></table>'


def _verdict_class(verdict) -> str:
    return {"hurts": "v-hurts", "helps": "v-helps"}.get(verdict, "v-none")


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
    parts = ['<p class="note">Each cell: the mean paired difference (same seed, same budget rule) of a method\'s run '
             "against its protocol's reference on the held-out real test images, with its 95 % interval over the seeds "
             "(hover for the seed count). "
             "<b>helps</b> / <b>hurts</b>: the interval lies above / below 0; <b>no measurable effect</b>: it "
             "contains 0.</p>"]
    if detector.get("resolution"):
        parts.append("<p>Detector resolution, per category (chosen from its real training images where params say auto): "
                     + "; ".join(f"{esc(c)}: {esc(resolution_words(r))}" for c, r in detector["resolution"].items()) + ".</p>")
    for protocol in detector["protocols"]:
        parts.append(f'<h3>{esc(protocol_heading(detector, protocol))}</h3>')
        if (detector.get("references") or {}).get(protocol) is None:
            rows = [r for r in detector.get("absolute") or [] if r.get("protocol") == protocol and r.get("defect_type") == "all"]
            parts.append("<p>No comparison: the mean of each run over the seeds with its 95 % interval.</p>")
            parts.append("<ul>" + "".join(f"<li>{esc(r.get('category'))}: {esc(absolute_sentence(r))}</li>" for r in rows) + "</ul>"
                         if rows else "<p><em>No runs.</em></p>")
            continue
        parts.append(_protocol_verdicts([r for r in comparisons if r.get("protocol", "mixed") == protocol],
                                        learned_by_protocol(detector).get(protocol) or {}, level=4, note=False))
    return "".join(parts)


def _protocol_verdicts(comparisons: list[dict], learned: dict, level: int = 3, note: bool = True) -> str:
    parts = ['<p class="note">Each cell: the mean paired difference (same seed, same budget) of real + synthetic '
             "against real-only on the held-out real test images, with its 95 % interval over the seeds "
             "(hover for the seed count). "
             "<b>helps</b> / <b>hurts</b>: the interval lies above / below 0; <b>no measurable effect</b>: it "
             "contains 0.</p>"] if note else []
    categories = sorted({str(r.get("category")) for r in comparisons} | set(learned))
    for category in categories:
        parts.append(f"<h{level}>{esc(category)}</h{level}>")
        info = learned.get(category) or {}
        rows = [r for r in comparisons if str(r.get("category")) == category]
        if info.get("learned") is False or any(r.get("verdict") == NOT_LEARNED for r in rows):
            parts.append(f'<p class="warn">{esc(not_learned_sentence(category, info))}</p>')
            continue
        if info.get("reason"):
            parts.append(f"<p>The detector learned on this category: {esc(info['reason'])}.</p>")
        elif isinstance(info.get("image_auroc_real_only"), (int, float)):
            parts.append(f"<p>The detector learned on this category: real-only image AUROC "
                         f"{info['image_auroc_real_only']:.3f}.</p>")
        hurts = [r for r in rows if r.get("verdict") == "hurts"]
        if hurts:
            items = "".join(f"<li>{esc(describe_comparison(r))}</li>" for r in hurts)
            parts.append(f'<div class="warn"><b>Synthetic data hurts the detector here:</b><ul>{items}</ul></div>')
        metrics = list(dict.fromkeys(str(r.get("metric")) for r in rows))
        cells: dict[tuple[str, str], dict[str, dict]] = {}
        for r in rows:
            dt = r.get("defect_type")
            cells.setdefault((str(r.get("method")), "all" if dt in (None, "") else str(dt)), {})[str(r.get("metric"))] = r
        body = []
        for (method, dt), by_metric in cells.items():
            tds = []
            for m in metrics:
                r = by_metric.get(m)
                if r is None:
                    tds.append("<td></td>")
                    continue
                v = r.get("verdict")
                tds.append(f'<td class="num {_verdict_class(v)}" title="{esc(describe_comparison(r))}">{signed(r.get("mean_diff"))} '
                           f'<small>[{signed(r.get("ci_low"))}, {signed(r.get("ci_high"))}]</small>'
                           + (f" {esc(v)}" if v in ("helps", "hurts") else "") + "</td>")
            body.append(f"<tr><td>{esc(method)}</td><td>{esc(dt)}</td>{''.join(tds)}</tr>")
        if body:
            ref = next((r.get("reference") for r in rows if r.get("reference")), BASELINE)
            parts.append(f"<table><caption>Δ against {esc(ref)}</caption><thead><tr><th>method</th><th>defect type</th>"
                         + "".join(f"<th>{esc(metric_name(m))}</th>" for m in metrics)
                         + f"</tr></thead><tbody>{''.join(body)}</tbody></table>")
        else:
            parts.append("<p><em>No comparisons for this category.</em></p>")
    return "".join(parts)


def _set_label(r: dict) -> str:
    category, defect = str(r.get("category", "")), str(r.get("defect_type", ""))
    return defect if not category or defect.startswith(f"{category}/") else f"{category}/{defect}"


def _realism_section(sets: Sequence[dict]) -> str:
    rows = [r for r in sets if any(k in r for k in REALISM_KEYS)]
    if not rows:
        return "<p><em>This run's quality stage wrote no realism scores.</em></p>"
    c2st_cp = {(r.get("category"), r.get("defect_type")): r.get("c2st_accuracy") for r in rows if r.get("method") == REFERENCE}
    expl = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in REALISM_EXPLAINED)
    body = []
    for r in rows:
        iqr = r.get("contrast_real_iqr")
        iqr_s = f"[{sig3(iqr[0])}, {sig3(iqr[1])}]" if isinstance(iqr, (list, tuple)) and len(iqr) == 2 else "—"
        inside = contrast_inside(r)
        inside_s = "" if inside is None else (" inside" if inside else ' <span class="v-hurts">outside</span>')
        cp = c2st_cp.get((r.get("category"), r.get("defect_type")))
        refs = f"real-vs-real {sig3(r.get('c2st_real_vs_real'))}"
        if r.get("method") != REFERENCE:
            refs += f", copy-paste {sig3(cp)}"
        sat = finite(r.get("saturation"))
        sat_cls = ' class="v-hurts"' if sat is not None and sat > max(0.01, (finite(r.get("saturation_real")) or 0) * 2) else ""
        speck = finite(r.get("speckle_ratio"))
        sp_cls = ' class="v-hurts"' if speck is not None and speck > SPECKLE_FLAG else ""
        body.append(
            f"<tr><td>{esc(_set_label(r))}</td><td>{esc(r.get('method'))}</td>"
            f"<td{sat_cls}>{percent(sat)} <small>(real {percent(r.get('saturation_real'))})</small></td>"
            f'<td class="num">{sig3(r.get("intensity_distance"))}</td>'
            f"<td>{sig3(r.get('contrast_median'))} <small>(real IQR {iqr_s})</small>{inside_s}</td>"
            f"<td>{sig3(r.get('c2st_accuracy'))} <small>({refs})</small></td>"
            f"<td{sp_cls}>{sig3(r.get('speckle_ratio'))}</td></tr>")
    per_method = "".join(f"<li>{esc(realism_sentence(m, v))}</li>" for m, v in realism_by_method(rows).items())
    return (f"<ul class=\"note\">{expl}</ul><p>Per method:</p><ul>{per_method}</ul><table><thead><tr><th>set</th><th>method</th><th>saturated share</th>"
            "<th>intensity distance</th><th>contrast median</th><th>C2ST accuracy</th><th>speckle (× real)</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


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
    extra_cols = [k for k in ("protocol", "budget") if len({r.get(k) for r in rows}) > 1]  # said once in the heading otherwise
    note = (f'<p class="note">Highlighted: the <b>{esc(baseline)}</b> baseline (U-Net on the real training '
            "split only). Protocol and budget as in the verdicts above; "
            "<code>synthetic/&lt;method&gt;</code>: trained on that method's samples and the real normal images only. "
            "Small numbers under a value: difference to that baseline for the same category in the mixed protocol "
            "(left out where the detector did not learn). The verdicts above, not these raw numbers, say whether "
            "a method helps. AdaBLDM's IAP/IAP90 are not reported: the seed text does not define them.</p>")
    return note + table(rows, cols + extra_cols, row_class=row_class, extra=extra)


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
        quality_rows: :func:`~defectforge.metrics.fidelity.compute_fidelity` dicts, each
            with ``defect_type`` and ``method`` added (and optionally ``pass_rate`` and the
            realism keys ``saturation``, ``c2st_accuracy``, ...).
        detector_rows: raw per-run rows, each with ``run`` (``real-only``, a method) and
            ``defect_type`` (the category).
        detector: the detector stage's details dict; its ``comparisons`` and ``learned``
            give the verdicts (absent ``comparisons``: a single-seed run, said so).
        curves: run name -> per-epoch rows (``epoch``, ``loss``, ``val_*``).
        max_per_cell: samples shown per grid column (failures first).
    """
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"]
    parts += _header_parts(meta, detector, notes)
    parts += _samples_parts(grids, max_per_cell)
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
    parts += _image_quality_parts(quality_rows)
    parts.append("<h2>Detector (U-Net) on held-out real images: raw numbers</h2>")
    if detector_rows:
        parts.append(_detector_section(detector_rows, baseline, unlearned, single_seed))
    else:
        parts.append("<p><em>No runs.</em></p>")
    parts += _curves_parts(curves)
    parts.append("</body></html>")
    return "".join(parts)


def _header_parts(meta: dict | None, detector: dict | None, notes: Sequence[str]) -> list[str]:
    """The run's facts, the detector's findings in words, and the notes."""
    parts = []
    if meta:
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in meta.items())
        parts.append(f'<dl class="meta">{items}</dl>')
    findings = detector_findings(detector)
    if findings:
        items = "".join(f'<li class="{"v-helps" if k == "helps" else "v-hurts" if k != "single-seed" else ""}">'
                        f"{esc(t)}</li>" for k, t in findings)
        parts.append(f'<div class="{"warn" if any(k != "helps" for k, _ in findings) else "note"}">'
                     f"<b>Findings of the detector:</b><ul>{items}</ul></div>")
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    return parts


def _samples_parts(grids: Sequence[SampleGrid], max_per_cell: int) -> list[str]:
    """Real and synthetic samples side by side, one grid per (category, defect type)."""
    parts = ["<h2>Samples: real vs synthetic</h2>"]
    if not grids:
        return parts + ["<p><em>No samples.</em></p>"]
    parts.append("<p>One row per source. Each sample: the plain image, the mask and the overlay (mask in red), cropped around the mask, "
                 "then the whole image. Samples that failed their quality gate come first, framed in red with "
                 f"the gate's reasons. At most {max_per_cell} samples per source.</p>")
    return parts + [_grid_section(g, max_per_cell) for g in grids]


def _image_quality_parts(quality_rows: Sequence[dict]) -> list[str]:
    """FID / KID / LPIPS / IS per set, with the backbones named once."""
    parts = ["<h2>Image quality</h2>"]
    names = sorted({str(r.get(k)) for r in quality_rows for k in ("backbone", "lpips_backbone") if r.get(k)})
    if names:
        parts.append(f"<p>Backbones: {', '.join(f'<code>{esc(n)}</code>' for n in names)}.</p>")
    if any(n.startswith("random-") for n in names):
        parts.append('<p class="note">Backbones named <code>random-…</code> are seeded, randomly initialised '
                     "networks (no pretrained weights are available offline). Their FID/KID/LPIPS rank methods "
                     "against each other on the same data and are <b>not comparable with published numbers</b>.</p>")
    # the backbones are named once above; the realism and C2ST details are in the realism section
    qcols = [c for c in QUALITY_COLUMNS if c not in ("backbone", "lpips_backbone") or len(names) > 2]
    return parts + [table(quality_rows, qcols)]


def _curves_parts(curves: dict[str, Sequence[dict]] | None) -> list[str]:
    """One chart per logged quantity, one line per run."""
    parts = ["<h2>Training curves</h2>"]
    if not curves:
        return parts + ["<p><em>No curves.</em></p>"]
    ykeys = []
    for rows in curves.values():
        for r in rows:
            for k, v in r.items():
                if k not in ("epoch", "lr", "seconds") and isinstance(v, (int, float)) and k not in ykeys:
                    ykeys.append(k)
    charts = [svg_line_chart({run: [(r.get("epoch", i + 1), r.get(k)) for i, r in enumerate(rows)]
                              for run, rows in curves.items()}, title=k) for k in ykeys]
    return parts + [f'<div class="charts">{"".join(charts)}</div>']


def write_report(path: str | Path, **kwargs) -> Path:
    """Render with :func:`render_report` and write atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report(**kwargs))
    return path


# ----------------------------------------------------------------------------- from stage outputs
def method_order(present: Sequence[str], methods: Sequence[str] | None = None) -> list[str]:
    """The grid's method columns: ``copy-paste`` first, then ``methods`` (``generate.methods``;
    default: the registry's order, as written out in :data:`~defectforge.params.needs.NEEDS_CHECKPOINTS`, so
    the report does not import the methods' code), then any other method present, sorted."""
    from defectforge.params.needs import NEEDS_CHECKPOINTS

    order = list(methods) if methods is not None else list(NEEDS_CHECKPOINTS)
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

