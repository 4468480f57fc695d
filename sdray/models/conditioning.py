"""How a batch's captions become the denoiser's conditioning, for any family.

Encoding (``encode_prompts``: token ids → cacheable prompt embeddings, the family's work) and using them
(``drop_captions``: classifier-free guidance's caption dropout; then ``ModelFamily.predict`` adds what
else the family conditions on, as SDXL's size ids or Flux's guidance) are separate steps, so the
embeddings can come from the text encoders or from a latent cache alike.
"""

from __future__ import annotations

import torch

from sdray.models.build import Components


def token_ids(comps: Components, batch: dict) -> dict[str, torch.Tensor]:
    """The batch's token-id columns of the job's text encoders."""
    return {slot.ids: batch[slot.ids] for slot in comps.family.text_slots_of(comps) if slot.ids in batch}


def encode_prompts(comps: Components, batch: dict, *, device: torch.device | str = "cpu") -> dict:
    """The batch's prompt embeddings (``prompt_embeds``, and ``pooled_prompt_embeds`` where the family has
    one). Gradients flow into the text encoders unless the caller runs this under ``torch.no_grad()``."""
    return comps.family.encode_prompts(comps, token_ids(comps, batch), device=device)


def unconditional_prompts(comps: Components, *, device: torch.device | str = "cpu") -> dict:
    """The embeddings a dropped caption is replaced by (classifier-free guidance), one row without a batch
    axis: the empty caption's, or zeros for families whose pipelines feed zeros."""
    return comps.family.unconditional(comps, device=device)


def drop_captions(embeds: dict, *, unconditional: dict | None = None, drop: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """``embeds`` on ``device``, the rows marked in ``drop`` replaced by ``unconditional``'s."""
    embeds = {k: v.to(device) for k, v in embeds.items()}
    if drop is None or not drop.any():
        return embeds
    keep = (~drop).to(device)
    return {k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v, unconditional[k].to(device, v.dtype))
            for k, v in embeds.items()}
