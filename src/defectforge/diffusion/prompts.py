"""Prompt encoders: the contexts C_1 = [C_def, C_bg] and C_2 = [C_m, C_bg].

Two encoders share one interface, ``embed(concept, defect) -> (n_tokens, dim)`` with
``concept`` in {"defect", "good", "mask", "bg"}:

* :class:`TokenPromptEncoder` (tiny profile): learned token vectors, trained with
  the UNet (pretrain learns bg / mask / good, finetune adds one group per defect
  type, like textual inversion's new tokens). Saved as safetensors.
* :class:`TextPromptEncoder` (pretrained profile): a frozen CLIP text encoder on
  DefectDiffu's prompt templates (below), filled with the dataset's names: the product is
  the category, the defect the defect type unified through :data:`DEFECT_NAME_UNIFICATION`.

:func:`build_context` concatenates an inside group with the background group and
returns the token-kind vector the masked cross-attention processor needs.

DefectDiffu's conditions (../shared/seeds/defectdiffu-consistency-modeling.txt, Sec. 3.2-3.3)
map onto these groups: the defect condition c_d is C_def (c_g, "good", is C_good), the
product condition c_p is C_bg, and the null condition 0 that Algorithm 1 drops c_p to is
``"null"``: learned tokens on the tiny profile (created by :meth:`TokenPromptEncoder.add_null`,
trained by finetune's condition dropout), the empty prompt on the pretrained one
(classifier-free guidance's null). ``build_context(..., outside="null")`` gives [C_inside, 0].
The tiny profile trains one model per category, so its learned background tokens are the
product's; the pretrained profile writes the names out (Sec. 3.2):

    c_p  "A photo of {product name}"                  (concept "bg")
    c_d  "A photo of {defect name}"                   (concept "defect"; c_g is the defect name "good")
    c_f  "A photo of {defect name} {product name}"    (TDIA's fusion prompt)

The product name is the category (``TextPromptEncoder.product``, set by finetune and stored
in the fine-tune folder, so training and generation read the same prompts); the defect name
is the defect type mapped through the paper's unification table (supplementary Tab. 2,
:data:`DEFECT_NAME_UNIFICATION`: "scratch_neck" -> "scratch", "poke" -> "hole", ...), so that
similar defects of different products share one defect prompt (inter-product defect
consistency). Names the table does not list pass through cleaned (lower case, "_" and "-"
to spaces): Magnetic Tile's "Blowhole" is "blowhole". Without a category (a base model
loaded outside the pipeline) the product name is :data:`GENERIC_PRODUCT`. The paper gives
no text for the DDIM-inversion paper's C_m (``"mask"``); it stays "a masked region".
The templates use the plain names, as the paper does: no DreamBooth rare identifier
("a photo of sks {defect} defect") and no generic "background" c_p.

TDIA's fusion prompt c_f: with ``fusion=True`` :func:`build_context` appends it as a third
group, ``[c_d, c_p, c_f]``, token kinds 1 / 0 / 2. The text encoder encodes it as the
template above (:meth:`TextPromptEncoder.fuse`; with the null product it is c_d alone); the
tiny token encoder has no words to join, so its c_f is the two token groups side by side,
attended under one softmax by the fusion layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from defectforge.errors import DefectforgeError

CONCEPTS = ("defect", "good", "mask", "bg", "null")

TEXT_TEMPLATES = {
    "bg": "A photo of {product}",  # c_p (DefectDiffu Sec. 3.2)
    "defect": "A photo of {defect}",  # c_d; c_g is this template with the defect name "good"
    "fusion": "A photo of {defect} {product}",  # c_f
    "mask": "a masked region",  # C_m of the DDIM-inversion paper (it gives no text)
    "null": "",  # the null condition of classifier-free guidance / DefectDiffu's Algorithm 1
}
GOOD = "good"  # c_g: the defect name of normal images (DefectDiffu Algorithm 1)
GENERIC_PRODUCT = "product"  # the product name when no category is known

# DefectDiffu, supplementary Tab. 2: MVTec AD defect names (per product) -> the unified
# defect name used in training ("uni_defect"). Identity rows are kept: the table as printed
# (73 rows, 26 renamed). The text copy prints it in two columns whose product labels sit
# mid-group; each row is assigned to the MVTec AD category that has that defect type.
DEFECT_NAME_UNIFICATION: dict[str, dict[str, str]] = {
    "metal_nut": {"scratch": "scratch", "flip": "flip", "color": "color", "bent": "bent"},
    "carpet": {"hole": "hole", "metal_contamination": "metal_contamination", "cut": "cut", "thread": "thread",
               "color": "color"},
    "screw": {"scratch_neck": "scratch", "thread_top": "thread", "scratch_head": "scratch",
              "manipulated_front": "manipulated_front", "thread_side": "thread"},
    "leather": {"glue": "liquid", "cut": "cut", "color": "color", "poke": "hole", "fold": "fold"},
    "pill": {"scratch": "scratch", "faulty_imprint": "faulty_imprint", "combined": "combined",
             "contamination": "contamination", "pill_type": "pill_type", "crack": "crack", "color": "color"},
    "cable": {"missing_cable": "missing", "missing_wire": "missing", "cable_swap": "cable_swap", "bent_wire": "bent",
              "poke_insulation": "hole", "combined": "combined", "cut_inner_insulation": "cut",
              "cut_outer_insulation": "cut"},
    "transistor": {"cut_lead": "cut", "damaged_case": "damaged_case", "misplaced": "misplaced", "bent_lead": "bent"},
    "hazelnut": {"print": "print", "hole": "hole", "cut": "cut", "crack": "crack"},
    "wood": {"scratch": "scratch", "combined": "combined", "hole": "hole", "liquid": "liquid", "color": "color"},
    "capsule": {"scratch": "scratch", "faulty_imprint": "faulty_imprint", "squeeze": "squeeze", "crack": "crack",
                "poke": "hole"},
    "grid": {"broken": "broken", "glue": "liquid", "metal_contamination": "metal_contamination", "thread": "thread",
             "bent": "bent"},
    "zipper": {"rough": "rough", "fabric_border": "cut", "combined": "combined", "fabric_interior": "cut",
               "squeezed_teeth": "squeeze", "broken_teeth": "broken", "split_teeth": "split"},
    "tile": {"rough": "rough", "gray_stroke": "color", "glue_strip": "glue_strip", "oil": "liquid", "crack": "crack"},
    "bottle": {"contamination": "contamination", "broken_small": "broken", "broken_large": "broken"},
    "toothbrush": {"defective": "bent"},
}


def _name_key(name: str) -> str:
    """Lookup key of a raw name: lower case, runs of spaces / "-" / "_" as one "_"."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


