"""decoders.py — frozen text-to-image decoders behind one interface, registered by type name.

``FrozenDecoder`` holds a diffusers-layout model (tokenizer, CLIP text encoder, UNet, its own noise
scheduler, optional VAE) and offers what Stage 1 needs:

* ``encode_text(vilex_tokens, num_keep, prompt_ids)`` -> UNet conditioning, through the ONE conditioning
  function (conditioning.py);
* ``to_model_space(images in [-1,1]) -> x0`` (VAE latents * scaling factor, or identity in pixel space) and
  ``from_model_space``; latent caching (training) calls ``to_model_space`` on its own, so
* ``diffusion_loss(x0, cond, generator)`` takes x0 directly: one random timestep per sample, the target of
  the scheduler's ``prediction_type`` ("epsilon" | "v_prediction" | "sample"), optional min-SNR weighting;
* ``predict(x_t, t, cond)`` (fp32 out, whatever dtype the decoder is held in).

Frozen means: every parameter has requires_grad=False and the module stays in eval() even when a parent
calls ``.train()``; gradients still flow THROUGH the text encoder and UNet into the ViLex tokens. It may be
held in bf16 (inputs are cast to its dtype, outputs back to fp32).

Gradient checkpointing is non-reentrant everywhere (reentrant checkpointing drops the gradient of a
grad-carrying input when all the weights are frozen). One subtlety: transformers' layers only checkpoint
when ``self.training`` is True, and a frozen text encoder is in eval() — so the flag is set on the
checkpointed layers alone (their attention/MLP submodules stay in eval, so nothing else changes).

Registered types: "stable_diffusion" (SD1.x/2.x folders: unet/, vae/, text_encoder/, tokenizer/,
scheduler/) and "pixel_unet" (the same without vae/: a pixel-space UNet, Imagen/DeepFloyd-IF style).
Both use a CLIP text encoder, which is what those layouts ship. The base class calls the UNet plainly
with x_t (a UNet must take exactly the channels it predicts); only "pixel_unet" may take extra (x, y)
coordinate input channels (CoordConv, coordinates.py), which it appends itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vilex.errors import ConfigError, UserError
from vilex.models.conditioning import SpecialTokens, TextLayout, build_text_conditioning
from vilex.models.configs import DecoderConfig
from vilex.models.coordinates import coordinate_channels, with_coordinates
from vilex.models.registry import FROZEN_DECODERS, load_pretrained
from vilex.models.timesteps import draw_timesteps

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normals drawn on the generator's device (reproducible), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


class FrozenDecoder(nn.Module):
    """A frozen T2I diffusion model used as the decoder of the ViLex autoencoder."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, unet: nn.Module, scheduler: Any,
                 vae: nn.Module | None = None, config: DecoderConfig | None = None,
                 extra_modules: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        for name, module in (extra_modules or {}).items():  # a subclass's further frozen parts (SDXL: text_encoder_2)
            setattr(self, name, module)
        self.config = config or DecoderConfig()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.extra_input_channels = self._extra_input_channels(unet)  # a bad layout fails here, not mid-training
        self._check_resolution()
        self._check_scheduler()
        max_pos = text_encoder.config.max_position_embeddings
        if self.special.context_length > max_pos:
            raise UserError(f"decoder tokenizer context ({self.special.context_length}) exceeds the text encoder's "
                            f"{max_pos} positions")
        self.requires_grad_(False)
        self.to(_DTYPES[self.config.dtype])
        if self.config.channels_last:
            unet.to(memory_format=torch.channels_last)
        self._checkpointing = bool(self.config.gradient_checkpointing)
        if self._checkpointing:
            for encoder in self.text_encoders:
                encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            unet.enable_gradient_checkpointing()  # diffusers: use_reentrant=False
        self.train(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, config: DecoderConfig) -> FrozenDecoder:
        raise NotImplementedError

    @staticmethod
    def _check_local_layout(path: str, subfolders: Sequence[str]) -> None:
        """A local folder must hold every component subfolder (the libraries would silently build a default
        tokenizer from an empty one)."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return  # a hub id (or a missing path: load_pretrained reports it)
        missing = [name + "/" for name in subfolders if not (folder / name).is_dir()]
        if missing:
            raise UserError(f"decoder: {folder} is not a diffusers pipeline folder: missing {', '.join(missing)}")

    @classmethod
    def _load_text_parts(cls, path: str, subfolders: Sequence[str] = ("unet", "text_encoder", "tokenizer",
                                                                       "scheduler")) -> tuple[Any, Any, Any, Any]:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        cls._check_local_layout(path, subfolders)
        # The text encoder first: transformers builds a default tokenizer when no tokenizer files exist, so
        # a missing model is reported by the weights, and the tokenizer is checked against them below.
        text_encoder = load_pretrained(CLIPTextModel.from_pretrained, path, "decoder text encoder",
                                       subfolder="text_encoder", attn_implementation="sdpa")
        tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, path, "decoder tokenizer", subfolder="tokenizer")
        if len(tokenizer) != text_encoder.config.vocab_size:
            raise UserError(f"decoder {path}: the tokenizer has {len(tokenizer)} tokens but the text encoder's "
                            f"vocabulary has {text_encoder.config.vocab_size}: tokenizer/ and text_encoder/ must "
                            f"come from the same model")
        unet = load_pretrained(UNet2DConditionModel.from_pretrained, path, "decoder unet", subfolder="unet")
        # The decoder's own training noise schedule (any diffusers scheduler config loads into DDPM).
        scheduler = load_pretrained(DDPMScheduler.from_pretrained, path, "decoder scheduler", subfolder="scheduler")
        return tokenizer, text_encoder, unet, scheduler

    # ------------------------------------------------------------------ the UNet's inputs
    @staticmethod
    def _extra_input_channels(unet: Any) -> int:
        """Input channels the UNet takes beyond x_t: none (it reads exactly the channels it predicts)."""
        if int(unet.config.in_channels) != int(unet.config.out_channels):
            raise ConfigError(f"the decoder UNet takes {unet.config.in_channels} input channels and predicts "
                              f"{unet.config.out_channels}: this decoder type feeds it x_t alone, so the two must "
                              f"be equal")
        return 0

    def unet_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """What the UNet reads for noisy x_t: x_t itself."""
        return x_t

    def _check_scheduler(self) -> None:
        """The training objective must be one this class implements (a flow-matching decoder overrides this)."""
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"decoder scheduler prediction_type '{self.prediction_type}' is not one of "
                            f"{', '.join(PREDICTION_TYPES)}")

    # ------------------------------------------------------------------ frozen: always eval
    def train(self, mode: bool = True) -> FrozenDecoder:
        super().train(False)
        if self._checkpointing:
            from transformers.modeling_layers import GradientCheckpointingLayer

            for module in (m for encoder in self.text_encoders for m in encoder.modules()):
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True  # only the checkpoint switch; dropout etc. live in eval submodules
        return self

    # ------------------------------------------------------------------ facts
    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def text_encoders(self) -> list[nn.Module]:
        """Every frozen text encoder the ViLex tokens enter (one here; SDXL has two)."""
        return [self.text_encoder]

    @property
    def embedding_table(self) -> torch.Tensor:
        """The frozen token-embedding matrix (V, D) the ViLex tokens live in: the text encoder's (with several
        encoders, theirs side by side: (V, D_1 + D_2 + ...), see ``token_heads``)."""
        return self.text_encoder.get_input_embeddings().weight

    @property
    def token_heads(self) -> list[int]:
        """The widths of the parts of a ViLex token, one per text encoder (they sum to ``embed_width``); the pooler
        normalises each part to its own encoder's embedding statistics."""
        return [self.embed_width]

    @property
    def embed_width(self) -> int:
        return int(self.embedding_table.shape[1])

    @property
    def context_length(self) -> int:
        return self.special.context_length

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def model_space_factor(self) -> int:
        """Pixels per model-space position along a side (the VAE's downsampling; 1 in pixel space)."""
        return 1

    @property
    def native_image_size(self) -> int:
        """The resolution the decoder was trained at: its UNet's sample_size in pixels."""
        return int(self.unet.config.sample_size) * self.model_space_factor

    @property
    def image_size(self) -> int:
        """Resolution (pixels) of the images the decoder generates / is trained on: ``resolution`` when the config
        sets one, else its own."""
        return int(self.config.resolution or self.native_image_size)

    @property
    def resolution_multiple(self) -> int:
        """What every resolution must be a multiple of: the model-space factor × the UNet's downsampling."""
        return self.model_space_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def _resolution_factors(self) -> str:
        """What makes up ``resolution_multiple``, in words (for the error)."""
        return (f"this decoder's {self.model_space_factor}x model-space factor x its UNet's "
                f"{self.resolution_multiple // self.model_space_factor}x downsampling")

    def _check_resolution(self) -> None:
        size, multiple = self.config.resolution, self.resolution_multiple
        if size is not None and size % multiple:
            lower = max(multiple, size // multiple * multiple)
            raise ConfigError(f"model.decoder.resolution: {size} is not a multiple of {multiple} "
                              f"({self._resolution_factors()}); e.g. {lower} or {lower + multiple}")

    @property
    def model_space_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x0 (latents or pixels): what the UNet predicts (a pixel_unet's inputs may carry
        extra coordinate channels)."""
        size = self.image_size // self.model_space_factor
        return (int(self.unet.config.out_channels), size, size)

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt token ids WITHOUT BOS/EOS (the conditioning function adds them; a too-long prompt fails there)."""
        return [list(self.tokenizer(p, add_special_tokens=False, verbose=False).input_ids) for p in prompts]

    def encode_text(self, vilex_tokens: torch.Tensor | None = None, num_keep: int | torch.Tensor | None = None,
                    prompt_ids: Sequence[Sequence[int]] | None = None, return_layout: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, TextLayout]:
        """UNet conditioning (B, L, W) for ``[BOS, v_1..v_m, prompt, EOS, pad...]`` (see conditioning.py)."""
        return build_text_conditioning(self.text_encoder, self.special, vilex_tokens, num_keep, prompt_ids,
                                       clip_skip=self.config.clip_skip, return_layout=return_layout)

    def unconditional(self, batch: int) -> Any:
        """The conditioning classifier-free guidance contrasts with: the empty prompt's."""
        return self.encode_text(None, None, [[] for _ in range(batch)])

    @staticmethod
    def concat_conditions(conds: Sequence[Any]) -> Any:
        """Several conditionings as one batch (guidance runs every branch in one UNet call): tensors, or dicts of
        tensors (decoders conditioned on more than the hidden states, e.g. SDXL's pooled text embedding)."""
        if isinstance(conds[0], dict):
            return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
        return torch.cat(list(conds))

    def sampling_scheduler(self) -> Any:
        """The scheduler inference samples with: DDIM from the decoder's own noise-schedule config."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler.config)

    @property
    def has_vae(self) -> bool:
        """True for latent diffusion (x0 = VAE latents; worth caching), False in pixel space."""
        return self.vae is not None

    # ------------------------------------------------------------------ model space
    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] -> x0 (float32)."""
        raise NotImplementedError

    def from_model_space(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 -> images (B,3,H,W), float32, roughly in [-1,1] (not clamped)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ diffusion
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (of the scheduler's prediction_type) for noisy x_t at timesteps t; fp32."""
        dtype = self.dtype
        return self.unet(self.unet_input(x_t.to(dtype)), t, encoder_hidden_states=cond.to(dtype)).sample.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict, per the scheduler's prediction_type."""
        return diffusion_target(self.scheduler, x0, noise, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights: 1, or min-SNR-gamma (Hang et al. 2023) expressed for the prediction type."""
        gamma = self.config.snr_gamma
        if gamma is None:
            return torch.ones(t.shape, device=t.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def diffusion_loss(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """Per-sample (B,) denoising loss of the frozen model: one random timestep and noise per sample."""
        x0 = x0.float()
        batch = x0.shape[0]
        noise = _draw_normal(tuple(x0.shape), generator, x0.device)
        t = draw_timesteps(batch, self.scheduler.config.num_train_timesteps, generator,
                           self.config.high_noise_fraction, self.config.high_noise_min_t, device=x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        pred = self.predict(x_t, t, cond)
        mse = (pred - self.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        return mse * self.loss_weights(t)


def diffusion_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a diffusers scheduler's model learns to predict for noisy ``x0`` at ``t``: its ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


@FROZEN_DECODERS.register("stable_diffusion")
class StableDiffusionDecoder(FrozenDecoder):
    """Latent diffusion (SD1.x / SD2.x): x0 = VAE latents * scaling_factor."""

    @classmethod
    def from_config(cls, config: DecoderConfig) -> StableDiffusionDecoder:
        from diffusers import AutoencoderKL

        tokenizer, text_encoder, unet, scheduler = cls._load_text_parts(
            config.name_or_path, ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
        vae = load_pretrained(AutoencoderKL.from_pretrained, config.name_or_path, "decoder vae", subfolder="vae")
        return cls(tokenizer, text_encoder, unet, scheduler, vae=vae, config=config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def model_space_factor(self) -> int:
        return self.vae_scale_factor

    def _shift_scale(self) -> tuple[float, float]:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return float(shift), float(self.vae.config.scaling_factor)

    @torch.no_grad()  # encoding data never needs gradients (and the VAE is frozen)
    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of images in [-1,1]: (mean, std), float32, unscaled (what a latent cache stores)."""
        dist = self.vae.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def model_space_from_posterior(self, mean: torch.Tensor, std: torch.Tensor,
                                   generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 = (a posterior sample - shift) * scaling_factor; the noise is drawn from ``generator``."""
        shift, scale = self._shift_scale()
        latents = mean.float() + std.float() * _draw_normal(tuple(mean.shape), generator, mean.device)
        return (latents - shift) * scale

    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE posterior sample * scaling factor (equal to ``model_space_from_posterior(*encode_posterior(...))``
        for the same generator state)."""
        return self.model_space_from_posterior(*self.encode_posterior(images), generator)

    def from_model_space(self, x0: torch.Tensor) -> torch.Tensor:
        shift, scale = self._shift_scale()
        return self.vae.decode((x0 / scale + shift).to(self.dtype)).sample.float()


@FROZEN_DECODERS.register("pixel_unet")
class PixelUNetDecoder(FrozenDecoder):
    """Pixel-space diffusion (no VAE): x0 = the image in [-1, 1]. Its UNet may take 2 extra (x, y)
    coordinate input channels (``in_channels = out_channels + 2``, CoordConv), appended to x_t here."""

    @staticmethod
    def _extra_input_channels(unet: Any) -> int:
        return coordinate_channels(unet)  # 0, or 2 for (x, y) coordinates; any other layout is refused

    def unet_input(self, x_t: torch.Tensor) -> torch.Tensor:
        return with_coordinates(x_t, self.extra_input_channels)

    @classmethod
    def from_config(cls, config: DecoderConfig) -> PixelUNetDecoder:
        tokenizer, text_encoder, unet, scheduler = cls._load_text_parts(config.name_or_path)
        return cls(tokenizer, text_encoder, unet, scheduler, vae=None, config=config)

    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images.float()

    def from_model_space(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.float()


def build_frozen_decoder(config: DecoderConfig) -> FrozenDecoder:
    """The decoder named by ``config.type``, loaded from ``config.name_or_path`` (hub id or local folder)."""
    return FROZEN_DECODERS.get(config.type).from_config(config)


# decoders defined in their own files register themselves on import (they subclass the ones above)
from vilex.models import sdxl as _sdxl  # noqa: E402,F401  (registers "stable_diffusion_xl")
from vilex.models import sd3 as _sd3  # noqa: E402,F401  (registers "stable_diffusion_3")
