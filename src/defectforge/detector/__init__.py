"""U-Net defect detector: training on real (+ synthetic) pairs, evaluation on held-out real images."""

from defectforge.detector.train import (
    evaluate_detector,
    evaluate_groups,
    image_scores_from_maps,
    load_detector,
    predict_maps,
    Prepared,
    prepare_items,
    ragged_detection_metrics,
    sample_patch,
    save_detector,
    train_detector,
)
from defectforge.detector.unet import UNet

__all__ = [
    "Prepared",
    "ragged_detection_metrics",
    "sample_patch",
    "UNet",
    "evaluate_detector",
    "evaluate_groups",
    "image_scores_from_maps",
    "load_detector",
    "predict_maps",
    "prepare_items",
    "save_detector",
    "train_detector",
]
