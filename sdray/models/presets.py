"""Named architectures, as diffusers/transformers configs (no weights).

``tiny`` is for tests and the demo: 16 px RGB → 8×8×4 latents, a ~1 M-parameter UNet with attention
kept off its highest resolution, a ~30 k-parameter text encoder. ``tiny-xl`` is the same size with
SDXL's structure (two text encoders, pooled-text and size conditioning); ``tiny-sd3`` has SD3.5's
(16-channel latents with a shift factor, two CLIPs and a T5, an MMDiT with one dual-attention block and
RMS-normed queries and keys); ``tiny-flux`` has Flux.1's: 16 px → 8×8×16 latents, packed into 16 tokens of
64 channels, a ~1 M-parameter transformer (dev-shaped: it embeds a guidance value), a tiny CLIP (pooled) and
a tiny T5 (sequence). The others have the shapes of the public Stable Diffusion, SD3 and Flux.1 releases,
for real clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# The noise schedule every Stable Diffusion 1.x/2.x release trains with.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# FLUX.1-dev's scheduler_config.json: Flux shifts its sigmas by the image's token count (dynamic shifting,
# mu from base_shift at base_image_seq_len to max_shift at max_image_seq_len); the static shift is unused.
FLUX_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class Preset:
    """A named architecture of one model family: each component's config, by pipeline slot."""

    family: str  # sdray.models.families: sd, sdxl, sd3, flux
    resolution: int
    denoiser: dict[str, Any]  # the UNet's or transformer's config
    vae: dict[str, Any]
    # text encoder slot ("text_encoder", "text_encoder_2", …) → its config (CLIPTextConfig / T5Config fields)
    text_encoders: dict[str, dict[str, Any]]
    tokenizer_max_length: int  # the CLIP tokenizers'
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_NOISE_SCHEDULE))
    t5_max_length: int | None = None  # the T5 tokenizer's (families with a T5 encoder)


_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# OpenAI's CLIP ViT-L/14 text encoder (SD 1.x; SDXL's and SD3's first) and OpenCLIP's bigG/14 (SDXL's and
# SD3's second).
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
_CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}

_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "max_position_embeddings": 16,
}

_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 1.0,
}

_TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# Flux's latents: 16 channels, normalised as (x - shift_factor) × scaling_factor (FLUX.1's vae/config.json).
_FLUX_LATENTS = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                 "use_quant_conv": False, "use_post_quant_conv": False}

# Flux packs each 2×2 patch of latent pixels into one token: the transformer's in_channels are 4 × latent channels.
_FLUX_PATCH = 4

# google/t5-v1_1-xxl's encoder, as FLUX.1's text_encoder_2/config.json.
_T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

_FLUX_DEV = {
    "patch_size": 1,
    "in_channels": _FLUX_PATCH * _FLUX_LATENTS["latent_channels"],
    "num_layers": 19,
    "num_single_layers": 38,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "joint_attention_dim": _T5_XXL["d_model"],
    "pooled_projection_dim": _CLIP_L["hidden_size"],
    "guidance_embeds": True,
}

_TINY_FLUX_T5 = {
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1's, as FLUX.1's T5-XXL
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
}

# FLUX.1-dev's structure at tiny size (about 1 M parameters).
_TINY_FLUX = {
    **_FLUX_DEV,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "axes_dims_rope": [8, 8, 8],  # sums to attention_head_dim
    "joint_attention_dim": _TINY_FLUX_T5["d_model"],
    "pooled_projection_dim": _TINY_TEXT["hidden_size"],  # CLIPTextModel's pooler_output is hidden-size wide
}

# SD3's flow-matching scheduler (every SD3/3.5 release's scheduler_config.json: a static shift of 3).
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# SD3's VAE: SDXL's shape with 16 latent channels, no quant convs, and latents normalised as
# (x - shift_factor) × scaling_factor (stable-diffusion-3-medium-diffusers' vae/config.json; the SD3.5
# presets take the same VAE, which was not checked against their own config.json).
_SD3_VAE = {
    **_SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}

# SD3's three text encoders: CLIP ViT-L/14 and OpenCLIP bigG/14 (both with their projections: the pooled
# conditioning is the two projections side by side) and T5 v1.1 XXL's encoder.
_SD3_TEXT = {
    "text_encoder": _CLIP_L,
    "text_encoder_2": _CLIP_G,
    "text_encoder_3": _T5_XXL,
}

# The transformer every SD3/3.5 release shares: 16-channel latents in 2×2 patches, the T5 width as the
# context width, the two CLIP projections (768 + 1280) as the pooled width; the caption projection is the
# inner width (heads × 64).
_SD3_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}


def _sd3_release(transformer: dict) -> Preset:
    # t5_max_length: the pipeline's default (256). For training, SimpleTuner's SD3 guide keeps captions to at
    # most 154 T5 tokens (set model.max_sequence_length), which also saves memory and latent-cache space.
    return Preset(family="sd3", resolution=1024, denoiser={**_SD3_TRANSFORMER, **transformer}, vae=_SD3_VAE,
                  text_encoders=_SD3_TEXT, tokenizer_max_length=77, scheduler=SD3_SCHEDULER, t5_max_length=256)


