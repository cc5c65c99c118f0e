"""toy/caption_attributes.py — make every padded slot of the toy text encoder carry the whole caption.

Why (docs/EXPERIMENTS.md, "Where placement fails"): the toy decoder never learned to place objects from the
LiT-pretrained text encoder, while it learned placement within ~500 steps from a one-hot position code written on
ALL 77 conditioning slots. Position words moved the LiT encoder's conditioning by 2 % of its norm (colour words:
76 %), and only on the few slots after the word. Two losses, added to LiT's, fix the two halves:

- ``attribute_loss``: from every slot at or after the caption's first EOS (the causal encoder's slots that have
  read the whole caption, most of the 77), a linear head predicts the scene the caption describes — background,
  and for each of up to ``MAX_OBJECTS`` objects: present, colour, shape, centre (x, y) and size. The centre and
  size are regressed to the true values, so a coarse caption learns the mean of its cell and a fine one more.
- ``swap_margin_loss``: a caption and its one-word-swapped copy (the LiT hard negatives) must differ by at least
  ``margin`` of the conditioning's norm (mean over all 77 slots: what ``word_sensitivity`` measures), for every
  kind of word alike. A hinge: pairs already that far apart cost nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from toy.scenes import world
from toy.decoder_model import prompt_ids

MAX_OBJECTS = 3
BACKGROUNDS: tuple[str, ...] = tuple(world.BACKGROUND_COLOURS)
COLOURS: tuple[str, ...] = tuple(world.OBJECT_COLOURS)
SHAPES: tuple[str, ...] = tuple(world.SHAPES)


def scene_targets(scenes: Sequence[world.Scene]) -> dict[str, torch.Tensor]:
    """Ground truth per scene: background (B,), present (B, K), colour/shape (B, K) (-100 where absent), and
    centre (B, K, 2) and size (B, K) (0 where absent), objects in caption order."""
    b, k = len(scenes), MAX_OBJECTS
    out = {"background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
           "present": torch.zeros(b, k), "colour": torch.full((b, k), -100), "shape": torch.full((b, k), -100),
           "centre": torch.zeros(b, k, 2), "size": torch.zeros(b, k)}
    for i, scene in enumerate(scenes):
        if len(scene.objects) > k:
            raise ValueError(f"a scene has {len(scene.objects)} objects; caption attributes hold {k}")
        for j, obj in enumerate(scene.objects):
            out["present"][i, j] = 1.0
            out["colour"][i, j] = COLOURS.index(obj.colour)
            out["shape"][i, j] = SHAPES.index(obj.shape)
            out["centre"][i, j] = torch.tensor([obj.cx, obj.cy])
            out["size"][i, j] = obj.size
    return out


class AttributeHead(nn.Module):
    """One linear map from a conditioning slot to every attribute of the scene."""

    def __init__(self, width: int) -> None:
        super().__init__()
        k = MAX_OBJECTS
        self.sizes = {"background": len(BACKGROUNDS), "present": k, "colour": k * len(COLOURS),
                      "shape": k * len(SHAPES), "centre": k * 2, "size": k}
        self.proj = nn.Linear(width, sum(self.sizes.values()))

    def forward(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """slots (N, W) -> named predictions, objects on dim 1."""
        parts = dict(zip(self.sizes, self.proj(slots).split(list(self.sizes.values()), dim=-1)))
        n, k = slots.shape[0], MAX_OBJECTS
        return {"background": parts["background"], "present": parts["present"],
                "colour": parts["colour"].reshape(n, k, -1), "shape": parts["shape"].reshape(n, k, -1),
                "centre": parts["centre"].reshape(n, k, 2), "size": parts["size"]}


def first_eos_index(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Per caption, the index of its first EOS token in the padded 77-token ids (the encoder's input)."""
    ids = prompt_ids(tokenizer, texts)
    return (ids == tokenizer.eos_token_id).int().argmax(dim=1)


def attribute_loss(head: AttributeHead, hidden: torch.Tensor, eos_index: torch.Tensor,
                   targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the slots at/after each caption's first EOS of the attribute losses (cross-entropy for the
    categories, BCE for presence, MSE ×10 for centre and size, which live in [0, 1]); also their parts."""
    b, length, _ = hidden.shape
    mask = torch.arange(length)[None, :] >= eos_index[:, None]  # (B, L)
    rows = mask.nonzero()[:, 0]
    pred = head(hidden[mask])
    t = {name: value[rows] for name, value in targets.items()}
    present = t["present"].bool()
    parts = {
        "background": F.cross_entropy(pred["background"], t["background"]),
        "present": F.binary_cross_entropy_with_logits(pred["present"], t["present"]),
        "colour": F.cross_entropy(pred["colour"].flatten(0, 1), t["colour"].flatten()),
        "shape": F.cross_entropy(pred["shape"].flatten(0, 1), t["shape"].flatten()),
        "centre": 10 * F.mse_loss(pred["centre"][present], t["centre"][present]),
        "size": 10 * F.mse_loss(pred["size"][present], t["size"][present]),
    }
    return sum(parts.values()), {name: round(float(v.detach()), 4) for name, v in parts.items()}


def relative_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair, mean over slots of ||a − b|| / ||a|| (the quantity ``word_sensitivity`` reports)."""
    return ((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-6)).mean(dim=-1)


def swap_margin_loss(hidden: torch.Tensor, swapped_hidden: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge: mean of relu(margin − relative change) over (caption, one-word-swapped caption) pairs."""
    return F.relu(margin - relative_change(hidden, swapped_hidden)).mean()
