"""Named architectures, as diffusers/transformers configs (no weights).

``tiny`` is for tests and the demo: 16 px RGB → 8×8×4 latents, a ~0.8 M-parameter UNet with attention
kept off its highest resolution, a ~30 k-parameter text encoder. The others have the shapes of the
public Stable Diffusion releases, for real clusters.
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
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer_max_length: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_NOISE_SCHEDULE))


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
    "tiny": Preset(
        resolution=16,
        unet={
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
        },
        vae={
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
        },
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "max_position_embeddings": 16,
        },
        tokenizer_max_length=16,
    ),
    "sd15": Preset(
        resolution=512,
        unet={**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae=_SD_VAE,
        text_encoder={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
        },
        tokenizer_max_length=77,
    ),
    "sd2-base": Preset(
        resolution=512,
        unet={
            **_SD_UNET,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        vae=_SD_VAE,
        text_encoder={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "projection_dim": 512,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        },
        tokenizer_max_length=77,
    ),
}