# SDXL's added conditioning: 6 size/crop numbers, each embedded in addition_time_embed_dim channels,
# next to text_encoder_2's pooled projection.
_XL_TIME_IDS = 6

_SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}

_FLUX_DEV_PRESET = Preset(
    family="flux",
    resolution=1024,
    denoiser=_FLUX_DEV,
    vae={**_SD_VAE, **_FLUX_LATENTS, "sample_size": 1024},
    text_encoders={"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL},
    tokenizer_max_length=77,
    scheduler=dict(FLUX_NOISE_SCHEDULE),
    t5_max_length=512,
)

# tiny-sd3's T5 is wider than its two CLIPs side by side (64), as SD3's (4096 > 768 + 1280), so the CLIP
# hidden states are zero-padded to its width rather than cropped; no dropout, so encoding is deterministic
# whether or not the encoder was put in eval mode.
_TINY_T5 = {
    "d_model": 96,
    "d_ff": 128,
    "d_kv": 16,
    "num_heads": 4,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(family="sd", resolution=16, denoiser=_TINY_UNET, vae=_TINY_VAE,
                   text_encoders={"text_encoder": _TINY_TEXT}, tokenizer_max_length=16),
    "tiny-xl": Preset(
        family="sdxl",
        resolution=16,
        denoiser={
            **_TINY_UNET,
            "cross_attention_dim": 64,  # the two text encoders' hidden states, concatenated
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + _XL_TIME_IDS * 8,
        },
        vae=_TINY_VAE,
        text_encoders={"text_encoder": _TINY_TEXT, "text_encoder_2": _TINY_TEXT},
        tokenizer_max_length=16,
    ),
    # 16 px → 8×8×16 latents (a shifted and scaled 2-block VAE, SD3's factors) → 4×4 patches of 2×2; ~1.4 M
    # parameters in 4 joint blocks of width 96, the first with SD3.5's second (image-only) attention.
    "tiny-sd3": Preset(
        family="sd3",
        resolution=16,
        denoiser={
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 4,
            "attention_head_dim": 16,
            "num_attention_heads": 6,
            "caption_projection_dim": 96,  # the inner width: heads × head dim
            "joint_attention_dim": _TINY_T5["d_model"],
            "pooled_projection_dim": 2 * _TINY_TEXT["projection_dim"],
            "pos_embed_max_size": 16,  # up to 64 px images (bucketed batches up to 4× the resolution)
            "dual_attention_layers": [0],
            "qk_norm": "rms_norm",
        },
        vae={**_TINY_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
             "use_quant_conv": False, "use_post_quant_conv": False},
        text_encoders={"text_encoder": _TINY_TEXT, "text_encoder_2": _TINY_TEXT, "text_encoder_3": _TINY_T5},
        tokenizer_max_length=16,
        scheduler=SD3_SCHEDULER,
        t5_max_length=16,
    ),
    "sd15": Preset(
        family="sd",
        resolution=512,
        denoiser={**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae=_SD_VAE,
        text_encoders={"text_encoder": _CLIP_L},
        tokenizer_max_length=77,
    ),
    "sd2-base": Preset(
        family="sd",
        resolution=512,
        denoiser={
            **_SD_UNET,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        vae=_SD_VAE,
        text_encoders={"text_encoder": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "projection_dim": 512,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        }},
        tokenizer_max_length=77,
    ),
    "sdxl-base": Preset(
        family="sdxl",
        resolution=1024,
        denoiser={
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 1280 + _XL_TIME_IDS * 256,
        },
        vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
        text_encoders={"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G},
        tokenizer_max_length=77,
        scheduler={**SD_NOISE_SCHEDULE, "timestep_spacing": "leading"},
    ),
    "tiny-flux": Preset(
        family="flux",
        resolution=16,
        denoiser=_TINY_FLUX,
        vae={**_TINY_VAE, **_FLUX_LATENTS},
        text_encoders={"text_encoder": _TINY_TEXT, "text_encoder_2": _TINY_FLUX_T5},
        tokenizer_max_length=16,
        scheduler=dict(FLUX_NOISE_SCHEDULE),
        t5_max_length=16,
    ),
    "flux-dev": _FLUX_DEV_PRESET,
    # Timestep-distilled for 1-4 steps without guidance embeddings. Its scheduler config (a static shift of 1,
    # no dynamic shifting) is FLUX.1-schnell's as remembered, not checked against the published file.
    "flux-schnell": replace(_FLUX_DEV_PRESET, denoiser={**_FLUX_DEV, "guidance_embeds": False}, t5_max_length=256,
                            scheduler={**FLUX_NOISE_SCHEDULE, "shift": 1.0, "use_dynamic_shifting": False}),
    "sd3-medium": _sd3_release({"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                                "pos_embed_max_size": 192}),
    # SD3.5 medium (MMDiT-X): the first 13 blocks add a second, image-only attention; queries and keys are
    # RMS-normed; a position-embedding grid twice as wide.
    "sd35-medium": _sd3_release({"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                                 "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
                                 "qk_norm": "rms_norm"}),
    "sd35-large": _sd3_release({"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                                "pos_embed_max_size": 192, "qk_norm": "rms_norm"}),
}
