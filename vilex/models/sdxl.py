"""sdxl.py — Stable Diffusion XL as a frozen ViLex decoder (registered as "stable_diffusion_xl").

SDXL conditions its UNet on two CLIP text encoders (diffusers' ``StableDiffusionXLPipeline.encode_prompt``):

* ``prompt_embeds`` (B, 77, 768 + 1280): the PENULTIMATE hidden states of CLIP-L (``text_encoder``) and OpenCLIP-bigG
  (``text_encoder_2``) side by side, without the final LayerNorm (``clip_skip = k`` goes k layers further back);
* ``text_embeds`` (B, 1280): bigG's pooled output, its text projection of the normed last state at EOS;
* ``time_ids``: (original size, crop top-left, target size), here (R, R, 0, 0, R, R) at the training
  resolution R: the loader centre-crops and resizes every image to R, so that is what the UNet sees.

Where the ViLex tokens go: into BOTH encoders' word-embedding spaces, at the same positions 1..m. A ViLex token is
one vector of width 768 + 1280, read as one part per encoder (``token_heads``): the pooler's output projection
splits into two heads, each normalised to its own encoder's embedding statistics (encoder.py), and TailDrop cuts
both alike because it cuts whole tokens. Why both: ``prompt_embeds`` carries both encoders' states to every
cross-attention layer, so tokens placed in one encoder alone would leave half of every key/value fixed to the
empty prompt's; and the pooled embedding, which SDXL feeds to every ResNet block through the time embedding, comes
out of ``[BOS, v, EOS]`` in bigG by itself, with no extra head.

Both tokenizers are CLIP BPE tokenizers over one vocabulary (they differ in the pad: EOS for CLIP-L, "!" for bigG),
so a prompt is tokenized once and laid out per encoder with that encoder's own pad (checked at load).

Classifier-free guidance contrasts with zeros (prompt_embeds and pooled), as diffusers does for a missing negative
prompt when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL base: true; read from model_index.json).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vilex.errors import ConfigError, UserError
from vilex.models.conditioning import SpecialTokens, TextLayout, _text_core, clip_hidden_states
from vilex.models.configs import DecoderConfig
from vilex.models.decoders import StableDiffusionDecoder
from vilex.models.registry import FROZEN_DECODERS, load_pretrained

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _zeros_for_empty_prompt(path: str) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` (SDXL's default: true) from a local folder's model_index."""
    index = Path(path).expanduser() / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    return True


