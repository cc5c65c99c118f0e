"""vlm/varlen_attention.py — ``attn_implementation: sdpa_varlen``: attention per packed sample, on any device.

With packing (vlm/packing.py) a row holds several samples whose ``position_ids`` restart at 0. transformers' ``sdpa``
turns that layout into a block-diagonal (rows, 1, T, T) mask and attends over the whole row, so attention costs grow
with the row length T, not with the samples' own lengths; only flash-attention 2 (CUDA) has a varlen kernel that
skips the masked blocks. ``sdpa_varlen`` is that varlen path for every device: each sample's span of the row goes
through ``F.scaled_dot_product_attention(is_causal=True)`` on its own, so the cost is Σ length² and a longer
``pack_length`` (fewer, fuller rows) costs nothing extra in attention.

It is registered in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under the name
``sdpa_varlen`` (importing this module does it), so any HF causal LM that dispatches through them (Llama, Qwen2,
Mistral, Gemma, ...) accepts ``attn_implementation="sdpa_varlen"``. Everything that is not a packed, cache-free
forward is handed to transformers' own sdpa unchanged: padded batches (a 2D attention mask is given: the mask is
built exactly as for ``sdpa``), and generation with a KV cache (query and key lengths differ).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its samples: a sample starts wherever the position id is 0 (or the row starts).
    One host read for the whole batch (a single ``nonzero``)."""
    rows, width = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    per_row: list[list[int]] = [[] for _ in range(rows)]
    for r, c in torch.nonzero(starts).tolist():
        per_row[r].append(c)
    return [[e - s for s, e in zip(row, [*row[1:], width])] for row in per_row]


_last_segments: tuple[weakref.ref, int, list[list[int]]] | None = None


def _segments_for_forward(position_ids: torch.Tensor) -> list[list[int]]:
    """``segment_lengths``, computed once per forward: every decoder layer receives the same ``position_ids``
    tensor, so the last result is reused while that tensor (unchanged) is the one asked about."""
    global _last_segments
    last = _last_segments
    if last is not None and last[0]() is position_ids and last[1] == position_ids._version:
        return last[2]
    lengths = segment_lengths(position_ids)
    _last_segments = (weakref.ref(position_ids), position_ids._version, lengths)
    return lengths


def varlen_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[list[int]],
                scaling: float | None, dropout: float) -> torch.Tensor:
    """Causal attention within each segment. q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, T, H, D)."""
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, row_lengths in enumerate(lengths):
        q_parts = query[b:b + 1].split(row_lengths, dim=2)
        k_parts = key[b:b + 1].split(row_lengths, dim=2)
        v_parts = value[b:b + 1].split(row_lengths, dim=2)
        outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout,
                                               enable_gqa=gqa)
                for q, k, v in zip(q_parts, k_parts, v_parts)]
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (same signature as its ``sdpa_attention_forward``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2] \
            or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lengths = _segments_for_forward(position_ids)
    if len(lengths) != query.shape[0]:  # one row of positions shared by the batch
        lengths = lengths * query.shape[0]
    dropout = dropout if module.training else 0.0
    return varlen_sdpa(query, key, value, lengths, scaling, dropout), None


def sdpa_varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask when the input has none (packed rows, or no padding): the attention splits by position ids.
    With a 2D padding mask: exactly sdpa's mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)


register()
