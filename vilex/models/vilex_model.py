"""vilex_model.py — the Stage-1 training model: encoder + TailDrop + frozen decoder -> diffusion loss.

    encoder_pixels -> ViLexEncoder -> tokens (B, n, D) -> TailDrop (m per sample)
                   -> build_text_conditioning  [BOS, v_1..v_m, EOS, pad...] -> frozen text encoder
                   -> frozen UNet on x0 noised at a random timestep -> per-sample loss

Only the encoder trains: ``trainable_parameter_groups()`` returns {"vit": [...], "pooler": [...]} so the
trainer can give them the paper's separate learning rates (1e-5 and 3e-4). TailDrop is sampled only while
the ENCODER is in training mode (training strategies wrap and toggle only the encoder); otherwise all n
tokens are used unless ``num_keep`` is passed.

Checkpoints (``save_pretrained`` / ``write_checkpoint``) hold the encoder and ``vilex_config.json``; the
decoder is referenced by its id/path, not copied:

    <ckpt>/vit/               the tower's own layout (SiglipVisionModel.save_pretrained for "siglip")
    <ckpt>/pooler/            safetensors + config.json (AttentionPooler)
    <ckpt>/vilex_config.json  the ViLexConfig
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from vilex.checkpoint import atomic_dir
from vilex.config import from_dict, to_dict
from vilex.errors import UserError
from vilex.models.configs import ViLexConfig
from vilex.models.decoders import FrozenDecoder, build_frozen_decoder
from vilex.models.encoder import ViLexEncoder
from vilex.models.taildrop import sample_num_keep

log = logging.getLogger(__name__)

CONFIG_FILE = "vilex_config.json"


class ViLexModel(nn.Module):
    """ViLex encoder trained through a frozen T2I decoder."""

    def __init__(self, encoder: ViLexEncoder, decoder: FrozenDecoder, config: ViLexConfig) -> None:
        super().__init__()
        if encoder.token_width != decoder.embed_width:
            raise UserError(f"encoder token width {encoder.token_width} != decoder embedding width "
                            f"{decoder.embed_width}: this encoder was trained for another decoder")
        self.encoder = encoder
        self.decoder = decoder
        self.config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ViLexConfig) -> ViLexModel:
        """A fresh model: decoder loaded (frozen), ViT pretrained or random-init, pooler random-init."""
        config.validate()
        decoder = build_frozen_decoder(config.decoder)
        encoder = ViLexEncoder.build(config.vit, config.pooler, decoder.embedding_table, decoder.context_length,
                                     decoder.token_heads)
        model = cls(encoder, decoder, config)
        model.log_trainable()
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, decoder: FrozenDecoder | None = None) -> ViLexModel:
        """Load a checkpoint folder (the decoder from the config's reference unless one is given)."""
        config = read_vilex_config(path)
        decoder = decoder if decoder is not None else build_frozen_decoder(config.decoder)
        encoder = ViLexEncoder.from_saved(path, config.vit)
        return cls(encoder, decoder, config)

    def save_pretrained(self, path: str | Path) -> Path:
        """Atomically write the checkpoint folder (vit/, pooler/, vilex_config.json)."""
        with atomic_dir(path) as tmp:
            write_checkpoint(tmp, self.encoder, self.config)
        return Path(path)

    # ------------------------------------------------------------------ training
    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that can learn, by part: ``{"vit": [...], "pooler": [...]}`` (the decoder has none)."""
        return {
            "vit": [p for p in self.encoder.vit.parameters() if p.requires_grad],
            "pooler": [p for p in self.encoder.pooler.parameters() if p.requires_grad],
        }

    def log_trainable(self) -> None:
        """One line per component: trainable or frozen, and how many parameters."""
        for name, module in (("vit", self.encoder.vit), ("pooler", self.encoder.pooler), ("decoder", self.decoder)):
            total = sum(p.numel() for p in module.parameters())
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            state = "frozen" if trainable == 0 else "trainable"
            log.info("%-8s %-9s %12s params (%s trainable)", name, state, f"{total:,}", f"{trainable:,}")

    def forward(self, encoder_pixels: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None,
                num_keep: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss of reconstructing x0 (decoder model space) from the ViLex tokens of ``encoder_pixels``.

        Returns ``loss`` (scalar mean), ``loss_per_sample`` (B,) and ``num_keep`` (B,) — the m used per sample.
        """
        return self.loss_from_tokens(self.encoder(encoder_pixels), x0, generator, num_keep)

    def loss_from_tokens(self, tokens: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None,
                         num_keep: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The second half of ``forward``: TailDrop -> conditioning -> diffusion loss, from tokens (B, n, D)
        that a training strategy computed with its own (wrapped) encoder."""
        batch, n = tokens.shape[:2]
        if num_keep is None:
            if self.encoder.training:  # the encoder's flag: strategies wrap (and .train()) only the encoder
                num_keep = sample_num_keep(batch, n, self.config.taildrop, generator, device=tokens.device)
            else:
                num_keep = torch.full((batch,), n, dtype=torch.long, device=tokens.device)
        elif not isinstance(num_keep, torch.Tensor):
            num_keep = torch.full((batch,), int(num_keep), dtype=torch.long, device=tokens.device)
        cond = self.decoder.encode_text(tokens, num_keep)
        loss_per_sample = self.decoder.diffusion_loss(x0, cond, generator)
        return {"loss": loss_per_sample.mean(), "loss_per_sample": loss_per_sample, "num_keep": num_keep}


def write_checkpoint(folder: str | Path, encoder: ViLexEncoder, config: ViLexConfig) -> None:
    """Write the ViLex checkpoint files into an existing folder (use inside ``atomic_dir`` or
    ``CheckpointManager.save``); a local decoder folder is recorded as an absolute path."""
    folder = Path(folder)
    encoder.save_pretrained(folder)
    data = to_dict(config)
    local = Path(config.decoder.name_or_path).expanduser()
    if local.exists():
        data["decoder"]["name_or_path"] = str(local.resolve())
    # The tower is loaded from <ckpt>/vit, so the original reference is kept only as provenance.
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=False))


def read_vilex_config(path: str | Path) -> ViLexConfig:
    """The ``ViLexConfig`` stored in a checkpoint folder (UserError when it is not one)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint folder not found: {path}")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise UserError(f"{path} is not a ViLex checkpoint: {CONFIG_FILE} missing")
    return from_dict(ViLexConfig, json.loads(cfg_file.read_text()))
