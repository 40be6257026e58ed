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
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
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


class _Stream:
    """Endless shuffled passes over ``n`` indices (a fresh permutation per pass)."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen, self.order, self.pos = n, gen, torch.empty(0, dtype=torch.long), 0

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        self.pos += 1
        return int(self.order[self.pos - 1])


def _as_tensors(items, size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(items, tuple) and len(items) == 2 and all(isinstance(t, torch.Tensor) for t in items):
        x, y = items
        if x.ndim != 4 or x.shape[1] != 3 or y.shape != (x.shape[0], 1, *x.shape[2:]) or x.shape[-2:] != (size, size):
            raise DataError(f"{name}: prepared tensors must be (N, 3, {size}, {size}) and (N, 1, {size}, {size}), got {tuple(x.shape)}, {tuple(y.shape)}")
        return x, y
    return prepare_items(items, size, name)


def train_detector(
    train_items: Sequence[Item] | tuple[torch.Tensor, torch.Tensor],
    *,
    synthetic_items: Sequence[Item] | tuple[torch.Tensor, torch.Tensor] | None = None,
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
    """Train a U-Net on real (image, mask) pairs, optionally with synthetic pairs.

    Budget and sampling (the same for real-only and every real+synthetic run, so a paired
    comparison measures the data and nothing else):

    1. ``steps = epochs * ceil(len(train_items) / batch_size)``: the budget is counted in
       passes over the *real* training set, so adding synthetic samples does not add steps.
    2. Balanced batches: ``batch_size // 2`` slots hold defect images, the rest defect-free
       ones (defects are rare; uniform batches are mostly empty masks). A defect slot takes
       a synthetic sample with probability ``n_syn / (n_syn + n_real_defects)`` (the share
       it would have in the union), otherwise the next real defect.
    3. Paired randomness: the weights come from ``seed``; the defect-free stream, the real
       defect stream, the synthetic stream, the real/synthetic choice and the flips each
       have their own generator derived from ``seed``. Two runs with the same seed start
       from the same weights and see the real images in the same order.
    4. Adam with cosine learning-rate decay from ``lr`` to 0 over ``steps``.

    ``train_items`` / ``synthetic_items`` may be ``(x, y)`` tensors from :func:`prepare_items`
    (to prepare a dataset once for several seeds). Returns (model in eval mode, curve): one
    row per pass over the real set: ``epoch`` (1-based), ``step``, ``loss`` (mean over the
    pass), ``lr`` (at its end), ``seconds``, and with ``val_items`` the ``val_<metric>`` of
    :func:`evaluate_detector`. Same arguments and seed give the same weights (CPU).
    """
    for key, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("size", size, 8)):
        if not isinstance(v, int) or v < lo:
            raise DefectforgeError(f"detector.{key} must be an integer >= {lo}, got {v!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise DefectforgeError(f"detector.lr must be a positive number, got {lr!r}")
    if size % 2 ** (depth - 1):
        raise DefectforgeError(f"detector.size {size} must be divisible by 2**(depth-1) = {2 ** (depth - 1)}")
    x, y = _as_tensors(train_items, size, "train_items")
    if synthetic_items is not None and len(synthetic_items):
        xs, ys = _as_tensors(synthetic_items, size, "synthetic_items")
    else:
        xs, ys = x[:0], y[:0]
    is_defect = y.flatten(1).amax(1) > 0.5
    good, defect = torch.nonzero(~is_defect)[:, 0], torch.nonzero(is_defect)[:, 0]
    steps_per_epoch = math.ceil(len(x) / batch_size)
    steps = epochs * steps_per_epoch
    n_def_slots = 0 if not (len(defect) or len(xs)) else batch_size if not len(good) else max(1, batch_size // 2)
    p_syn = len(xs) / (len(xs) + len(defect)) if len(xs) else 0.0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(base_channels=base_channels, depth=depth)
    model.config.update(size=size, score_pool=score_pool)
    gens = [torch.Generator().manual_seed(seed * 7919 + k) for k in range(1, 6)]
    s_good, s_def, s_syn = _Stream(len(good), gens[0]), _Stream(len(defect), gens[1]), _Stream(len(xs), gens[2])
    g_mix, g_flip = gens[3], gens[4]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    curve: list[dict] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        # same number of draws from every generator per step, whatever the pools hold
        use_syn = (torch.rand(n_def_slots, generator=g_mix) < p_syn).tolist()
        flips = torch.rand(batch_size, 2, generator=g_flip) < 0.5
        xb, yb = [], []
        for k in range(batch_size):
            if k < n_def_slots:
                src = (xs, ys, int(s_syn.next())) if use_syn[k] or not len(defect) else (x, y, int(defect[s_def.next()]))
            else:
                src = (x, y, int(good[s_good.next()]))
            xi, yi = src[0][src[2]], src[1][src[2]]
            dims = [d for d, f in zip((-1, -2), flips[k].tolist()) if f]
            if dims:  # the same random flip for image and mask
                xi, yi = xi.flip(dims), yi.flip(dims)
            xb.append(xi)
            yb.append(yi)
        loss = _loss(model(torch.stack(xb)), torch.stack(yb))
        if not torch.isfinite(loss.detach()):
            raise DefectforgeError(f"detector loss became {loss.item()} at step {step} (lr={lr}); lower detector.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % steps_per_epoch == 0:
            row = {"epoch": step // steps_per_epoch, "step": step, "loss": float(np.mean(losses)),
                   "lr": float(opt.param_groups[0]["lr"]), "seconds": round(time.perf_counter() - t0, 3)}
            if val_items:
                m = evaluate_detector(model, val_items, batch_size=batch_size)
                row.update({f"val_{k}": m[k] for k in DETECTION_KEYS})
                model.train()
            curve.append(row)
            _report(progress, row)
            losses, t0 = [], time.perf_counter()
    model.eval()
    return model, curve


@torch.no_grad()
def predict_maps(model: UNet, images: Sequence[np.ndarray] | torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Defect probability maps (N, size, size) float32 for uint8 (H, W, 3) images
    (or an (N, 3, size, size) tensor from :func:`prepare_items`)."""
    size = model.config["size"]
    if isinstance(images, torch.Tensor):
        x = images
    else:
        x, _ = prepare_items([(im, np.zeros(np.asarray(im).shape[:2], bool)) for im in images], size, "images")
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


