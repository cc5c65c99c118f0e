"""vlm/packing.py — a micro-batch of samples -> model inputs, padded (LLaVA-style) or packed.

* padded: one sample per row, right-padded to the longest; a 2D ``attention_mask`` hides the padding.
* packed: the samples are placed into rows of at most ``row_length`` tokens (the stage's ``pack_length``, by
  default ``max_length``). Rows are padded to the fullest one, so ``pack_rows`` searches for few AND even rows
  (first-fit-decreasing at several row widths, longest-onto-emptiest spreads), minimising rows x width.
  ``position_ids`` restart at 0 for every sample and ``attention_mask`` is None: transformers (5.x, Qwen2/Llama/...
  through ``masking_utils.create_causal_mask``) then detects the packed layout from the position ids and builds a
  block-diagonal causal mask for sdpa/eager on CPU and GPU, or the varlen path with flash-attention 2 — no token
  attends across samples. Detection needs
  ``use_cache=False`` (the model passes it). Padding in a packed row is its own "sample" (positions 0..), so nothing
  attends to it and nothing learns from it.

Targets were shifted per sample before packing (templates.py), so the packed loss is exactly the loss of the same
samples unpacked (tests/test_vlm_packing.py checks it). Images go in ``pixel_values`` in the order their samples
appear in the rows (row by row, left to right) — the order the model scatters image features back in.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlm.data import Example, Skipped
from vlm.templates import IGNORE


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, T)
    targets: torch.Tensor  # (rows, T) shifted next-token targets, IGNORE = not learned
    pixel_values: torch.Tensor | None  # (images, 3, S, S) in placement order, or None
    attention_mask: torch.Tensor | None = None  # padded layout
    position_ids: torch.Tensor | None = None  # packed layout
    num_samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (on_bad_image: skip)
    truncated_samples: int = 0
    truncated_tokens: int = 0
    real_tokens: int = 0  # non-padding tokens

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor | None]:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return {"input_ids": move(self.input_ids), "targets": move(self.targets),
                "pixel_values": move(self.pixel_values), "attention_mask": move(self.attention_mask),
                "position_ids": move(self.position_ids)}

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= capacity (an item longer than capacity gets its own bin).

    Ties keep the input order, so the result is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _longest_onto_emptiest(lengths: Sequence[int], rows: int) -> tuple[list[list[int]], int]:
    """LPT scheduling: each item, longest first, onto the currently emptiest row; returns (rows, fullest fill)."""
    bins: list[list[int]] = [[] for _ in range(rows)]
    fill = [0] * rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(rows), key=lambda j: (fill[j], j))
        bins[r].append(i)
        fill[r] += lengths[i]
    return bins, max(fill)


def _area(bins: list[list[int]], lengths: Sequence[int]) -> int:
    return len(bins) * max(sum(lengths[i] for i in b) for b in bins)


def pack_rows(lengths: Sequence[int], capacity: int, tries: int = 32) -> list[list[int]]:
    """Rows of item indices, each at most ``capacity`` tokens, minimising rows x fullest row (= tokens processed).

    Rows are padded to the fullest one, so the layout to find is few AND even rows. Candidates: first-fit-decreasing
    into rows of width W for ``tries`` widths W from the longest item up to ``capacity``, and longest-onto-emptiest
    (LPT) spreads over those row counts and the fewest possible ones, when they fit. Deterministic; a few ms for a
    micro-batch of 16.
    """
    longest = max(lengths)
    if longest >= capacity:
        return first_fit_decreasing(lengths, capacity)
    step = max(1, (capacity - longest) // tries)
    candidates = [first_fit_decreasing(lengths, width) for width in [*range(longest, capacity, step), capacity]]
    fewest = -(-sum(lengths) // capacity)
    for rows in sorted({*range(fewest, fewest + 3), *(len(c) for c in candidates)}):
        spread, fullest = _longest_onto_emptiest(lengths, rows)
        if fullest <= capacity:
            candidates.append(spread)
    return min(candidates, key=lambda bins: (_area(bins, lengths), len(bins)))


def _stack_images(examples: Sequence[Example]) -> torch.Tensor | None:
    images = [e.pixel_values for e in examples if e.pixel_values is not None]
    return torch.stack(images) if images else None


class Collator:
    """``collate_fn`` for the DataLoader: Example/Skipped items -> one ``Batch``."""

    def __init__(self, pad_token_id: int, packing: bool, row_length: int) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.row_length = row_length  # packed row capacity (samples are already <= max_length)

    def __call__(self, items: Sequence[Example | Skipped]) -> Batch:
        examples = [x for x in items if isinstance(x, Example)]
        skipped = Counter(x.reason for x in items if isinstance(x, Skipped))
        if not examples:  # every sample of the micro-batch was skipped: an empty batch the trainer counts
            empty = torch.zeros(1, 1, dtype=torch.long)
            return Batch(empty + self.pad_token_id, empty + IGNORE, None, attention_mask=torch.ones_like(empty),
                         num_samples=0, skipped=dict(skipped))
        batch = self.pack(examples) if self.packing else self.pad(examples)
        batch.skipped = dict(skipped)
        batch.truncated_samples = sum(1 for e in examples if e.tokens.truncated_tokens)
        batch.truncated_tokens = sum(e.tokens.truncated_tokens for e in examples)
        return batch

    def pad(self, examples: Sequence[Example]) -> Batch:
        width = max(e.tokens.length for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        targets = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(examples):
            n = e.tokens.length
            ids[r, :n], targets[r, :n], mask[r, :n] = e.tokens.input_ids, e.tokens.targets, 1
        return Batch(ids, targets, _stack_images(examples), attention_mask=mask, num_samples=len(examples),
                     real_tokens=int(mask.sum()))

    def pack(self, examples: Sequence[Example]) -> Batch:
        bins = pack_rows([e.tokens.length for e in examples], self.row_length)
        width = max(sum(examples[i].tokens.length for i in b) for b in bins)
        ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        targets = torch.full_like(ids, IGNORE)
        positions = torch.zeros_like(ids)
        placed: list[Example] = []
        for r, b in enumerate(bins):
            at = 0
            for i in b:
                e = examples[i]
                n = e.tokens.length
                ids[r, at:at + n], targets[r, at:at + n] = e.tokens.input_ids, e.tokens.targets
                positions[r, at:at + n] = torch.arange(n)
                at += n
                placed.append(e)
            positions[r, at:] = torch.arange(width - at)  # the padding tail: a "sample" of its own
        real = sum(e.tokens.length for e in examples)
        return Batch(ids, targets, _stack_images(placed), position_ids=positions, num_samples=len(examples),
                     real_tokens=real)
