"""Metrics, one module per family (imported one by one, so a stage pays only for what it uses):

* :mod:`~defectforge.metrics.fidelity` - FID / KID / IS / LPIPS / IC-LPIPS on defect crops;
* :mod:`~defectforge.metrics.backbones` - the feature networks, named beside every number;
* :mod:`~defectforge.metrics.realism` - realism scores that need no downloaded weights;
* :mod:`~defectforge.metrics.gates` - per-sample and set-level quality gates;
* :mod:`~defectforge.metrics.detection` - image / pixel AUROC, AP, F1-max, AUPRO.
"""
