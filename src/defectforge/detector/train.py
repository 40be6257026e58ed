"""Train the U-Net detector and evaluate it on held-out real images.

The protocol of the seed papers: a U-Net is trained on defect image-mask pairs
together with normal images (whose masks are empty), once on the real training split
alone (``real-only``) and once per generation method on real + synthetic pairs, with
the same seed, budget (epochs, batch size, learning rate) and architecture; each
model is evaluated on the same held-out real test split. The image-level score is the
maximum of the anomaly map after average pooling (AnomalyDiffusion: "localisation
outcomes are aggregated using average pooling to derive confidence scores", as in
DRAEM), with a ``score_pool`` x ``score_pool`` window.

Loss: per-pixel binary cross-entropy + soft Dice (defect pixels are rare). Inputs are
resized to ``size`` x ``size`` (images bilinear with antialiasing, masks nearest), and
metrics are computed at that resolution.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> items = []
    >>> for i in range(4):
    ...     im = rng.integers(90, 110, (32, 32, 3), dtype=np.uint8); m = np.zeros((32, 32), bool)
    ...     if i % 2: m[8:16, 8:16] = True; im[m] = 250
    ...     items.append((im, m))
    >>> model, curve = train_detector(items, epochs=2, batch_size=2, size=32, base_channels=4, depth=2)
    >>> sorted(curve[0])[:3], len(curve)
    (['epoch', 'loss', 'lr'], 2)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from defectforge.detector.unet import UNet
from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.detection import DETECTION_KEYS, detection_metrics

Item = tuple[np.ndarray, np.ndarray]


def prepare_items(items: Sequence[Item], size: int, name: str = "items") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x float (N, 3, size, size) in [-1, 1], y float (N, 1, size, size) in {0, 1}."""
    xs, ys = [], []
    for i, it in enumerate(items):
        try:
            image, mask = it
        except (TypeError, ValueError):
            raise DataError(f"{name}[{i}]: expected an (image, mask) pair") from None
        image, mask = np.asarray(image), np.asarray(mask)
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise DefectforgeError(f"{name}[{i}]: image contains NaN or infinite values")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"{name}[{i}]: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        if mask.shape != image.shape[:2]:
            raise DataError(f"{name}[{i}]: mask shape {mask.shape} != image shape {image.shape[:2]}")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        y = torch.from_numpy(np.ascontiguousarray(mask.astype(np.float32)))[None, None]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            y = F.interpolate(y, size=(size, size), mode="nearest")
        xs.append(x / 127.5 - 1.0)
        ys.append(y)
    if not xs:
        raise DataError(f"{name}: no (image, mask) pairs given")
    return torch.cat(xs), torch.cat(ys)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, y)
    p = torch.sigmoid(logits)
    dice = 1.0 - (2 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    return bce + dice


def _report(progress, row: dict) -> None:
    if progress is True:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"[detector] {shown}", file=sys.stderr, flush=True)
    elif callable(progress):
        progress(row)


