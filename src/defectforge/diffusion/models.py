"""Model loading for both profiles through one code path.

``load_pipeline_components(path_or_hub_id)`` returns :class:`DiffusionComponents`
(UNet, autoencoder, DDIM scheduler, prompt encoder) for

* a **tiny** directory written by :func:`defectforge.diffusion.training.pretrain`
  (``model_index.json`` with ``"profile": "tiny"``, ``unet/``, ``scheduler/``,
  ``prompt_encoder/``; the autoencoder is the identity, the UNet works in pixels);
* any **diffusers Stable Diffusion** directory or hub id (``vae/``, ``unet/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``), on CUDA when present;
* a **finetune** directory written by :func:`defectforge.diffusion.training.finetune`
  (``defectforge_finetune.json`` naming its base, plus ``unet/`` or ``lora/`` and,
  for the tiny profile, ``prompt_encoder/`` with the new defect tokens): the base is
  loaded by the same function and the fine-tuned weights are applied on top.

Every weight file is safetensors; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from defectforge.diffusion.attention import install_masked_attention
from defectforge.diffusion.autoencoder import IdentityAutoencoder
from defectforge.diffusion.prompts import TextPromptEncoder, TokenPromptEncoder, build_context
from defectforge.errors import DefectforgeError

FINETUNE_FILE = "defectforge_finetune.json"
# What a method's training hooks add to a fine-tune folder, by the key their ``meta()`` sets to true in
# defectforge_finetune.json: key -> load(comps, folder, device), which returns the weight files it read.
# The method's package registers its own (:func:`register_finetune_part`; DefectDiffu: "tdia", "mask_module").
FINETUNE_PARTS: dict = {}
_CORE_PARTS = ("trimap_control",)  # loaded here (the shared ControlNet)


def register_finetune_part(key: str, load) -> None:
    """Load a fine-tune folder whose defectforge_finetune.json sets ``key`` with ``load(comps, folder, device)``."""
    FINETUNE_PARTS[key] = load
TINY_CLASS = "DefectforgeTinyPipeline"


def config_json(name: str) -> dict:
    """A model config shipped in ``defectforge/configs`` (keys starting with ``_`` dropped)."""
    text = resources.files("defectforge").joinpath("configs", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# the dtypes the components can be loaded in (generate.precision; finetune's frozen LoRA base)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str, device: str | torch.device = "auto", param: str = "generate.precision") -> torch.dtype:
    """The dtype the components load in for ``precision`` on ``device``. fp16 is refused off CUDA
    (CPU fp16 kernels are missing or slow, and its range needs the CUDA loss scaling of training);
    bf16 runs on CPU and CUDA.

    >>> precision_dtype("bf16", "cpu")
    torch.bfloat16
    """
    from defectforge.errors import ParamsError

    if precision not in DTYPES:
        raise ParamsError(f"{param}: must be one of {', '.join(DTYPES)}, got {precision!r}")
    dev = resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise ParamsError(f"{param}: fp16 needs a CUDA device, got {dev.type}; use bf16 (CPU and CUDA) or fp32")
    return DTYPES[precision]


def _dtype_of(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of a module's weights (None: it has none, like the identity autoencoder)."""
    return next((p.dtype for p in module.parameters()), None)


