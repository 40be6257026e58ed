"""The built-in sample: a small defect dataset made here, deterministically, in seconds.

``make_sample(out_dir)`` writes a dataset in the MVTec AD layout (so ``ingest("mvtec",
out_dir)`` reads it) with two categories of real surface photographs and two defect
types each:

========  ===========================================  ==================================
category  surface                                      defect types
========  ===========================================  ==================================
brick     brick wall, ``skimage/data/brick.png``        ``crack`` (thin, jagged, branching
          (CC0Textures Bricks25), tinted brick-red      dark gap), ``hole`` (chipped pit:
                                                       dark floor, lit far wall, shadowed
                                                       near wall)
gravel    gravel, ``skimage/data/gravel.png``           ``scratch`` (thin smooth bright or
          (CC0Textures Gravel04), warm gray             dark curve), ``stain`` (irregular
                                                       oil / rust stain with a darker rim)
========  ===========================================  ==================================

The two photographs ship inside scikit-image's wheel (no download). Every image is its
own crop of the photograph, at its own scale, angle (small for the oriented brick wall,
any for the isotropic gravel), mirror, brightness, contrast, illumination gradient and
sensor noise.

A defect is drawn on a fresh crop as ``x' = (1 - α) x + α t`` with an opacity ``α``
that falls off smoothly at the defect's edge and a target appearance ``t``; the mask is
exactly ``α > 0`` (opacities below 0.04 are cut to 0 at the rim), so outside the mask
the defect image equals its defect-free surface bit for bit.

Layout (``NNN`` from ``000``)::

    <out_dir>/sample.json                       the arguments (skip-if-same marker)
    <out_dir>/<category>/train/good/NNN.png     n_train_good per category
    <out_dir>/<category>/test/good/NNN.png      n_test_good per category
    <out_dir>/<category>/test/<defect>/NNN.png  n_defect per defect type
    <out_dir>/<category>/ground_truth/<defect>/NNN_mask.png   0/255

Randomness comes from one :class:`numpy.random.SeedSequence` per image, keyed by
``(seed, category, kind, index)``, so an image does not change when another count does,
and the same arguments give byte-identical PNGs.

Example
-------
>>> import tempfile, pathlib
>>> from defectforge.data.sample import make_sample
>>> root = make_sample(pathlib.Path(tempfile.mkdtemp()) / "sample", size=64, n_train_good=2, n_test_good=1, n_defect=1)
>>> sorted(p.name for p in (root / "brick" / "test").iterdir())
['crack', 'good', 'hole']
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defectforge.data.files import atomic_dir, atomic_write_text, write_png
from defectforge.errors import DataError, ParamsError
from defectforge.seeding import keyed_rng

SAMPLE_VERSION = 1  # bump when the drawing code changes what a given seed produces
META_FILE = "sample.json"


@dataclass(frozen=True)
class _Category:
    texture: str  # file in skimage/data
    tint: tuple[float, float, float]  # gray → RGB colour of the surface
    max_rotation: float  # degrees, ± around the photograph's orientation
    defects: tuple[str, ...]


CATEGORIES: dict[str, _Category] = {
    "brick": _Category("brick.png", (1.10, 0.74, 0.60), 6.0, ("crack", "hole")),
    "gravel": _Category("gravel.png", (1.02, 0.98, 0.92), 180.0, ("scratch", "stain")),
}
_CROP = 192.0  # side of the source crop in texture pixels (before scale jitter)


def make_sample(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    size: int = 128,
    n_train_good: int = 24,
    n_test_good: int = 8,
    n_defect: int = 12,
) -> Path:
    """Write the built-in sample dataset to ``out_dir`` (MVTec AD layout) and return it.

    If ``out_dir/sample.json`` records the same arguments, nothing is done. Otherwise the
    whole dataset is built in a temporary folder beside ``out_dir`` and renamed into
    place, replacing an older sample; a folder that is not a sample is never replaced.

    Raises:
        ParamsError: a count below its minimum or a size outside 32..1024.
        DataError: ``out_dir`` exists, is not empty and holds no ``sample.json``.
    """
    for name, value, low in (
        ("seed", seed, 0),
        ("n_train_good", n_train_good, 1),
        ("n_test_good", n_test_good, 0),
        ("n_defect", n_defect, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ParamsError(f"{name}={value!r}: must be an integer >= {low}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 1024:
        raise ParamsError(f"size={size!r}: must be an integer in 32..1024")

    out_dir = Path(out_dir)
    args = {
        "seed": int(seed),
        "size": int(size),
        "n_train_good": int(n_train_good),
        "n_test_good": int(n_test_good),
        "n_defect": int(n_defect),
        "version": SAMPLE_VERSION,
    }
    meta = out_dir / META_FILE
    if meta.is_file():
        try:
            if json.loads(meta.read_text())["args"] == args:
                return out_dir
        except (ValueError, KeyError, TypeError):
            pass  # a damaged marker: rebuild
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not a defectforge sample (no {META_FILE}); refusing to replace it")

    with atomic_dir(out_dir, "sample folder", markers=(META_FILE,)) as tmp:
        _build(tmp, args)
        atomic_write_text(
            tmp / META_FILE,
            json.dumps(
                {
                    "args": args,
                    "layout": "mvtec",
                    "name": "defectforge built-in sample (scikit-image textures)",
                    "license": "CC0-1.0 (textures from CC0Textures via scikit-image; the defects are drawn by defectforge)",
                    "categories": {name: list(c.defects) for name, c in CATEGORIES.items()},
                    "sources": {
                        name: f"scikit-image data/{c.texture} (CC0Textures, CC0 licence)"
                        for name, c in CATEGORIES.items()
                    },
                },
                indent=2,
                sort_keys=True,
            )
            + "\n",
        )
    return out_dir


# --------------------------------------------------------------------------- building


def _build(root: Path, args: dict) -> None:
    size, seed = args["size"], args["seed"]
    for name, cat in CATEGORIES.items():
        texture = _load_texture(cat.texture, size)
        plan = [("train/good", "train-good", args["n_train_good"]), ("test/good", "test-good", args["n_test_good"])]
        for folder, key, n in plan:
            for k in range(n):
                rng = keyed_rng(seed, name, key, k)
                write_png(root / name / folder / f"{k:03d}.png", _to_uint8(_surface(texture, cat, size, rng)))
        for defect in cat.defects:
            for k in range(args["n_defect"]):
                rng = keyed_rng(seed, name, defect, k)
                image, mask = _defect_image(_surface(texture, cat, size, rng), defect, rng)
                write_png(root / name / "test" / defect / f"{k:03d}.png", image)
                write_png(root / name / "ground_truth" / defect / f"{k:03d}_mask.png", mask)




def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _load_texture(filename: str, size: int) -> np.ndarray:
    """The photograph as float32 gray in [0, 1], pre-blurred against aliasing at ``size``."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / filename
    if not path.is_file():
        raise DataError(f"{path}: scikit-image's bundled texture is missing (reinstall scikit-image)")
    with Image.open(path) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    zoom = _CROP / size  # source pixels per output pixel
    return ndimage.gaussian_filter(gray, sigma=0.45 * zoom) if zoom > 1 else gray


