"""toy/pretrain_siglip.py — train a tiny SigLIP on toy image–caption pairs (the ViLex ViT's initialisation).

ViLex initialises its ViT from SigLIP; the toy world has none to download, so this trains a transformers
``SiglipModel`` (ViT at 32×32, patch 4; a 2-layer text tower on the toy tokenizer) with SigLIP's sigmoid
image–text loss on freshly rendered scenes, each paired with its coarse or fine caption. Output:

* ``out/``         the full ``SiglipModel`` (save_pretrained) + the tokenizer + an image processor config;
* ``out/vision/``  the vision tower alone as a ``SiglipVisionModel`` folder (what ViLex's "siglip" tower loads);
* ``out/recipe.json`` with image→caption retrieval on held-out scenes (top-1/top-5, fine and coarse captions,
  and the chance level of each).

Decisions:
* Text is padded to ``text.max_length`` with the pad (= EOS) token and no attention mask: SigLIP pools the
  LAST position of its text tower, so it is trained, like the original, on fixed-length padded text.
* Loss: SigLIP's sigmoid loss, except that two pairs with the SAME caption text are positives of each other
  (coarse captions repeat across scenes: "a large red circle at the center on a gray background"). A caption
  is a true description of every image it was generated for, so calling it a negative would be wrong.
* ``logit_scale`` / ``logit_bias`` start at log 10 / -10 as in the SigLIP paper (transformers inits them to 0).
* Retrieval counts a hit when the retrieved caption's TEXT equals the image's own caption, and chance is
  computed for the same duplicates (1 - C(N-m, k) / C(N, k) per image, m = copies of its caption).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Literal

import numpy as np
import torch
from torch.nn import functional as F

from toy.recipe import (
    Stream,
    heldout_scenes,
    images_to_unit_range,
    render_batch,
    toy_rng,
    write_recipe,
)
from toy.scenes import world
from toy.stage0 import Stage0Trainer, Stage0TrainSpec, decay_groups
from toy.tokenizer import load_toy_tokenizer
from vilex.checkpoint import atomic_dir
from vilex.config import cfg_field, to_dict
from vilex.errors import ConfigError, UserError
from vilex.train.run_loop import RunState

log = logging.getLogger(__name__)


@dataclass
class SiglipVisionSpec:
    image_size: int = cfg_field(32, ge=8)
    patch_size: int = cfg_field(4, ge=1)
    width: int = cfg_field(96, ge=8)
    layers: int = cfg_field(3, ge=1)
    heads: int = cfg_field(4, ge=1)
    mlp_ratio: int = cfg_field(4, ge=1)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision: image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"vision: width {self.width} not divisible by heads {self.heads}")


@dataclass
class SiglipTextSpec:
    width: int = cfg_field(96, ge=8)
    layers: int = cfg_field(2, ge=1)
    heads: int = cfg_field(4, ge=1)
    mlp_ratio: int = cfg_field(4, ge=1)
    max_length: int = cfg_field(64, ge=4, help="text positions; every caption is padded to this length")

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text: width {self.width} not divisible by heads {self.heads}")


@dataclass
class SiglipTrainSpec(Stage0TrainSpec):
    max_steps: int = cfg_field(2000, ge=1, help="optimizer steps")
    min_lr_ratio: float = cfg_field(0.05, ge=0, le=1)
    weight_decay: float = cfg_field(1e-4, ge=0)
    global_batch_size: int = cfg_field(128, ge=2, help="scenes per optimizer step (all in one forward: the "
                                                        "sigmoid loss's negatives are the batch's other captions)")
    captions: Literal["mixed", "web"] = cfg_field("mixed", help="mixed: each scene's coarse or fine caption "
                                                                "(fine_caption_prob); web: alt-text-like captions "
                                                                "(world.caption_web) that never state positions, "
                                                                "sizes or counts, as web-scale SigLIP's data")
    fine_caption_prob: float = cfg_field(0.5, ge=0, le=1)
    bf16: bool = cfg_field(True)
    num_workers: int = cfg_field(1, ge=0)


@dataclass
class SiglipPretrainConfig:
    """One SigLIP-pretraining experiment (configs/toy/siglip.yaml)."""

    seed: int = cfg_field(0)
    tokenizer: str = cfg_field("assets/toy/tokenizer")
    work_dir: str = cfg_field("runs/toy/siglip", help="checkpoints and the training log (not shipped)")
    vision: SiglipVisionSpec = field(default_factory=SiglipVisionSpec)
    text: SiglipTextSpec = field(default_factory=SiglipTextSpec)
    train: SiglipTrainSpec = field(default_factory=SiglipTrainSpec)
    eval_scenes: int = cfg_field(256, ge=2, help="held-out scenes for image->caption retrieval")
    feature_probe: bool = cfg_field(True, help="linear probes of the image tower's features in the recipe "
                                               "(toy/feature_probe.py: what they carry and what they miss)")


def build_siglip(cfg: SiglipPretrainConfig, tokenizer: Any) -> Any:
    """A randomly initialised ``SiglipModel`` for the toy tokenizer, with SigLIP's logit scale/bias init."""
    from transformers import SiglipConfig, SiglipModel

    v, t = cfg.vision, cfg.text
    config = SiglipConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_ratio * v.width, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t.width, intermediate_size=t.mlp_ratio * t.width,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_length,
                         projection_size=v.width, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


