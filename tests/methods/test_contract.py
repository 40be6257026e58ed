"""The contract every registered method keeps, run over the registry (a method is tested the
day it is registered): the image keeps the input's size and type, the mask is binary and
of the image's size, the same seed gives the same bytes and another seed other bytes, and the
config survives a round trip through its dict. A test-only method (:class:`Stamp`, one
class and one :func:`~defectforge.methods.register` line) goes through the same test.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from pydantic import Field

from defectforge.methods import GenerationMethod, GenerationResult, get_method_class, register, registered_methods, unregister
from defectforge.methods.config import MethodConfig

torch.set_num_threads(1)


class StampConfig(MethodConfig):
    """A test-only method's section: the grey level range it paints the mask with."""

    section: ClassVar[str] = "stamp"
    low: int = Field(0, ge=0, le=255)
    high: int = Field(60, ge=0, le=255)


class Stamp(GenerationMethod):
    """Paints the target mask with seeded noise in [low, high]: the smallest model-free method."""

    name = "stamp"
    config_class = StampConfig

    def fit(self, defects, defect):
        pass

    def generate(self, image, mask, defect, seed):
        rng = np.random.default_rng(seed)
        out = image.copy()
        m = mask.astype(bool)
        out[m] = rng.integers(self.config.low, self.config.high + 1, (int(m.sum()), image.shape[2]), dtype=np.uint8)
        return GenerationResult(image=out, mask=m, metadata={"method": self.name, "seed": int(seed)})


BUILT_IN = list(registered_methods())
ALL = BUILT_IN + ["stamp"]


@pytest.fixture(scope="module", autouse=True)
def stamp_registered():
    register("stamp", __name__, "Stamp")  # the one registry line of a new method
    yield
    unregister("stamp")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints: a tiny model that knows "pit" (and the null tokens), and an anomaly embedding on it."""
    from defectforge.diffusion import build_tiny_components, save_tiny
    from defectforge.methods.anomalydiffusion.training import fit_anomaly_embedding

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("pit")
    comps.prompts.add_null()
    d = tmp_path_factory.mktemp("contract")
    save_tiny(comps, d / "tiny")
    image, mask = _real()
    fit_anomaly_embedding(d / "tiny", [(image, mask)], "pit", d / "ad" / "anomaly_embedding", device="cpu", steps=2, batch_size=2)
    return {"tiny": str(d / "tiny"), "ad": {"pit": str(d / "ad")}}


def _real():
    rng = np.random.default_rng(0)
    image = rng.integers(80, 120, (48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[20:28, 10:30] = True
    image[mask] = 20
    return image, mask


def _make(name, checkpoints):
    cls = get_method_class(name)
    cfg = cls.config_class(**({"steps": 3, "device": "cpu"} if cls.needs_checkpoints else {}))
    if cls.needs_checkpoints:
        method = cls.from_pretrained(checkpoints["ad"] if name == "anomalydiffusion" else checkpoints["tiny"], cfg)
    else:
        method = cls(cfg)
    method.prepare("tile", "pit", [_real()])
    return method


def _target():
    rng = np.random.default_rng(3)
    image = rng.integers(60, 200, (70, 90, 3), dtype=np.uint8)
    mask = np.zeros((70, 90), bool)
    mask[25:40, 30:52] = True
    return image, mask


def test_the_registry_maps_every_id_to_its_class():
    for name in ALL:
        cls = get_method_class(name)
        assert issubclass(cls, GenerationMethod) and cls.name == name
    assert get_method_class("stamp") is Stamp


@pytest.mark.parametrize("name", ALL)
def test_every_registered_method_keeps_the_contract(name, checkpoints):
    method = _make(name, checkpoints)
    image, mask = _target()
    before = image.copy()
    a = method.generate(image, mask, "pit", 7)
    assert np.array_equal(image, before)  # the input is not written to
    assert a.image.dtype == np.uint8 and a.image.shape == image.shape
    assert a.mask.dtype == bool and a.mask.shape == mask.shape and a.mask.any()
    assert a.attention is None or (a.attention.shape == mask.shape and np.isfinite(a.attention).all())
    assert not np.array_equal(a.image, image)  # something was made
    b = _make(name, checkpoints).generate(image, mask, "pit", 7)  # a fresh instance, the same seed: the same bytes
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    c = method.generate(image, mask, "pit", 8)
    assert c.image.tobytes() != a.image.tobytes()  # the seed is used
    cfg = method.config
    assert type(cfg)(**cfg.to_dict()) == cfg  # the config a sample stores gives the same config back
