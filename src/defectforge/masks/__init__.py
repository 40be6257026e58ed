"""Masks: target-mask augmentation and placement, crops, foreground, trimap and Eq. 13 refinement."""