def tokenize_padded(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids (B, max_length), padded with the pad token; a text that does not fit is a UserError."""
    ids = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=False,
                    return_tensors="pt").input_ids
    if ids.shape[1] > max_length:
        raise UserError(f"a caption has {ids.shape[1]} tokens; text.max_length is {max_length}")
    return ids


def sigmoid_loss_with_duplicates(logits_per_text: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """SigLIP's loss (sum over pairs of -log σ(±logit), mean over texts) with equal captions as positives."""
    index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = torch.tensor([index[t] for t in texts])
    signs = (ids[:, None] == ids[None, :]).float() * 2.0 - 1.0
    return -F.logsigmoid(signs * logits_per_text.float()).sum(dim=-1).mean()


def retrieval_chance(texts: Sequence[str], k: int) -> float:
    """Expected image->caption top-k hit rate of a random ranking, given duplicate captions."""
    n = len(texts)
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    k = min(k, n)
    return float(np.mean([1.0 - math.comb(n - counts[t], k) / math.comb(n, k) for t in texts]))


@torch.no_grad()
def retrieval_accuracy(model: Any, tokenizer: Any, images: torch.Tensor, texts: Sequence[str], max_length: int,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->caption top-k accuracy (a hit = a retrieved caption equal to the image's own) and chance."""
    ids = tokenize_padded(tokenizer, texts, max_length)
    out = model(input_ids=ids, pixel_values=images)
    result = topk_caption_hits(out.logits_per_image, texts, ks)
    result["distinct_captions"] = len(set(texts))
    return result


def topk_caption_hits(logits: torch.Tensor, texts: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of a square retrieval (row i's own item is i, in either direction) where a hit is any retrieved
    item whose caption text equals row i's, with the matching chance levels; plus ``n``."""
    ranking = logits.argsort(dim=-1, descending=True)
    result: dict[str, float] = {}
    for k in ks:
        hits = [any(texts[j] == texts[i] for j in ranking[i, :k].tolist()) for i in range(len(texts))]
        result[f"top{k}"] = round(float(np.mean(hits)), 4)
        result[f"chance_top{k}"] = round(retrieval_chance(texts, k), 4)
    result["n"] = len(texts)
    return result


def evaluate_siglip(model: Any, tokenizer: Any, seed: int, n_scenes: int, image_size: int, max_length: int
                    ) -> dict[str, Any]:
    scenes = heldout_scenes(seed, n_scenes)
    images = images_to_unit_range(render_batch(scenes, image_size))
    model.eval()
    return {"fine_captions": retrieval_accuracy(model, tokenizer, images, [world.caption_fine(s) for s in scenes],
                                                max_length),
            "coarse_captions": retrieval_accuracy(model, tokenizer, images,
                                                  [world.caption_coarse(s) for s in scenes], max_length),
            "web_captions": retrieval_accuracy(model, tokenizer, images,
                                               [world.caption_web(s, toy_rng(seed, Stream.CHOICES, i))
                                                for i, s in enumerate(scenes)], max_length)}


def training_captions(scenes: Sequence[world.Scene], rng: Any, spec: SiglipTrainSpec) -> list[str]:
    """The caption each training scene is paired with (``spec.captions``)."""
    if spec.captions == "web":
        return [world.caption_web(s, rng) for s in scenes]
    fine = rng.random(len(scenes)) < spec.fine_caption_prob
    return [world.caption_fine(s) if f else world.caption_coarse(s) for s, f in zip(scenes, fine)]


def vision_tower(model: Any) -> Any:
    """The image tower of a ``SiglipModel`` as a ``SiglipVisionModel`` (what the ViLex ViT and the VLMs load)."""
    from transformers import SiglipVisionModel

    vision = SiglipVisionModel(model.config.vision_config)
    vision.load_state_dict(model.vision_model.state_dict())  # transformers v5: SiglipVisionModel is flat
    return vision


def save_siglip(model: Any, tokenizer: Any, out: Path) -> None:
    """The full model + tokenizer + image processor in ``out``, and the vision tower alone in ``out/vision``."""
    from transformers import SiglipImageProcessor

    size = int(model.config.vision_config.image_size)
    # Toy images are rendered at the tower's size; the processor only rescales to [-1, 1] (mean = std = 0.5).
    processor = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    vision_tower(model).save_pretrained(str(out / "vision"))
    processor.save_pretrained(str(out / "vision"))


class SiglipTrainer(Stage0Trainer):
    """SigLIP's sigmoid loss on fresh scenes, each paired with its coarse or fine caption."""

    name = "pretrain-siglip"
    accumulates = False  # the sigmoid loss's negatives are the batch's other captions

    def __init__(self, cfg: SiglipPretrainConfig) -> None:
        super().__init__(cfg, bf16=cfg.train.bf16)
        self.tokenizer = load_toy_tokenizer(cfg.tokenizer)
        self.model = build_siglip(cfg, self.tokenizer)
        self.prepare(self.model, decay_groups(self.model, cfg.train.lr, cfg.train.weight_decay))

    def batches(self, state: RunState) -> Iterator[Any]:
        return self.scene_batches(state, self.cfg.vision.image_size,
                                  self.cfg.train.num_workers)

    def micro_step(self, batch: Any) -> torch.Tensor:
        step_index, images_u8, scenes = batch
        texts = training_captions(scenes, toy_rng(self.seed, Stream.CHOICES, step_index), self.cfg.train)
        ids = tokenize_padded(self.tokenizer, texts, self.cfg.text.max_length)
        with self.strategy.autocast():
            out = self.model(input_ids=ids, pixel_values=images_to_unit_range(images_u8))
        return sigmoid_loss_with_duplicates(out.logits_per_text, texts)

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        return {"train/logit_scale": float(self.model.logit_scale.detach().exp()),
                "train/logit_bias": float(self.model.logit_bias.detach())}


def pretrain_siglip(cfg: SiglipPretrainConfig, out: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume) the tiny SigLIP, measure held-out retrieval, write ``out`` (and ``out/vision``)."""
    trainer = SiglipTrainer(cfg)
    model, tokenizer = trainer.model, trainer.tokenizer
    log.info("siglip: %.2fM params; %d steps of batch %d", sum(p.numel() for p in model.parameters()) / 1e6,
             cfg.train.max_steps, cfg.train.global_batch_size)
    summary = trainer.train(resume)
    metrics = {
        "retrieval_heldout": evaluate_siglip(model, tokenizer, cfg.seed, cfg.eval_scenes, cfg.vision.image_size,
                                             cfg.text.max_length),
        **trainer.run_metrics(summary),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if cfg.feature_probe:
        from toy.feature_probe import probe_tower

        metrics["feature_probe"] = probe_tower(vision_tower(model))
    with atomic_dir(out) as tmp:
        save_siglip(model, tokenizer, tmp)
        write_recipe(tmp, "siglip", to_dict(cfg), cfg.seed, time.time() - trainer.started, metrics)
    return metrics
