"""The dataset card (``README.md`` of a release) and the headline metrics.

The card says in words what the numbers say: per category whether the detector
learned, each method's verdict against real-only with its 95 % interval ("no
measurable effect" where the interval contains 0, "hurts" where it lies below),
realism per method, and which backbone produced every number.

Its "Provenance" part (:func:`provenance`) names the source dataset and its licence, the
hash of the code (src/, stages/, params.yaml, dvc.yaml; the commit is the release tag's), the params hashes and the methods with their configs; "Known
limitations" lists what was measured against the data (failed quality gates, samples
failing the per-sample gates, categories where the detector did not learn, methods that
hurt the detector); "Quarantine" lists the source samples ingest left out
(``data.on_bad: skip``), or says "none".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

from defectforge.publish.findings import (NOT_LEARNED, SPECKLE_FLAG, absolute_sentence, describe_comparison, detector_findings,
                                        learned_by_protocol, not_learned_sentence, protocol_heading, protocol_tag, realism_by_method,
                                        realism_sentence, resolution_words, signed)


def supported_n(det: dict) -> list[str]:
    """Per category and method, in words, which number of synthetic samples the detector's evidence supports:
    the amount it trained with when its pixel AP interval (mixed protocol, all test images) lies above 0,
    none when it holds 0 or lies below."""
    out = []
    for r in det.get("comparisons") or []:
        if r.get("protocol", "mixed") != "mixed" or r.get("metric") != "pixel_ap" or r.get("defect_type") not in (None, "", "all"):
            continue
        n = ((det.get("per_category") or {}).get(r.get("category")) or {}).get(r.get("method"), {}).get("train_synthetic")
        amount = f"{n} samples" if isinstance(n, int) else "its samples"
        ci = f"Δ {signed(r.get('mean_diff'))}, 95 % CI [{signed(r.get('ci_low'))}, {signed(r.get('ci_high'))}]"
        verdict = r.get("verdict")
        if verdict == "helps":
            words = f"supports {amount} ({ci}); larger amounts are not measured"
        elif verdict == "hurts":
            words = f"is against adding {amount} ({ci}): they hurt the detector"
        elif verdict == NOT_LEARNED:
            words = "supports no amount: the real-only detector did not learn"
        else:
            words = f"supports no amount: {amount} had no measurable effect ({ci})"
        out.append(f"{r.get('category')}/{r.get('method')}: the evidence {words}")
    return out


def headline_metrics(metrics: dict) -> dict:
    """A flat dict of the numbers a data team looks at first (for cards and list-versions).

    Besides the mean metrics per run: ``detector.<category>.learned`` and, per comparison over
    all defect types, ``detector.<category>.<method>.<metric>`` = the verdict in words with
    the mean difference and its 95 % interval; ``realism.<method>.<score>`` per method.
    A run that records its protocol and budget names them in every detector entry: the
    synthetic protocol's entries are ``detector.<category>.synthetic/<method>.<metric>``
    (``detector.<category>.synthetic.learned``), the values and the mean keys say
    ``protocol ..., budget ...``; a protocol without a reference gives its absolute means.
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
    budget = det.get("training_budget")
    if budget:
        out["detector.protocol"], out["detector.budget"] = det.get("protocol"), budget
    d = det.get("mean") or {}
    for run, m in d.items():
        if not isinstance(m, dict):
            continue
        suffix = f" [protocol {run.split('/')[0] if '/' in run else 'mixed'}, budget {budget}]" if budget else ""
        for k in ("image_auroc", "pixel_ap", "aupro"):
            if isinstance(m.get(k), (int, float)):
                out[f"{run}.{k}{suffix}"] = m[k]
    for category, r in (det.get("resolution") or {}).items():  # what the detector's auto settings chose, and from what
        out[f"detector.{category}.resolution"] = resolution_words(r)
    for protocol, learned in learned_by_protocol(det).items():
        for category, info in learned.items():
            if isinstance(info, dict) and "learned" in info:
                out[f"detector.{category}.learned" if protocol == "mixed" else f"detector.{category}.{protocol}.learned"] = bool(info["learned"])
    for r in det.get("comparisons") or []:
        if r.get("defect_type") not in (None, "", "all"):
            continue
        verdict, tag = r.get("verdict"), protocol_tag(r)
        if verdict != "detector did not learn":
            verdict = f"{verdict} (Δ {signed(r.get('mean_diff'))}, 95 % CI [{signed(r.get('ci_low'))}, {signed(r.get('ci_high'))}]" + (f"; {tag})" if tag else ")")
        elif tag:
            verdict = f"{verdict} ({tag})"
        method = r.get("method") if r.get("protocol", "mixed") == "mixed" else f"{r['protocol']}/{r.get('method')}"
        out[f"detector.{r.get('category')}.{method}.{r.get('metric')}"] = verdict
    for r in det.get("absolute") or []:  # a protocol without a reference: its absolute numbers
        if (det.get("references") or {}).get(r.get("protocol"), "") is None and r.get("defect_type") == "all":
            out[f"detector.{r['category']}.{r['protocol']}/{r['run']}.{r['metric']}"] = absolute_sentence(r).split(": ", 1)[1]
    return out


