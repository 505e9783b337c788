"""Tiny diffusers pipelines built from configs with random weights: no downloads, a few seconds
per generation on CPU.

Builders: :func:`tiny_sd`, :func:`tiny_sdxl`, :func:`tiny_sd_img2img`, :func:`tiny_sd3` return
ready pipelines (SD-style scheduler configs, SD3 with ``FlowMatchEulerDiscreteScheduler(shift=3)``).
Each pipeline has a real (tiny, character-level) CLIP tokenizer and random text encoders, so
``prompt="..."`` works, but the call-kwargs helpers :func:`sd_inputs`, :func:`sdxl_inputs`,
:func:`sd_img2img_inputs` and :func:`sd3_inputs` hand out seeded random embeddings instead (no
text encoder pass, fully deterministic), to be used as::

    pipe = tiny_sd()
    out = pipe(**sd_inputs(), num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="latent")

Sizes: SD / SD img2img / SDXL images are 32x32 px with 16x16x4 latents (VAE factor 2); SD3 images
are 32x32 px with 16x16x4 latents. Everything is float32 on CPU. Wrap generations in
:func:`fewstep.testing.one_thread` on shared CPUs.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: the scheduler keywords Stable Diffusion 1.x/2.x and SDXL checkpoints ship
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

SD_SIZE = 32  # image px of SD / SDXL / img2img (latents 16x16)
SD3_SIZE = 32  # image px of SD3 (latents 16x16)
TEXT_LEN = 77  # CLIP context length
SD_TEXT_DIM = 32  # SD cross-attention width (one CLIP encoder)
SDXL_TEXT_DIM = 64  # SDXL: two CLIP encoders of 32 concatenated
SDXL_POOLED_DIM = 32  # SDXL pooled embedding (text_encoder_2 projection)
SD3_TEXT_DIM = 32  # SD3 joint attention width
SD3_POOLED_DIM = 64  # SD3 pooled embedding (two CLIP projections of 32)




def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (printable ASCII, no merges) built in memory; saves and
    loads like a real one."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LEN)


def _clip_config(hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _vae(seed: int, **extra) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SD_SIZE,
        **extra,
    ).eval()


def _frozen(module):
    module.requires_grad_(False)
    return module.eval()


def tiny_sd(seed: int = 0, scheduler: str = "pndm") -> StableDiffusionPipeline:
    """A tiny Stable Diffusion 1.x pipeline: UNet2DConditionModel (32/64 channels, one cross-attention
    block), AutoencoderKL (factor 2), CLIPTextModel (width 32), char-level tokenizer, no safety
    checker. ``scheduler``: ``"pndm"`` (SD 1.5's shipped scheduler), ``"ddim"`` or ``"euler"``, all
    with :data:`SD_SCHEDULER_CONFIG`. Weights are random with ``seed``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SD_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SD_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config())
    pipe = StableDiffusionPipeline(
        vae=_frozen(_vae(seed + 2)),
        text_encoder=_frozen(text_encoder),
        tokenizer=tiny_tokenizer(),
        unet=_frozen(unet),
        scheduler=_sd_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_scheduler(kind: str):
    if kind == "pndm":
        return PNDMScheduler(**SD_SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    if kind == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False)
    if kind == "euler":
        return EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    raise ValueError(f"scheduler={kind!r} is not supported; allowed: 'pndm', 'ddim', 'euler'")



def tiny_sd_img2img(seed: int = 0, scheduler: str = "pndm") -> StableDiffusionImg2ImgPipeline:
    """The img2img pipeline over the components of :func:`tiny_sd` (same seed, same weights)."""
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd(seed, scheduler).components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0, scheduler: str = "euler") -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline: UNet2DConditionModel with ``text_time`` added conditioning (pooled
    text 32 + 6 time ids x 8), two CLIP text encoders (the second with projection) of width 32,
    AutoencoderKL (factor 2), no watermarker. ``scheduler`` as in :func:`tiny_sd` (SDXL ships
    EulerDiscrete with the SD config)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SD_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + SDXL_POOLED_DIM,
        cross_attention_dim=SDXL_TEXT_DIM,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModel(_clip_config())
    torch.manual_seed(seed + 2)
    te2 = CLIPTextModelWithProjection(_clip_config(projection_dim=SDXL_POOLED_DIM))
    pipe = StableDiffusionXLPipeline(
        vae=_frozen(_vae(seed + 3)),
        text_encoder=_frozen(te1),
        text_encoder_2=_frozen(te2),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=_frozen(unet),
        scheduler=_sd_scheduler(scheduler),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler as a checkpoint loads it: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` built
    from a config dict that carries ``_class_name`` (as ``scheduler_config.json`` does; a scheduler
    constructed directly has no ``_class_name`` in its config)."""
    return FlowMatchEulerDiscreteScheduler.from_config(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    )


def tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline: SD3Transformer2DModel (1 joint block, patch 1, width 32), two CLIP text
    encoders with projection (width 32, pooled 32 + 32), no T5 (``text_encoder_3=None``),
    AutoencoderKL with SD3's latent shift/scale, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=SD3_SIZE // 2,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD3_TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=SD3_POOLED_DIM,
        out_channels=4,
    )
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModelWithProjection(_clip_config(projection_dim=32))
    torch.manual_seed(seed + 2)
    te2 = CLIPTextModelWithProjection(_clip_config(projection_dim=32))
    vae = _vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=_frozen(transformer),
        scheduler=sd3_scheduler(),
        vae=_frozen(vae),
        text_encoder=_frozen(te1),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_frozen(te2),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------
# call kwargs
# ------------------------------------------------------------------------------------------------
def _randn(shape, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def sd_inputs(seed: int = 0, batch: int = 1) -> dict:
    """Call kwargs for :func:`tiny_sd`: seeded ``prompt_embeds`` / ``negative_prompt_embeds``
    (batch, 77, 32) and ``height = width = 32``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": _randn((batch, TEXT_LEN, SD_TEXT_DIM), g),
        "negative_prompt_embeds": _randn((batch, TEXT_LEN, SD_TEXT_DIM), g),
        "height": SD_SIZE,
        "width": SD_SIZE,
    }


def sd_img2img_inputs(seed: int = 0, batch: int = 1, strength: float = 0.6) -> dict:
    """Call kwargs for :func:`tiny_sd_img2img`: the embeddings of :func:`sd_inputs`, a seeded smooth
    random ``image`` tensor (batch, 3, 32, 32) in ``[0, 1]`` and ``strength``."""
    kw = sd_inputs(seed, batch)
    del kw["height"], kw["width"]
    g = torch.Generator().manual_seed(seed + 1000)
    coarse = torch.rand(batch, 3, 8, 8, generator=g)
    kw["image"] = torch.nn.functional.interpolate(coarse, size=(SD_SIZE, SD_SIZE), mode="bilinear")
    kw["strength"] = strength
    return kw


def _pooled_inputs(seed: int, batch: int, text_dim: int, pooled_dim: int, size: int) -> dict:
    """Seeded ``prompt_embeds`` (batch, 77, text_dim), ``pooled_prompt_embeds`` (batch, pooled_dim),
    their negatives (drawn in that order), ``height = width = size``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": _randn((batch, TEXT_LEN, text_dim), g),
        "negative_prompt_embeds": _randn((batch, TEXT_LEN, text_dim), g),
        "pooled_prompt_embeds": _randn((batch, pooled_dim), g),
        "negative_pooled_prompt_embeds": _randn((batch, pooled_dim), g),
        "height": size,
        "width": size,
    }


def sdxl_inputs(seed: int = 0, batch: int = 1) -> dict:
    """Call kwargs for :func:`tiny_sdxl`: seeded ``prompt_embeds`` (batch, 77, 64),
    ``pooled_prompt_embeds`` (batch, 32), their negatives, ``height = width = 32``."""
    return _pooled_inputs(seed, batch, SDXL_TEXT_DIM, SDXL_POOLED_DIM, SD_SIZE)


def sd3_inputs(seed: int = 0, batch: int = 1) -> dict:
    """Call kwargs for :func:`tiny_sd3`: seeded ``prompt_embeds`` (batch, 77, 32),
    ``pooled_prompt_embeds`` (batch, 64), their negatives, ``height = width = 32``."""
    return _pooled_inputs(seed, batch, SD3_TEXT_DIM, SD3_POOLED_DIM, SD3_SIZE)
