"""What a run trains, decided in one place from the spec.

- ``stage: autoencoder``: the VAE.
- ``stage: denoiser``: the family's denoiser (UNet or transformer), or LoRA adapters on it (``model.lora``;
  its own weights stay frozen); with ``train.train_text_encoder`` also the text encoders, or, with
  ``model.lora``, LoRA adapters on their attention projections (as diffusers' LoRA training examples do).
Everything else is frozen. ``Trainable`` gives the module the parallel strategy wraps (one module, so one
DDP wrap covers the denoiser and the trained text encoders), the parameters the optimizer and EMA hold, the
weights a checkpoint saves (the adapters alone, for LoRA), and the LoRA exports. Components are named by
their pipeline slot (``unet`` or ``transformer``, ``text_encoder``, …), in checkpoints too.
"""

from __future__ import annotations

import copy

import torch
from diffusers.training_utils import cast_training_params

from sdray.models.build import Components, ModelError
from sdray.models.conditioning import drop_captions
from sdray.models.families.sd import unet_blocks
from sdray.models.pipeline import assemble_pipeline
from sdray.spec import JobSpec, LoRASpec
from sdray.train.losses import AutoencoderObjective

# The text encoders' attention projections (CLIP and T5 name them alike), the adapters' targets in
# diffusers' LoRA examples.
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class ConditionedDenoiser(torch.nn.Module):
    """The denoiser with its text conditioning computed inside ``forward``: with grad through the text
    encoders in ``trained_text`` (registered as submodules, so a DDP wrap of this module covers them),
    without grad when none trains. Called as ``module(noisy, timesteps, batch=..., drop=...)``; returns the
    prediction in the latents' shape (``ModelFamily.predict``). The prompt embeddings come from ``encoder``
    (the text encoders, or a latent cache's rows). The denoiser is registered under its pipeline slot name
    (``unet``, ``transformer``), which sharded checkpoints' keys start with."""

    def __init__(self, comps: Components, denoiser, encoder, trained_text: list[torch.nn.Module] = (),
                 guidance: float = 1.0):
        super().__init__()
        self.slot = comps.family.denoiser
        self.add_module(self.slot, denoiser)
        self.text_encoders = torch.nn.ModuleList(trained_text)
        self.comps = comps
        self.encoder = encoder
        self.guidance = guidance

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.slot)

    def forward(self, sample, timestep, *, batch: dict, drop: torch.Tensor | None = None):
        family = self.comps.family
        trains_text = len(self.text_encoders) > 0
        if trains_text and drop is not None and not family.zero_unconditional:
            # A trained encoder's empty-caption embedding moves with it: encode the empty caption's ids
            # in place of the dropped captions' (a zeros-unconditional family's input stays zeros).
            batch = {**batch, **{k: torch.where(drop[:, None], empty, batch[k])
                                 for k, empty in self.encoder.empty_ids.items() if k in batch}}
            drop = None
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains_text):
            prompts = self.encoder.prompts(batch)
        embeds = drop_captions(prompts, unconditional=self.encoder.unconditional, drop=drop, device=sample.device)
        return family.predict(self.denoiser, sample, timestep, embeds, batch, resolution=self.comps.resolution,
                              guidance=self.guidance)


def _lora_config(lora: LoRASpec, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      init_lora_weights="gaussian")


