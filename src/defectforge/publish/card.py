"""The dataset card (``README.md`` of a release) and the headline metrics.

The card says in words what the numbers say: per category whether the detector
learned, each method's verdict against real-only with its 95 % interval ("no
measurable effect" where the interval contains 0, "hurts" where it lies below),
realism per method, and which backbone produced every number.
"""

from __future__ import annotations

from defectforge.publish.report import (NOT_LEARNED, describe_comparison, detector_findings, not_learned_sentence,
                                        realism_by_method, realism_sentence, signed)


def headline_metrics(metrics: dict) -> dict:
    """A flat dict of the numbers a data team looks at first (for cards and list-versions).

    Besides the mean metrics per run: ``detector.<category>.learned`` and, per comparison over
    all defect types, ``detector.<category>.<method>.<metric>`` = the verdict in words with
    the mean difference and its 95 % interval; ``realism.<method>.<score>`` per method.
    """
    out: dict = {}
    q = metrics.get("quality")
    if q:
        out["qc_pass_rate"] = q.get("pass_rate")
        for method, r in realism_by_method(list((q.get("sets") or {}).values())).items():
            for k in ("saturation", "c2st_accuracy", "intensity_distance"):
                if r.get(k) is not None:
                    out[f"realism.{method}.{k}"] = round(r[k], 4)
    det = metrics.get("detector") or {}
    d = det.get("mean") or {}
    for run, m in d.items():
        if not isinstance(m, dict):
            continue
        for k in ("image_auroc", "pixel_ap", "aupro"):
            if isinstance(m.get(k), (int, float)):
                out[f"{run}.{k}"] = m[k]
    for category, info in (det.get("learned") or {}).items():
        if isinstance(info, dict) and "learned" in info:
            out[f"detector.{category}.learned"] = bool(info["learned"])
    for r in det.get("comparisons") or []:
        if r.get("defect_type") not in (None, "", "all"):
            continue
        verdict = r.get("verdict")
        if verdict != "detector did not learn":
            verdict = f"{verdict} (Δ {signed(r.get('mean_diff'))}, 95 % CI [{signed(r.get('ci_low'))}, {signed(r.get('ci_high'))}])"
        out[f"detector.{r.get('category')}.{r.get('method')}.{r.get('metric')}"] = verdict
    return out


def _measured(details: dict) -> list[str]:
    """The card's "Measured" part: detector verdicts in words, realism per method, backbones."""
    lines: list[str] = []
    det = details.get("detector") or {}
    q = details.get("quality") or {}
    sets = list((q.get("sets") or {}).values())
    if det:
        lines += ["", "**Detector** (U-Net trained from scratch on real + synthetic images against real-only, "
                  "scored on held-out real test images):", ""]
        learned = det.get("learned") or {}
        comparisons = det.get("comparisons")
        if comparisons is None:
            lines.append("- One seed per condition, no confidence intervals: the detector numbers in `metrics.json` "
                         "are within seed-to-seed noise and are **not a ranking** of the methods.")
        else:
            rows = [r for r in comparisons if r.get("defect_type") in (None, "", "all")] or list(comparisons)
            for category in sorted({str(r.get("category")) for r in rows} | set(learned)):
                info = learned.get(category) or {}
                mine = [r for r in rows if str(r.get("category")) == category]
                if info.get("learned") is False or any(r.get("verdict") == NOT_LEARNED for r in mine):
                    lines.append(f"- {category}: {not_learned_sentence(category, info)}")
                    continue
                lines.append(f"- {category}:")
                lines += [f"  - {describe_comparison(r)}" for r in mine]
            hurts = [t for k, t in detector_findings(det) if k == "hurts"]
            if hurts:
                lines += ["", "**Synthetic data hurts the detector** in: " + "; ".join(hurts) + "."]
    realism = realism_by_method(sets)
    if realism:
        lines += ["", "**Realism** (per method; saturated share of in-mask pixels, classifier two-sample test "
                  "accuracy where 0.5 = indistinguishable from real defects, intensity-profile distance, "
                  "in-mask contrast against the real interquartile range):", ""]
        lines += [f"- {realism_sentence(m, r)}" for m, r in realism.items()]
    names = sorted({str(r[k]) for r in sets for k in ("backbone", "lpips_backbone") if r.get(k)})
    c2st = sorted({str(r["c2st_classifier"]) for r in sets if r.get("c2st_classifier")})
    if names or c2st or det:
        lines += ["", "**Backbones:** " + "; ".join(
            ([f"FID/KID/LPIPS: {', '.join(f'`{n}`' for n in names)}"] if names else [])
            + ([f"C2ST classifier: {', '.join(f'`{n}`' for n in c2st)}"] if c2st else [])
            + ([_detector_name(det)] if det else []))]
        if any(n.startswith("random-") for n in names):
            lines.append("`random-…` backbones are seeded, randomly initialised networks (no pretrained weights offline): "
                         "their numbers compare methods on this data only, not with published results.")
    return ["", "## Measured", *lines] if lines else []


def _detector_name(det: dict) -> str:
    b = det.get("budget") or {}
    facts = [f"{k} {b[k]}" for k in ("size", "epochs", "base_channels", "depth") if k in b]
    seeds = b.get("seeds")
    if isinstance(seeds, (list, tuple)):
        facts.append(f"{len(seeds)} seeds")
    elif isinstance(seeds, int):
        facts.append(f"{seeds} seeds")
    return "detector: U-Net from scratch" + (f" ({', '.join(facts)})" if facts else "")


def card(version: str, df, counts, metrics, has_report: bool = False, *, details: dict | None = None) -> str:
    lines = [
        f"# defectforge dataset `{version}`",
        "",
        "Synthetic industrial defect images with pixel masks, made by defectforge.",
        "",
        f"- samples: {len(df)}",
        f"- methods: {', '.join(sorted(df['method'].unique()))}",
        "- manifest: `manifest.parquet` (one row per sample; paths relative to the dataset root",
        "  stored in the file's metadata; read it with `defectforge.manifest.io.read_manifest`)",
        "",
        "| category | defect type | method | samples |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r.category} | {r.defect_type} | {r.method} | {r.samples} |" for r in counts.itertuples()]
    if "qc_pass" in df and df["qc_pass"].notna().any():
        lines += ["", f"Per-sample quality gates: {int(df['qc_pass'].fillna(False).sum())} of {len(df)} samples pass "
                  "(failing rows are kept, flagged in `qc_pass` / `qc_reasons`)."]
    if details:
        lines += _measured(details)
    if metrics:
        lines += ["", "## Headline metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
        lines += ["", "Full numbers, with the backbone beside every image-quality figure: `metrics.json`."]
    if has_report:
        lines += ["", "Report (sample grids, detector verdicts, realism, quality and detector tables, training curves): "
                  "[report.html](report.html)"]
    return "\n".join(lines) + "\n"
