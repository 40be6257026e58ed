"""Image-quality metrics (backbone recorded beside every number), detection metrics, quality gates."""

from defectforge.metrics.backbones import DEFAULT_BACKBONE, DEFAULT_LPIPS_BACKBONE
from defectforge.metrics.detection import DETECTION_KEYS, aupro, detection_metrics
from defectforge.metrics.gates import GateThresholds, SetThresholds, gate_sample, gate_set, thresholds_from_dict
from defectforge.metrics.quality import QUALITY_KEYS, compute_quality

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_LPIPS_BACKBONE",
    "DETECTION_KEYS",
    "GateThresholds",
    "QUALITY_KEYS",
    "SetThresholds",
    "aupro",
    "compute_quality",
    "detection_metrics",
    "gate_sample",
    "gate_set",
    "thresholds_from_dict",
]
