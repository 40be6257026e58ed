"""Generation methods: the registry (here) and one file per method.

=============  ===================================  =====================================
name           module                               paper
=============  ===================================  =====================================
copy-paste     :mod:`defectforge.methods.copy_paste`  the baseline of every paper's tables
cutpaste       :mod:`defectforge.methods.cutpaste`    CutPaste (Li et al. 2021), patch and scar
perlin         :mod:`defectforge.methods.perlin`      DRAEM's Perlin-noise anomalies
inversion      :mod:`defectforge.methods.inversion`   DDIM inversion + disentangled sampling
blended        :mod:`defectforge.methods.blended`     AdaBLDM (blended latent diffusion)
defectdiffu    :mod:`defectforge.methods.defectdiffu` DefectDiffu (double-free guidance, attention masks)
anomalydiffusion :mod:`defectforge.methods.anomalydiffusion` AnomalyDiffusion (spatial anomaly embedding, Eq. 7-8)
=============  ===================================  =====================================

Modules load on first use, so the registry (and the manifest suite that checks method
names) stays cheap to import; a method that needs torch pulls it in only when asked for.
"""

from __future__ import annotations

import importlib

from defectforge.methods.base import DiffusionMethod, GenerationMethod, GenerationResult
from defectforge.params.methods import REFERENCE_METHOD as REFERENCE, MethodConfig

# name: module (each class declares its config model and whether it needs checkpoints)
METHODS: dict[str, str] = {
    "copy-paste": "defectforge.methods.copy_paste",
    "cutpaste": "defectforge.methods.cutpaste",
    "perlin": "defectforge.methods.perlin",
    "inversion": "defectforge.methods.inversion",
    "blended": "defectforge.methods.blended",
    "defectdiffu": "defectforge.methods.defectdiffu",
    "anomalydiffusion": "defectforge.methods.anomalydiffusion",
}


def get_method_class(name: str) -> type[GenerationMethod]:
    from defectforge.errors import ParamsError

    if name not in METHODS:
        raise ParamsError(f"generate.methods: unknown method {name!r}; allowed: {registered_methods()}")
    module = importlib.import_module(METHODS[name])
    cls = next(c for c in vars(module).values() if isinstance(c, type) and issubclass(c, GenerationMethod) and c.name == name)
    return cls


def needs_checkpoints(name: str) -> bool:
    """Whether ``name`` needs the fine-tuned models (its class's ``needs_checkpoints``)."""
    return bool(get_method_class(name).needs_checkpoints)


def registered_methods() -> list[str]:
    return list(METHODS)


__all__ = ["METHODS", "REFERENCE", "DiffusionMethod", "GenerationMethod", "GenerationResult", "MethodConfig",
           "get_method_class", "needs_checkpoints", "registered_methods"]
