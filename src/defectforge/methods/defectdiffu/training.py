"""DefectDiffu's parts of the fine-tune (../shared/seeds/defectdiffu-consistency-modeling.txt),
each a :class:`~defectforge.diffusion.training.TrainingHook` of the shared training step:

==========================  ===========================================================  ===================================
hook                        what                                                         finetune option
==========================  ===========================================================  ===================================
:class:`DoubleFreeDropout`  Algorithm 1 (Sec. 3.3): each C_1 row's product condition     ``cond_dropout_product`` = p_1,
                            c_p -> the null tokens, defect c_d -> good, so the null      ``cond_dropout_defect`` = p_2
                            condition and eps(c_d, 0) that Eq. 4 evaluates at sampling
                            are trained (the tiny profile learns the null tokens too)
:class:`TDIA`               Sec. 3.2: cross-attention routed by TDIA part, fusion        ``tdia``
                            prompt in the contexts (recorded in the folder)
:class:`AdaptiveAttention`  the adaptive attention-enhanced loss, Eq. 7-10, on the C_1   ``aal``, ``aal_alpha``
                            rows with C_def: Eq. 11's objective without its mask term
:class:`MaskModuleLoss`     lambda loss_m (Eq. 6, 11): G reads the C_def rows' per-token  ``mask_module`` = lambda,
                            attention maps (with gradient) and predicts Mask_f            ``mask_module_lr``
==========================  ===========================================================  ===================================

:func:`defectdiffu_hooks` builds the hooks a set of options asks for, in the order the
step adds their terms (Eq. 5, attention loss, loss_d, lambda loss_m).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.diffusion.attention import TokenMapStore
from defectforge.methods.defectdiffu.attention import mask_module_layers, set_tdia
from defectforge.methods.defectdiffu.mask_module import MASK_MODULE_DIR, MaskGenerationModule, mask_features, mask_loss, module_input
from defectforge.diffusion.training import BaseTrainingHook, StepState, TrainingHook
from defectforge.errors import ParamsError


# ------------------------------------------------------------------ Algorithm 1
def double_free_dropout(inside: list[str], p1: float, p2: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Algorithm 1 (double-free) for a batch: ``inside[i]`` is row i's defect condition
    ("defect" = c_d^r or "good"); returns (defect condition, product condition) per row,
    the product condition being "bg" (c_p) or "null" (0):

        1: with probability p_1, c_p -> 0
        2: if c_d^r is not good:
        3:     with probability p_2, c_d -> good
        4:     with probability p_1, c_p -> 0

    As written, a defect row has its product condition dropped by line 1 or line 4, i.e.
    with probability 1 - (1 - p_1)^2. Three uniform draws per row, in that order."""
    out_d, out_p = [], []
    for c_d in inside:
        c_p = "bg"
        if rng.random() < p1:  # line 1
            c_p = "null"
        if c_d != "good":  # line 2
            if rng.random() < p2:  # line 3
                c_d = "good"
            if rng.random() < p1:  # line 4
                c_p = "null"
        out_d.append(c_d)
        out_p.append(c_p)
    return out_d, out_p


# ------------------------------------------------------------------ AAL, Eq. 7-10
AAL_RANGE = (2.0, 8.0)  # Eq. (9): R = min(max(Rat, 2), 8)


