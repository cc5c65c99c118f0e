"""encoder.py — the ViLex encoder: ViT patch tokens -> attention pooler -> n tokens in word-embedding space.

``AttentionPooler`` (a diffusers ``ModelMixin`` + ``ConfigMixin``, so ``save_pretrained`` /
``from_pretrained`` with safetensors + config.json come for free):

    patch tokens (B, L, C) -> LayerNorm -> Linear(C, width) [+ 2-D sin-cos positions] (shared keys/values)
    n learned position-specific queries (n, width), then `depth` pre-norm blocks of
        [self-attention over the queries, cross-attention queries -> patch tokens, MLP]
    -> LayerNorm -> Linear(width, D) -> output normalisation -> ViLex tokens (B, n, D)

D is the frozen text encoder's token-embedding width (taken from the decoder, never from config).
Query i is tied to text position i (the token after BOS + i), so "keep the first m" (TailDrop) is meaningful.
Attention uses ``F.scaled_dot_product_attention``.

Output normalisation ("match_embeddings", the default): LayerNorm WITHOUT affine parameters, then a
per-dimension scale by the std and a shift by the mean of the frozen token-embedding table (computed once
from the decoder's embedding matrix and stored as buffers, so a saved pooler needs no decoder to load).
Why: the frozen text encoder's first layer has only ever seen inputs at the scale of real word embeddings
(CLIP's are small, of order 1e-2 per dimension). Unnormalised pooler outputs are free to drift to large norms, which
then dominate the position embeddings and saturate the text encoder's LayerNorms/attention softmax, and the
gradient through the frozen model degrades. Matching the table's per-dimension statistics keeps every token
"in distribution" from step 0. "layernorm" (affine LN) and "none" are kept for ablations.

``ViLexEncoder`` = a ``VisionTower`` (towers.py) + an ``AttentionPooler``; it saves as ``<dir>/vit/`` and
``<dir>/pooler/``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from vilex.errors import UserError
from vilex.models.configs import PoolerConfig, VisionTowerConfig
from vilex.models.registry import VISION_TOWERS, load_pretrained
from vilex.models.towers import VisionTower, build_vision_tower

VIT_SUBFOLDER = "vit"
POOLER_SUBFOLDER = "pooler"


class _Attention(nn.Module):
    """Multi-head attention (queries from x, keys/values from context) through SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, nq, w = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, w // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, nq, w))


class _PoolerBlock(nn.Module):
    """Pre-norm [self-attn over queries, cross-attn to patch tokens, MLP], each with a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.norm_cross(queries), context)
        return queries + self.mlp(self.norm_mlp(queries))


def sincos_positions(length: int, width: int) -> torch.Tensor:
    """(length, width) fixed position codes: 2-D sin-cos on the square grid of ``length`` patches (half the
    channels code the row, half the column), 1-D over the sequence when ``length`` is not a square."""
    side = round(length ** 0.5)
    coords = [torch.arange(length) // side, torch.arange(length) % side] if side * side == length \
        else [torch.arange(length)]
    part = width // (2 * len(coords))
    freqs = 1.0 / (10000 ** (torch.arange(part, dtype=torch.float32) / max(part, 1)))
    codes = []
    for c in coords:
        angles = c.float()[:, None] * freqs[None]
        codes += [angles.sin(), angles.cos()]
    out = torch.cat(codes, dim=-1)
    return F.pad(out, (0, width - out.shape[-1]))


class AttentionPooler(ModelMixin, ConfigMixin):
    """n learned queries cross-attend to ViT patch tokens; output tokens live in word-embedding space."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_tokens: int, input_width: int, output_width: int, width: int = 1024, depth: int = 5,
                 heads: int = 16, mlp_ratio: float = 4.0, output_norm: str = "match_embeddings",
                 output_heads: Sequence[int] | None = None, context_positions: str = "none") -> None:
        super().__init__()
        # A decoder with several text encoders (SDXL) takes each token as the concatenation of one part per
        # encoder: the output projection's rows split into those parts, and each part is normalised on its own,
        # then matched to its own encoder's embedding statistics (one "head" per encoder, TailDrop alike for all).
        self.output_heads = list(output_heads) if output_heads else [output_width]
        if sum(self.output_heads) != output_width:
            raise UserError(f"pooler output heads {self.output_heads} do not add up to its output width {output_width}")
        if output_norm not in ("match_embeddings", "layernorm", "none"):
            raise UserError(f"pooler.output_norm: unknown '{output_norm}' (match_embeddings | layernorm | none)")
        if width % heads:
            raise UserError(f"pooler.width ({width}) must be divisible by pooler.heads ({heads})")
        if context_positions not in ("none", "sincos2d"):
            raise UserError(f"pooler.context_positions: unknown '{context_positions}' (none | sincos2d)")
        self.context_norm = nn.LayerNorm(input_width)
        self.context_proj = nn.Linear(input_width, width)
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(_PoolerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, output_width)
        self.out_norm = nn.LayerNorm(output_width) if output_norm == "layernorm" else None
        # Per-dimension statistics of the frozen token-embedding table (for "match_embeddings").
        self.register_buffer("embed_mean", torch.zeros(output_width))
        self.register_buffer("embed_std", torch.ones(output_width))

    @torch.no_grad()
    def set_embedding_statistics(self, embedding_table: torch.Tensor) -> None:
        """Store the per-dimension mean/std of the frozen token-embedding matrix (V, D)."""
        table = embedding_table.detach().float()
        if table.shape[-1] != self.config.output_width:
            raise ValueError(f"embedding table width {table.shape[-1]} != pooler output width "
                             f"{self.config.output_width}")
        self.embed_mean.copy_(table.mean(0).to(self.embed_mean))
        self.embed_std.copy_(table.std(0).to(self.embed_std))

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        context = self.context_proj(self.context_norm(patch_tokens.to(self.queries.dtype)))
        if self.config.context_positions == "sincos2d":
            context = context + sincos_positions(context.shape[1], context.shape[2]).to(context)
        queries = self.queries.unsqueeze(0).expand(patch_tokens.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, context)
        tokens = self.out_proj(self.final_norm(queries))
        if self.config.output_norm == "match_embeddings":
            parts = tokens.split(self.output_heads, dim=-1)
            tokens = torch.cat([F.layer_norm(p, p.shape[-1:]) for p in parts], dim=-1) * self.embed_std + self.embed_mean
        elif self.out_norm is not None:
            tokens = self.out_norm(tokens)
        return tokens