def _clean(name: str) -> str:
    """A name as prompt words: lower case, "_" and "-" to spaces."""
    return _name_key(name).replace("_", " ")


def _any_product_table() -> dict[str, str]:
    """Raw defect name -> unified name over all products (the table maps no raw name two ways)."""
    flat: dict[str, str] = {}
    for rows in DEFECT_NAME_UNIFICATION.values():
        for raw, uni in rows.items():
            if flat.setdefault(raw, uni) != uni:
                raise AssertionError(f"DEFECT_NAME_UNIFICATION maps {raw!r} to {flat[raw]!r} and {uni!r}")
    return flat


_UNIFIED_ANY_PRODUCT = _any_product_table()


def product_name(category: str | None) -> str:
    """{product name} of the prompts: the category, cleaned ("magnetic-tile" -> "magnetic tile")."""
    return _clean(category) if category and _clean(category) else GENERIC_PRODUCT


def defect_name(defect: str, category: str | None = None) -> str:
    """{defect name} of the prompts: the defect type through :data:`DEFECT_NAME_UNIFICATION`
    (the category's row first, then any product's; case, "-" and "_" do not matter), else
    the raw name cleaned ("Blowhole" -> "blowhole", "crack" -> "crack", "Break" -> "break")."""
    key = _name_key(defect)
    rows = DEFECT_NAME_UNIFICATION.get(_name_key(category), {}) if category else {}
    return _clean(rows.get(key) or _UNIFIED_ANY_PRODUCT.get(key) or key)


