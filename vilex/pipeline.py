"""pipeline.py — ViLex inference: encode images to tokens, decode tokens to images, reconstruct, compose.

A plain class with diffusers' conventions (``from_pretrained`` / ``save_pretrained``, ``generator=`` for
reproducibility, ``progress_bar``, a swappable ``scheduler`` object). It does not subclass
``DiffusionPipeline``: our checkpoint is not a ``model_index.json`` folder — it stores only the trained
encoder plus a REFERENCE to the frozen decoder (see vilex/models/vilex_model.py for the layout).

Guidance:
* ``decode`` / ``reconstruct``: classifier-free guidance against the EMPTY prompt,
  ``pred = pred(∅) + g · (pred(v) − pred(∅))`` (g = 1: no guidance, one UNet pass per step).
* ``compose`` — Text-Free Guidance (ViLex paper):
  ``pred = pred(v) + w · (pred([v, c]) − pred(v))`` where ``[v, c]`` = the ViLex tokens then the prompt's
  tokens inside one ``[BOS … EOS]``. With ``guidance_scale`` g != 1, CFG against the empty prompt is applied
  on top: ``pred(∅) + g · (pred_tfg − pred(∅))``.
The combinations are linear in the UNet output, so they hold for ε-, v- and x0-prediction alike.
Sampling uses the decoder's ``sampling_scheduler()`` (DDIM from its own noise-schedule config for the SD family;
replace ``pipe.scheduler`` to change it).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vilex.checkpoint import CheckpointManager, atomic_dir, folder_problem, verify_folder
from vilex.errors import UserError
from vilex.models.configs import ViLexConfig
from vilex.models.decoders import FrozenDecoder, build_frozen_decoder
from vilex.models.encoder import ViLexEncoder
from vilex.models.vilex_model import CONFIG_FILE, read_vilex_config, write_checkpoint

log = logging.getLogger(__name__)

ImagesIn = Sequence[Image.Image] | torch.Tensor
PIPELINE_SUBFOLDER = "pipeline"  # the ViLex checkpoint inside each `vilex pretrain` checkpoint-<step> folder
RUN_CHECKPOINTS = "checkpoints"  # the checkpoint-<step> folders of a `vilex pretrain` run


def resolve_vilex_checkpoint(path: str | Path) -> Path:
    """The ViLex checkpoint folder (``vilex_config.json``, ``vit/``, ``pooler/``) that ``path`` names: that folder
    itself, a `vilex pretrain` ``checkpoint-<step>`` folder (its ``pipeline/``), or a run folder (or its
    ``checkpoints/``): the ``pipeline/`` of its latest checkpoint. Anything else is a one-line UserError saying what
    was expected. Every command and tower that takes a stage-1 checkpoint goes through this function."""
    given = Path(path).expanduser()
    if (given / CONFIG_FILE).is_file():
        verify_folder(given, "ViLex checkpoint")  # a truncated or changed file is named before anything loads
        return given
    if (given / PIPELINE_SUBFOLDER / CONFIG_FILE).is_file():
        verify_folder(given / PIPELINE_SUBFOLDER, "ViLex checkpoint")
        return given / PIPELINE_SUBFOLDER

    def pipeline_problem(checkpoint: Path) -> str | None:  # only what is loaded: not the optimizer state
        return folder_problem(checkpoint / PIPELINE_SUBFOLDER) if (checkpoint / PIPELINE_SUBFOLDER).is_dir() else None

    for root in (given / RUN_CHECKPOINTS, given):
        latest = CheckpointManager(root, keep_last=None).latest_verified(pipeline_problem)
        if latest is None:
            continue
        if not (latest / PIPELINE_SUBFOLDER / CONFIG_FILE).is_file():
            raise UserError(f"{given}: its latest checkpoint {latest.name} has no {PIPELINE_SUBFOLDER}/{CONFIG_FILE} "
                            "(a ViLex checkpoint is made by `vilex pretrain`)")
        log.info("ViLex checkpoint %s: the latest, %s", given, latest / PIPELINE_SUBFOLDER)
        return latest / PIPELINE_SUBFOLDER
    if not given.exists():
        raise UserError(f"ViLex checkpoint not found: {given}")
    raise UserError(f"{given} is not a ViLex checkpoint: expected a folder with {CONFIG_FILE} (vit/, pooler/), a "
                    f"`vilex pretrain` checkpoint-<step> folder (with {PIPELINE_SUBFOLDER}/), or a run folder (with "
                    f"{RUN_CHECKPOINTS}/checkpoint-<step>/)")


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if generator is not None:
        return generator
    return torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) float in [0,1] -> PIL images."""
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


