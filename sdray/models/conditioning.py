"""How a batch's captions (and, for SDXL, image sizes) become the UNet's conditioning.

Stable Diffusion 1.x/2.x: the text encoder's last hidden state. SDXL: both text encoders' penultimate
hidden states side by side, plus the second encoder's pooled projection and six "time ids" (original
size, crop corner, target size: the aspect-ratio bucket's when bucketing), as diffusers' SDXL pipeline
computes them at inference.
"""

from __future__ import annotations

import torch

from sdray.models.build import Components


def unet_conditioning(comps: Components, batch: dict, *, drop: torch.Tensor | None = None,
                      device: torch.device | str = "cpu") -> dict:
    """Keyword arguments for ``unet(noisy, t, **cond)``. ``drop`` marks captions to drop for
    classifier-free guidance (SD: the empty caption's ids, set by the caller; SDXL: zeroed embeddings,
    which is what the SDXL pipeline feeds as the unconditional input). Gradients flow into the text
    encoders unless the caller runs this under ``torch.no_grad()`` (frozen encoders)."""
    ids = batch["input_ids"].to(device)
    if not comps.is_xl:
        return {"encoder_hidden_states": comps.text_encoder(ids)[0]}
    first = comps.text_encoder(ids, output_hidden_states=True)
    second = comps.text_encoder_2(batch["input_ids_2"].to(device), output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second.text_embeds
    if drop is not None and drop.any():
        keep = (~drop).to(device)
        embeds = embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
    n, r = ids.shape[0], comps.resolution
    # Bucketed rows carry their bucket's (height, width); square ones are the model's resolution.
    target = (batch["target_size"].to(device) if "target_size" in batch
              else torch.tensor([[r, r]], device=device).expand(n, 2))
    time_ids = torch.cat([batch["original_size"].to(device), batch["crop_top_left"].to(device), target], dim=1)
    return {"encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)}}
