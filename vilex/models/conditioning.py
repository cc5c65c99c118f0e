"""conditioning.py — THE one place that turns ViLex tokens (and/or a prompt) into text-encoder states.

Training (ViLexModel.forward) and inference (ViLexPipeline: reconstruct, compose, CFG's empty prompt) both go
through a decoder's ``encode_text``, which builds on ``clip_hidden_states`` (SD 1.x/2.x: ``build_text_conditioning``;
SDXL picks other states of the same run); nothing else builds text-encoder inputs.

Layout, exactly as the tokenizer lays out real text (L = context length, 77 for CLIP):

    [BOS, v_1 .. v_m, c_1 .. c_k, EOS, PAD, ..., PAD]

``v`` are ViLex tokens (continuous, placed where word embeddings go), ``c`` the prompt's token ids
(without BOS/EOS). The PAD id comes from the tokenizer and DIFFERS between decoders: SD1.x's CLIP-L
tokenizer pads with EOS (49407), SD2.x's OpenCLIP-H tokenizer pads with "!" (id 0). Pads are real inputs
(the UNet cross-attends to all L states), so using the wrong one would shift every hidden state.

The frozen text encoder then runs as its own forward does (transformers v5: ``CLIPTextModel.forward``
takes no ``inputs_embeds``): ``embeddings(inputs_embeds=...)`` (adds position embeddings), a causal mask
from ``transformers.masking_utils.create_causal_mask`` (plus the padding mask only if the encoder's
config sets ``use_attention_mask``, as diffusers' ``encode_prompt`` does), ``encoder(...)``,
``final_layer_norm``. With ``clip_skip = k > 0`` the output of the k-th layer from the end is taken
(then the final LayerNorm), matching diffusers' ``clip_skip``. For a plain prompt (no ViLex tokens) the
result equals ``StableDiffusionPipeline.encode_prompt`` (tested).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vilex.errors import UserError


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids and context length of a decoder's tokenizer (the only facts the layout needs)."""

    bos: int | None  # None: the encoder has no BOS (T5)
    eos: int
    pad: int
    context_length: int
    name: str = "text"  # how errors name this context ("T5" for SD3's third encoder)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(bos=int(tokenizer.bos_token_id), eos=int(tokenizer.eos_token_id), pad=int(pad),
                   context_length=int(tokenizer.model_max_length))


@dataclass
class TextLayout:
    """Where everything sits in the L text positions of each sample (B rows)."""

    input_ids: torch.Tensor       # (B, L) int64; ViLex positions hold the pad id (their embedding is replaced)
    vilex_mask: torch.Tensor      # (B, L) bool; True at the m ViLex positions 1..m
    attention_mask: torch.Tensor  # (B, L) int64; 1 for BOS..EOS, 0 for padding (what the tokenizer returns)
    eos_index: torch.Tensor       # (B,) int64; position of EOS
    num_vilex: torch.Tensor       # (B,) int64; m per sample


def _as_num_keep(num_keep: int | torch.Tensor | None, batch_size: int, num_available: int) -> list[int]:
    if num_keep is None:
        values = [num_available] * batch_size
    elif isinstance(num_keep, torch.Tensor):
        values = [int(v) for v in num_keep.reshape(-1).tolist()]
        if len(values) == 1:
            values = values * batch_size
    else:
        values = [int(num_keep)] * batch_size
    if len(values) != batch_size:
        raise ValueError(f"num_keep has {len(values)} entries for a batch of {batch_size}")
    for m in values:
        if m < 0:
            raise UserError(f"num_tokens must be >= 0, got {m}")
        if m > num_available:
            raise UserError(f"num_tokens={m} is more than the {num_available} ViLex tokens this encoder makes: "
                            f"at most {num_available} fit")
    return values