class Trainable:
    """The trained components of a job (name → module) and how to train, save and export them."""

    def __init__(self, comps: Components, spec: JobSpec, encoder=None):
        self.comps = comps
        self.encoder = encoder  # stage denoiser: where latents and prompt embeddings come from
        self.lora = spec.model.lora
        self.guidance = spec.train.guidance
        family = comps.family
        self.denoiser_slot = family.denoiser
        if spec.stage == "autoencoder":
            self.components = {"vae": comps.vae}
        else:
            self.components = {family.denoiser: comps.denoiser}
            if spec.train.train_text_encoder:
                self.components.update({s.encoder: comps.text_encoders[s.encoder]
                                        for s in family.text_slots_of(comps) if s.trainable})
        for name, module in {family.denoiser: comps.denoiser, **comps.frozen_modules()}.items():
            if module is not None:
                module.requires_grad_(name in self.components and self.lora is None)
        if self.lora is not None:
            self._add_adapters()
        for slot, encoder in comps.text_encoders.items():
            if slot in self.components:
                for unused in family.text_parameters_without_gradient(slot, encoder):
                    unused.requires_grad_(False)
        # Trained weights are fp32 whatever the source's precision (autocast does the half-precision math).
        cast_training_params(list(self.components.values()), dtype=torch.float32)
        self.kl_weight = spec.train.kl_weight

    def _add_adapters(self) -> None:
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import check_target_module_exists

        for name, module in self.components.items():
            config = _lora_config(self.lora, self.lora_targets() if name == self.denoiser_slot
                                  else TEXT_ENCODER_LORA_TARGETS)
            if not any(check_target_module_exists(config, key) for key, _ in module.named_modules()):
                raise ModelError(f"spec.model.lora.targets: none of {sorted(config.target_modules)} names a module "
                                 f"of the {name}")
            if name == self.denoiser_slot:
                module.add_adapter(config)
            else:  # transformers' own add_adapter wants a newer peft than diffusers does; this is what it calls
                inject_adapter_in_model(config, module)

    @property
    def kinds(self) -> dict[str, str]:
        """What a checkpoint holds for each component: 'lora' (adapters) or 'full' (every weight)."""
        return {name: "lora" if self.lora else "full" for name in self.components}

    def objective(self, model=None) -> torch.nn.Module:
        """The module a batch's loss runs through, around ``model`` (default: the trained one)."""
        if "vae" in self.components:
            return AutoencoderObjective(model if model is not None else self.comps.vae, self.kl_weight)
        text = [m for n, m in self.components.items() if n != self.denoiser_slot]
        return ConditionedDenoiser(self.comps, model if model is not None else self.comps.denoiser, self.encoder,
                                   text, guidance=self.guidance)

    def shard_units(self) -> list[torch.nn.Module]:
        """The blocks a sharding strategy wraps one by one: the family's denoiser blocks, or the VAE's."""
        if "vae" in self.components:
            return unet_blocks(self.comps.vae)
        return self.comps.family.shard_units(self.comps.denoiser)

    def lora_targets(self) -> list[str]:
        """The denoiser's adapter targets: the spec's, else the family's defaults."""
        return list(self.lora.targets or self.comps.family.lora_targets)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train. Call after wrapping: FSDP replaces them with sharded ones."""
        return [p for m in self.components.values() for p in m.parameters() if p.requires_grad]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained weights of each component: every weight, or the adapters alone for LoRA."""
        from peft import get_peft_model_state_dict

        return {name: get_peft_model_state_dict(m) if self.lora else m.state_dict()
                for name, m in self.components.items()}

    def load_state_dicts(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        from peft import set_peft_model_state_dict

        for name, module in self.components.items():
            if not self.lora:
                module.load_state_dict(state[name])
                continue
            result = set_peft_model_state_dict(module, state[name])
            if result.unexpected_keys:
                raise ValueError(f"{name}: the checkpoint's adapters do not fit this model "
                                 f"(unexpected: {result.unexpected_keys[:3]})")

    def lora_layers(self) -> dict:
        """``save_lora_weights`` arguments: each component's adapters with their peft config as metadata
        (so ``load_lora_weights`` rebuilds the same rank, alpha and targets). The keys stay in peft's naming:
        diffusers' ``convert_state_dict_to_diffusers`` renames attention projections only, and
        ``load_lora_weights`` judges a file's naming by its first key, so targets beyond attention would
        be dropped silently on load."""
        from peft import get_peft_model_state_dict

        layers = {}
        for name, module in self.components.items():
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
            layers[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        return layers

    def merged_pipeline(self, denoiser):
        """A stock pipeline whose components hold the adapters merged into their weights, with the peft
        layers removed: plain diffusers/transformers models (the trained ones are left as they are)."""
        copies = {name: copy.deepcopy(denoiser if name == self.denoiser_slot else module)
                  for name, module in self.components.items()}
        denoiser_copy = copies.pop(self.denoiser_slot)
        pipe = assemble_pipeline(self.comps.with_models(denoiser=denoiser_copy, **copies))
        copies[self.denoiser_slot] = denoiser_copy
        pipe.fuse_lora(components=list(copies))
        pipe.unload_lora_weights()
        return pipe
