"""Feature backbones for the image-quality metrics, resolved by name.

Every number the quality stage writes is computed with one of these backbones and
the backbone's name is written beside it. The names:

=============================  ==========================================================
name                           what it is
=============================  ==========================================================
``inception-v3``               torch-fidelity's ``FeatureExtractorInceptionV3`` (the
                               standard FID / KID / IS network: 2048-d pool features,
                               1008-way ``logits_unbiased`` for IS). Needs ``weights``:
                               a local copy of ``weights-inception-2015-12-05-6726825d.pth``
                               (or the same state dict as ``.safetensors``). Numbers are
                               comparable with published FIDs.
``random-inception-v3-seed<k>``  the same architecture, seeded random init (for tests).
``random-vgg11-seed<k>``       offline default: torchvision VGG-11 convolutional layers
                               with the torchvision init under ``torch.manual_seed(k)``,
                               input resized to 128 px, global-average-pooled 512-d
                               features. No classifier: IS is skipped with a reason.
                               **Not comparable with published FID/KID/IS numbers**: it
                               only ranks methods against each other on the same data.
=============================  ==========================================================

LPIPS backbones (``lpips_backbone``):

=============================  ==========================================================
``alexnet`` / ``vgg16``        torchvision AlexNet / VGG-16 loaded from ``lpips_weights``
                               (a torchvision state dict: ``alexnet-owt-7be5be79.pth``,
                               ``vgg16-397923af.pth``) with the learned LPIPS v0.1
                               linear heads shipped inside torchmetrics. Recorded as
                               ``alexnet+lpips-v0.1-lin``. Comparable with published LPIPS.
``random-alexnet-seed<k>``     offline default: seeded random AlexNet, **uniform** layer
                               weights (every lin head = ones, i.e. the ``lpips=False``
                               variant of the lpips package: unit-normalised channels,
                               squared differences summed over channels, spatially
                               averaged, summed over layers). Recorded as
                               ``random-alexnet-seed<k>+uniform-lin``. Not comparable
                               with published LPIPS.
=============================  ==========================================================

User-given weight files are read with ``torch.load(weights_only=True)`` or
``safetensors`` (never a pickle load); a file whose tensors do not fit the network
raises one :class:`~defectforge.errors.DefectforgeError` naming the file.
"""

from __future__ import annotations

import functools

import re
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F

from defectforge.errors import DefectforgeError

DEFAULT_BACKBONE = "random-vgg11-seed0"
DEFAULT_LPIPS_BACKBONE = "random-alexnet-seed0"
RANDOM_VGG_INPUT = 128

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@contextmanager
def _seeded(seed: int):
    """Deterministic parameter init without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects.

    ``.safetensors`` through safetensors; anything else through
    ``torch.load(weights_only=True)``. A ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise DefectforgeError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise DefectforgeError(
            f"{path}: not a readable tensor-only weights file ({exc.__class__.__name__})"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DefectforgeError(f"{path}: expected a state dict of tensors")
    return sd


def _check_fit(module: nn.Module, sd: dict, path: str | Path, what: str) -> None:
    """Raise one line naming the file and the first misfit unless ``sd`` fits ``module``."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensors of the wrong shape, e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise DefectforgeError(f"{path}: weights do not fit {what}: " + "; ".join(parts))


def _load_strict(module: nn.Module, sd: dict, path: str | Path, what: str) -> None:
    _check_fit(module, sd, path, what)
    module.load_state_dict(sd, strict=True)


def _parse_seed(name: str, prefix: str) -> int | None:
    m = re.fullmatch(re.escape(prefix) + r"-seed(\d+)", name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- FID/KID/IS


class RandomVGGFeatures(nn.Module):
    """Seeded random VGG-11 conv stack, pooled: uint8 (N,3,H,W) -> (N,512) features.

    It has no classifier, so IS (which needs p(y|x) from a trained classifier) is
    reported as skipped for this backbone rather than computed from a random head.
    """

    def __init__(self, seed: int = 0, input_size: int = RANDOM_VGG_INPUT):
        super().__init__()
        import torchvision

        with _seeded(seed):
            # make_layers + torchvision's VGG init (kaiming fan_out for convs), without
            # allocating VGG's 120 M-parameter classifier.
            self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"])
            for m in self.features.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)
        self.input_size = input_size
        self.num_features = 512
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "RandomVGGFeatures":  # never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


class _SelectOutput(nn.Module):
    """torch-fidelity extractors return a tuple; torchmetrics wants one (N, d) tensor."""

    def __init__(self, extractor: nn.Module, index: int, num_features: int):
        super().__init__()
        self.extractor = extractor
        self.index = index
        self.num_features = num_features

    def train(self, mode: bool = True) -> "_SelectOutput":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)[self.index].float()