@FROZEN_DECODERS.register("stable_diffusion_xl")
class StableDiffusionXLDecoder(StableDiffusionDecoder):
    """SDXL: two CLIP text encoders, pooled text and size conditioning, a VAE (see the module docstring)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, unet: nn.Module, scheduler: Any, vae: nn.Module,
                 tokenizer_2: Any, text_encoder_2: nn.Module, config: DecoderConfig | None = None,
                 zeros_for_empty_prompt: bool = True) -> None:
        super().__init__(tokenizer, text_encoder, unet, scheduler, vae=vae, config=config,
                         extra_modules={"text_encoder_2": text_encoder_2})
        self.tokenizer_2 = tokenizer_2
        self.special_2 = SpecialTokens.from_tokenizer(tokenizer_2)
        self.zeros_for_empty_prompt = zeros_for_empty_prompt
        if tokenizer.get_vocab() != tokenizer_2.get_vocab():
            raise UserError("SDXL decoder: tokenizer/ and tokenizer_2/ must share one vocabulary (a prompt is "
                            "tokenized once for both encoders)")
        if self.special_2.context_length != self.special.context_length:
            raise UserError(f"SDXL decoder: the tokenizers' contexts differ ({self.special.context_length} vs "
                            f"{self.special_2.context_length})")
        widths = [int(e.get_input_embeddings().weight.shape[0]) for e in self.text_encoders]
        if widths[0] != widths[1]:
            raise UserError(f"SDXL decoder: the text encoders' vocabularies differ ({widths[0]} vs {widths[1]})")
        self._check_added_conditioning()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, config: DecoderConfig) -> StableDiffusionXLDecoder:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        path = config.name_or_path
        tokenizer, text_encoder, unet, scheduler = cls._load_text_parts(path, SDXL_PARTS)
        text_encoder_2 = load_pretrained(CLIPTextModelWithProjection.from_pretrained, path, "decoder text encoder 2",
                                         subfolder="text_encoder_2", attn_implementation="sdpa")
        tokenizer_2 = load_pretrained(CLIPTokenizer.from_pretrained, path, "decoder tokenizer 2",
                                      subfolder="tokenizer_2")
        vae = load_pretrained(AutoencoderKL.from_pretrained, path, "decoder vae", subfolder="vae")
        return cls(tokenizer, text_encoder, unet, scheduler, vae, tokenizer_2, text_encoder_2, config=config,
                   zeros_for_empty_prompt=_zeros_for_empty_prompt(path))

    def _check_added_conditioning(self) -> None:
        """The UNet's added embedding must take 6 size ids plus bigG's projection (diffusers checks it per call)."""
        if getattr(self.unet.config, "addition_embed_type", None) != "text_time":
            raise ConfigError("SDXL decoder: the UNet has no 'text_time' added conditioning (addition_embed_type): "
                              "this is not an SDXL UNet")
        passed = 6 * int(self.unet.config.addition_time_embed_dim) + int(self.text_encoder_2.config.projection_dim)
        expected = int(self.unet.config.projection_class_embeddings_input_dim)
        if passed != expected:
            raise ConfigError(f"SDXL decoder: the UNet's added embedding takes {expected} inputs but 6 size ids and "
                              f"text_encoder_2's projection make {passed}")

    # ------------------------------------------------------------------ facts
    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    @property
    def embedding_table(self) -> torch.Tensor:
        return torch.cat([e.get_input_embeddings().weight for e in self.text_encoders], dim=1)

    @property
    def token_heads(self) -> list[int]:
        return [int(e.get_input_embeddings().weight.shape[1]) for e in self.text_encoders]

    def time_ids(self, batch: int) -> torch.Tensor:
        """(original size, crop top-left, target size) per sample: the training resolution, uncropped."""
        size = self.image_size
        return torch.tensor([[size, size, 0, 0, size, size]], dtype=self.dtype, device=self.device).expand(batch, -1)

    # ------------------------------------------------------------------ text
    def encode_text(self, vilex_tokens: torch.Tensor | None = None, num_keep: int | torch.Tensor | None = None,
                    prompt_ids: Sequence[Sequence[int]] | None = None, return_layout: bool = False
                    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], TextLayout]:
        """``{"prompt_embeds": (B, L, D1 + D2), "text_embeds": (B, P)}`` for ``[BOS, v_1..v_m, prompt, EOS, pad...]``
        in both encoders (each part of a ViLex token into its own encoder)."""
        parts: list[torch.Tensor | None] = [None, None]
        if vilex_tokens is not None:
            parts = list(vilex_tokens.split(self.token_heads, dim=-1))
        skip = self.config.clip_skip
        states = []
        pooled = layout = None
        for encoder, special, part in zip(self.text_encoders, (self.special, self.special_2), parts):
            total = len(_text_core(encoder).encoder.layers)
            if skip > total - 1:
                raise UserError(f"decoder.clip_skip={skip}: SDXL takes the output of layer {total - 1 - skip} of the "
                                f"text encoder's {total}")
            run_all = encoder is self.text_encoder_2  # the pooled output needs bigG's last layer
            hidden, layout = clip_hidden_states(encoder, special, part, num_keep, prompt_ids,
                                                num_layers=None if run_all else total - 1 - skip)
            states.append(hidden[total - 1 - skip])  # HF hidden_states[-(clip_skip + 2)]
            if run_all:
                core = _text_core(encoder)
                last = core.final_layer_norm(hidden[-1])
                eos = last[torch.arange(last.shape[0], device=last.device), layout.eos_index]
                pooled = encoder.text_projection(eos)
        cond = {"prompt_embeds": torch.cat(states, dim=-1), "text_embeds": pooled}
        return (cond, layout) if return_layout else cond

    def unconditional(self, batch: int) -> dict[str, torch.Tensor]:
        empty = self.encode_text(None, None, [[] for _ in range(batch)])
        if self.zeros_for_empty_prompt:
            return {key: torch.zeros_like(value) for key, value in empty.items()}
        return empty

    # ------------------------------------------------------------------ diffusion
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": self.time_ids(x_t.shape[0])}
        return self.unet(self.unet_input(x_t.to(dtype)), t, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                         added_cond_kwargs=added).sample.float()
