"""The DAG, one module per stage, each with one ``run(params, paths...)``.

=========  =========================================  =======================================
stage      module                                     writes
=========  =========================================  =======================================
sample     :mod:`~defectforge.pipeline.sample`        the built-in sample (MVTec AD layout)
ingest     :mod:`~defectforge.pipeline.ingest`        the source manifest
split      :mod:`~defectforge.pipeline.split`         the split manifest (train / test / folds)
pretrain   :mod:`~defectforge.pipeline.pretrain`      the base model (tiny: trained; pretrained: recorded)
finetune   :mod:`~defectforge.pipeline.finetune`      one checkpoint per (category, defect type)
generate   :mod:`~defectforge.pipeline.generate`      images, masks, sharded manifest (fan-out: ``fanout``)
refine     :mod:`~defectforge.pipeline.refine`        the dataset masks (Eq. 13 from attention)
quality    :mod:`~defectforge.pipeline.quality`       per-sample gates, FID/KID/LPIPS, realism scores
detector   :mod:`~defectforge.pipeline.detector`      real-only vs real + synthetic, paired seeds
release    :mod:`~defectforge.pipeline.release`       the versioned manifest, report and card
=========  =========================================  =======================================

Paths come from dvc.yaml's command lines (``stages/<stage>.py``, via
:mod:`~defectforge.pipeline.entry`), from the CLI or from the Prefect flow; params come
validated from :mod:`defectforge.params`. Every stage writes atomically: a folder is
built beside its target and swapped in (:func:`defectforge.data.files.atomic_dir`), a
manifest is validated before it replaces the old one.
"""

STAGES = ("sample", "ingest", "split", "pretrain", "finetune", "generate", "refine", "quality", "detector", "release")