def _measured(details: dict) -> list[str]:
    """The card's "Measured" part: detector verdicts in words, realism per method, backbones."""
    lines: list[str] = []
    det = details.get("detector") or {}
    q = details.get("quality") or {}
    sets = list((q.get("sets") or {}).values())
    if det:
        if "protocols" in det:
            lines += ["", "**Detector** (U-Net trained from scratch, scored on held-out real test images; each line names "
                      "its protocol and budget):", ""]
        else:
            lines += ["", "**Detector** (U-Net trained from scratch on real + synthetic images against real-only, "
                      "scored on held-out real test images):", ""]
        comparisons = det.get("comparisons")
        if comparisons is None:
            lines.append("- One seed per condition, no confidence intervals: the detector numbers in `metrics.json` "
                         "are within seed-to-seed noise and are **not a ranking** of the methods.")
        else:
            rows = [r for r in comparisons if r.get("defect_type") in (None, "", "all")] or list(comparisons)
            for category, r in (det.get("resolution") or {}).items():  # what the detector's auto settings chose, and from what
                lines.append(f"- Detector resolution, {category}: {resolution_words(r)}.")
            for protocol, learned in learned_by_protocol(det).items():
                if "protocols" in det:
                    lines.append(f"- {protocol_heading(det, protocol)}:")
                indent = "  " if "protocols" in det else ""
                if "protocols" in det and (det.get("references") or {}).get(protocol) is None:
                    lines += [f"  - {r['category']}: {absolute_sentence(r)}" for r in det.get("absolute") or []
                              if r.get("protocol") == protocol and r.get("defect_type") == "all"]
                    continue
                mine_p = [r for r in rows if r.get("protocol", "mixed") == protocol]
                for category in sorted({str(r.get("category")) for r in mine_p} | set(learned)):
                    info = learned.get(category) or {}
                    mine = [r for r in mine_p if str(r.get("category")) == category]
                    if info.get("learned") is False or any(r.get("verdict") == NOT_LEARNED for r in mine):
                        lines.append(f"{indent}- {category}: {not_learned_sentence(category, info)}")
                        continue
                    lines.append(f"{indent}- {category}:")
                    lines += [f"{indent}  - {describe_comparison(r)}" for r in mine]
            hurts = [t for k, t in detector_findings(det) if k == "hurts"]
            if hurts:
                lines += ["", "**Synthetic data hurts the detector** in: " + "; ".join(hurts) + "."]
            support = supported_n(det)
            if support:
                lines += ["", "**How many synthetic samples the evidence supports** (pixel AP, mixed protocol; one amount per "
                          "method was measured, the release's own: `bench/dose_response.py` measures a curve):", ""]
                lines += [f"- {t}" for t in support]
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


LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt", "LICENCE", "LICENCE.txt")
DATASET_META_FILES = ("sample.json", "dataset.json")  # sample.json: the built-in sample's marker


