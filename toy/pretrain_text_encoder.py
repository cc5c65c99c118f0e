"""toy/pretrain_text_encoder.py — pretrain the toy decoder's CLIP text encoder contrastively (LiT-style).

Stable Diffusion's UNet is trained against a text encoder that contrastive pretraining (CLIP / OpenCLIP) already
taught to encode every word of a caption. Trained jointly with the UNet from scratch, a toy text encoder does not
learn that: it encodes the background word and barely the object words (``word_sensitivity`` measures it; the
numbers are in docs/EXPERIMENTS.md), and the decoder never learns to draw what the objects are. So the toy world
does what SD did: this module trains a ``CLIPTextModel`` first, and the decoder is trained against it frozen
(``text_encoder.pretrained`` in configs/toy/decoder.yaml).

How: "locked-image text tuning" (LiT, Zhai et al. 2022) against the frozen image tower of the toy SigLIP
(``assets/toy/siglip``): image features come from the frozen ``SiglipModel.get_image_features``; the text side is
the ``CLIPTextModel`` the decoder will use (same tokenizer, 77 positions padded with EOS, no attention mask, exactly
as the decoder encodes prompts) + a linear head; SigLIP's sigmoid loss with equal captions as positives, plus
hard-negative captions that differ from an image's own in ONE word (background, colour, shape or position).

Decision: the text embedding is the MEAN of the last hidden states over all positions, not CLIP's EOS pooling. The
UNet cross-attends to every position, so every position must carry the caption; EOS pooling would train one.

Output ``out/``: the ``CLIPTextModel`` (save_pretrained), the tokenizer, ``head.safetensors`` (the projection head,
only needed to re-measure retrieval) and ``recipe.json`` with caption→image retrieval on held-out scenes.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from toy.stage0 import Stage0Trainer, Stage0TrainSpec, decay_groups
from vilex.checkpoint import atomic_dir, save_tensors
from vilex.train.run_loop import RunState
from vilex.config import cfg_field, to_dict
from vilex.errors import ConfigError, UserError
from toy.scenes import world
from toy.caption_attributes import (
    AttributeHead,
    attribute_loss,
    first_eos_index,
    relative_change,
    scene_targets,
    swap_margin_loss,
)
from toy.decoder_model import TextEncoderSpec, encode_prompts, load_or_build_text_encoder
from toy.pretrain_siglip import topk_caption_hits
from toy.recipe import (
    Stream,
    heldout_scenes,
    images_to_unit_range,
    render_batch,
    toy_rng,
    write_recipe,
)
from toy.tokenizer import load_toy_tokenizer

log = logging.getLogger(__name__)


SWAP_KINDS: tuple[str, ...] = ("background", "colour", "shape", "position")


@dataclass
class TextEncoderTrainSpec(Stage0TrainSpec):
    max_steps: int = cfg_field(1500, ge=1, help="optimizer steps")
    min_lr_ratio: float = cfg_field(0.05, ge=0, le=1)
    weight_decay: float = cfg_field(1e-4, ge=0)
    threads: int = cfg_field(1, ge=1)
    global_batch_size: int = cfg_field(128, ge=2, help="scenes per optimizer step (all in one forward: the "
                                                        "contrastive loss's negatives are the batch's other captions)")
    fine_caption_prob: float = cfg_field(0.5, ge=0, le=1)
    hard_negatives: int = cfg_field(1, ge=0, help="per image caption, this many copies with ONE word swapped "
                                                  "(background, object colour, shape or position) as negatives")
    num_workers: int = cfg_field(1, ge=0)
    attribute_weight: float = cfg_field(0.0, ge=0, help="weight of the caption-attribute loss: every slot after the "
                                                        "caption's EOS predicts the scene (toy/caption_attributes.py)")
    swap_margin: float = cfg_field(0.0, ge=0, help="a one-word-swapped caption must move the conditioning by at "
                                                   "least this fraction of its norm (hinge); 0: off")
    swap_margin_weight: float = cfg_field(1.0, ge=0)
    sensitivity_every: int = cfg_field(100, ge=1, help="log word_sensitivity every this many steps")


@dataclass
class TextEncoderPretrainConfig:
    """One text-encoder pretraining experiment (configs/toy/text_encoder.yaml)."""

    seed: int = cfg_field(0)
    tokenizer: str = cfg_field("assets/toy/tokenizer")
    work_dir: str = cfg_field("runs/toy/text_encoder", help="checkpoints and the training log (not shipped)")
    image_tower: str = cfg_field("assets/toy/siglip", help="frozen toy SigLIP folder whose image features are the "
                                                          "targets (vilex toy pretrain-siglip)")
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    train: TextEncoderTrainSpec = field(default_factory=TextEncoderTrainSpec)
    eval_scenes: int = cfg_field(256, ge=2, help="held-out scenes for caption->image retrieval")


class LockedImageText(nn.Module):
    """The trainable side: text encoder + linear head + SigLIP logit scale/bias (init log 10 / -10), and the
    caption-attribute head (used when ``train.attribute_weight`` > 0)."""

    def __init__(self, text_encoder: nn.Module, image_dim: int) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.head = nn.Linear(text_encoder.config.hidden_size, image_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.attributes = AttributeHead(text_encoder.config.hidden_size)

    def embed(self, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, image_dim): the mean over ALL positions of the decoder's conditioning."""
        return self.embed_hidden(encode_prompts(tokenizer, self.text_encoder, texts))

    def embed_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(hidden.mean(dim=1)), dim=-1)

    def logits(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """logits_per_text (T, I)."""
        return text_emb @ image_emb.t() * self.logit_scale.exp() + self.logit_bias


HEADS_FILE = "head.safetensors"


def build_locked_image_text(spec: TextEncoderSpec, tokenizer: Any, image_dim: int) -> LockedImageText:
    """A new model, or (``spec.pretrained``) one that continues a pretrained encoder and its heads."""
    from safetensors.torch import load_file

    model = LockedImageText(load_or_build_text_encoder(spec, tokenizer), image_dim)
    heads = Path(spec.pretrained or "") / HEADS_FILE
    if spec.pretrained is not None and heads.is_file():
        missing, unexpected = model.load_state_dict(load_file(str(heads)), strict=False)
        missing = [k for k in missing if not k.startswith(("text_encoder.", "attributes."))]
        if missing or unexpected:
            raise ConfigError(f"{heads} does not fit: missing {missing}, unexpected {unexpected}")
    return model


def hard_negative_captions(texts: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` one-word-swapped copies of each caption (kind drawn per copy; kinds a caption lacks are skipped).

    In a random batch two captions differ in many words, so a contrastive text encoder can match them by the
    background and the colours alone and never learn position words (the first LiT run: swapping "left"/"right"
    moved the conditioning by 1%). A caption that differs from the truth in ONE word must score low (NegCLIP).
    """
    out = []
    for text in texts:
        for _ in range(k):
            for kind in rng.permutation(SWAP_KINDS):
                swapped = _swap_word(text, str(kind))
                if swapped is not None:
                    out.append(swapped)
                    break
    return out


def sigmoid_loss_rows(logits: torch.Tensor, row_texts: Sequence[str], image_texts: Sequence[str]) -> torch.Tensor:
    """SigLIP's sigmoid loss for text rows against images: a pair is positive iff the row's text equals the
    image's own caption (so duplicate captions are positives, and a swapped caption that happens to equal
    another image's caption is a positive for that image). Mean over rows."""
    signs = torch.tensor([[1.0 if r == t else -1.0 for t in image_texts] for r in row_texts])
    return -F.logsigmoid(signs * logits.float()).sum(dim=-1).mean()


def load_image_tower(folder: str | Path) -> Any:
    from transformers import SiglipModel

    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"image_tower: toy SigLIP not found: {folder} (train it with `vilex toy pretrain-siglip`)")
    model = SiglipModel.from_pretrained(str(folder)).eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def image_features(tower: Any, images: torch.Tensor) -> torch.Tensor:
    out = tower.get_image_features(pixel_values=images)
    out = getattr(out, "pooler_output", out)  # transformers v5 returns a ModelOutput
    return F.normalize(out.float(), dim=-1)


@torch.no_grad()
def caption_to_image_retrieval(model: LockedImageText, tokenizer: Any, image_emb: torch.Tensor,
                               texts: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Caption -> image top-k (a hit = an image whose own caption equals the query text), with chance."""
    return topk_caption_hits(model.logits(model.embed(tokenizer, texts), image_emb), texts, ks)


def evaluate_text_encoder(model: LockedImageText, tower: Any, tokenizer: Any, seed: int, n: int,
                          image_size: int) -> dict[str, Any]:
    scenes = heldout_scenes(seed, n)
    image_emb = image_features(tower, images_to_unit_range(render_batch(scenes, image_size)))
    model.eval()
    return {"fine_captions": caption_to_image_retrieval(model, tokenizer, image_emb,
                                                        [world.caption_fine(s) for s in scenes]),
            "coarse_captions": caption_to_image_retrieval(model, tokenizer, image_emb,
                                                          [world.caption_coarse(s) for s in scenes])}


_FAR_GRID5 = {"1": "4", "2": "5", "3": "1", "4": "1", "5": "2"}  # a fine grid index -> one 2-3 cells away


def _swap_word(caption: str, kind: str) -> str | None:
    """``caption`` with one word of ``kind`` replaced (None when it has none): the background colour, or the
    first object's colour, shape or position word (left<->right, top<->bottom; in fine captions the first
    object's column number)."""
    words = caption.split(" ")
    if kind == "position" and "column" in words:
        j = words.index("column") + 1
        words[j] = _FAR_GRID5[words[j]]
        return " ".join(words)
    if kind == "background":
        j = len(words) - 2  # "... on a <colour> background"
        swap = {c: n for c, n in zip(world.BACKGROUND_COLOURS, list(world.BACKGROUND_COLOURS)[1:] +
                                     list(world.BACKGROUND_COLOURS)[:1])}
    else:
        vocab = {"colour": world.OBJECT_COLOURS, "shape": world.SHAPES,
                 "position": {"left": 0, "right": 0, "top": 0, "bottom": 0}}[kind]
        names = list(vocab)
        swap = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"} if kind == "position" else \
            {c: n for c, n in zip(names, names[1:] + names[:1])}
        j = next((i for i, w in enumerate(words) if w.strip(",") in swap), None)
        if j is None:
            return None
    word = words[j].strip(",")
    words[j] = words[j].replace(word, swap[word])
    return " ".join(words)


def word_sensitivity(text_encoder: nn.Module, tokenizer: Any, seed: int, n: int = 64) -> dict[str, float]:
    """Mean relative change of the conditioning (L2 per position / its norm) when ONE caption word changes.

    The diagnostic that showed the jointly trained encoder ignoring object words: in held-out coarse captions,
    swap the background colour, or the first object's colour, shape or position word (and the position in fine
    captions).
    """
    scenes = heldout_scenes(seed, n)
    coarse, fine = [world.caption_coarse(s) for s in scenes], [world.caption_fine(s) for s in scenes]
    result = {}
    with torch.no_grad():
        for name, base, kind in [("background", coarse, "background"), ("colour", coarse, "colour"),
                                 ("shape", coarse, "shape"), ("position", coarse, "position"),
                                 ("position_fine", fine, "position")]:
            pairs = [(i, c) for i, c in enumerate(_swap_word(b, kind) for b in base) if c is not None]
            ref = encode_prompts(tokenizer, text_encoder, [base[i] for i, _ in pairs])
            h1 = encode_prompts(tokenizer, text_encoder, [c for _, c in pairs])
            result[name] = round(float(relative_change(ref, h1).mean()), 4)
    return result


class TextEncoderTrainer(Stage0Trainer):
    """LiT: the text encoder learns to match the frozen SigLIP image tower's features (plus optional caption-attribute
    and swap-margin losses)."""

    name = "pretrain-text-encoder"
    accumulates = False  # the contrastive loss's negatives are the batch's other captions

    def __init__(self, cfg: TextEncoderPretrainConfig) -> None:
        super().__init__(cfg)
        self.tokenizer = load_toy_tokenizer(cfg.tokenizer)
        self.tower = load_image_tower(cfg.image_tower)
        self.image_size = int(self.tower.config.vision_config.image_size)
        self.model = build_locked_image_text(cfg.text_encoder, self.tokenizer,
                                             int(self.tower.config.vision_config.hidden_size))
        self.prepare(self.model, decay_groups(self.model, cfg.train.lr, cfg.train.weight_decay))
        self.parts: dict[str, float] = {}

    def batches(self, state: RunState) -> Iterator[Any]:
        return self.scene_batches(state, self.image_size, self.cfg.train.num_workers)

    def micro_step(self, batch: Any) -> torch.Tensor:
        step_index, images_u8, scenes = batch
        spec, model, tokenizer = self.cfg.train, self.model, self.tokenizer
        rng = toy_rng(self.seed, Stream.CHOICES, step_index)
        fine = rng.random(len(scenes)) < spec.fine_caption_prob
        texts = [world.caption_fine(s) if f else world.caption_coarse(s) for s, f in zip(scenes, fine)]
        negatives = hard_negative_captions(texts, spec.hard_negatives, rng)
        rows = texts + negatives
        image_emb = image_features(self.tower, images_to_unit_range(images_u8))
        hidden = encode_prompts(tokenizer, model.text_encoder, rows)
        loss = sigmoid_loss_rows(model.logits(model.embed_hidden(hidden), image_emb), rows, texts)
        self.parts = {"lit": float(loss.detach())}
        if spec.attribute_weight > 0:
            attr, self.parts["attributes"] = attribute_loss(model.attributes, hidden[: len(texts)],
                                                            first_eos_index(tokenizer, texts), scene_targets(scenes))
            loss = loss + spec.attribute_weight * attr
        if spec.swap_margin > 0 and negatives:
            k = spec.hard_negatives  # every caption has a background word, so each got exactly k, in order
            own = hidden[: len(texts)].repeat_interleave(k, dim=0)
            margin = swap_margin_loss(own, hidden[len(texts):], spec.swap_margin)
            self.parts["swap_margin"] = round(float(margin.detach()), 4)
            loss = loss + spec.swap_margin_weight * margin
        return loss

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        flat: dict[str, float] = {}
        for name, value in self.parts.items():  # the attribute loss reports one value per attribute
            items = value.items() if isinstance(value, dict) else [("", value)]
            flat.update({f"train/{name}_loss{'_' + k if k else ''}": float(v) for k, v in items})
        return flat

    def after_step(self, state: RunState) -> None:
        if state.step % self.cfg.train.sensitivity_every == 0:
            self.model.eval()
            log.info("step %d word_sensitivity %s", state.step,
                     word_sensitivity(self.model.text_encoder, self.tokenizer, self.seed))
            self.model.train()


def pretrain_text_encoder(cfg: TextEncoderPretrainConfig, out: str | Path, resume: str | None = None
                          ) -> dict[str, Any]:
    """Train (or resume) the text encoder against the frozen toy SigLIP image tower; write ``out``; returns metrics."""
    trainer = TextEncoderTrainer(cfg)
    model, tokenizer, tower = trainer.model, trainer.tokenizer, trainer.tower
    log.info("text encoder: %.2fM params; %d steps of batch %d (+%d hard negatives each) against frozen %s",
             sum(p.numel() for p in model.text_encoder.parameters()) / 1e6, cfg.train.max_steps, cfg.train.global_batch_size,
             cfg.train.hard_negatives, cfg.image_tower)
    before = word_sensitivity(model.text_encoder, tokenizer, cfg.seed)
    summary = trainer.train(resume)
    metrics = {
        "retrieval_heldout": evaluate_text_encoder(model, tower, tokenizer, cfg.seed, cfg.eval_scenes,
                                                   trainer.image_size),
        "word_sensitivity": {"before_training": before,
                             "after_training": word_sensitivity(model.text_encoder, tokenizer, cfg.seed)},
        **trainer.run_metrics(summary),
        "parameters": sum(p.numel() for p in model.text_encoder.parameters()),
    }
    with atomic_dir(out) as tmp:
        model.text_encoder.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_tensors(tmp, {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")},
                     weights_name="head.safetensors")
        write_recipe(tmp, "text_encoder", to_dict(cfg), cfg.seed, time.time() - trainer.started, metrics)
    return metrics