def build_fidelity_inception(state_dict: dict | None, *, seed: int = 0) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` from a state dict already in memory.

    torch-fidelity would otherwise download the weights, or unpickle a path with
    ``weights_only=False``; here the loader it calls is replaced by one returning
    ``state_dict`` (``None`` keeps a seeded random init). Features: ("2048",
    "logits_unbiased"). Raises ``RuntimeError`` from ``load_state_dict`` on a mismatch.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fei

    class _InMemoryInception(fei.FeatureExtractorInceptionV3):
        def load_state_dict(self, sd, strict=True, assign=False):  # noqa: D401
            if sd is None:  # random init requested
                return None
            return super().load_state_dict(sd, strict=strict, assign=assign)

    with _seeded(seed), mock.patch.object(fei, "load_state_dict_from_url", lambda *a, **k: state_dict):
        return _InMemoryInception("inception-v3-compat", ["2048", "logits_unbiased"])


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a seeded random torch-fidelity Inception-v3 (right shapes, no meaning)."""
    return {k: v.clone() for k, v in build_fidelity_inception(None, seed=seed).state_dict().items()}


def resolve_feature_backbone(name: str, weights: str | Path | None = None) -> tuple[nn.Module, nn.Module | None, str]:
    """(feature module for FID/KID, logits module for IS or None, recorded name).

    The modules take uint8 (N, 3, H, W) and return (N, d). The logits module is None
    for backbones without a trained classifier (IS is then skipped with a reason).
    """
    if name == "inception-v3":
        if weights is None:
            raise DefectforgeError(
                "backbone 'inception-v3' needs a local weights path "
                "(weights-inception-2015-12-05-6726825d.pth); nothing is downloaded"
            )
        sd = load_state_dict_file(weights)
        ext = build_fidelity_inception(None)
        _load_strict(ext, sd, weights, "torch-fidelity Inception-v3 (FID weights)")
        return _SelectOutput(ext, 0, 2048), _SelectOutput(ext, 1, 1008), "inception-v3"
    seed = _parse_seed(name, "random-inception-v3")
    if seed is not None:
        if weights is not None:
            raise DefectforgeError(f"backbone {name!r} is randomly initialised; it takes no weights file ({weights})")
        ext = build_fidelity_inception(None, seed=seed)
        return _SelectOutput(ext, 0, 2048), _SelectOutput(ext, 1, 1008), name
    seed = _parse_seed(name, "random-vgg11")
    if seed is not None:
        if weights is not None:
            raise DefectforgeError(f"backbone {name!r} is randomly initialised; it takes no weights file ({weights})")
        return RandomVGGFeatures(seed), None, name
    raise DefectforgeError(
        f"unknown quality backbone {name!r}: use 'inception-v3' (with weights), "
        "'random-vgg11-seed<k>' or 'random-inception-v3-seed<k>'"
    )


# --------------------------------------------------------------------------- LPIPS


def resolve_lpips_backbone(name: str, weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """An LPIPS network (torchmetrics' ``_LPIPS``) and its recorded name.

    torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` only builds its backbone
    from a download, so the same network class is built here with a random backbone
    (``pnet_rand=True``) and the user's torchvision weights copied into its slices.
    """
    import torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    seed = _parse_seed(name, "random-alexnet")
    if seed is not None:
        if weights is not None:
            raise DefectforgeError(f"LPIPS backbone {name!r} is randomly initialised; it takes no weights file ({weights})")
        with _seeded(seed):
            net = _LPIPS(pretrained=False, net="alex", pnet_rand=True)
        for lin in net.lins:
            for m in lin.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.ones_(m.weight)  # uniform layer weights: plain channel sum
        net.eval().requires_grad_(False)
        return net, f"{name}+uniform-lin"
    if name in ("alexnet", "vgg16"):
        if weights is None:
            raise DefectforgeError(
                f"LPIPS backbone {name!r} needs a local torchvision weights path "
                f"({'alexnet-owt-7be5be79.pth' if name == 'alexnet' else 'vgg16-397923af.pth'}); nothing is downloaded"
            )
        sd = load_state_dict_file(weights)
        with torch.device("meta"):  # shapes only: no 138 M-parameter allocation for vgg16
            tv = getattr(torchvision.models, name)(weights=None)
        _check_fit(tv, sd, weights, f"torchvision {name}")
        net = _LPIPS(pretrained=True, net="alex" if name == "alexnet" else "vgg", pnet_rand=True)
        # Copy the torchvision ``features.<i>.*`` tensors into the LPIPS slices, whose
        # children keep the torchvision feature index as their name.
        for slice_mod in net.net.children():
            for idx, layer in slice_mod.named_children():
                own = {k: sd[f"features.{idx}.{k}"] for k in layer.state_dict()}
                layer.load_state_dict(own, strict=True)
        net.eval().requires_grad_(False)
        return net, f"{name}+lpips-v0.1-lin"
    raise DefectforgeError(
        f"unknown LPIPS backbone {name!r}: use 'alexnet' or 'vgg16' (with weights) or 'random-alexnet-seed<k>'"
    )


# --------------------------------------------------------------------------- reuse
def _stamp(weights: str | Path | None) -> tuple | None:
    if weights is None:
        return None
    st = Path(weights).stat() if Path(weights).is_file() else None
    return (str(weights), st.st_size, st.st_mtime_ns) if st else (str(weights),)


@functools.lru_cache(maxsize=4)
def _cached(kind: str, name: str, weights: str | None, stamp: tuple | None):
    return resolve_feature_backbone(name, weights) if kind == "features" else resolve_lpips_backbone(name, weights)


def feature_backbone(name: str, weights: str | Path | None = None):
    """:func:`resolve_feature_backbone`, built once per (name, weights file state) and process.

    The networks are in eval mode without gradients, so one instance serves every set
    of a quality stage (one build per set cost seconds each, and dominated small runs).
    """
    return _cached("features", name, None if weights is None else str(weights), _stamp(weights))


def lpips_backbone(name: str, weights: str | Path | None = None):
    """:func:`resolve_lpips_backbone`, built once per (name, weights file state) and process."""
    return _cached("lpips", name, None if weights is None else str(weights), _stamp(weights))