class ViLexPipeline:
    """Images <-> ViLex tokens through a trained encoder and its frozen decoder."""

    def __init__(self, encoder: ViLexEncoder, decoder: FrozenDecoder, config: ViLexConfig,
                 scheduler: Any | None = None) -> None:
        self.encoder = encoder.eval()
        self.decoder = decoder
        self.config = config
        self.scheduler = scheduler or decoder.sampling_scheduler()
        self._progress_kwargs: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | Path, decoder: FrozenDecoder | None = None,
                        decoder_name_or_path: str | None = None, device: str | torch.device | None = None
                        ) -> ViLexPipeline:
        """Load ``<path>/{vit,pooler,vilex_config.json}`` (``path`` may also be a `vilex pretrain` checkpoint-<step>
        or run folder: ``resolve_vilex_checkpoint``); the decoder from the config's reference, from
        ``decoder_name_or_path`` (e.g. it moved), or an already loaded ``decoder``."""
        path = resolve_vilex_checkpoint(path)
        config = read_vilex_config(path)
        if decoder_name_or_path is not None:
            config.decoder.name_or_path = str(decoder_name_or_path)
        if decoder is None:
            decoder = build_frozen_decoder(config.decoder)
        encoder = ViLexEncoder.from_saved(path, config.vit)
        if encoder.token_width != decoder.embed_width:
            raise UserError(f"{path}: encoder tokens have width {encoder.token_width} but the decoder "
                            f"{config.decoder.name_or_path} embeds words at width {decoder.embed_width}")
        pipe = cls(encoder, decoder, config)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, path: str | Path) -> Path:
        """Atomically write the checkpoint folder (same layout as ``ViLexModel.save_pretrained``)."""
        with atomic_dir(path) as tmp:
            write_checkpoint(tmp, self.encoder, self.config)
        return Path(path)

    def to(self, device: str | torch.device) -> ViLexPipeline:
        self.encoder.to(device)
        self.decoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def num_tokens(self) -> int:
        """n: how many ViLex tokens the encoder produces."""
        return self.encoder.num_tokens

    # ------------------------------------------------------------------ progress bar (diffusers-style)
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress_kwargs = kwargs

    def progress_bar(self, iterable: Iterable) -> Iterable:
        from tqdm.auto import tqdm

        kwargs = {"disable": os.environ.get("DISABLE_TQDM", "0") == "1", "leave": False, **self._progress_kwargs}
        return tqdm(iterable, **kwargs)

    # ------------------------------------------------------------------ encode
    def _check_num_tokens(self, num_tokens: int | None, available: int) -> int:
        if num_tokens is None:
            return available
        if not 1 <= num_tokens <= available:
            raise UserError(f"num_tokens={num_tokens} is out of range: this encoder makes {available} ViLex tokens, "
                            f"so 1..{available} fit")
        return int(num_tokens)

    @torch.no_grad()
    def encode(self, images: ImagesIn, num_tokens: int | None = None) -> torch.Tensor:
        """Images (PIL list, or (B,3,H,W) float in [0,1]) -> ViLex tokens (B, num_tokens, D), float32."""
        m = self._check_num_tokens(num_tokens, self.num_tokens)
        pixels = self.encoder.preprocess(images).to(self.device)
        return self.encoder(pixels)[:, :m]

    # ------------------------------------------------------------------ guidance and sampling
    @staticmethod
    def guided_prediction(pred_vilex: torch.Tensor, pred_vilex_text: torch.Tensor | None = None,
                          pred_empty: torch.Tensor | None = None, tfg_scale: float = 1.0,
                          guidance_scale: float = 1.0) -> torch.Tensor:
        """TFG then (optionally) CFG: ``pv + w(pvc − pv)``, then ``pe + g(· − pe)`` when ``pred_empty`` is given."""
        pred = pred_vilex if pred_vilex_text is None else pred_vilex + tfg_scale * (pred_vilex_text - pred_vilex)
        if pred_empty is not None:
            pred = pred_empty + guidance_scale * (pred - pred_empty)
        return pred

    def predict_guided(self, x_t: torch.Tensor, t: torch.Tensor | int, cond_vilex: torch.Tensor,
                       cond_vilex_text: torch.Tensor | None = None, cond_empty: torch.Tensor | None = None,
                       tfg_scale: float = 1.0, guidance_scale: float = 1.0) -> torch.Tensor:
        """One guided UNet prediction; all branches run as one batch through the UNet."""
        conds = [c for c in (cond_vilex, cond_vilex_text, cond_empty) if c is not None]
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = (t.expand(batch) if t.ndim == 0 else t).repeat(len(conds))
        preds = self.decoder.predict(torch.cat([x_t] * len(conds)), t,
                                     self.decoder.concat_conditions(conds)).chunk(len(conds))
        it = iter(preds)
        pv = next(it)
        pvc = next(it) if cond_vilex_text is not None else None
        pe = next(it) if cond_empty is not None else None
        return self.guided_prediction(pv, pvc, pe, tfg_scale, guidance_scale)

    def _sample(self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int,
                num_inference_steps: int, generator: torch.Generator | None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        # flow-matching schedulers have no input scaling and start from unit noise
        x = randn_tensor((batch, *self.decoder.model_space_shape), generator=generator, device=self.device,
                         dtype=torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in self.progress_bar(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(predict(x_in, t), t, x, generator=generator).prev_sample
        images = self.decoder.from_model_space(x)
        return ((images.clamp(-1, 1) + 1) / 2).float()

    def _empty_cond(self, batch: int) -> Any:
        return self.decoder.unconditional(batch)

    @staticmethod
    def _output(images: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor:
        if output_type == "pil":
            return to_pil(images)
        if output_type == "pt":
            return images
        raise UserError(f"output_type must be 'pil' or 'pt', got {output_type!r}")

    # ------------------------------------------------------------------ decode / reconstruct / compose
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, num_tokens: int | None = None, guidance_scale: float = 3.0,
               num_inference_steps: int = 50, generator: torch.Generator | None = None, seed: int | None = None,
               output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """ViLex tokens (B, m, D) -> images, with CFG against the empty prompt (``guidance_scale`` 1 = off)."""
        m = self._check_num_tokens(num_tokens, tokens.shape[1])
        tokens = tokens[:, :m].to(self.device)
        batch = tokens.shape[0]
        cond = self.decoder.encode_text(tokens, m)
        empty = self._empty_cond(batch) if guidance_scale != 1.0 else None
        images = self._sample(
            lambda x, t: self.predict_guided(x, t, cond, None, empty, guidance_scale=guidance_scale),
            batch, num_inference_steps, _generator(generator, seed))
        return self._output(images, output_type)

    @torch.no_grad()
    def reconstruct(self, images: ImagesIn, num_tokens: int | None = None, guidance_scale: float = 3.0,
                    num_inference_steps: int = 50, generator: torch.Generator | None = None, seed: int | None = None,
                    output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """Encode images to ``num_tokens`` ViLex tokens and decode them back."""
        tokens = self.encode(images, num_tokens)
        return self.decode(tokens, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                           generator=generator, seed=seed, output_type=output_type)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], guidance_scale: float = 3.0, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """Plain text-to-image with the frozen decoder (the caption baseline), CFG against the empty prompt."""
        prompts = list(prompts)
        cond = self.decoder.encode_text(None, None, self.decoder.tokenize(prompts))
        empty = self._empty_cond(len(prompts)) if guidance_scale != 1.0 else None
        images = self._sample(
            lambda x, t: self.predict_guided(x, t, cond, None, empty, guidance_scale=guidance_scale),
            len(prompts), num_inference_steps, _generator(generator, seed))
        return self._output(images, output_type)

    def compose_conditioning(self, tokens: torch.Tensor, prompt: str | Sequence[str]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond of ``[BOS, v, EOS]``, cond of ``[BOS, v, c, EOS]``) for TFG; a UserError if [v, c] does not fit."""
        prompts = [prompt] * tokens.shape[0] if isinstance(prompt, str) else list(prompt)
        prompt_ids = self.decoder.tokenize(prompts)
        m = tokens.shape[1]
        cond_v = self.decoder.encode_text(tokens, m)
        cond_vc = self.decoder.encode_text(tokens, m, prompt_ids)
        return cond_v, cond_vc

    @torch.no_grad()
    def compose(self, image: Image.Image | ImagesIn, prompt: str, tfg_scale: float = 3.0,
                num_tokens: int | None = None, guidance_scale: float = 1.0, num_inference_steps: int = 50,
                num_images: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """ViLex tokens of ``image`` + a text prompt, sampled with Text-Free Guidance (scale ``tfg_scale``)."""
        images = [image] if isinstance(image, Image.Image) else image
        tokens = self.encode(images, num_tokens)
        tokens = tokens.repeat_interleave(num_images, dim=0)
        cond_v, cond_vc = self.compose_conditioning(tokens, prompt)
        empty = self._empty_cond(tokens.shape[0]) if guidance_scale != 1.0 else None
        out = self._sample(
            lambda x, t: self.predict_guided(x, t, cond_v, cond_vc, empty, tfg_scale, guidance_scale),
            tokens.shape[0], num_inference_steps, _generator(generator, seed))
        return self._output(out, output_type)