def _surface(texture: np.ndarray, cat: _Category, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free surface: a jittered crop of the photograph, (size, size, 3) float in [0, 1]."""
    th, tw = texture.shape
    crop = _CROP * rng.uniform(0.85, 1.15)
    angle = np.deg2rad(rng.uniform(-cat.max_rotation, cat.max_rotation))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    half = crop * np.sqrt(0.5) + 1.0  # the rotated crop's half diagonal stays inside
    cy, cx = rng.uniform(half, th - half), rng.uniform(half, tw - half)

    # output pixel (v, u) in [-1/2, 1/2) * crop → source (y, x) after mirror and rotation
    g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    v, u = np.meshgrid(g * crop, g * crop * flip, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    ys, xs = cy + s * u + c * v, cx + c * u - s * v
    gray = ndimage.map_coordinates(texture, [ys, xs], order=1, mode="reflect")

    # photometric jitter: contrast, brightness, a soft illumination gradient, sensor noise
    mean = gray.mean()
    gray = (gray - mean) * rng.uniform(0.85, 1.15) + mean + rng.uniform(-0.06, 0.06)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * u + np.sin(theta) * v) / crop  # in [-0.7, 0.7]
    gray = gray * (1.0 + rng.uniform(0.0, 0.12) * ramp)
    rgb = gray[..., None] * np.asarray(cat.tint, dtype=np.float32)
    rgb = rgb + rng.normal(0.0, 0.008, size=rgb.shape)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- defects


def _defect_image(surface: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a ``kind`` defect on ``surface``: (uint8 image, bool mask = α > 0)."""
    size = surface.shape[0]
    draw = {"crack": _crack, "hole": _hole, "scratch": _scratch, "stain": _stain}[kind]
    min_area = max(8, int(0.002 * size * size))
    for _ in range(50):
        alpha, target = draw(surface, rng)
        mask = alpha > 0
        if min_area <= mask.sum() <= 0.5 * size * size:
            break
    else:  # pragma: no cover - the drawing ranges make this practically unreachable
        raise RuntimeError(f"could not draw a {kind} defect of a usable size")
    image = surface * (1.0 - alpha[..., None]) + target * alpha[..., None]
    image_u8 = _to_uint8(image)
    # outside the mask the pixels are the surface's exactly (α = 0 there)
    return image_u8, mask


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(g, g, indexing="ij")  # y, x


def _edge(distance_inside: np.ndarray, soft: float) -> np.ndarray:
    """Opacity from a signed distance (> 0 inside): 1 deep inside, smoothstep to 0 over
    ``soft`` pixels, exactly 0 outside; tiny values are cut so the mask is what is seen."""
    t = np.clip(distance_inside / soft, 0.0, 1.0)
    a = t * t * (3.0 - 2.0 * t)
    return np.where(a >= 0.04, a, 0.0).astype(np.float32)


def _polyline_distance(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every pixel to a polyline (N, 2) in (y, x), and the arc-length
    position (0..1) of the nearest point."""
    y, x = _grid(size)
    p = np.stack([y.ravel(), x.ravel()], axis=1)  # (P, 2)
    a, b = points[:-1], points[1:]
    ab = b - a
    seg_len = np.maximum(np.linalg.norm(ab, axis=1), 1e-6)
    t = np.clip(((p[:, None, :] - a[None]) * ab[None]).sum(-1) / seg_len[None] ** 2, 0.0, 1.0)
    d = np.linalg.norm(p[:, None, :] - (a[None] + t[..., None] * ab[None]), axis=-1)
    idx = d.argmin(axis=1)
    rows = np.arange(len(p))
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    arc = (cum[idx] + t[rows, idx] * seg_len[idx]) / cum[-1]
    return d[rows, idx].reshape(size, size), arc.reshape(size, size)


def _random_walk(start, heading, length, step, jag, size, rng) -> np.ndarray:
    """A jagged path: each step leaves in the slowly drifting main heading plus an
    independent random kink of spread ``jag`` (radians), so it zigzags without curling."""
    pts = [np.asarray(start, dtype=np.float32)]
    drift = rng.normal(0.0, 0.04)
    for _ in range(max(2, int(length / step))):
        heading += drift + rng.normal(0.0, 0.06)
        kink = heading + rng.normal(0.0, jag)
        nxt = pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.sin(kink), np.cos(kink)], dtype=np.float32)
        if not (3 <= nxt[0] <= size - 3 and 3 <= nxt[1] <= size - 3):
            break
        pts.append(nxt)
    return np.stack(pts)


def _crack(surface, rng):
    """A jagged dark gap, widest in the middle, tapering to hairline ends, maybe branched;
    its darkness varies along its length."""
    size = surface.shape[0]
    start = rng.uniform(0.25 * size, 0.75 * size, size=2)
    heading = rng.uniform(0, 2 * np.pi)
    step = size / 48
    trunk = _random_walk(start, heading, rng.uniform(0.35, 0.7) * size, step, 0.5, size, rng)
    paths = [trunk]
    if len(trunk) > 6 and rng.random() < 0.6:
        j = int(rng.integers(len(trunk) // 3, 2 * len(trunk) // 3))
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        paths.append(_random_walk(trunk[j], branch_heading, rng.uniform(0.12, 0.3) * size, step, 0.5, size, rng))
    width = size * rng.uniform(0.004, 0.009)
    soft = max(0.8, size / 160)
    alpha = np.zeros((size, size), np.float32)
    for n, pts in enumerate(paths):
        if len(pts) < 2:
            continue
        d, arc = _polyline_distance(pts, size)
        taper = 0.25 + 0.75 * np.sin(np.pi * np.clip(arc, 0, 1)) ** 0.7 if n == 0 else 0.2 + 0.6 * (1 - arc)
        alpha = np.maximum(alpha, _edge(width * taper + soft / 2 - d, soft))
    depth = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), size / 30)
    depth = rng.uniform(0.2, 0.4) * (1 + 0.8 * depth / max(float(depth.std()), 1e-6))
    target = surface * np.clip(depth, 0.08, 0.7)[..., None]
    return alpha, target


def _hole(surface, rng):
    """A chipped pit: irregular outline, dark floor, the wall away from the light lit and
    the wall toward it in shadow, with some grit inside."""
    size = surface.shape[0]
    r0 = size * rng.uniform(0.035, 0.08)
    cy, cx = rng.uniform(r0 * 1.6 + 2, size - r0 * 1.6 - 2, size=2)
    y, x = _grid(size)
    dy, dx = y - cy, x - cx
    theta = np.arctan2(dy, dx)
    radius = np.full_like(theta, r0)
    for k in range(2, 6):
        radius = radius * (1 + rng.uniform(0, 0.13) / np.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    dist = np.hypot(dy, dx)
    rho = dist / radius
    alpha = _edge(radius - dist, max(0.8, size / 160))
    light = rng.uniform(0, 2 * np.pi)
    facing = -(np.cos(light) * dx + np.sin(light) * dy) / np.maximum(dist, 1e-6)  # >0: wall facing the light
    floor = rng.uniform(0.12, 0.28)
    # the floor darkens toward the middle; the wall facing the light comes back up to
    # (a bit above) the surface's brightness at the rim, the other wall stays in shadow
    lit = np.clip(0.2 + facing, 0, 1.2) * np.clip(rho, 0, 1) ** 2
    shade = floor * (0.7 + 0.3 * np.clip(rho, 0, 1)) + (1.1 - floor) * lit
    grit = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), 0.8)
    shade = shade * (1 + 0.15 * grit)
    target = surface * shade[..., None]
    return alpha, target


def _scratch(surface, rng):
    """A thin smooth curve (quadratic Bézier), mostly brighter than the surface."""
    size = surface.shape[0]
    length = size * rng.uniform(0.3, 0.7)
    p0 = rng.uniform(0.15 * size, 0.85 * size, size=2)
    heading = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(heading), np.cos(heading)])
    p2 = np.clip(p0 + length * direction, 4, size - 4)
    normal = np.array([-direction[1], direction[0]])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, 32)[:, None]
    pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.float32)
    d, arc = _polyline_distance(pts, size)
    width = size * rng.uniform(0.003, 0.007)
    soft = max(0.8, size / 160)
    alpha = _edge(width + soft / 2 - d, soft)
    ends = np.clip(np.minimum(arc, 1 - arc) / 0.1, 0.35, 1.0)  # fainter at both ends
    alpha = np.where(alpha > 0, alpha * ends, 0.0).astype(np.float32)
    if rng.random() < 0.75:
        target = np.full_like(surface, rng.uniform(0.85, 0.97))  # bright scratch
    else:
        target = surface * rng.uniform(0.2, 0.35)  # dark scratch
    return alpha, target


def _stain(surface, rng):
    """An irregular oil or rust stain: noisy elliptic outline, darker rim, coloured tint."""
    size = surface.shape[0]
    a, b = size * rng.uniform(0.08, 0.18, size=2)
    margin = max(a, b) * 1.4 + 2
    cy, cx = rng.uniform(margin, size - margin, size=2)
    phi = rng.uniform(0, np.pi)
    y, x = _grid(size)
    u = np.cos(phi) * (x - cx) + np.sin(phi) * (y - cy)
    v = -np.sin(phi) * (x - cx) + np.cos(phi) * (y - cy)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), size / 25)
    noise /= max(float(noise.std()), 1e-6)
    field = 1.0 - rho + 0.22 * noise  # > 0 inside the stain
    scale = min(a, b)
    alpha = _edge(field * scale, max(1.0, 0.25 * scale)) * rng.uniform(0.55, 0.8)
    rim = np.exp(-((field * scale / max(1.0, 0.2 * scale)) ** 2))
    alpha = np.where(alpha > 0, np.clip(alpha * (1 + 0.35 * rim), 0, 1), 0.0).astype(np.float32)
    tint = np.array([0.55, 0.36, 0.22]) if rng.random() < 0.5 else np.array([0.30, 0.29, 0.27])  # rust / oil
    target = surface * tint.astype(np.float32)
    return alpha, target