def _key(defect: str) -> str:
    return "defect__" + re.sub(r"[^0-9A-Za-z_]", "_", defect)


class TokenPromptEncoder(nn.Module):
    """Learned prompt tokens: ``tokens_per_concept`` vectors of size ``dim`` per concept."""

    def __init__(self, tokens_per_concept: int = 4, dim: int = 64, init_std: float = 0.5, seed: int = 0):
        super().__init__()
        self.tokens_per_concept = tokens_per_concept
        self.dim = dim
        self.init_std = init_std
        g = torch.Generator().manual_seed(seed)
        self.tokens = nn.ParameterDict(
            {c: nn.Parameter(torch.randn(tokens_per_concept, dim, generator=g) * init_std) for c in ("bg", "mask", "good")}
        )
        self.defects: list[str] = []

    def add_defect(self, defect: str, seed: int = 0) -> None:
        """New defect tokens start as fresh random vectors (like the other concepts at init).

        Not next to the "good" tokens (textual inversion's init from a related word): on
        Magnetic Tile such tokens stay within 13 % of "good", the fine-tuned UNet paints
        defects whatever the tokens say, and the defect-vs-background guidance has nothing
        to amplify.
        """
        if defect in self.defects:
            return
        g = torch.Generator().manual_seed(seed + 1000)
        good = self.tokens["good"].detach()
        init = torch.randn(good.shape, generator=g) * self.init_std
        self.tokens[_key(defect)] = nn.Parameter(init.to(good.device))
        self.defects.append(defect)

    @property
    def has_null(self) -> bool:
        return "null" in self.tokens

    def add_null(self, seed: int = 0) -> None:
        """Learned null-condition tokens (DefectDiffu Algorithm 1's 0), fresh random vectors like
        the other concepts; created on demand so base models trained without them are unchanged."""
        if self.has_null:
            return
        g = torch.Generator().manual_seed(seed + 2000)
        good = self.tokens["good"].detach()
        self.tokens["null"] = nn.Parameter((torch.randn(good.shape, generator=g) * self.init_std).to(good.device))

    def defect_parameters(self, defect: str) -> list[nn.Parameter]:
        return [self.tokens[_key(defect)]]

    def embed(self, concept: str, defect: str | None = None) -> torch.Tensor:
        if concept == "defect":
            if defect not in self.defects:
                raise DefectforgeError(
                    f"defect type {defect!r} has no learned tokens in this model (known: {self.defects}); "
                    "run finetune for it first"
                )
            return self.tokens[_key(defect)]
        if concept == "null" and not self.has_null:
            raise DefectforgeError(
                "this model has no learned null-condition tokens (needed by DefectDiffu's Eq. 4); "
                "fine-tune it with finetune.cond_dropout_product > 0"
            )
        return self.tokens[concept]

    # ---- persistence (safetensors + json) ----
    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tokens.items()}
        save_file(tensors, str(folder / "token_embeddings.safetensors"))
        meta = {"tokens_per_concept": self.tokens_per_concept, "dim": self.dim, "init_std": self.init_std, "defects": self.defects}
        (folder / "tokens.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "TokenPromptEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, weights = folder / "tokens.json", folder / "token_embeddings.safetensors"
        if not meta_path.is_file() or not weights.is_file():
            raise DefectforgeError(f"{folder}: missing tokens.json or token_embeddings.safetensors")
        meta = json.loads(meta_path.read_text())
        enc = cls(meta["tokens_per_concept"], meta["dim"], meta.get("init_std", 0.5))
        state = load_file(str(weights))
        for name, tensor in state.items():
            enc.tokens[name] = nn.Parameter(tensor)
        enc.defects = list(meta.get("defects", []))
        return enc


class TextPromptEncoder:
    """Frozen tokenizer + text encoder on :data:`TEXT_TEMPLATES`; embeddings are cached.

    ``product``: the category the prompts name (c_p, c_f); None gives :data:`GENERIC_PRODUCT`."""

    def __init__(self, tokenizer, text_encoder, device: torch.device | str = "cpu", templates: dict[str, str] | None = None,
                 product: str | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.templates = dict(templates or TEXT_TEMPLATES)
        self.product = product
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def _defect_name(self, concept: str, defect: str | None) -> str:
        if concept == "good":
            return GOOD
        if not defect:
            raise ValueError("the defect prompt c_d needs a defect type")
        return defect_name(defect, self.product)

    def text(self, concept: str, defect: str | None = None) -> str:
        """The prompt of ``concept``: c_p ("bg"), c_d ("defect"), c_g ("good"), C_m ("mask") or the null ""."""
        if concept in ("defect", "good"):
            return self.templates["defect"].format(defect=self._defect_name(concept, defect))
        if concept == "bg":
            return self.templates["bg"].format(product=product_name(self.product))
        if concept in ("mask", "null"):
            return self.templates[concept]
        raise ValueError(f"concept must be one of {CONCEPTS}, not {concept!r}")

    def embed(self, concept: str, defect: str | None = None) -> torch.Tensor:
        return self._encode(self.text(concept, defect))

    def fusion_text(self, inside: str, defect: str | None, outside: str) -> str:
        """c_f, "A photo of {defect name} {product name}", of the pair (inside, outside); with the
        null product it is c_d alone. C_m (no defect name) is followed by the product name."""
        product = product_name(self.product) if outside == "bg" else ""
        if inside == "mask":
            return " ".join(t for t in (self.templates["mask"], product) if t)
        if not product:
            return self.text(inside, defect)
        return self.templates["fusion"].format(defect=self._defect_name(inside, defect), product=product)

    def fuse(self, inside: str, defect: str | None, outside: str) -> torch.Tensor:
        """TDIA's fusion prompt c_f ("A photo of {defect name} {product name}") through the text encoder."""
        return self._encode(self.fusion_text(inside, defect, outside))

    def _encode(self, prompt: str) -> torch.Tensor:
        if prompt not in self._cache:
            ids = self.tokenizer(
                prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            with torch.no_grad():
                self._cache[prompt] = self.text_encoder(ids)[0][0]
        return self._cache[prompt]


def build_context(encoder, inside: str, defect: str | None = None, outside: str = "bg",
                  fusion: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C_inside, C_outside]`` as (1, L, D) and the token kinds (L,) bool (True = inside).

    ``outside`` is "bg" (C_bg, DefectDiffu's product condition c_p) or "null" (its null condition 0).
    ``fusion`` (TDIA): ``[C_inside, C_outside, c_f]`` and int kinds 1 / 0 / 2 (see module docstring).

    ``inside="defect"`` gives C_1, ``"mask"`` gives C_2, ``"good"`` the defect-free
    baseline used by the defect-vs-background guidance (DefectDiffu Eq. 4).
    """
    if inside not in ("defect", "good", "mask"):
        raise ValueError(f"inside must be defect, good or mask, not {inside!r}")
    c_in = encoder.embed(inside, defect)
    if outside not in ("bg", "null"):
        raise ValueError(f"outside must be bg or null, not {outside!r}")
    c_bg = encoder.embed(outside)
    if fusion:
        c_f = encoder.fuse(inside, defect, outside) if hasattr(encoder, "fuse") else torch.cat([c_in, c_bg], dim=0)
        ctx = torch.cat([c_in, c_bg, c_f], dim=0)[None]
        kinds = torch.cat([torch.full((len(c_in),), 1), torch.full((len(c_bg),), 0), torch.full((len(c_f),), 2)]).long()
        return ctx, kinds
    ctx = torch.cat([c_in, c_bg], dim=0)[None]
    kinds = torch.cat([torch.ones(len(c_in), dtype=torch.bool), torch.zeros(len(c_bg), dtype=torch.bool)])
    return ctx, kinds