def adaptive_attention_loss(maps: list[torch.Tensor], mask: torch.Tensor, eps_pred: torch.Tensor, eps: torch.Tensor,
                            alpha: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """DefectDiffu's adaptive attention-enhanced loss (../shared/seeds/defectdiffu-consistency-modeling.txt Sec. 3.5).

    ``maps``: the defect tokens' cross-attention maps, one (B, h_l, w_l) tensor per layer
    (their share of the joint softmax, Eq. 5); ``mask`` (B, 1, H, W) the real mask at the
    latent size of ``eps_pred`` / ``eps`` (B, C, H, W). Returns (loss_d, R (B,)).

        Map  = 1/M sum_i softmax(Q_i K^T / sqrt(d))                                   (7)
        Rat  = sum (1 - mask) Map / (sum mask Map + alpha)                            (8)
        R    = clamp(Rat, 2, 8)                                                       (9)
        loss_d = R || mask eps_theta - mask eps ||^2                                  (10)

    The layers' maps differ in size: each is upsampled (bilinear) to the largest one before
    the mean of Eq. 7, and the mask is scaled to that size (area) for Eq. 8, as the paper
    scales the real mask to Map. R is a weight: no gradient flows through it. The squared
    norm of Eq. 10 is the mean over the row's elements (as Eq. 5's "all" norm), averaged over rows.
    """
    if not maps:
        raise RuntimeError("adaptive_attention_loss: no cross-attention maps were collected")
    size = max((mp.shape[-2:] for mp in maps), key=lambda hw: hw[0] * hw[1])
    att = torch.stack([F.interpolate(mp.detach().float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                       for mp in maps]).mean(0)  # Eq. (7)
    small = F.interpolate(mask.float(), size=size, mode="area")[:, 0]
    rat = ((1 - small) * att).sum((1, 2)) / ((small * att).sum((1, 2)) + alpha)  # Eq. (8)
    r = rat.clamp(*AAL_RANGE)  # Eq. (9)
    per_row = ((mask * eps_pred - mask * eps) ** 2).flatten(1).mean(1)
    return (r * per_row).mean(), r  # Eq. (10)


# ------------------------------------------------------------------ the hooks
class DoubleFreeDropout(BaseTrainingHook):
    """Algorithm 1 on every batch, drawn from its own generator (seeded ``[seed, 1]`` by
    :meth:`configure`) so the batches themselves do not change with it."""

    def __init__(self, p1: float, p2: float):
        for key, p in (("cond_dropout_product", p1), ("cond_dropout_defect", p2)):
            if not 0 <= p < 1:
                raise ParamsError(f"finetune.{key}: must be in [0, 1), got {p}")
        self.p1, self.p2 = p1, p2
        self.rng: np.random.Generator | None = None

    def configure(self, comps, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 1])

    def tokens(self, comps, seed: int) -> list[torch.Tensor]:
        if self.p1 <= 0:
            return []
        comps.prompts.add_null(seed=seed)  # Algorithm 1 drops c_p to the null tokens: learn them too
        comps.prompts.tokens["null"].requires_grad_(True)
        return [comps.prompts.tokens["null"]]

    def conditions(self, inside, outside):
        return double_free_dropout(inside, self.p1, self.p2, self.rng)

    def run_log(self) -> dict:
        return {"cond_dropout_product": self.p1, "cond_dropout_defect": self.p2}


class TDIA(BaseTrainingHook):
    """Route the model's cross-attention by TDIA part (Sec. 3.2) from the start of training."""

    def check(self, *, attention_loss: float, hooks) -> None:
        if attention_loss > 0 or any(isinstance(h, AdaptiveAttention) for h in hooks):
            raise ParamsError("finetune.tdia: cannot be combined with attention_loss or aal (both read the defect tokens' share of "
                              "the joint softmax over [c_d, c_p], which TDIA's per-part softmax does not have)")

    def configure(self, comps, seed: int) -> None:
        set_tdia(comps, True)

    def run_log(self) -> dict:
        return {"tdia": True}

    def meta(self) -> dict:
        return {"tdia": True}


class AdaptiveAttention(BaseTrainingHook):
    """loss_d of Eq. 10 on the C_def rows, added to the step's loss as in Eq. 11 ("aal")."""

    needs_share = True

    def __init__(self, alpha: float = 1e-3):
        if not alpha > 0:
            raise ParamsError(f"finetune.aal_alpha: must be > 0, got {alpha}")
        self.alpha = alpha

    def extra_loss(self, state: StepState, out: dict) -> None:
        if state.collector is not None and state.defect_rows:
            h0, w0 = state.m.shape[-2:]
            n_d = len(state.defect_rows)
            maps = []
            for share in state.collector.shares:  # (rows, N) per layer -> (n_d, h, w)
                sc = math.sqrt(h0 * w0 / share.shape[1])
                maps.append(share[:n_d].reshape(n_d, round(h0 / sc), round(w0 / sc)))
            idx = torch.tensor(state.defect_rows, device=state.eps.device)
            loss_d, _ = adaptive_attention_loss(maps, state.m[idx], state.eps_def[idx], state.eps[idx], self.alpha)
        else:
            loss_d = torch.zeros((), device=out["loss"].device)
        out["aal"] = loss_d
        out["loss"] = out["loss"] + loss_d

    def curve_keys(self) -> tuple[str, ...]:
        return ("aal",)

    def step_log(self) -> dict:
        return {"aal": True, "aal_alpha": self.alpha}


class MaskModuleLoss(BaseTrainingHook):
    """lambda loss_m (Eq. 6, the lambda term of Eq. 11) with the mask generation module G.

    ``module``: a G to train (tests); None builds it from scratch in :meth:`param_groups`
    (channels = layers read x the defect prompt's tokens) and saves it in ``mask_module/``."""

    def __init__(self, weight: float, lr: float = 1e-3, module: MaskGenerationModule | None = None):
        if weight < 0 or lr <= 0:
            raise ParamsError(f"finetune.mask_module: must be >= 0 (lambda of Eq. 11), got {weight}; mask_module_lr > 0")
        self.weight, self.lr, self.module = weight, lr, module
        self._maps: TokenMapStore | None = None

    def param_groups(self, comps, defect_type: str) -> list[dict]:
        layers = mask_module_layers(comps)
        n_tokens = len(comps.prompts.embed("defect", defect_type))
        self.module = MaskGenerationModule(len(layers) * n_tokens, comps.latent_channels, layers=layers).to(comps.device)
        self.module.train()
        return [{"params": list(self.module.parameters()), "lr": self.lr}]

    def store(self, state: StepState):
        self._maps = TokenMapStore(state.defect_rows, with_grad=True) if state.defect_rows else None
        return self._maps

    def extra_loss(self, state: StepState, out: dict) -> None:
        if self._maps is not None:
            idx = torch.tensor(state.defect_rows, device=state.eps.device)
            m_f = self.module(module_input(self._maps.steps[-1], tuple(state.z0.shape[-2:])))  # M_f
            loss_m = mask_loss(m_f, mask_features(state.comps, state.mask[idx]))  # vs Mask_f
        else:
            loss_m = torch.zeros((), device=out["loss"].device)
        out["mask"] = loss_m
        out["loss"] = out["loss"] + self.weight * loss_m

    def curve_keys(self) -> tuple[str, ...]:
        return ("mask",)

    def step_log(self) -> dict:
        return {"mask_weight": self.weight}

    def meta(self) -> dict:
        return {"mask_module": True}

    def save(self, out: Path) -> None:
        self.module.eval().save_pretrained(out / MASK_MODULE_DIR)


def defectdiffu_hooks(*, cond_dropout_product: float = 0.0, cond_dropout_defect: float = 0.0, aal: bool = False,
                      aal_alpha: float = 1e-3, tdia: bool = False, mask_module: float = 0.0,
                      mask_module_lr: float = 1e-3) -> list[TrainingHook]:
    """The hooks the finetune options ask for (none when all are off), in the step's order."""
    dropout = DoubleFreeDropout(cond_dropout_product, cond_dropout_defect)
    module = MaskModuleLoss(mask_module, mask_module_lr)
    alpha = AdaptiveAttention(aal_alpha) if aal else None
    hooks: list[TrainingHook] = []
    if cond_dropout_product > 0 or cond_dropout_defect > 0:
        hooks.append(dropout)
    if tdia:
        hooks.append(TDIA())
    if alpha is not None:
        hooks.append(alpha)
    if mask_module > 0:
        hooks.append(module)
    return hooks
