"""sd3.py — Stable Diffusion 3 / 3.5 as a frozen ViLex decoder (registered as "stable_diffusion_3").

SD3 conditions its MMDiT transformer on three text encoders (diffusers' ``StableDiffusion3Pipeline.encode_prompt``):

* ``prompt_embeds`` (B, 77 + L5, W5): the PENULTIMATE hidden states of CLIP-L (``text_encoder``) and CLIP-G
  (``text_encoder_2``) side by side, without the final LayerNorm (``clip_skip = k`` goes k layers further back),
  zero-padded to T5's width W5, followed along the sequence by T5's (``text_encoder_3``) last hidden states for
  ``[prompt, </s>, <pad>...]`` of length L5 (``decoder.t5_max_length``; 256 in diffusers, 77 in SD3's training);
  T5 runs without an attention mask, so the pads are real inputs, as they are in diffusers;
* ``pooled_projections`` (B, P1 + P2): both CLIP encoders' pooled outputs (the text projection of the normed last
  state at EOS), side by side; the transformer adds it to the timestep embedding that modulates every block.

Where the ViLex tokens go (``decoder.sd3_token_encoders``): by default into all three encoders, one pooler head per
encoder as for SDXL (sdxl.py), so a token is 768 + 1280 + 4096 wide for SD3.5 and TailDrop cuts every head alike.
In CLIP-L and CLIP-G they take positions 1..m of ``[BOS, v_1..v_m, prompt, EOS, pad...]`` and so also reach the pooled
vector; T5 has no BOS, so there they take positions 0..m-1 of ``[v_1..v_m, prompt, </s>, <pad>...]`` (no causal mask
and relative position bias: the layout is the same for any m, and every state sees every token). Measured on tiny
configs (docs/EXPERIMENTS.md, "SD3: which text encoders the ViLex tokens enter"), against a frozen decoder trained
text-to-image with SD3's per-encoder dropout: all three trained to the lowest held-out loss and reconstructed best,
both CLIPs alone came second, T5 alone last (its layout leaves the pooled vector, which modulates every block, at the
empty prompt's); the ranking held over three seeds and against a random decoder. ``[clip_l, clip_g]`` is the cheaper
choice: T5 (4.8 B parameters for SD3.5, twice the transformer) then reads only the empty prompt, whose states are
computed once and reused, saving its forward and backward pass for every image. An encoder without tokens reads the
prompt alone.

A prompt is tokenized twice, by CLIP's BPE (both CLIP tokenizers share one vocabulary, checked at load; they differ
in the pad: EOS for CLIP-L, "!" for CLIP-G) and by T5's SentencePiece; ``tokenize`` returns ``SD3PromptIds``, the
CLIP ids as a list (what the other decoders return, so counting tokens works alike) carrying the T5 ids.

Training is rectified flow as SD3 was trained (diffusers' SD3 training scripts): x_t = (1 - σ) x0 + σ ε, the
transformer predicts the velocity ε - x0, and σ is one of the scheduler's shifted sigmas (shift 3 for SD3), picked
by u * T with u drawn from ``decoder.flow_weighting``'s density (logit-normal by default; "mode"; uniform otherwise)
and the loss weighted by it where that scheme weights ("sigma_sqrt", "cosmap"). Guidance combines velocities
linearly, so CFG and Text-Free Guidance work unchanged; classifier-free guidance contrasts with the empty prompt's
conditioning, as diffusers does (SD3 has no ``force_zeros_for_empty_prompt``). Sampling uses the decoder's own
``FlowMatchEulerDiscreteScheduler``.

Resolution: the transformer patchifies latents by ``patch_size`` (2), so sizes are multiples of the VAE factor × 2
(16 for SD3), and its position table bounds them: at most ``pos_embed_max_size`` patches per side.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vilex.errors import ConfigError, UserError
from vilex.models.conditioning import (SpecialTokens, TextLayout, _as_num_keep, _text_core, build_text_layout,
                                      clip_hidden_states)
from vilex.models.configs import DecoderConfig
from vilex.models.decoders import StableDiffusionDecoder, _draw_normal
from vilex.models.registry import FROZEN_DECODERS, load_pretrained

SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
             "tokenizer_3", "scheduler")
TOKEN_ENCODERS = ("clip_l", "clip_g", "t5")  # the order of a ViLex token's parts (pooler heads)
FLOW_WEIGHTINGS = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


class SD3PromptIds(list):
    """One prompt's CLIP token ids (without BOS/EOS), with the same prompt's T5 ids (without </s>) as ``.t5``."""

    def __init__(self, clip_ids: Sequence[int], t5_ids: Sequence[int]) -> None:
        super().__init__(int(i) for i in clip_ids)
        self.t5 = [int(i) for i in t5_ids]


@FROZEN_DECODERS.register("stable_diffusion_3")
class StableDiffusion3Decoder(StableDiffusionDecoder):
    """SD3 / SD3.5: CLIP-L, CLIP-G and T5 text encoders, an MMDiT transformer trained by rectified flow, a VAE with a
    shift (see the module docstring). The transformer is held where the base class holds a UNet (``self.unet``)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, transformer: nn.Module, scheduler: Any,
                 vae: nn.Module, tokenizer_2: Any, text_encoder_2: nn.Module, tokenizer_3: Any,
                 text_encoder_3: nn.Module, config: DecoderConfig | None = None) -> None:
        config = config or DecoderConfig(type="stable_diffusion_3")
        self._check_token_encoders(config)  # before the base class enables checkpointing in those encoders
        super().__init__(tokenizer, text_encoder, transformer, scheduler, vae=vae, config=config,
                         extra_modules={"text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3})
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.special_2 = SpecialTokens.from_tokenizer(tokenizer_2)
        self.t5_pad = int(tokenizer_3.pad_token_id)
        self.t5_eos = int(tokenizer_3.eos_token_id)
        if tokenizer.get_vocab() != tokenizer_2.get_vocab():
            raise UserError("SD3 decoder: tokenizer/ and tokenizer_2/ must share one vocabulary (a prompt is "
                            "tokenized once for both CLIP encoders)")
        if self.special_2.context_length != self.special.context_length:
            raise UserError(f"SD3 decoder: the CLIP tokenizers' contexts differ ({self.special.context_length} vs "
                            f"{self.special_2.context_length})")
        if len(tokenizer_3) > int(text_encoder_3.config.vocab_size):
            raise UserError(f"SD3 decoder: tokenizer_3/ has {len(tokenizer_3)} tokens but text_encoder_3's vocabulary "
                            f"{text_encoder_3.config.vocab_size}: they must come from the same model")
        self._check_transformer_inputs()
        # The training noise levels: the scheduler's shifted sigmas and their timesteps at construction (sampling
        # calls set_timesteps on its own copy, which rewrites both).
        from diffusers import FlowMatchEulerDiscreteScheduler

        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self._train_sigmas = fresh.sigmas[:int(scheduler.config.num_train_timesteps)].float().cpu()
        self._train_timesteps = fresh.timesteps.float().cpu()
        self._empty_t5: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, config: DecoderConfig) -> StableDiffusion3Decoder:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = config.name_or_path
        cls._check_local_layout(path, SD3_PARTS)
        parts: dict[str, Any] = {}
        for suffix in ("", "_2"):  # the models first: a missing model is reported by its weights (see decoders.py)
            encoder = load_pretrained(CLIPTextModelWithProjection.from_pretrained, path,
                                      f"decoder text encoder{suffix}", subfolder=f"text_encoder{suffix}",
                                      attn_implementation="sdpa")
            tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, path, f"decoder tokenizer{suffix}",
                                        subfolder=f"tokenizer{suffix}")
            if len(tokenizer) != encoder.config.vocab_size:
                raise UserError(f"decoder {path}: tokenizer{suffix}/ has {len(tokenizer)} tokens but text_encoder"
                                f"{suffix}/'s vocabulary has {encoder.config.vocab_size}: they must come from the same "
                                f"model")
            parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
        parts["text_encoder_3"] = load_pretrained(T5EncoderModel.from_pretrained, path, "decoder text encoder 3",
                                                  subfolder="text_encoder_3")
        parts["tokenizer_3"] = load_pretrained(T5TokenizerFast.from_pretrained, path, "decoder tokenizer 3",
                                               subfolder="tokenizer_3")
        parts["transformer"] = load_pretrained(SD3Transformer2DModel.from_pretrained, path, "decoder transformer",
                                               subfolder="transformer")
        parts["scheduler"] = load_pretrained(FlowMatchEulerDiscreteScheduler.from_pretrained, path,
                                             "decoder scheduler", subfolder="scheduler")
        parts["vae"] = load_pretrained(AutoencoderKL.from_pretrained, path, "decoder vae", subfolder="vae")
        return cls(config=config, **parts)

    @staticmethod
    def _check_token_encoders(config: DecoderConfig) -> None:
        names = list(config.sd3_token_encoders)
        unknown = [n for n in names if n not in TOKEN_ENCODERS]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(f"model.decoder.sd3_token_encoders: {names} must name each of {', '.join(TOKEN_ENCODERS)}"
                              f" at most once, and at least one")

    def _check_scheduler(self) -> None:
        """Rectified flow with a fixed shift: FlowMatchEulerDiscreteScheduler's config (a resolution-dependent shift,
        Flux's, needs the image size at every set_timesteps call, which sampling does not pass)."""
        cfg = self.scheduler.config
        if "shift" not in cfg:
            raise UserError(f"SD3 decoder: scheduler/ is a {type(self.scheduler).__name__}, not a flow-matching "
                            f"scheduler (FlowMatchEulerDiscreteScheduler)")
        if cfg.get("use_dynamic_shifting"):
            raise UserError("SD3 decoder: the scheduler shifts its sigmas by resolution (use_dynamic_shifting, as "
                            "Flux does): only a fixed shift is supported")
        if self.config.snr_gamma is not None:
            raise ConfigError("model.decoder.snr_gamma: min-SNR weighting is for ε/v-prediction; a flow-matching "
                              "decoder weights by model.decoder.flow_weighting")
        if self.config.flow_weighting not in FLOW_WEIGHTINGS:
            raise ConfigError(f"model.decoder.flow_weighting: '{self.config.flow_weighting}' is not one of "
                              f"{', '.join(FLOW_WEIGHTINGS)}")

    def _check_transformer_inputs(self) -> None:
        """The transformer must read T5's width and both CLIP projections (diffusers only fails deep in a call)."""
        cfg = self.unet.config
        t5_width = int(self.text_encoder_3.config.d_model)
        if int(cfg.joint_attention_dim) != t5_width:
            raise ConfigError(f"SD3 decoder: the transformer attends to text of width {cfg.joint_attention_dim} but "
                              f"text_encoder_3 (T5) is {t5_width} wide")
        pooled = sum(int(e.config.projection_dim) for e in (self.text_encoder, self.text_encoder_2))
        if int(cfg.pooled_projection_dim) != pooled:
            raise ConfigError(f"SD3 decoder: the transformer takes a pooled text vector of {cfg.pooled_projection_dim}"
                              f" but the two CLIP projections make {pooled}")

    # ------------------------------------------------------------------ facts
    @property
    def token_encoder_names(self) -> list[str]:
        """The encoders the ViLex tokens enter, in the order of a token's parts."""
        return [n for n in TOKEN_ENCODERS if n in self.config.sd3_token_encoders]

    def _encoder(self, name: str) -> nn.Module:
        return {"clip_l": self.text_encoder, "clip_g": self.text_encoder_2, "t5": self.text_encoder_3}[name]

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self._encoder(n) for n in self.token_encoder_names]

    @property
    def embedding_table(self) -> torch.Tensor:
        """The token encoders' embedding matrices side by side. CLIP's share a vocabulary; T5's differs, so with T5
        among them each matrix is stood in for by the two rows mean ± std/√2 per dimension: the same per-dimension
        mean and (unbiased) std, which is all the pooler reads (``set_embedding_statistics``)."""
        tables = [e.get_input_embeddings().weight for e in self.text_encoders]
        if len({t.shape[0] for t in tables}) == 1:
            return torch.cat(tables, dim=1)
        rows = []
        for table in tables:
            mean, spread = table.float().mean(0), table.float().std(0) / math.sqrt(2)
            rows.append(torch.stack([mean + spread, mean - spread]))
        return torch.cat(rows, dim=1)

    @property
    def token_heads(self) -> list[int]:
        return [int(e.get_input_embeddings().weight.shape[1]) for e in self.text_encoders]

    @property
    def t5_length(self) -> int:
        return int(self.config.t5_max_length)

    @property
    def context_length(self) -> int:
        """Positions per token encoder, stated as a CLIP-like context: at most ``context_length - 2`` ViLex tokens fit
        (CLIP: 77 - BOS - EOS = 75; T5: L5 - </s>, so T5 counts as L5 + 1)."""
        return min(self.special.context_length if n != "t5" else self.t5_length + 1 for n in self.token_encoder_names)

    @property
    def prediction_type(self) -> str:
        return "flow"  # the velocity ε - x0

    @property
    def patch_size(self) -> int:
        return int(self.unet.config.patch_size)

    @property
    def resolution_multiple(self) -> int:
        return self.model_space_factor * self.patch_size

    def _resolution_factors(self) -> str:
        return (f"this decoder's {self.model_space_factor}x VAE x its transformer's {self.patch_size}x{self.patch_size} "
                f"patches")

    def _check_resolution(self) -> None:
        super()._check_resolution()
        largest = int(self.unet.config.pos_embed_max_size) * self.patch_size * self.model_space_factor
        if self.image_size > largest:
            raise ConfigError(f"model.decoder.resolution: {self.image_size} is larger than this transformer's position "
                              f"table covers ({self.unet.config.pos_embed_max_size} patches of "
                              f"{self.patch_size * self.model_space_factor} px: {largest})")

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str]) -> list[SD3PromptIds]:
        """Each prompt's CLIP ids (without BOS/EOS) carrying its T5 ids (without </s>); too long fails in
        ``encode_text``."""
        return [SD3PromptIds(self.tokenizer(p, add_special_tokens=False, verbose=False).input_ids,
                             self.tokenizer_3(p, add_special_tokens=False, verbose=False).input_ids) for p in prompts]

    @staticmethod
    def _split_prompts(prompt_ids: Sequence[Sequence[int]] | None, batch: int
                       ) -> tuple[list[list[int]], list[list[int]]]:
        if prompt_ids is None:
            return [[] for _ in range(batch)], [[] for _ in range(batch)]
        prompts = list(prompt_ids)
        if len(prompts) == 1 and batch > 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {batch}")
        clip, t5 = [], []
        for p in prompts:
            if not hasattr(p, "t5") and len(p):
                raise ValueError("SD3 prompts carry CLIP and T5 ids: make them with decoder.tokenize")
            clip.append(list(p))
            t5.append(list(getattr(p, "t5", [])))
        return clip, t5

    def _t5_layout(self, keep: list[int], prompts: list[list[int]], device: torch.device) -> TextLayout:
        """``[v_1..v_m, prompt, </s>, <pad>...]`` of length L5 per sample (T5 has no BOS)."""
        t5 = SpecialTokens(bos=None, eos=self.t5_eos, pad=self.t5_pad, context_length=self.t5_length,
                           name="T5 (model.decoder.t5_max_length)")
        return build_text_layout(t5, torch.tensor(keep), prompts, batch_size=len(keep), num_available=self.t5_length,
                                 device=device)

    def _t5_states(self, part: torch.Tensor | None, keep: list[int], prompts: list[list[int]]
                   ) -> tuple[torch.Tensor, TextLayout]:
        """T5's last hidden states (B, L5, W5) for the layout; the tokens-free empty prompt's are computed once."""
        encoder = self.text_encoder_3
        table = encoder.get_input_embeddings()
        device = table.weight.device
        if part is None and not any(prompts):
            layout = self._t5_layout([0] * len(prompts), prompts, device)
            key = (device, table.weight.dtype, self.t5_length)
            if self._empty_t5 is None or self._empty_t5[0] != key:
                with torch.no_grad():
                    self._empty_t5 = (key, encoder(inputs_embeds=table(layout.input_ids[:1])).last_hidden_state)
            return self._empty_t5[1].expand(len(prompts), -1, -1), layout
        layout = self._t5_layout(keep if part is not None else [0] * len(prompts), prompts, device)
        embeds = table(layout.input_ids)
        if part is not None and part.shape[1] > 0:
            placed = torch.zeros_like(embeds)
            placed[:, :part.shape[1]] = part.to(device=device, dtype=embeds.dtype)
            embeds = torch.where(layout.vilex_mask.unsqueeze(-1), placed, embeds)
        return encoder(inputs_embeds=embeds).last_hidden_state, layout

    def encode_text(self, vilex_tokens: torch.Tensor | None = None, num_keep: int | torch.Tensor | None = None,
                    prompt_ids: Sequence[Sequence[int]] | None = None, return_layout: bool = False
                    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], TextLayout]:
        """``{"prompt_embeds": (B, 77 + L5, W5), "pooled_projections": (B, P1 + P2)}``; each part of a ViLex token goes
        into its own encoder (``sd3_token_encoders``), the prompt into all three. The layout returned is the first
        token encoder's."""
        return self._encode(vilex_tokens, num_keep, prompt_ids, self.config.clip_skip, return_layout)

    def _encode(self, vilex_tokens: torch.Tensor | None, num_keep: int | torch.Tensor | None,
                prompt_ids: Sequence[Sequence[int]] | None, clip_skip: int, return_layout: bool = False) -> Any:
        names = self.token_encoder_names
        if vilex_tokens is not None:
            batch = vilex_tokens.shape[0]
            parts = dict(zip(names, vilex_tokens.split(self.token_heads, dim=-1)))
            keep = _as_num_keep(num_keep, batch, vilex_tokens.shape[1])
        else:
            batch = (len(prompt_ids) if prompt_ids is not None
                     else (num_keep.numel() if isinstance(num_keep, torch.Tensor) else 1))
            parts, keep = {}, [0] * batch
        clip_prompts, t5_prompts = self._split_prompts(prompt_ids, batch)
        layouts: dict[str, TextLayout] = {}
        states, pooled = [], []
        for name, special in (("clip_l", self.special), ("clip_g", self.special_2)):
            encoder = self._encoder(name)
            total = len(_text_core(encoder).encoder.layers)
            if clip_skip > total - 1:
                raise UserError(f"decoder.clip_skip={clip_skip}: SD3 takes the output of layer {total - 1 - clip_skip} "
                                f"of the text encoder's {total}")
            part = parts.get(name)
            hidden, layouts[name] = clip_hidden_states(encoder, special, part,
                                                       torch.tensor(keep) if part is not None else None, clip_prompts)
            states.append(hidden[total - 1 - clip_skip])  # HF hidden_states[-(clip_skip + 2)]
            last = _text_core(encoder).final_layer_norm(hidden[-1])
            eos = last[torch.arange(batch, device=last.device), layouts[name].eos_index]
            pooled.append(encoder.text_projection(eos))
        t5, layouts["t5"] = self._t5_states(parts.get("t5"), keep, t5_prompts)
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # as diffusers pads CLIP's states to T5's width
        cond = {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}
        return (cond, layouts[names[0]]) if return_layout else cond

    def unconditional(self, batch: int) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning, as diffusers' negative prompt (taken without clip skip, as there)."""
        return self._encode(None, None, [[] for _ in range(batch)], clip_skip=0)

    def sampling_scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)

    # ------------------------------------------------------------------ diffusion
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity for x_t at timesteps t (σ × num_train_timesteps); fp32."""
        dtype = self.dtype
        t = torch.as_tensor(t, device=x_t.device)
        return self.unet(hidden_states=x_t.to(dtype), timestep=t.expand(x_t.shape[0]) if t.ndim == 0 else t,
                         encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                         pooled_projections=cond["pooled_projections"].to(dtype)).sample.float()

    def draw_noise_levels(self, batch: int, generator: torch.Generator | None, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, timestep) per sample: u from the weighting scheme's density, σ = the shifted sigma at index u * T; a
        ``high_noise_fraction`` share (the first samples) instead uniformly among the T - high_noise_min_t noisiest."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        cfg = self.config
        total = len(self._train_sigmas)
        gen_device = generator.device if generator is not None else device
        u = compute_density_for_timestep_sampling(cfg.flow_weighting, batch, logit_mean=cfg.flow_logit_mean,
                                                  logit_std=cfg.flow_logit_std, mode_scale=cfg.flow_mode_scale,
                                                  device=gen_device, generator=generator)
        index = (u * total).long().clamp(0, total - 1).cpu()
        k = round(batch * cfg.high_noise_fraction)
        if k:
            if not 0 <= cfg.high_noise_min_t < total:
                raise ConfigError(f"high_noise_min_t={cfg.high_noise_min_t} is outside [0, {total})")
            # sigmas fall with the index: the noisiest T - min_t levels come first
            index[:k] = torch.randint(0, total - cfg.high_noise_min_t, (k,), generator=generator,
                                      device=gen_device).cpu()
        return self._train_sigmas[index].to(device), self._train_timesteps[index].to(device)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.config.flow_weighting, sigmas).float()

    def diffusion_loss(self, x0: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """Per-sample (B,) flow-matching loss of the frozen transformer: one noise level and noise per sample."""
        x0 = x0.float()
        noise = _draw_normal(tuple(x0.shape), generator, x0.device)
        sigmas, timesteps = self.draw_noise_levels(x0.shape[0], generator, x0.device)
        s = sigmas.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - s) * x0 + s * noise
        pred = self.predict(x_t, timesteps, cond)
        mse = (pred - self.target(x0, noise, timesteps)).pow(2).flatten(1).mean(1)
        return mse * self.loss_weights(sigmas)
