"""How a batch's captions (and, for SDXL, image sizes) become the UNet's conditioning.

Stable Diffusion 1.x/2.x: the text encoder's last hidden state. SDXL: both text encoders' penultimate
hidden states side by side, plus the second encoder's pooled projection and six "time ids" (original
size, crop corner, target size: the aspect-ratio bucket's when bucketing), as diffusers' SDXL pipeline
computes them at inference.

Encoding (``encode_prompts``) and assembling the UNet's arguments (``unet_conditioning``) are separate
steps, so the embeddings can come from the text encoders or from a latent cache alike.
"""

from __future__ import annotations

import torch

from sdray.models.build import Components


def encode_prompts(comps: Components, batch: dict, *, device: torch.device | str = "cpu") -> dict:
    """``prompt_embeds`` (and, for SDXL, ``pooled_prompt_embeds``) of the batch's token ids. Gradients
    flow into the text encoders unless the caller runs this under ``torch.no_grad()`` (frozen encoders)."""
    ids = batch["input_ids"].to(device)
    if not comps.is_xl:
        return {"prompt_embeds": comps.text_encoder(ids)[0]}
    first = comps.text_encoder(ids, output_hidden_states=True)
    second = comps.text_encoder_2(batch["input_ids_2"].to(device), output_hidden_states=True)
    return {"prompt_embeds": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
            "pooled_prompt_embeds": second.text_embeds}


@torch.no_grad()
def unconditional_prompts(comps: Components, *, device: torch.device | str = "cpu") -> dict:
    """The embeddings a dropped caption is replaced by (classifier-free guidance), one row without a
    batch axis: SD, the empty caption's; SDXL, zeros, which is what its pipeline feeds as the
    unconditional input (``force_zeros_for_empty_prompt``)."""
    tokenizers = {"input_ids": comps.tokenizer, "input_ids_2": comps.tokenizer_2}
    empty = {name: tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
             for name, tok in tokenizers.items() if tok is not None}
    embeds = encode_prompts(comps, empty, device=device)
    if comps.is_xl:
        embeds = {k: torch.zeros_like(v) for k, v in embeds.items()}
    return {k: v[0] for k, v in embeds.items()}


def unet_conditioning(embeds: dict, batch: dict, *, resolution: int, unconditional: dict | None = None,
                      drop: torch.Tensor | None = None, device: torch.device | str = "cpu") -> dict:
    """Keyword arguments for ``unet(noisy, t, **cond)`` from ``embeds`` (``encode_prompts``' output or
    cached rows). ``drop`` marks captions replaced by ``unconditional`` (classifier-free guidance)."""
    embeds = {k: v.to(device) for k, v in embeds.items()}
    if drop is not None and drop.any():
        keep = (~drop).to(device)
        embeds = {k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v, unconditional[k].to(device, v.dtype))
                  for k, v in embeds.items()}
    if "pooled_prompt_embeds" not in embeds:
        return {"encoder_hidden_states": embeds["prompt_embeds"]}
    n = embeds["prompt_embeds"].shape[0]
    # Bucketed rows carry their bucket's (height, width); square ones are the model's resolution.
    target = (batch["target_size"].to(device) if "target_size" in batch
              else torch.tensor([[resolution, resolution]], device=device).expand(n, 2))
    time_ids = torch.cat([batch["original_size"].to(device), batch["crop_top_left"].to(device), target], dim=1)
    return {"encoder_hidden_states": embeds["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"],
                                  "time_ids": time_ids.to(embeds["prompt_embeds"].dtype)}}