def evaluate_detector(model: UNet, test_items: Sequence[Item] | tuple[torch.Tensor, torch.Tensor], *, batch_size: int = 8,
                      score_pool: int | None = None) -> dict:
    """Detection metrics of ``model`` on (image, mask) pairs; good images have empty masks.

    Returns :func:`~defectforge.metrics.detection.detection_metrics`'s dict plus
    ``eval_size`` and ``score_pool``.
    """
    return evaluate_groups(model, test_items, {"all": None}, batch_size=batch_size, score_pool=score_pool)["all"]


def evaluate_groups(model: UNet, test_items: Sequence[Item] | tuple[torch.Tensor, torch.Tensor], groups: dict[str, Sequence[int] | None],
                    *, batch_size: int = 8, score_pool: int | None = None) -> dict[str, dict]:
    """Metrics of one model on several subsets of the test set, from one prediction pass.

    ``groups`` maps a name to the indices of its test items (None: all of them), e.g.
    ``{"all": None, "crack": [crack images + all defect-free images]}``. Metrics are
    computed at the model's input resolution (``size`` x ``size``) for every image, so
    every test image weighs the same whatever its original size.
    """
    size = model.config["size"]
    pool = model.config.get("score_pool", 9) if score_pool is None else score_pool
    x, y = _as_tensors(test_items, size, "test_items")
    maps = predict_maps(model, x, batch_size)
    masks = y[:, 0].numpy() > 0.5
    labels = masks.reshape(len(masks), -1).any(axis=1)
    scores = image_scores_from_maps(maps, pool)
    out = {}
    for name, idx in groups.items():
        idx = np.arange(len(maps)) if idx is None else np.asarray(idx, dtype=np.int64)
        res = detection_metrics(scores[idx], labels[idx], maps[idx], masks[idx])
        res.update(eval_size=size, score_pool=pool)
        out[name] = res
    return out


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
