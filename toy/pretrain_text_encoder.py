"""toy/pretrain_text_encoder.py — pretrain the toy decoder's CLIP text encoder contrastively (LiT-style).

Stable Diffusion's UNet is trained against a text encoder that contrastive pretraining (CLIP / OpenCLIP) already
taught to encode every word of a caption. Trained jointly with the UNet from scratch, the toy text encoder did not
learn that: it encoded the background word and barely the object words (position words moved its output by 0.005
on average, the background word by 0.82), and the decoder never learned to draw what the objects are. So the toy
world now does what SD did: this module trains a ``CLIPTextModel`` first, and the decoder is trained against it
frozen (``text_encoder.pretrained`` in configs/toy/decoder.yaml).

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
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vilex.checkpoint import atomic_dir, save_tensors
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
from toy.pretrain_decoder import TextEncoderSpec, encode_prompts, load_or_build_text_encoder
from toy.pretrain_siglip import topk_caption_hits
from toy.probe import warmup_cosine
from toy.recipe import (
    SceneBatches,
    Stream,
    heldout_scenes,
    images_to_unit_range,
    render_batch,
    scene_loader,
    toy_rng,
    write_recipe,
)
from toy.tokenizer import load_toy_tokenizer

log = logging.getLogger(__name__)


SWAP_KINDS: tuple[str, ...] = ("background", "colour", "shape", "position")


@dataclass
class TextEncoderTrainSpec:
    steps: int = cfg_field(1500, ge=1)
    batch_size: int = cfg_field(128, ge=2)
    lr: float = cfg_field(1e-3, gt=0)
    warmup_steps: int = cfg_field(100, ge=0)
    min_lr_ratio: float = cfg_field(0.05, ge=0, le=1)
    weight_decay: float = cfg_field(1e-4, ge=0)
    grad_clip: float = cfg_field(1.0, gt=0)
    fine_caption_prob: float = cfg_field(0.5, ge=0, le=1)
    hard_negatives: int = cfg_field(1, ge=0, help="per image caption, this many copies with ONE word swapped "
                                                  "(background, object colour, shape or position) as negatives")
    threads: int = cfg_field(1, ge=1)
    num_workers: int = cfg_field(1, ge=0)
    log_every: int = cfg_field(25, ge=1)
    max_minutes: float | None = cfg_field(None, gt=0, help="stop early (and still evaluate and save) after this long")
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


def pretrain_text_encoder(cfg: TextEncoderPretrainConfig, out: str | Path) -> dict[str, Any]:
    """Train the text encoder against the frozen toy SigLIP image tower; write ``out``; returns metrics."""
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    spec = cfg.train
    tokenizer = load_toy_tokenizer(cfg.tokenizer)
    tower = load_image_tower(cfg.image_tower)
    image_size = int(tower.config.vision_config.image_size)
    model = build_locked_image_text(cfg.text_encoder, tokenizer, int(tower.config.vision_config.hidden_size))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, spec.steps, spec.warmup_steps, spec.min_lr_ratio))
    log.info("text encoder: %.2fM params; %d steps of batch %d (+%d hard negatives each) against frozen %s",
             sum(p.numel() for p in model.text_encoder.parameters()) / 1e6, spec.steps, spec.batch_size,
             spec.hard_negatives, cfg.image_tower)
    before = word_sensitivity(model.text_encoder, tokenizer, cfg.seed)
    batches = SceneBatches(cfg.seed, 0, spec.steps, spec.batch_size, image_size)
    curve, window, window_start, step, stopped_early = [], [], time.time(), 0, False
    model.train()
    for step_index, images_u8, scenes in scene_loader(batches, spec.num_workers):
        rng = toy_rng(cfg.seed, Stream.CHOICES, step_index)
        fine = rng.random(len(scenes)) < spec.fine_caption_prob
        texts = [world.caption_fine(s) if f else world.caption_coarse(s) for s, f in zip(scenes, fine)]
        negatives = hard_negative_captions(texts, spec.hard_negatives, rng)
        rows = texts + negatives
        image_emb = image_features(tower, images_to_unit_range(images_u8))
        hidden = encode_prompts(tokenizer, model.text_encoder, rows)
        loss = sigmoid_loss_rows(model.logits(model.embed_hidden(hidden), image_emb), rows, texts)
        parts = {"lit": float(loss.detach())}
        if spec.attribute_weight > 0:
            attr, parts["attributes"] = attribute_loss(model.attributes, hidden[: len(texts)],
                                                       first_eos_index(tokenizer, texts), scene_targets(scenes))
            loss = loss + spec.attribute_weight * attr
        if spec.swap_margin > 0 and negatives:
            k = spec.hard_negatives  # every caption has a background word, so each got exactly k, in order
            own = hidden[: len(texts)].repeat_interleave(k, dim=0)
            margin = swap_margin_loss(own, hidden[len(texts):], spec.swap_margin)
            parts["swap_margin"] = round(float(margin.detach()), 4)
            loss = loss + spec.swap_margin_weight * margin
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        lr_sched.step()
        step = step_index + 1
        window.append(float(loss.detach()))
        if step % spec.log_every == 0 or step == spec.steps:
            sec = (time.time() - window_start) / len(window)
            curve.append({"step": step, "loss": round(float(np.mean(window)), 4)})
            log.info("step %d/%d loss %.4f lr %.2e %.2fs/step %s", step, spec.steps, curve[-1]["loss"],
                     lr_sched.get_last_lr()[0], sec, parts)
            window, window_start = [], time.time()
        if step % spec.sensitivity_every == 0:
            model.eval()
            log.info("step %d word_sensitivity %s", step, word_sensitivity(model.text_encoder, tokenizer, cfg.seed))
            model.train()
        if spec.max_minutes is not None and time.time() - started > spec.max_minutes * 60 and step < spec.steps:
            log.warning("train.max_minutes=%s reached at step %d of %d: stopping early", spec.max_minutes, step,
                        spec.steps)
            stopped_early = True
            break
    model.eval()
    metrics = {
        "retrieval_heldout": evaluate_text_encoder(model, tower, tokenizer, cfg.seed, cfg.eval_scenes, image_size),
        "word_sensitivity": {"before_training": before,
                             "after_training": word_sensitivity(model.text_encoder, tokenizer, cfg.seed)},
        "steps_done": step, "steps_planned": spec.steps, "stopped_early": stopped_early,
        "train_minutes": round((time.time() - started) / 60, 2),
        "parameters": sum(p.numel() for p in model.text_encoder.parameters()),
        "loss_curve": curve[:: max(1, len(curve) // 8)] + curve[-1:],
    }
    with atomic_dir(out) as tmp:
        model.text_encoder.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_tensors(tmp, {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")},
                     weights_name="head.safetensors")
        write_recipe(tmp, "text_encoder", to_dict(cfg), cfg.seed, time.time() - started, metrics)
    return metrics
