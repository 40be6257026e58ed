"""Fidelity metrics (FID / KID / IS / LPIPS / IC-LPIPS) of a synthetic defect set against the real defect images.

Named apart from the ``quality`` stage that runs them and from the per-sample gates
(:mod:`defectforge.metrics.gates`) it applies beside them.

The seed papers measure generation quality with

* FID (Fréchet distance of feature Gaussians) and LPIPS — ddim-inversion Tab. 1/3,
  DefectDiffu Tab. 1 (there LPIPS between generated images is read as diversity);
* KID (unbiased polynomial-kernel MMD of features) — AdaBLDM;
* IS (exp E_x KL(p(y|x) || p(y))) and IC-LPIPS — AnomalyDiffusion Tab. 1, which notes
  that FID/KID are unreliable with few real images and adds IC-LPIPS (Ojha et al.
  2021): the cluster centres are the real *training* images of the defect type (the
  few-shot images the generator learned from; "one-third of the anomaly data for
  training"), every generated image is assigned to its nearest centre (lowest
  LPIPS), the mean pairwise LPIPS inside each cluster is taken, and averaged over
  clusters. ``compute_fidelity`` takes those centres as ``centres``; without them it
  falls back to the ``real`` set and says so in ``ic_lpips_centres``.

FID, KID and IS are computed by torchmetrics (``FrechetInceptionDistance``,
``KernelInceptionDistance``, ``InceptionScore``) on features from the backbone named
by ``backbone`` (see :mod:`defectforge.metrics.backbones`); the features are
extracted once and handed to the three metrics through a pass-through feature
module, so the backbone runs once per image. LPIPS distances come from torchmetrics'
LPIPS network (``_LPIPS``: unit-normalised channel features, squared differences,
per-layer linear heads, spatial mean, sum over layers); the per-image features are
cached so the fake x real distance matrix needs one backbone pass per image.

Every result names its backbones. A metric that cannot be computed from the given
number of images is ``None`` with a ``<metric>_skipped`` reason, never a zero.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> real = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    >>> q = compute_fidelity(real, real, size=64)
    >>> q["backbone"], abs(q["fid"]) < 1e-3
    ('random-vgg11-seed0', True)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.backbones import (
    DEFAULT_BACKBONE,
    DEFAULT_LPIPS_BACKBONE,
    _seeded,
    feature_backbone,
    lpips_backbone as cached_lpips_backbone,
)

QUALITY_KEYS = (
    "fid", "kid_mean", "kid_std", "is_mean", "is_std", "lpips", "ic_lpips",
)


class _Precomputed(nn.Module):
    """Feature module for torchmetrics that returns its input: features are extracted once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def images_to_tensor(images: Sequence[np.ndarray], name: str, size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) from a list of uint8 (H, W, 3) arrays (any H, W).

    Raises DefectforgeError naming ``name[i]`` for NaNs, wrong dtype or shape.
    """
    out = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.dtype.kind == "f" and not np.isfinite(im).all():
            raise DefectforgeError(f"{name}[{i}]: image contains NaN or infinite values")
        if im.dtype != np.uint8:
            raise DataError(f"{name}[{i}]: expected a uint8 image, got dtype {im.dtype}")
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        if im.ndim != 3 or im.shape[2] != 3 or im.shape[0] == 0 or im.shape[1] == 0:
            raise DataError(f"{name}[{i}]: expected an (H, W, 3) image, got shape {im.shape}")
        t = torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1)[None].float()
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(t.round().clamp(0, 255).to(torch.uint8))
    if not out:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.cat(out)


def crop_around_mask(image: np.ndarray, mask: np.ndarray, *, context: float = 2.0, min_side: int = 32) -> np.ndarray:
    """Square crop centred on the mask's bounding box, side = max(context x box side, min_side).

    Defects are often a small part of the image, so whole-image statistics mostly
    measure the background; quality metrics on these crops measure the defect. The
    crop is shifted (not padded) to stay inside the image; an empty mask gives the
    centre crop.
    """
    image, mask = np.asarray(image), np.asarray(mask).astype(bool)
    if mask.shape != image.shape[:2]:
        raise DataError(f"mask shape {mask.shape} != image shape {image.shape[:2]}")
    h, w = mask.shape
    if mask.any():
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        box = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    else:
        cy, cx, box = h / 2, w / 2, 0
    side = int(min(max(round(box * context), min_side), h, w))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return image[y0 : y0 + side, x0 : x0 + side]


@torch.no_grad()
def _run(module: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    if len(x) == 0:
        return torch.zeros((0, module.num_features))
    return torch.cat([module(x[i : i + batch_size]).double() for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------- LPIPS


@torch.no_grad()
def lpips_features(net: nn.Module, x: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Unit-normalised per-layer features of the LPIPS network for uint8 images."""
    from torchmetrics.functional.image.lpips import _normalize_tensor

    per_layer: list[list[torch.Tensor]] = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].float() / 127.5 - 1.0  # LPIPS input range [-1, 1]
        outs = net.net(net.scaling_layer(xb))
        feats = [_normalize_tensor(o) for o in outs]
        if not per_layer:
            per_layer = [[] for _ in feats]
        for kk, f in enumerate(feats):
            per_layer[kk].append(f)
    return [torch.cat(fs) for fs in per_layer]


