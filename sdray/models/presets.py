"""Named architectures, as diffusers/transformers configs (no weights).

``tiny`` is for tests and the demo: 16 px RGB → 8×8×4 latents, a ~1 M-parameter UNet with attention
kept off its highest resolution, a ~30 k-parameter text encoder. ``tiny-xl`` is the same size with
SDXL's structure (two text encoders, pooled-text and size conditioning). The others have the shapes of
the public Stable Diffusion releases, for real clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

# CLIP ViT-L/14's text encoder (SD 1.x, SDXL's first).
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}

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
        text_encoders={"text_encoder": _CLIP_L, "text_encoder_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        }},
        tokenizer_max_length=77,
        scheduler={**SD_NOISE_SCHEDULE, "timestep_spacing": "leading"},
    ),
}