@dataclass
class DiffusionComponents:
    """What every method and training loop needs, whatever the profile."""

    unet: torch.nn.Module
    autoencoder: torch.nn.Module
    scheduler: object  # diffusers DDIMScheduler
    prompts: object  # TokenPromptEncoder | TextPromptEncoder
    profile: str  # "tiny" | "pretrained"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: str = ""
    files: list[Path] = field(default_factory=list)  # weight files, for checkpoint_sha256
    defect_type: str | None = None  # set for finetune directories
    tdia: bool = False  # DefectDiffu's TDIA routing (finetune.tdia): contexts carry the fusion prompt
    install_processors: object = None  # a method's processors for a UNet (TDIA's), when not install_masked_attention
    mask_module: torch.nn.Module | None = None  # DefectDiffu's mask generation module (Eq. 6), when trained
    controlnet: torch.nn.Module | None = None  # AdaBLDM's trimap ControlNet (diffusion/control.py), when trained

    # ---- geometry ----
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def inpainting(self) -> bool:
        """SD-inpainting layout: input = z_t + mask + masked-image latent."""
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1

    @property
    def has_decoder(self) -> bool:
        return getattr(self.autoencoder, "has_decoder", True)

    # ---- autoencoder ----
    # A model loaded in bf16 / fp16 (generate.precision) takes its inputs in that dtype; latents,
    # images and masks stay float32 between calls (the samplers' arithmetic keeps its precision),
    # so only the UNet's output is in the model's dtype. In fp32 every cast below is a no-op.
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], (B, 3, H, W) -> latent z_0 (scaled), float32."""
        sf = self.autoencoder.config.scaling_factor
        dt = _dtype_of(self.autoencoder)
        return self.autoencoder.encode(x if dt is None else x.to(dt)).latent_dist.mode().float() * sf

    def decode(self, z: torch.Tensor, decoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Latent (scaled) -> image in [-1, 1], float32."""
        sf = self.autoencoder.config.scaling_factor
        ae = decoder if decoder is not None else self.autoencoder
        dt = _dtype_of(ae)
        return ae.decode(z / sf if dt is None else (z / sf).to(dt)).sample.float()

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask (B, 1, H, W) -> latent mask: a latent pixel is inside if any pixel it covers is."""
        s = self.vae_scale_factor
        if s == 1:
            return mask.float()
        return (torch.nn.functional.max_pool2d(mask.float(), kernel_size=s, stride=s) > 0).float()

    # ---- prompts and UNet ----
    def context(self, inside: str, defect: str | None = None, outside: str = "bg") -> tuple[torch.Tensor, torch.Tensor]:
        ctx, kinds = build_context(self.prompts, inside, defect, outside, fusion=self.tdia)
        return ctx.to(self.device), kinds.to(self.device)

    def processors_on(self, unet: torch.nn.Module) -> None:
        """Put this model's attention processors on ``unet`` (another copy of its UNet): a method's
        (``install_processors``, e.g. TDIA's) or the masked cross-attention of every model."""
        (self.install_processors or install_masked_attention)(unet)

    def eps(
        self,
        z: torch.Tensor,
        t,
        context: torch.Tensor,
        token_kinds: torch.Tensor,
        region_mask: torch.Tensor,
        cond_image: torch.Tensor | None = None,
        store=None,
        reweight=None,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """epsilon_theta(z_t, t, C) with masked cross-attention over ``region_mask`` (m').

        For an inpainting UNet the input is ``[z_t, m, (1 - m) * cond_image]``.
        ``reweight``: an :class:`~defectforge.diffusion.attention.AttentionReweight`
        (AnomalyDiffusion Eq. 7-8), passed to every attention processor. ``control``: the
        trimap condition (:func:`~defectforge.diffusion.control.trimap_condition`); with a
        ``controlnet`` its residuals are added to the UNet's skips and middle (AdaBLDM).
        """
        x = z
        if self.inpainting:
            cond = cond_image if cond_image is not None else torch.zeros_like(z)
            x = torch.cat([z, region_mask, (1.0 - region_mask) * cond], dim=1)
        if context.shape[0] != z.shape[0]:
            context = context.expand(z.shape[0], -1, -1)
        if not torch.is_tensor(t):
            t = torch.tensor([t] * z.shape[0], device=z.device)
        elif t.ndim == 0:
            t = t.expand(z.shape[0])
        kwargs = {"region_mask": region_mask, "token_kinds": token_kinds, "attention_store": store}
        if reweight is not None:
            kwargs["reweight"] = reweight
        extra = {}
        if control is not None and self.controlnet is not None:
            from defectforge.diffusion.control import control_residuals

            down, mid = control_residuals(self.controlnet, x, t.to(z.device), context, control)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        # the weights' dtype (generate.precision): the output comes back in it; a module without weights
        # (a test's stand-in UNet) takes its inputs as they are
        dt = _dtype_of(self.unet) or x.dtype
        return self.unet(x.to(dt), t.to(z.device), encoder_hidden_states=context.to(dt), cross_attention_kwargs=kwargs, **extra).sample

    def checkpoint_sha256(self) -> str:
        """SHA-256 over the weight files this model was loaded from (sorted by name)."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda p: str(p)):
            h.update(Path(f).name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        if not self.files:
            h.update(self.source.encode())
        return h.hexdigest()


# ---------------------------------------------------------------- tiny profile
def build_tiny_components(seed: int = 0, device: str | torch.device = "cpu") -> DiffusionComponents:
    """A fresh (untrained) tiny model from the configs in ``defectforge/configs``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config_json("tiny_unet"))
    tok = config_json("tiny_tokens")
    prompts = TokenPromptEncoder(tok["tokens_per_concept"], tok["dim"], tok["init_std"], seed=seed)
    scheduler = DDIMScheduler(**config_json("tiny_scheduler"))
    dev = resolve_device(device)
    comps = DiffusionComponents(unet.to(dev), IdentityAutoencoder(), scheduler, prompts.to(dev), "tiny", dev, "tiny (untrained)")
    install_masked_attention(comps.unet)
    return comps


def save_tiny(comps: DiffusionComponents, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write a tiny model as a diffusers-style directory (safetensors weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comps.unet.save_pretrained(out / "unet", safe_serialization=True)
    comps.scheduler.save_pretrained(out / "scheduler")
    comps.prompts.save(out / "prompt_encoder")
    index = {
        "_class_name": TINY_CLASS,
        "profile": "tiny",
        "autoencoder": "identity (pixel space)",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "prompt_encoder": ["defectforge", "TokenPromptEncoder"],
        **(extra or {}),
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def _load_tiny(path: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> DiffusionComponents:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, torch_dtype=dtype)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    prompts = TokenPromptEncoder.load(path / "prompt_encoder")
    files = sorted((path / "unet").glob("*.safetensors")) + [path / "prompt_encoder" / "token_embeddings.safetensors"]
    comps = DiffusionComponents(unet.to(device), IdentityAutoencoder(), scheduler, prompts.to(device), "tiny", device, str(path), files)
    install_masked_attention(comps.unet)
    return comps


# ---------------------------------------------------------- pretrained profile
def _hub_error(name: str) -> DefectforgeError:
    return DefectforgeError(
        f"{name}: cannot load this model from the Hugging Face hub (no network, or not in the local cache); "
        "download it on a machine with network and set base_model to its local directory (HF_HUB_OFFLINE=1 makes this fail at once)"
    )


def _load_diffusers(source: str, device: torch.device, local: bool, dtype: torch.dtype, cache_only: bool = False) -> DiffusionComponents:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"local_files_only": True} if (local or cache_only or os.environ.get("HF_HUB_OFFLINE")) else {}
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        sched_cfg = DDIMScheduler.load_config(source, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        if local:
            raise DefectforgeError(f"{source}: not a loadable diffusers Stable Diffusion directory ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
        raise _hub_error(source) from None
    except Exception as exc:  # network stacks raise their own types (httpx, requests)
        if local:
            raise
        raise _hub_error(source) from exc
    scheduler = DDIMScheduler.from_config(sched_cfg)
    prompts = TextPromptEncoder(tokenizer, text_encoder.to(device), device)
    files = []
    if local:
        files = sorted(p for sub in ("unet", "vae", "text_encoder") for p in (Path(source) / sub).glob("*.safetensors"))
    vae.requires_grad_(False)
    comps = DiffusionComponents(unet.to(device), vae.to(device), scheduler, prompts, "pretrained", device, source, files)
    install_masked_attention(comps.unet)
    return comps


def build_tiny_latent_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a test-size *latent* Stable Diffusion directory (AutoencoderKL, UNet,
    CLIP text encoder, CLIP tokenizer, DDIM scheduler) with ``save_pretrained``.

    Used to test the pretrained profile offline: the directory loads through
    :func:`load_pipeline_components` exactly like a real SD 1.5 directory.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    AutoencoderKL(**config_json("tiny_latent_vae")).save_pretrained(out / "vae", safe_serialization=True)
    UNet2DConditionModel(**config_json("tiny_latent_unet")).save_pretrained(out / "unet", safe_serialization=True)
    te_cfg = CLIPTextConfig(**config_json("tiny_latent_text_encoder"))
    CLIPTextModel(te_cfg).save_pretrained(out / "text_encoder", safe_serialization=True)
    # byte-level CLIP vocabulary without merges: every character is a token (built offline)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=te_cfg.max_position_embeddings)
    tok.save_pretrained(out / "tokenizer")
    DDIMScheduler(**config_json("tiny_latent_scheduler")).save_pretrained(out / "scheduler")
    _write_model_index(out, "StableDiffusionPipeline")
    return out


_SD_COMPONENTS = {
    "vae": ["diffusers", "AutoencoderKL"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def _write_model_index(out: Path, class_name: str, note: str | None = None) -> None:
    """``model_index.json`` of a Stable Diffusion directory (the components diffusers loads), with ``note``."""
    index = {"_class_name": class_name, **({"_defectforge_note": note} if note is not None else {}), **_SD_COMPONENTS}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# ------------------------------------------------- Stable Diffusion 1.5 at full size
def sd15_config_names(inpainting: bool = False) -> dict[str, str]:
    """The ``defectforge/configs`` names of the SD 1.5 components (``config_json`` reads them)."""
    return {
        "unet": "sd15_inpaint_unet" if inpainting else "sd15_unet",
        "text_encoder": "sd15_text_encoder",
        "vae": "sd15_vae",
        "scheduler": "sd15_scheduler",
    }


def build_sd15_modules(inpainting: bool = False, device: str | torch.device = "meta", parts: tuple[str, ...] = ("unet", "text_encoder", "vae")) -> dict:
    """SD 1.5-shaped modules from the shipped configs, by default on the ``meta`` device:
    shapes and parameter counts without allocating memory (about 4.3 GB in fp32 otherwise)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    names = sd15_config_names(inpainting)
    make = {
        "unet": lambda: UNet2DConditionModel(**config_json(names["unet"])),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**config_json(names["text_encoder"]))),
        "vae": lambda: AutoencoderKL(**config_json(names["vae"])),
    }
    with torch.device(device):
        return {p: make[p]() for p in parts}


def character_clip_tokenizer(max_length: int, vocab_size: int | None = None):
    """A CLIPTokenizer built offline: every byte-level character is a token (no BPE merges).

    With ``vocab_size`` the vocabulary is padded with unused entries so that
    ``<|startoftext|>`` and ``<|endoftext|>`` get CLIP's ids (``vocab_size - 2`` and
    ``vocab_size - 1``: 49406 and 49407 for SD 1.5); the unused entries are never produced,
    since without merges only single characters are tokens."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    if vocab_size is not None:
        if vocab_size < len(vocab) + 2:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab) + 2} character and special tokens")
        vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), vocab_size - 2)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_sd15_model(out_dir: str | Path, *, inpainting: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a Stable Diffusion 1.5-shaped directory with *random* weights (``save_pretrained``,
    safetensors): UNet 320/640/1280/1280, cross-attention 768, 8 heads (9 input channels with
    ``inpainting``); CLIP ViT-L/14 text encoder (12 layers, 768 wide, 77 positions, vocabulary
    49408); AutoencoderKL KL-f8 (scaling factor 0.18215); DDIM with SD's betas. The configs are
    ``defectforge/configs/sd15_*.json``, copied from the published checkpoints. CLIP's BPE
    tokenizer cannot be built offline: :func:`character_clip_tokenizer` stands in for it.

    The directory loads through :func:`load_pipeline_components` like a downloaded SD 1.5
    checkpoint: shapes, memory and speed are those of the real model, the outputs are noise.
    Components are built, saved and freed one at a time, so peak memory is about one fp32
    UNet (3.4 GB) rather than the whole pipeline; disk: about 4.3 GB in fp32, half in fp16.
    """
    import gc

    from diffusers import DDIMScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sd15_config_names(inpainting)
    torch.manual_seed(seed)
    for part in ("vae", "unet", "text_encoder"):  # one at a time: only one component is alive at once
        module = build_sd15_modules(inpainting, "cpu", (part,))[part]
        if dtype != torch.float32:
            module.to(dtype)  # parameter by parameter: no second full copy
        module.save_pretrained(out / part, safe_serialization=True)
        del module
        gc.collect()
    te = config_json(names["text_encoder"])
    character_clip_tokenizer(te["max_position_embeddings"], te["vocab_size"]).save_pretrained(out / "tokenizer")
    DDIMScheduler(**config_json(names["scheduler"])).save_pretrained(out / "scheduler")
    _write_model_index(out, "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
                       note="random weights in the Stable Diffusion 1.5 architecture (build_sd15_model): real shapes, untrained")
    return out


# ------------------------------------------------------------------ one entry
def load_pipeline_components(
    path_or_hub_id: str | Path, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32
) -> DiffusionComponents:
    """Load a tiny, diffusers or finetune directory, or a hub id (see module doc)."""
    dev = resolve_device(device)
    p = Path(path_or_hub_id)
    if p.is_dir():
        if (p / FINETUNE_FILE).is_file():
            return _load_finetune(p, dev, dtype)
        index = p / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("profile") == "tiny":
            return _load_tiny(p, dev, dtype)
        if (p / "unet").is_dir():
            return _load_diffusers(str(p), dev, local=True, dtype=dtype)
        raise DefectforgeError(f"{p}: not a model directory (no {FINETUNE_FILE}, tiny model_index.json or unet/ folder)")
    name = str(path_or_hub_id)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/")) and not p.suffix
    if not looks_like_hub_id:
        raise DefectforgeError(f"{name}: model directory not found")
    # a hub id: the local cache first; the network only when the hub answers at once,
    # so a machine without network fails in seconds instead of retrying for a minute
    if not os.environ.get("HF_HUB_OFFLINE"):
        try:
            return _load_diffusers(name, dev, local=False, dtype=dtype, cache_only=True)
        except DefectforgeError:
            if not _hub_reachable():
                raise _hub_error(name) from None
    return _load_diffusers(name, dev, local=False, dtype=dtype)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)  # the endpoint's own port, not always 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def base_reference(base: str | os.PathLike, folder: str | os.PathLike) -> str:
    """How a trained folder records the base model it was trained on: a local base
    directory relative to ``folder`` (so the pair can move together), anything else
    (a hub id) as given. :func:`resolve_base_reference` reads it back."""
    if Path(base).is_dir():
        return os.path.relpath(Path(base).resolve(), Path(folder).resolve())
    return str(base)


def resolve_base_reference(ref: str, folder: str | os.PathLike) -> str | Path:
    """The base model a folder recorded with :func:`base_reference`: the directory when it
    exists (relative to ``folder``, or absolute), else the reference itself (a hub id)."""
    path = Path(ref) if Path(ref).is_absolute() else Path(folder) / ref
    return path if path.is_dir() else ref


def _load_parts(path: Path, meta: dict, comps: DiffusionComponents, device: torch.device) -> list[Path]:
    """The method parts of a fine-tune (:data:`FINETUNE_PARTS`), in the order its json lists them; a
    part whose method package was not imported is refused in one line, never left out."""
    files = []
    for key, value in meta.items():
        if value is not True or key in _CORE_PARTS:
            continue
        if key not in FINETUNE_PARTS:
            raise DefectforgeError(f"{path / FINETUNE_FILE}: the fine-tune has a {key!r} part that no imported method package "
                                   "loads (import the method that trained it, e.g. defectforge.methods.defectdiffu.attention)")
        files += FINETUNE_PARTS[key](comps, path, device)
    return files


def _load_finetune(path: Path, device: torch.device, dtype: torch.dtype) -> DiffusionComponents:
    from diffusers import UNet2DConditionModel

    meta = json.loads((path / FINETUNE_FILE).read_text())
    comps = load_pipeline_components(resolve_base_reference(meta["base"], path), device, dtype)
    files = list(comps.files)
    if meta["mode"] == "unet":
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, torch_dtype=dtype)
        comps.unet = unet.to(device)
        files = [f for f in files if "unet" not in Path(f).parent.name] + sorted((path / "unet").glob("*.safetensors"))
    elif meta["mode"] == "lora":
        comps.unet.load_lora_adapter(str(path / "lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        files += sorted((path / "lora").glob("*.safetensors"))
    else:
        raise DefectforgeError(f"{path / FINETUNE_FILE}: unknown mode {meta['mode']!r} (unet or lora)")
    if comps.profile == "tiny":
        comps.prompts = TokenPromptEncoder.load(path / "prompt_encoder").to(device)
        files = [f for f in files if Path(f).name != "token_embeddings.safetensors"]
        files.append(path / "prompt_encoder" / "token_embeddings.safetensors")
    elif hasattr(comps.prompts, "product"):  # the product name the fine-tune's text prompts were trained with
        comps.prompts.product = meta.get("category")
    install_masked_attention(comps.unet)
    files += _load_parts(path, meta, comps, device)
    if meta.get("trimap_control"):
        from diffusers import ControlNetModel

        from defectforge.diffusion.control import CONTROLNET_DIR

        comps.controlnet = ControlNetModel.from_pretrained(path / CONTROLNET_DIR, use_safetensors=True, torch_dtype=dtype).to(device).eval()
        files += sorted((path / CONTROLNET_DIR).glob("*.safetensors"))
    comps.source = str(path)
    comps.files = files
    comps.defect_type = meta.get("defect_type")
    return comps