def source_license(root: str | os.PathLike | None) -> tuple[str, str]:
    """(dataset name, licence) of a source dataset folder: the ``license`` / ``name`` fields of its
    ``sample.json`` / ``dataset.json``, else the first line of a LICENSE file, else "not recorded"."""
    if root is None:
        return "unknown", "not recorded"
    root = Path(root)
    name = root.name
    for meta in DATASET_META_FILES:
        f = root / meta
        if f.is_file():
            try:
                info = json.loads(f.read_text())
            except (ValueError, OSError):
                continue
            if isinstance(info, dict) and info.get("license"):
                return str(info.get("name") or name), str(info["license"])
    for lic in LICENSE_FILES:
        f = root / lic
        if f.is_file():
            try:
                first = next((ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()), "")
            except OSError:
                continue
            return name, f"{first[:200]} (from {lic})" if first else f"see {lic}"
    return name, "not recorded (add a LICENSE file or a dataset.json with a \"license\" field to the dataset folder)"


CODE_PATHS = ("src", "stages", "params.yaml", "dvc.yaml")


PROJECT_CODE = "src/, stages/, params.yaml and dvc.yaml (the commit is the release tag's)"


def code_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 of the code and params that made the data: every file of ``src/`` and ``stages/``
    (git-tracked ones in a checkout), ``params.yaml`` and ``dvc.yaml``, by path and content,
    in the project holding ``folder`` (its git top level, else the nearest folder with dvc.yaml).
    See :func:`code_record` for a folder in no project.

    Not the git commit: the commit that records a run's dvc.lock is always newer than the
    one the run started from, so a commit id in an output could never match the committed
    lock (docs/reproducibility.md). The release tag names the commit.
    """
    return code_record(folder)[0]


def code_record(folder: str | os.PathLike) -> tuple[str, str]:
    """``(sha256, what it covers)``: the project's code as :func:`code_sha256` says; where ``folder``
    lies in no project (no checkout, no dvc.yaml above it: the command line run elsewhere), the
    files of the installed defectforge package that ran, never the hash of nothing."""
    root = Path(folder).resolve()
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    if top.returncode == 0:
        root = Path(top.stdout.strip())
    else:  # not a checkout: the nearest folder up holding dvc.yaml is the project
        root = next((d for d in (root, *root.parents) if (d / "dvc.yaml").is_file()), root)
    listed = subprocess.run(["git", "ls-files", "-z", "--", *CODE_PATHS], cwd=root, capture_output=True)
    if listed.returncode == 0:
        files = sorted({f for f in listed.stdout.decode().split("\0") if f})
    else:
        files = sorted(p.relative_to(root).as_posix() for c in CODE_PATHS for p in ([root / c] if (root / c).is_file() else (root / c).rglob("*"))
                       if p.is_file() and "__pycache__" not in p.parts)
    files = [f for f in files if (root / f).is_file()]
    what = PROJECT_CODE
    if not files:
        import defectforge

        root = Path(defectforge.__file__).resolve().parent
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        what = f"the installed defectforge package ({root}), run outside a project (no checkout or dvc.yaml at {Path(folder).resolve()})"
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + hashlib.sha256((root / f).read_bytes()).digest())
    return h.hexdigest(), what


def read_quarantine(folder: str | os.PathLike | None) -> list[dict]:
    """The samples ingest quarantined: every ``*.quarantine.json`` of defectforge in ``folder``."""
    out: list[dict] = []
    if folder is None or not Path(folder).is_dir():
        return out
    for f in sorted(Path(folder).glob("*.quarantine.json")):
        try:
            q = json.loads(f.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(q, dict) and str(q.get("format", "")).startswith("defectforge-quarantine/"):
            out += [s for s in q.get("samples") or [] if isinstance(s, dict)]
    return out


def provenance(df, *, source_root=None, project=None, quarantine_dir=None) -> dict:
    """Where the release comes from: source dataset + licence, commit, params hashes, methods, quarantine."""
    name, lic = source_license(source_root)
    methods = {}
    for m, cfg in df.drop_duplicates("method")[["method", "method_config"]].itertuples(index=False):
        methods[str(m)] = str(cfg)
    return {
        "source_dataset": name,
        "source_license": lic,
        **(dict(zip(("code_sha256", "code_of"), code_record(project))) if project is not None
           else {"code_sha256": "not recorded", "code_of": PROJECT_CODE}),
        "params_sha256": sorted({str(h) for h in df["params_sha256"].dropna()}),
        "methods": dict(sorted(methods.items())),
        "quarantine": read_quarantine(quarantine_dir),
    }


def limitations(df, details: dict | None, gates: dict | None) -> list[str]:
    """What was measured against this data, in words (empty: nothing found)."""
    out: list[str] = []
    if gates and gates.get("passed") is False:
        out.append("Set-level quality gates failed: " + "; ".join(str(f) for f in gates.get("failures") or ["(no detail)"]) + ".")
    if "qc_pass" in df and df["qc_pass"].notna().any():
        failing = df[df["qc_pass"].eq(False)]
        if len(failing):
            reasons = Counter(r for rs in failing.get("qc_reasons", []) if rs is not None for r in list(rs))
            why = ", ".join(f"{r} {n}" for r, n in reasons.most_common()) or "no reason recorded"
            out.append(f"{len(failing)} of {len(df)} samples fail the per-sample quality gates ({why}); they are kept, "
                       "flagged in `qc_pass`.")
    else:
        out.append("The per-sample quality gates were not run.")
    sets = ((details or {}).get("quality") or {}).get("sets") or {}
    noisy = sorted((k, v["speckle_ratio"]) for k, v in sets.items()
                   if isinstance(v, dict) and isinstance(v.get("speckle_ratio"), (int, float)) and v["speckle_ratio"] > SPECKLE_FLAG)
    if noisy:
        out.append(f"Pixel-scale noise inside the masks above {SPECKLE_FLAG:g}x the real defects' (speckle; measured, gated only "
                   "with quality.gates.speckle_ratio_max): " + ", ".join(f"{k} {r:.1f}x" for k, r in noisy) + ".")
    det = (details or {}).get("detector")
    if not det:
        out.append("No detector was trained: there is no evidence here that these samples help a detector.")
    else:
        from defectforge.publish.findings import detector_findings

        findings = detector_findings(det)
        out += [f"Detector did not learn: {t}" for k, t in findings if k == "not-learned"]
        out += [f"Synthetic data hurts the detector: {t}" for k, t in findings if k == "hurts"]
        out += [t for k, t in findings if k == "single-seed"]
        if not any(k == "helps" for k, _ in findings):
            out.append("No method measurably helps the detector on any category.")
    return out


def _provenance_lines(prov: dict, limits: list[str]) -> list[str]:
    lines = ["", "## Provenance", "",
             f"- source dataset: {prov.get('source_dataset')} (licence: {prov.get('source_license')})",
             f"- code: sha256 `{prov.get('code_sha256')}` of {prov.get('code_of', PROJECT_CODE)}",
             f"- params sha256: {', '.join(f'`{h}`' for h in prov.get('params_sha256') or []) or 'not recorded'}",
             "- methods (config as recorded per row in `method_config`):"]
    lines += [f"  - {m}: `{cfg}`" for m, cfg in (prov.get("methods") or {}).items()]
    lines += ["", "## Known limitations", ""]
    lines += [f"- {t}" for t in limits] or ["- none measured"]
    q = prov.get("quarantine") or []
    lines += ["", "## Quarantine", "", "Source samples left out at ingest as bad (`data.on_bad: skip`):", ""]
    if q:
        lines += [f"- `{s.get('image_id')}` ({s.get('reason')}): {s.get('detail') or s.get('image_path')}" for s in q]
    else:
        lines.append("none")
    return lines


def _detector_name(det: dict) -> str:
    b = det.get("budget") or {}
    facts = [f"{k} {b[k]}" for k in ("protocol", "budget", "size", "epochs", "base_channels", "depth") if k in b]
    seeds = b.get("seeds")
    if isinstance(seeds, (list, tuple)):
        facts.append(f"{len(seeds)} seeds")
    elif isinstance(seeds, int):
        facts.append(f"{seeds} seeds")
    return "detector: U-Net from scratch" + (f" ({', '.join(facts)})" if facts else "")


def card(version: str, df, counts, metrics, has_report: bool = False, *, details: dict | None = None,
         prov: dict | None = None, gates: dict | None = None) -> str:
    """The card in markdown; ``prov`` from :func:`provenance`, ``gates`` the quality stage's gates.json."""
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
    if prov is not None:
        lines += _provenance_lines(prov, limitations(df, details, gates))
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
