"""DefectDiffu's TDIA (Sec. 3.2: background / defect / fusion parts with c_p, c_d, c_f) and its
mask generation module (Sec. 3.4, Eq. 6, the lambda term of Eq. 11), on both profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from defectforge.diffusion.attention import TokenMapStore, cross_attention_order
from defectforge.methods.defectdiffu.attention import (
    TOKEN_KIND,
    TDIAAttnProcessor,
    mask_module_layers,
    set_tdia,
    tdia_parts,
    uses_tdia,
)
from defectforge.methods.defectdiffu.mask_module import (
    MASK_MODULE_DIR,
    MaskGenerationModule,
    decode_mask,
    mask_features,
    mask_loss,
    module_input,
    predicted_mask,
)
from defectforge.diffusion.prompts import build_context
from defectforge.methods.defectdiffu.training import MaskModuleLoss, defectdiffu_hooks
from defectforge.errors import DefectforgeError, ParamsError


# ------------------------------------------------------------------ TDIA: the split
def _run_order(unet, comps) -> list[str]:
    """The cross-attention layers in the order a real forward pass calls them."""
    called = []
    hooks = [mod.register_forward_hook(lambda m, i, o, n=name: called.append(n))
             for name, mod in unet.named_modules() if name.endswith("attn2")]
    z = torch.randn(1, comps.latent_channels, unet.config.sample_size, unet.config.sample_size)
    ctx, kinds = comps.context("good")
    with torch.no_grad():
        comps.eps(z, 10, ctx, kinds, torch.zeros(1, 1, *z.shape[-2:]), cond_image=z)
    for h in hooks:
        h.remove()
    return [n + ".processor" for n in called]


def test_tdia_cuts_the_forward_order_of_cross_attention_into_three_parts(tiny, tiny_latent_dir):
    from defectforge.diffusion.models import load_pipeline_components

    assert cross_attention_order(tiny.unet) == _run_order(tiny.unet, tiny)  # the order the UNet runs them
    parts = tdia_parts(tiny.unet)
    order = cross_attention_order(tiny.unet)
    assert len(order) == 6 and [parts[n] for n in order] == ["background"] * 2 + ["defect"] * 2 + ["fusion"] * 2
    assert order[:2] == ["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
                         "down_blocks.3.attentions.0.transformer_blocks.0.attn2.processor"]
    sd = load_pipeline_components(tiny_latent_dir, "cpu")  # the pretrained (SD) layout: one layer per part
    assert [tdia_parts(sd.unet)[n] for n in cross_attention_order(sd.unet)] == ["background", "defect", "fusion"]
    assert not uses_tdia(tiny.unet)
    set_tdia(tiny, True)
    assert uses_tdia(tiny.unet) and tiny.tdia
    assert {n: p.part for n, p in tiny.unet.attn_processors.items() if isinstance(p, TDIAAttnProcessor)} == parts
    assert not any(isinstance(p, TDIAAttnProcessor) for n, p in tiny.unet.attn_processors.items() if ".attn1." in n)  # self-attention untouched


# ------------------------------------------------------------------ TDIA: the routing
def _layer(part):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    attn.set_processor(TDIAAttnProcessor("x", part))
    return attn.eval()


def _context():
    torch.manual_seed(1)
    ctx = torch.randn(1, 6, 8)
    kinds = torch.tensor([1, 1, 0, 0, 2, 2])  # [c_d, c_p, c_f]
    return ctx, kinds


@pytest.mark.parametrize("part", ["background", "defect", "fusion"])
def test_a_tdia_layer_attends_only_to_its_own_prompt_by_hand(part):
    attn = _layer(part)
    hidden = torch.randn(2, 9, 16)
    ctx, kinds = _context()
    ctx = ctx.expand(2, -1, -1)
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=ctx, token_kinds=kinds, region_mask=torch.ones(2, 1, 3, 3))
        own = kinds == TOKEN_KIND[part]
        q = attn.to_q(hidden).view(2, 9, 2, 8).transpose(1, 2)
        k = attn.to_k(ctx[:, own]).view(2, -1, 2, 8).transpose(1, 2)
        v = attn.to_v(ctx[:, own]).view(2, -1, 2, 8).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(8), dim=-1)
        expected = attn.to_out[0]((p @ v).transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(out, expected)
    for kind in (0, 1, 2):  # changing another part's tokens changes nothing; its own, everything
        other = ctx.clone()
        other[:, kinds == kind] += 3.0
        with torch.no_grad():
            moved = attn(hidden, encoder_hidden_states=other, token_kinds=kinds, region_mask=torch.ones(2, 1, 3, 3))
        assert torch.equal(moved, out) == (kind != TOKEN_KIND[part])


def test_a_tdia_layer_refuses_a_context_without_its_prompt():
    ctx, kinds = _context()
    with pytest.raises(ValueError, match="no fusion tokens"):
        _layer("fusion")(torch.randn(1, 9, 16), encoder_hidden_states=ctx[:, :4], token_kinds=kinds[:4])


# ------------------------------------------------------------------ the fusion prompt
def test_fusion_context_is_defect_then_product_then_their_fusion(tiny):
    tiny.prompts.add_defect("crack")
    tiny.prompts.add_null()
    enc = tiny.prompts
    for inside, defect, outside in (("defect", "crack", "bg"), ("good", None, "null"), ("mask", None, "bg")):
        ctx, kinds = build_context(enc, inside, defect, outside, fusion=True)
        c_in, c_out = enc.embed(inside, defect), enc.embed(outside)
        torch.testing.assert_close(ctx[0], torch.cat([c_in, c_out, c_in, c_out]))  # tiny c_f: both groups, one softmax
        assert kinds.tolist() == [1] * len(c_in) + [0] * len(c_out) + [2] * (len(c_in) + len(c_out))
    plain, plain_kinds = build_context(enc, "defect", "crack", "bg")
    assert plain_kinds.dtype == torch.bool and plain.shape[1] == 2 * len(enc.embed("bg"))  # unchanged without TDIA
    tiny.tdia = True
    assert tiny.context("defect", "crack")[1].tolist() == build_context(enc, "defect", "crack", "bg", fusion=True)[1].tolist()


def test_pretrained_fusion_prompt_is_one_sentence_through_the_text_encoder(tiny_latent_dir):
    from defectforge.diffusion.models import load_pipeline_components

    enc = load_pipeline_components(tiny_latent_dir, "cpu").prompts
    enc.product = "magnetic-tile"
    # DefectDiffu Sec. 3.2: c_f = "A photo of {defect name} {product name}"
    assert enc.fusion_text("defect", "crack_edge", "bg") == "A photo of crack edge magnetic tile"
    assert enc.fusion_text("good", None, "null") == "A photo of good"  # null product: c_d alone
    ctx, kinds = build_context(enc, "defect", "crack_edge", "bg", fusion=True)
    n = enc.tokenizer.model_max_length
    assert ctx.shape[1] == 3 * n and kinds.tolist() == [1] * n + [0] * n + [2] * n
    ids = enc.tokenizer("A photo of crack edge magnetic tile", padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ctx[0, 2 * n:], enc.text_encoder(ids)[0][0])


# ------------------------------------------------------------------ Eq. 6
def test_eq6_loss_and_mask_features_by_hand(tiny, tiny_latent_dir):
    from defectforge.diffusion.models import load_pipeline_components

    mask = torch.zeros(2, 1, 64, 64)
    mask[0, 0, 10:20, 10:30] = 1
    mf = mask_features(tiny, mask)  # identity encoder: the mask as a grey image in [-1, 1]
    torch.testing.assert_close(mf, (mask * 2 - 1).expand(-1, 3, -1, -1))
    pred = torch.randn_like(mf)
    torch.testing.assert_close(mask_loss(pred, mf), ((pred - mf) ** 2).mean())
    torch.testing.assert_close(decode_mask(tiny, mf), mask[:, 0])  # D(Mask_f) gives the mask back
    sd = load_pipeline_components(tiny_latent_dir, "cpu")  # latent profile: E(2m - 1) through the VAE
    r = sd.resolution
    mask = torch.nn.functional.interpolate(mask, size=(r, r))
    mf_sd = mask_features(sd, mask)
    s = sd.unet.config.sample_size
    assert mf_sd.shape == (2, 4, s, s) and r > s
    torch.testing.assert_close(mf_sd, sd.encode((mask * 2 - 1).expand(-1, 3, -1, -1)))


def test_module_input_concatenates_layers_in_order_at_the_latent_size():
    a = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).view(2, 4, 8, 8)
    b = torch.rand(2, 4, 16, 16)
    x = module_input({"l1": a, "l2": b}, (16, 16))
    assert x.shape == (2, 8, 16, 16)
    torch.testing.assert_close(x[:, 4:], b)
    torch.testing.assert_close(x[:, :4], torch.nn.functional.interpolate(a, size=(16, 16), mode="bilinear", align_corners=False))


def test_m_pre_is_the_mean_of_the_decoded_steps(tiny):
    module = MaskGenerationModule(2, 3)
    steps = [{"l": torch.rand(1, 2, 64, 64)} for _ in range(3)]
    got = predicted_mask(tiny, module, steps)
    with torch.no_grad():
        each = [((module(s["l"]).mean(1) + 1) / 2).clamp(0, 1) for s in steps]
    torch.testing.assert_close(got, torch.stack(each).mean(0))


def test_the_module_learns_a_mask_hidden_in_one_token_map_and_round_trips(tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    module = MaskGenerationModule(4, 3)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(150):
        m = torch.zeros(4, 1, 16, 16)
        for i in range(4):
            y, x = torch.randint(0, 10, (2,), generator=g).tolist()
            m[i, 0, y:y + 6, x:x + 6] = 1
        maps = torch.rand(4, 4, 16, 16, generator=g) * 0.2
        maps[:, 2] = 0.1 + 0.8 * m[:, 0]  # token 2 attends to the defect
        loss = mask_loss(module(maps), (m * 2 - 1).expand(-1, 3, -1, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    module.save_pretrained(tmp_path / MASK_MODULE_DIR)
    back = MaskGenerationModule.from_pretrained(tmp_path / MASK_MODULE_DIR)
    assert json.loads((tmp_path / MASK_MODULE_DIR / "config.json").read_text())["in_channels"] == 4
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    with torch.no_grad():
        torch.testing.assert_close(back(maps), module.eval()(maps))


def _dark_patches(seed: int, size: int, grey: tuple[int, int], box: tuple[slice, slice], value: int):
    """Two random grey normals and the same images with a dark patch at ``box``: (normals, [(image, mask)])."""
    rng = np.random.default_rng(seed)
    normals = [rng.integers(*grey, (size, size, 3), dtype=np.uint8) for _ in range(2)]
    defects = []
    for img in normals:
        m = np.zeros((size, size), bool)
        m[box] = True
        img = img.copy()
        img[m] = value
        defects.append((img, m))
    return normals, defects


# ------------------------------------------------------------------ training: Eq. 11's lambda term, end to end
def test_mask_loss_trains_the_defect_part_and_not_the_fusion_part(tiny):
    from defectforge.diffusion.training import disentangled_step

    tiny.prompts.add_defect("crack")
    set_tdia(tiny, True)
    layers = mask_module_layers(tiny)
    assert [tdia_parts(tiny.unet)[n] for n in layers] == ["defect", "defect"]
    module = MaskGenerationModule(len(layers) * 4, 3, layers=layers)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    m = torch.zeros(2, 1, 64, 64)
    m[:, :, 20:40, 16:30] = 1
    out = disentangled_step(tiny, x, m, ["defect", "good"], "crack", torch.Generator().manual_seed(0),
                            hooks=[MaskModuleLoss(1.0, module=module)])
    tiny.unet.zero_grad()
    out["mask"].backward()
    grads = {n: mod.to_k.weight.grad for n, mod in tiny.unet.named_modules() if n.endswith("attn2")}
    parts = tdia_parts(tiny.unet)
    for name, grad in grads.items():
        part = parts[name + ".processor"]
        if part == "fusion":  # after the defect part: loss_m cannot reach it
            assert grad is None or not grad.any()
        else:
            assert grad is not None and grad.abs().sum() > 0, name
    assert module.net[0].weight.grad.abs().sum() > 0


def test_mask_module_without_tdia_reads_every_layer_joint_softmax(tiny):
    from defectforge.diffusion.training import disentangled_step

    tiny.prompts.add_defect("crack")
    layers = mask_module_layers(tiny)
    assert layers == cross_attention_order(tiny.unet)
    seen = []

    class Spy(MaskGenerationModule):
        def forward(self, maps):
            seen.append(maps)
            return super().forward(maps)

    module = Spy(len(layers) * 4, 3)
    out = disentangled_step(tiny, torch.rand(2, 3, 64, 64) * 2 - 1, torch.ones(2, 1, 64, 64), ["defect", "defect"], "crack",
                            torch.Generator().manual_seed(0), hooks=[MaskModuleLoss(2.0, module=module)], attention_loss=1.0)
    assert seen[0].shape == (2, 24, 64, 64) and "attention" in out and out["mask"] > 0
    # per pixel the 4 defect tokens' joint-softmax columns sum to the share: inside (0, 1)
    share = seen[0][:, :4].sum(1)
    assert (share > 0).all() and (share < 1).all()


def test_finetune_with_tdia_and_the_module_saves_and_loads_both(tmp_path):
    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.diffusion.training import finetune, pretrain

    normals, defects = _dark_patches(0, 72, (80, 160), (slice(30, 40), slice(30, 44)), 20)
    pretrain(normals, tmp_path / "tiny", steps=2, batch_size=2, progress=False, device="cpu")
    fm = finetune(tmp_path / "tiny", defects, "pit", tmp_path / "ft", normals=normals, steps=2, batch_size=2, progress=False, device="cpu", hooks=defectdiffu_hooks(tdia=True, mask_module=1.0, cond_dropout_product=0.2))
    assert fm["tdia"] and fm["mask_weight"] == 1.0
    assert (tmp_path / "ft" / MASK_MODULE_DIR / "mask_module.safetensors").is_file()
    header = (tmp_path / "ft" / "training_curve.csv").read_text().splitlines()[0]
    assert header == "step,loss,matching,regulariser,mask"
    ft = load_pipeline_components(tmp_path / "ft", "cpu")
    assert ft.tdia and uses_tdia(ft.unet) and ft.mask_module is not None
    assert any(MASK_MODULE_DIR in str(f) for f in ft.files)  # a retrained module changes checkpoint_sha256
    base = load_pipeline_components(tmp_path / "tiny", "cpu")
    assert not base.tdia and base.mask_module is None
    # a part no imported method package registered is refused, never loaded without it
    meta_path = tmp_path / "ft" / "defectforge_finetune.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "speckle_module": True}))
    with pytest.raises(DefectforgeError, match="'speckle_module' part that no imported method package loads"):
        load_pipeline_components(tmp_path / "ft", "cpu")
    with pytest.raises(ParamsError, match="finetune.tdia"):
        finetune(tmp_path / "tiny", defects, "pit", tmp_path / "ft2", steps=1, attention_loss=1.0, progress=False, device="cpu", hooks=defectdiffu_hooks(tdia=True))
    assert not (tmp_path / "ft2").exists()


# ------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def tdia_checkpoint(tmp_path_factory):
    from defectforge.diffusion.training import finetune, pretrain

    d = tmp_path_factory.mktemp("tdia")
    normals, defects = _dark_patches(1, 64, (90, 150), (slice(24, 40), slice(20, 44)), 30)
    pretrain(normals, d / "tiny", steps=2, batch_size=2, progress=False, device="cpu")
    finetune(d / "tiny", defects, "pit", d / "ft", normals=normals, steps=3, batch_size=2, progress=False, device="cpu", hooks=defectdiffu_hooks(tdia=True, mask_module=1.0, cond_dropout_product=0.2))
    return d / "ft"


def _image():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 60 + 100).astype(np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 18:42] = True
    return img, mask


def test_defectdiffu_mask_from_the_module_is_its_thresholded_m_pre(tdia_checkpoint, monkeypatch):
    import defectforge.methods.defectdiffu.method as dd
    from defectforge.methods.defectdiffu import DefectDiffu, DefectDiffuConfig, iterative_threshold

    calls = []

    def spy(comps, module, steps):
        out = predicted_mask(comps, module, steps)
        calls.append((steps, out))
        return out

    monkeypatch.setattr(dd, "predicted_mask", spy)
    img, mask = _image()
    method = DefectDiffu.from_pretrained(str(tdia_checkpoint), DefectDiffuConfig(steps=4, device="cpu", mask_source="module", feather=0.0,
                                                                                 attention_fraction=0.5, real_range=False, crop=False))
    res = method.generate(img, mask, "pit", seed=0)
    steps, m_pre = calls[0]
    assert len(steps) == 2  # the last half of 4 DDIM steps
    assert all(list(s) == mask_module_layers(method.models.get("pit")) for s in steps)
    np.testing.assert_allclose(res.attention, m_pre[0].numpy() * mask, atol=1e-6)  # M_pre inside the target
    np.testing.assert_array_equal(res.image[~mask], img[~mask])
    assert res.metadata["tdia"] is True and res.metadata["mask_origin"].startswith("defectdiffu-module")
    t = iterative_threshold(res.attention[mask])
    assert res.metadata["mask_threshold"] == pytest.approx(t)
    if res.metadata["mask_origin"] == "defectdiffu-module":
        np.testing.assert_array_equal(res.mask, (res.attention > t) & mask)
    assert not (res.mask & ~mask).any() and method.own_mask
    assert method.models.get("pit").tdia
    with pytest.raises(ParamsError, match="mask_source: attention"):
        DefectDiffu.from_pretrained(str(tdia_checkpoint), DefectDiffuConfig(steps=2, device="cpu", real_range=False)).generate(img, mask, "pit", 0)


def test_module_source_needs_a_trained_module(tmp_path):
    from defectforge.diffusion.training import finetune, pretrain
    from defectforge.methods.defectdiffu import DefectDiffu, DefectDiffuConfig

    rng = np.random.default_rng(2)
    normals = [rng.integers(90, 150, (64, 64, 3), dtype=np.uint8)]
    m = np.zeros((64, 64), bool)
    m[10:20, 10:20] = True
    pretrain(normals, tmp_path / "tiny", steps=1, batch_size=2, progress=False, device="cpu")
    finetune(tmp_path / "tiny", [(normals[0], m)], "pit", tmp_path / "ft", steps=1, batch_size=2,
             progress=False, device="cpu", hooks=defectdiffu_hooks(cond_dropout_product=0.2))
    img, mask = _image()
    method = DefectDiffu.from_pretrained(str(tmp_path / "ft"), DefectDiffuConfig(steps=2, device="cpu", mask_source="module", real_range=False))
    with pytest.raises(ParamsError, match="finetune.mask_module"):
        method.generate(img, mask, "pit", seed=0)


def test_tdia_store_captures_only_the_defect_part(tdia_checkpoint):
    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.methods.defectdiffu import contexts

    comps = load_pipeline_components(tdia_checkpoint, "cpu")
    ctx, kinds = contexts(comps, "pit")
    assert kinds.shape[0] == 3 and (kinds == 2).any(dim=1).all()  # each of Eq. 4's conditions has its fusion prompt
    store = TokenMapStore(rows=[2])
    z = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        comps.eps(z, 50, ctx, kinds, torch.ones(3, 1, 64, 64), cond_image=z, store=store)
    maps = store.captured()[0]
    assert list(maps) == mask_module_layers(comps) == comps.mask_module.config["layers"]
    for a in maps.values():  # softmax over c_d's 4 tokens only: the maps sum to 1 per pixel
        assert a.shape[:2] == (1, 4)
        torch.testing.assert_close(a.sum(1), torch.ones_like(a.sum(1)))


def test_training_step_loss_m_is_eq6_on_the_defect_rows_only(tiny):
    from defectforge.diffusion.training import disentangled_step

    tiny.prompts.add_defect("crack")
    set_tdia(tiny, True)
    seen = []

    class Spy(MaskGenerationModule):
        def forward(self, maps):
            out = super().forward(maps)
            seen.append(out)
            return out

    module = Spy(2 * 4, 3)
    m = torch.zeros(3, 1, 64, 64)
    m[:, :, 8:30, 20:50] = 1
    m[2, :, 40:60, 0:10] = 1
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    out = disentangled_step(tiny, x, m, ["good", "defect", "defect"], "crack",
                            torch.Generator().manual_seed(0), hooks=[MaskModuleLoss(0.5, module=module)])
    pred = seen[0]
    assert pred.shape == (2, 3, 64, 64)  # rows 1 and 2: the C_def rows
    expected = ((pred - (2 * m[1:] - 1).expand(-1, 3, -1, -1)) ** 2).mean()
    torch.testing.assert_close(out["mask"], expected)
    plain = disentangled_step(tiny, x, m, ["good", "defect", "defect"], "crack", torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * out["mask"])  # Eq. 11: + lambda loss_m


def test_pretrained_profile_offline_tdia_and_module_through_the_same_code(tiny_latent_dir, tmp_path):
    """A test-size Stable Diffusion directory (CLIP text encoder, VAE): LoRA fine-tune with TDIA
    and the mask module, then DefectDiffu with mask_source: module on it."""
    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.diffusion.training import finetune
    from defectforge.methods.defectdiffu import DefectDiffu, DefectDiffuConfig

    rng = np.random.default_rng(0)
    defects = []
    for _ in range(2):
        img = rng.integers(80, 160, (64, 64, 3), dtype=np.uint8)
        m = np.zeros((64, 64), bool)
        m[20:40, 16:44] = True
        img[m] = 30
        defects.append((img, m))
    fm = finetune(str(tiny_latent_dir), defects, "pit", tmp_path / "ft", mode="lora", steps=2, batch_size=2, lr=1e-2, progress=False, device="cpu", hooks=defectdiffu_hooks(tdia=True, mask_module=1.0))
    assert fm["profile"] == "pretrained" and fm["tdia"]
    ft = load_pipeline_components(tmp_path / "ft", "cpu")
    assert ft.tdia and uses_tdia(ft.unet) and any("lora" in n for n, _ in ft.unet.named_parameters())
    n = ft.prompts.tokenizer.model_max_length  # the module reads the defect part's 77-token (here n-token) maps
    assert ft.mask_module.config["in_channels"] == len(mask_module_layers(ft)) * n
    img, mask = _image()
    res = DefectDiffu.from_pretrained(str(tmp_path / "ft"), DefectDiffuConfig(steps=3, device="cpu", feather=0.0, mask_source="module",
                                                                              attention_fraction=0.5)).generate(img, mask, "pit", seed=0)
    np.testing.assert_array_equal(res.image[~mask], img[~mask])
    assert not (res.mask & ~mask).any() and res.metadata["mask_origin"].startswith("defectdiffu-module")