def train_detector(
    train_items: Sequence[Item],
    *,
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    size: int = 128,
    base_channels: int = 16,
    depth: int = 4,
    score_pool: int = 9,
    val_items: Sequence[Item] | None = None,
    progress: bool | Callable[[dict], None] = False,
) -> tuple[UNet, list[dict]]:
    """Train a U-Net on (image, mask) pairs; returns (model in eval mode, per-epoch curve).

    Each curve row: ``epoch`` (1-based), ``loss`` (mean over the epoch's batches), ``lr``,
    ``seconds``, and with ``val_items`` the ``val_<metric>`` of :func:`evaluate_detector`.
    Same arguments and seed give the same weights (CPU).
    """
    for key, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("size", size, 8)):
        if not isinstance(v, int) or v < lo:
            raise DefectforgeError(f"detector.{key} must be an integer >= {lo}, got {v!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise DefectforgeError(f"detector.lr must be a positive number, got {lr!r}")
    if size % 2 ** (depth - 1):
        raise DefectforgeError(f"detector.size {size} must be divisible by 2**(depth-1) = {2 ** (depth - 1)}")
    x, y = prepare_items(train_items, size, "train_items")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(base_channels=base_channels, depth=depth)
    model.config.update(size=size, score_pool=score_pool)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve: list[dict] = []
    n = len(x)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        losses = []
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            xb, yb = x[idx], y[idx]
            # flips: the same random flip for image and mask
            if torch.rand((), generator=gen) < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            if torch.rand((), generator=gen) < 0.5:
                xb, yb = xb.flip(-2), yb.flip(-2)
            loss = _loss(model(xb), yb)
            if not torch.isfinite(loss.detach()):
                raise DefectforgeError(f"detector loss became {loss.item()} at epoch {epoch} (lr={lr}); lower detector.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": lr,
               "seconds": round(time.perf_counter() - t0, 3)}
        if val_items:
            m = evaluate_detector(model, val_items, batch_size=batch_size)
            row.update({f"val_{k}": m[k] for k in DETECTION_KEYS})
        curve.append(row)
        _report(progress, row)
    model.eval()
    return model, curve


@torch.no_grad()
def predict_maps(model: UNet, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """Defect probability maps (N, size, size) float32 for uint8 (H, W, 3) images."""
    size = model.config["size"]
    items = [(im, np.zeros(np.asarray(im).shape[:2], bool)) for im in images]
    x, _ = prepare_items(items, size, "images")
    model.eval()
    out = [torch.sigmoid(model(x[i : i + batch_size]))[:, 0] for i in range(0, len(x), batch_size)]
    maps = torch.cat(out).numpy().astype(np.float32)
    if not np.isfinite(maps).all():
        raise DefectforgeError("detector output contains NaN or infinite values")
    return maps


def image_scores_from_maps(maps: np.ndarray, pool: int) -> np.ndarray:
    """Max of the average-pooled map (window ``pool``, stride 1, same size)."""
    t = torch.from_numpy(maps)[:, None]
    if pool > 1:
        t = F.avg_pool2d(t, pool, stride=1, padding=pool // 2, count_include_pad=False)
    return t.amax(dim=(1, 2, 3)).numpy().astype(np.float64)


def evaluate_detector(model: UNet, test_items: Sequence[Item], *, batch_size: int = 8,
                      score_pool: int | None = None) -> dict:
    """Detection metrics of ``model`` on (image, mask) pairs; good images have empty masks.

    Returns :func:`~defectforge.metrics.detection.detection_metrics`'s dict plus
    ``eval_size`` and ``score_pool``.
    """
    size = model.config["size"]
    pool = model.config.get("score_pool", 9) if score_pool is None else score_pool
    _, y = prepare_items(test_items, size, "test_items")
    maps = predict_maps(model, [im for im, _ in test_items], batch_size)
    masks = y[:, 0].numpy() > 0.5
    labels = masks.reshape(len(masks), -1).any(axis=1)
    res = detection_metrics(image_scores_from_maps(maps, pool), labels, maps, masks)
    res.update(eval_size=size, score_pool=pool)
    return res


def save_detector(model: UNet, path: str | Path) -> Path:
    """Write the weights as safetensors, the config in the file's metadata (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"config": json.dumps(model.config), "format": "pt"})
    tmp.replace(path)
    return path


def load_detector(path: str | Path) -> UNet:
    """Load a detector written by :func:`save_detector`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DefectforgeError(f"{path}: detector weights not found")
    try:
        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {})["config"])
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DefectforgeError(f"{path}: not a defectforge detector safetensors file ({exc.__class__.__name__})") from None
    model = UNet(config["in_channels"], config["base_channels"], config["depth"])
    model.config.update({k: v for k, v in config.items() if k not in model.config})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise DefectforgeError(f"{path}: weights do not fit the U-Net config {config}") from None
    return model.eval()