class ViLexEncoder(nn.Module):
    """Image -> ViLex tokens (B, n, D): a vision tower followed by the attention pooler."""

    def __init__(self, tower: VisionTower, pooler: AttentionPooler) -> None:
        super().__init__()
        self.vit = tower
        self.pooler = pooler

    # ------------------------------------------------------------------ construction and saving
    @classmethod
    def build(cls, vit_config: VisionTowerConfig, pooler_config: PoolerConfig, embedding_table: torch.Tensor,
              context_length: int, output_heads: Sequence[int] | None = None) -> ViLexEncoder:
        """A new encoder (tower pretrained or random-init, pooler random-init) for a decoder whose token
        embedding matrix is ``embedding_table`` (V, D), split into ``output_heads`` parts (one per text encoder;
        None = one), and whose text context holds ``context_length`` tokens."""
        check_num_tokens(pooler_config.num_tokens, context_length, what="pooler.num_tokens")
        tower = build_vision_tower(vit_config)
        pooler = AttentionPooler(
            num_tokens=pooler_config.num_tokens, input_width=tower.hidden_size,
            output_width=int(embedding_table.shape[-1]), width=pooler_config.width, depth=pooler_config.depth,
            heads=pooler_config.heads, mlp_ratio=pooler_config.mlp_ratio, output_norm=pooler_config.output_norm,
            output_heads=list(output_heads) if output_heads and len(output_heads) > 1 else None,
            context_positions=pooler_config.context_positions)
        pooler.set_embedding_statistics(embedding_table)
        return cls(tower, pooler)

    @classmethod
    def from_saved(cls, folder: str | Path, vit_config: VisionTowerConfig) -> ViLexEncoder:
        """Load the encoder saved by ``save_pretrained`` (``<folder>/vit``, ``<folder>/pooler``)."""
        folder = Path(folder)
        tower = VISION_TOWERS.get(vit_config.type).from_saved(folder / VIT_SUBFOLDER, vit_config)
        pooler = load_pretrained(AttentionPooler.from_pretrained, folder / POOLER_SUBFOLDER, "ViLex pooler")
        return cls(tower, pooler)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``<folder>/vit/`` (the tower's own layout) and ``<folder>/pooler/`` (safetensors + config)."""
        folder = Path(folder)
        self.vit.save_pretrained(folder / VIT_SUBFOLDER)
        self.pooler.save_pretrained(str(folder / POOLER_SUBFOLDER))

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return int(self.pooler.config.num_tokens)

    @property
    def token_width(self) -> int:
        return int(self.pooler.config.output_width)

    @property
    def image_size(self) -> int:
        return self.vit.image_size

    # ------------------------------------------------------------------ use
    def preprocess(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images (center-cropped to a square, resized) or a float tensor (B,3,H,W) in [0,1] -> normalised
        pixel values at the tower's size."""
        if isinstance(images, torch.Tensor):
            pixels = images.float()
            if pixels.ndim == 3:
                pixels = pixels.unsqueeze(0)
        else:
            if not images:
                raise UserError("no images given")
            size = self.image_size
            arrays = [np.asarray(center_square(im, size), dtype=np.float32) / 255.0 for im in images]
            pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
        size = self.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        mean = torch.tensor(self.vit.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.vit.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B,3,H,W) -> ViLex tokens (B, n, D), float32."""
        return self.pooler(self.vit(pixel_values)).float()


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of ``image`` (RGB), resized to ``size`` x ``size`` (bicubic): keeps the
    aspect ratio, unlike a plain resize."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def check_num_tokens(num_tokens: int, context_length: int, what: str = "num_tokens") -> None:
    """A UserError unless ``num_tokens`` ViLex tokens fit the text context (BOS and EOS take two places)."""
    fit = context_length - 2
    if num_tokens > fit:
        raise UserError(f"{what}={num_tokens} does not fit: the decoder's text context has {context_length} "
                        f"positions, so at most {fit} ViLex tokens fit (BOS and EOS take 2)")
