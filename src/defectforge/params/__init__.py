"""Typed, validated params.yaml, one module per stage's section.

Each stage's section has its own model next to the others here (``sample``, ``data``,
``split``, ``pretrain``, ``finetune``, ``generate``, ``refine``, ``quality``, ``detector``,
``release``); the YAML reader and the one-line error wording are :mod:`.loader`; the whole
file's model (every section, for ``defectforge check`` and the flows) is :mod:`.file`.

A stage script loads only the sections it reads (:func:`.loader.load_section`), so its
code (and its DVC deps) holds only those sections' models: editing the detector's params
model does not rerun the generate stage. This package's ``__init__`` imports nothing, so
importing one section does not pull in the others.
"""