def _as_prompts(prompt_ids: Sequence[Sequence[int]] | None, batch_size: int) -> list[list[int]]:
    if prompt_ids is None:
        return [[] for _ in range(batch_size)]
    prompts = [list(map(int, p)) for p in prompt_ids]
    if len(prompts) == 1 and batch_size > 1:
        prompts = prompts * batch_size
    if len(prompts) != batch_size:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}")
    return prompts


def build_text_layout(special: SpecialTokens, num_keep: int | torch.Tensor | None = None,
                      prompt_ids: Sequence[Sequence[int]] | None = None, batch_size: int | None = None,
                      num_available: int | None = None, device: torch.device | str | None = None) -> TextLayout:
    """The token layout ``[BOS, v_1..v_m, prompt, EOS, pad...]`` per sample (no BOS when ``special.bos`` is None),
    with its masks and EOS index.

    ``num_available`` is n (how many ViLex tokens exist); asking for more, or more than the context holds
    together with the prompt, is a UserError that says how many fit.
    """
    if batch_size is None:
        if isinstance(num_keep, torch.Tensor) and num_keep.numel() > 1:
            batch_size = num_keep.numel()
        elif prompt_ids is not None:
            batch_size = len(prompt_ids)
        else:
            batch_size = 1
    length = special.context_length
    head = [] if special.bos is None else [special.bos]
    fit = length - 1 - len(head)
    frame = "EOS takes 1" if not head else "BOS and EOS take 2"
    if num_available is None:
        num_available = fit
    keep = _as_num_keep(num_keep, batch_size, num_available)
    prompts = _as_prompts(prompt_ids, batch_size)
    ids, vmask, amask, eos = [], [], [], []
    for m, prompt in zip(keep, prompts):
        if m + len(prompt) > fit:
            if m == 0 or len(prompt) > fit:
                raise UserError(f"the prompt has {len(prompt)} tokens but the {length}-token {special.name} context "
                                f"holds at most {fit} ({frame})")
            raise UserError(f"{m} ViLex tokens + {len(prompt)} prompt tokens do not fit the {length}-token "
                            f"{special.name} context: at most {fit} fit together ({frame}), so at most "
                            f"{max(fit - len(prompt), 0)} ViLex tokens with this prompt")
        used = len(head) + m + len(prompt) + 1
        ids.append(head + [special.pad] * m + prompt + [special.eos] + [special.pad] * (length - used))
        vmask.append([False] * len(head) + [True] * m + [False] * (length - len(head) - m))
        amask.append([1] * used + [0] * (length - used))
        eos.append(used - 1)
    return TextLayout(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        vilex_mask=torch.tensor(vmask, dtype=torch.bool, device=device),
        attention_mask=torch.tensor(amask, dtype=torch.long, device=device),
        eos_index=torch.tensor(eos, dtype=torch.long, device=device),
        num_vilex=torch.tensor(keep, dtype=torch.long, device=device),
    )


def _text_core(text_encoder: Any) -> Any:
    """The module holding embeddings/encoder/final_layer_norm (flat in v5 CLIPTextModel; ``.text_model``
    in CLIPTextModelWithProjection)."""
    return getattr(text_encoder, "text_model", text_encoder)