@torch.no_grad()
def lpips_pairs(net: nn.Module, fa: list[torch.Tensor], fb: list[torch.Tensor],
                ia: torch.Tensor, ib: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """LPIPS(a[ia[k]], b[ib[k]]) for every k, from cached features (same sum as ``_LPIPS.forward``)."""
    out = []
    for s in range(0, len(ia), chunk):
        a, b = ia[s : s + chunk], ib[s : s + chunk]
        val = 0.0
        for kk in range(len(fa)):
            diff = (fa[kk][a] - fb[kk][b]) ** 2
            val = val + net.lins[kk](diff).mean(dim=(2, 3), keepdim=False).flatten()
        out.append(val)
    return torch.cat(out) if out else torch.zeros(0)


def lpips_matrix(net: nn.Module, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """(len(a), len(b)) LPIPS distance matrix."""
    na, nb = len(fa[0]), len(fb[0])
    ia = torch.arange(na).repeat_interleave(nb)
    ib = torch.arange(nb).repeat(na)
    return lpips_pairs(net, fa, fb, ia, ib).view(na, nb)


def ic_lpips_from(net: nn.Module, f_fake: list[torch.Tensor], assign: torch.Tensor) -> tuple[float | None, int]:
    """Mean over clusters (>= 2 members) of the mean pairwise LPIPS inside the cluster."""
    cluster_means = []
    for c in torch.unique(assign):
        members = torch.nonzero(assign == c).flatten()
        if len(members) < 2:
            continue
        i, j = torch.triu_indices(len(members), len(members), offset=1)
        d = lpips_pairs(net, f_fake, f_fake, members[i], members[j])
        cluster_means.append(float(d.mean()))
    if not cluster_means:
        return None, 0
    return float(np.mean(cluster_means)), len(cluster_means)


# --------------------------------------------------------------------------- main API


def compute_fidelity(
    real: Sequence[np.ndarray],
    fake: Sequence[np.ndarray],
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    lpips_backbone: str = DEFAULT_LPIPS_BACKBONE,
    lpips_weights: str | Path | None = None,
    size: int = 128,
    kid_subsets: int = 100,
    kid_subset_size: int = 50,
    is_splits: int = 10,
    n_clusters: int | None = None,
    centres: Sequence[np.ndarray] | None = None,
    centres_name: str = "train",
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """FID, KID, IS, LPIPS-to-nearest-real and IC-LPIPS of ``fake`` against ``real``.

    Args:
        real, fake: lists of uint8 (H, W, 3) images; resized to ``size`` x ``size``.
        backbone, weights: feature backbone for FID/KID/IS (see ``backbones``).
        lpips_backbone, lpips_weights: LPIPS network.
        kid_subsets, kid_subset_size: KID subsets; the size is capped at the number of
            images (the value used is returned as ``kid_subset_size``).
        is_splits: IS splits, capped at ``n_fake // 2`` (at least 2 needed for a std).
        centres: IC-LPIPS cluster centres. The paper's protocol: the real training
            images of the defect type (what the generator learned from), named
            ``centres_name`` in the result's ``ic_lpips_centres``. ``None``: the
            ``real`` images are the centres (``ic_lpips_centres`` = ``"real"``).
        n_clusters: use only the first ``n_clusters`` centres (default: all).
        seed: seeds KID's and IS's random subsets.

    Returns:
        dict with ``fid, kid_mean, kid_std, is_mean, is_std, lpips, ic_lpips`` (float or
        None), ``<metric>_skipped`` (reason or None), ``backbone``, ``lpips_backbone``,
        ``n_real``, ``n_fake``, ``size``, ``kid_subset_size``, ``is_splits``,
        ``ic_lpips_clusters`` (clusters with >= 2 members), ``ic_lpips_centres`` (which set
        gave the centres) and ``ic_lpips_n_centres``.
    """
    x_real = images_to_tensor(real, "real", size)
    x_fake = images_to_tensor(fake, "fake", size)
    x_centres = None if centres is None else images_to_tensor(centres, "centres", size)
    n_real, n_fake = len(x_real), len(x_fake)
    res: dict = {k: None for k in QUALITY_KEYS}
    res.update({f"{k}_skipped": None for k in ("fid", "kid", "is", "lpips", "ic_lpips")})
    res.update(n_real=n_real, n_fake=n_fake, size=size, kid_subset_size=None, is_splits=None,
               ic_lpips_clusters=0, ic_lpips_centres="real" if centres is None else centres_name,
               ic_lpips_n_centres=n_real if centres is None else len(x_centres))

    # 1. Features once per image; FID, KID, IS by torchmetrics on those features.
    feat_net, logit_net, name = feature_backbone(backbone, weights)
    res["backbone"] = name
    f_real = _run(feat_net, x_real, batch_size)
    f_fake = _run(feat_net, x_fake, batch_size)
    _check_finite(f_real, f"{name} features of the real images")
    _check_finite(f_fake, f"{name} features of the fake images")
    res.update(_fid(f_real, f_fake))
    res.update(_kid(f_real, f_fake, kid_subsets, kid_subset_size, seed))
    res.update(_inception_score(logit_net, name, x_fake, is_splits, seed, batch_size))

    # 2. LPIPS: fake -> nearest real; IC-LPIPS: clusters of fakes around the centres.
    net, lname = cached_lpips_backbone(lpips_backbone, lpips_weights)
    res["lpips_backbone"] = lname
    ff = lpips_features(net, x_fake, batch_size) if n_fake >= 1 else None
    res.update(_lpips_to_nearest(net, lname, ff, x_real, batch_size))
    x_c = x_real if x_centres is None else x_centres
    res.update(_ic_lpips(net, lname, ff, x_c, n_clusters, res["ic_lpips_centres"], batch_size))

    for key in QUALITY_KEYS:
        v = res[key]
        if v is not None and not math.isfinite(v):
            raise DefectforgeError(f"quality metric {key} is {v} (backbone {name}, lpips {lname})")
    return res


# The metrics of compute_fidelity, one step each: each returns the result keys it sets
# (its value, or its ``<metric>_skipped`` reason when the sets are too small).


def _too_few(n_real: int, n_fake: int) -> str:
    return f"needs >= 2 real and 2 fake images, got {n_real} real and {n_fake} fake"


def _fid(f_real: torch.Tensor, f_fake: torch.Tensor) -> dict:
    """FID from precomputed features (>= 2 images on each side)."""
    from torchmetrics.image import FrechetInceptionDistance

    n_real, n_fake = len(f_real), len(f_fake)
    if not (n_real >= 2 and n_fake >= 2):
        return {"fid_skipped": _too_few(n_real, n_fake)}
    fid = FrechetInceptionDistance(feature=_Precomputed(f_real.shape[1]))
    fid.update(f_real, real=True)
    fid.update(f_fake, real=False)
    return {"fid": float(fid.compute())}


def _kid(f_real: torch.Tensor, f_fake: torch.Tensor, subsets: int, subset_size: int, seed: int) -> dict:
    """KID from precomputed features; the subset size is capped at the number of images."""
    from torchmetrics.image import KernelInceptionDistance

    n_real, n_fake = len(f_real), len(f_fake)
    sub = min(subset_size, n_real, n_fake)
    if sub < 2:
        return {"kid_skipped": _too_few(n_real, n_fake)}
    with warnings.catch_warnings():  # "will save all extracted features": intended
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(f_real.shape[1]), subsets=subsets, subset_size=sub)
    kid.update(f_real, real=True)
    kid.update(f_fake, real=False)
    with _seeded(seed):
        km, ks = kid.compute()
    return {"kid_mean": float(km), "kid_std": float(ks), "kid_subset_size": sub}


def _inception_score(logit_net: nn.Module | None, name: str, x_fake: torch.Tensor, splits: int, seed: int,
                     batch_size: int) -> dict:
    """IS of the fake images from the backbone's class logits; needs a trained classifier and >= 2 splits of 2."""
    from torchmetrics.image import InceptionScore

    n_fake = len(x_fake)
    splits = min(splits, n_fake // 2)
    if logit_net is None:
        return {"is_skipped": f"IS needs a trained classifier's p(y|x); backbone {name} has none (give inception-v3 weights)"}
    if splits < 2:
        return {"is_skipped": f"needs >= 4 fake images (2 splits of 2), got {n_fake}"}
    logits = _run(logit_net, x_fake, batch_size)
    _check_finite(logits, f"{name} logits of the fake images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        isc = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    isc.update(logits)
    with _seeded(seed):
        im, istd = isc.compute()
    return {"is_mean": float(im), "is_std": float(istd), "is_splits": splits}


def _lpips_to_nearest(net: nn.Module, lname: str, ff: list[torch.Tensor] | None, x_real: torch.Tensor,
                      batch_size: int) -> dict:
    """Mean over the fake images of the LPIPS distance to the nearest real image."""
    n_real, n_fake = len(x_real), 0 if ff is None else len(ff[0])
    if not (n_real >= 1 and n_fake >= 1):
        return {"lpips_skipped": f"needs >= 1 real and 1 fake image, got {n_real} real and {n_fake} fake"}
    dist = lpips_matrix(net, ff, lpips_features(net, x_real, batch_size))
    _check_finite(dist, f"{lname} LPIPS distances")
    return {"lpips": float(dist.min(dim=1).values.mean())}


def _ic_lpips(net: nn.Module, lname: str, ff: list[torch.Tensor] | None, x_c: torch.Tensor, n_clusters: int | None,
              centres_name: str, batch_size: int) -> dict:
    """IC-LPIPS: each fake image joins its nearest centre (the first ``n_clusters`` of ``x_c``);
    the mean over clusters of >= 2 members of their mean pairwise LPIPS."""
    n_c, n_fake = len(x_c), 0 if ff is None else len(ff[0])
    if not (n_c >= 1 and n_fake >= 1):
        return {"ic_lpips_skipped": f"needs >= 1 centre ({centres_name}) and 1 fake image, got {n_c} centres and {n_fake} fake"}
    k = n_c if n_clusters is None else max(1, min(n_clusters, n_c))
    dc = lpips_matrix(net, ff, lpips_features(net, x_c[:k], batch_size))
    _check_finite(dc, f"{lname} LPIPS distances to the IC-LPIPS centres")
    assign = dc.argmin(dim=1)
    ic, n_cl = ic_lpips_from(net, ff, assign)
    out = {"ic_lpips": ic, "ic_lpips_clusters": n_cl, "ic_lpips_n_centres": k}
    if ic is None:
        out["ic_lpips_skipped"] = f"no cluster of >= 2 fake images around the {k} {centres_name} centres ({n_fake} fake images)"
    return out


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise DefectforgeError(f"{what} contain NaN or infinite values")