def clip_hidden_states(text_encoder: Any, special: SpecialTokens, vilex_tokens: torch.Tensor | None = None,
                       num_keep: int | torch.Tensor | None = None, prompt_ids: Sequence[Sequence[int]] | None = None,
                       num_layers: int | None = None, use_attention_mask: bool | None = None
                       ) -> tuple[list[torch.Tensor], TextLayout]:
    """The frozen CLIP text encoder's hidden states for ``[BOS, v_1..v_m, prompt, EOS, pad...]``: HF's
    ``hidden_states`` (the embeddings, then the output of each layer), through layer ``num_layers`` (None = all),
    without the final LayerNorm; and the layout. Decoders pick what they condition on from these (SD: the last
    state, normed; SDXL: the penultimate, unnormed, plus the pooled EOS state).

    Args:
        text_encoder: a (frozen) ``CLIPTextModel`` or ``CLIPTextModelWithProjection``.
        special: BOS/EOS/PAD ids and context length of the encoder's tokenizer.
        vilex_tokens: (B, n, D) ViLex tokens or None (plain prompt).
        num_keep: m, an int or (B,) tensor; None = all n (0 when ``vilex_tokens`` is None).
        prompt_ids: per-sample prompt token ids without BOS/EOS (one list is broadcast to the batch); None = none.
        num_layers: run this many layers (clip skip = fewer); None = all.
        use_attention_mask: apply the padding mask too; None = the encoder config's ``use_attention_mask``.
    """
    core = _text_core(text_encoder)
    embedding = core.embeddings.token_embedding
    device = embedding.weight.device
    if vilex_tokens is not None:
        batch_size, num_available, width = vilex_tokens.shape
        if width != embedding.weight.shape[1]:
            raise ValueError(f"ViLex tokens have width {width}, the text encoder's embeddings "
                             f"{embedding.weight.shape[1]}")
    else:
        batch_size = (len(prompt_ids) if prompt_ids is not None
                      else (num_keep.numel() if isinstance(num_keep, torch.Tensor) else 1))
        num_available = 0
    layout = build_text_layout(special, num_keep, prompt_ids, batch_size=batch_size, num_available=num_available,
                               device=device)

    embeds = embedding(layout.input_ids)
    if vilex_tokens is not None and num_available > 0:
        placed = torch.zeros_like(embeds)
        placed[:, 1:1 + num_available] = vilex_tokens.to(device=device, dtype=embeds.dtype)
        embeds = torch.where(layout.vilex_mask.unsqueeze(-1), placed, embeds)
    hidden = core.embeddings(inputs_embeds=embeds)

    from transformers.masking_utils import create_causal_mask

    if use_attention_mask is None:
        use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    mask = create_causal_mask(config=text_encoder.config, inputs_embeds=hidden,
                              attention_mask=layout.attention_mask if use_attention_mask else None, cache=None)
    layers = core.encoder.layers
    if num_layers is None:
        num_layers = len(layers)
    if not 0 <= num_layers <= len(layers):
        raise UserError(f"the decoder's text encoder has {len(layers)} layers: cannot take the output of layer "
                        f"{num_layers} (decoder.clip_skip too large?)")
    states = [hidden]
    for layer in layers[:num_layers]:  # each layer as CLIPEncoder.forward calls it (activation checkpointing too)
        states.append(layer(states[-1], mask, is_causal=True))
    return states, layout


def build_text_conditioning(text_encoder: Any, special: SpecialTokens, vilex_tokens: torch.Tensor | None = None,
                            num_keep: int | torch.Tensor | None = None,
                            prompt_ids: Sequence[Sequence[int]] | None = None, clip_skip: int = 0,
                            use_attention_mask: bool | None = None, return_layout: bool = False
                            ) -> torch.Tensor | tuple[torch.Tensor, TextLayout]:
    """SD 1.x/2.x conditioning (B, L, W): the last hidden state (``clip_skip = k``: the k-th from the end) after the
    final LayerNorm, for ``[BOS, v_1..v_m, prompt, EOS, pad...]``; arguments as ``clip_hidden_states``.
    ``return_layout`` also returns the ``TextLayout`` (tests compare training and inference layouts)."""
    total = len(_text_core(text_encoder).encoder.layers)
    if clip_skip >= total:
        raise UserError(f"decoder.clip_skip={clip_skip} but the text encoder has only {total} layers")
    states, layout = clip_hidden_states(text_encoder, special, vilex_tokens, num_keep, prompt_ids,
                                        num_layers=total - clip_skip, use_attention_mask=use_attention_mask)
    hidden = _text_core(text_encoder).final_layer_norm(states[-1])
    return (hidden, layout) if return_layout else hidden
