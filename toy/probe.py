"""toy/probe.py — the attribute probe: a small CNN that reads a toy image back into scene-graph facts.

It is the judge of generated toy images: it predicts, from pixels alone,

* ``background``  the background colour name           (``world.BACKGROUND_COLOURS``)
* ``count``       the number of objects                 ("1" .. "3")
* ``shape``       the shape of the LARGEST object        (``world.SHAPES``)
* ``colour``      the colour name of the largest object (``world.OBJECT_COLOURS``)
* ``cell``        the 3×3 cell of the largest object's centre ("top left" … "bottom right", "center")
* ``center``      the largest object's centre (x, y) in [0, 1] (regression)

so a generated image can be scored against the scene graph its caption came from (``judge``). "Largest"
means the largest ``size`` (bbox half-width). When two objects are nearly the same size the question
"which is largest" has no clear answer, so evaluations also report accuracy on scenes with a
``clear_largest`` object (alone, or the only one a coarse caption calls "large" and ≥ 1.2× the next).

Design: plain conv stages (stride-2 downsampling) over the image plus two coordinate channels (positions
are read from where features are, so the head sees them explicitly), flattened (keeping the 4×4 layout;
optionally plus the globally averaged features, position-free evidence for shape and colour) into an MLP
with one linear head per attribute. Trained on freshly rendered scenes with exact labels,
with random Gaussian pixel noise so it stays calibrated on slightly noisy generated images.
Saved as ``model.safetensors`` + ``config.json`` (architecture and label lists: the folder is self-describing).
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

from toy.stage0 import Stage0Trainer, Stage0TrainSpec
from vilex.checkpoint import atomic_dir, load_tensors, save_tensors
from vilex.train.run_loop import RunState
from vilex.config import cfg_field, to_dict
from vilex.errors import UserError
from toy.scenes import world
from toy.recipe import (
    heldout_scenes,
    images_to_unit_range,
    render_batch,
    write_recipe,
)

log = logging.getLogger(__name__)

CLASS_HEADS = ("background", "count", "shape", "colour", "cell")
CELL_NAMES = tuple(world.grid3_name((c + 0.5) / 3, (r + 0.5) / 3) for r in range(3) for c in range(3))
CLEAR_SIZE_RATIO = 1.2


def default_labels(max_objects: int = 3) -> dict[str, list[str]]:
    """Label names of every classification head, in logit order."""
    return {
        "background": list(world.BACKGROUND_COLOURS),
        "count": [str(n) for n in range(1, max_objects + 1)],
        "shape": list(world.SHAPES),
        "colour": list(world.OBJECT_COLOURS),
        "cell": list(CELL_NAMES),
    }


# ----------------------------------------------------------------------------- ground truth
def largest_object(scene: world.Scene) -> world.ToyObject:
    """The object with the largest ``size`` (the first one on a tie)."""
    return max(scene.objects, key=lambda o: o.size)


def clear_largest(scene: world.Scene, min_ratio: float = CLEAR_SIZE_RATIO) -> bool:
    """True when the largest object is unambiguous even from a coarse caption (see module docstring)."""
    if len(scene.objects) == 1:
        return True
    sizes = sorted((o.size for o in scene.objects), reverse=True)
    large = [o for o in scene.objects if world.size_word_coarse(o.size) == "large"]
    return len(large) == 1 and sizes[0] >= min_ratio * sizes[1]


def scene_facts(scene: world.Scene) -> dict[str, Any]:
    """The probe's targets for one scene, as label names (and the centre as floats)."""
    big = largest_object(scene)
    return {"background": scene.background, "count": str(len(scene.objects)), "shape": big.shape,
            "colour": big.colour, "cell": world.grid3_name(big.cx, big.cy), "center": (big.cx, big.cy)}


def probe_targets(scenes: Sequence[world.Scene], labels: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Class indices per head (int64 [B]) and ``center`` (float32 [B, 2]) for a batch of scenes."""
    facts = [scene_facts(s) for s in scenes]
    out: dict[str, torch.Tensor] = {}
    for head in CLASS_HEADS:
        index = {name: i for i, name in enumerate(labels[head])}
        try:
            out[head] = torch.tensor([index[f[head]] for f in facts], dtype=torch.long)
        except KeyError as e:
            raise UserError(f"probe: scene has {head} {e.args[0]!r}, which this probe has no label for") from None
    out["center"] = torch.tensor([f["center"] for f in facts], dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------- model
@dataclass
class ProbeModelConfig:
    """Architecture of the probe (written to its config.json)."""

    image_size: int = cfg_field(32, ge=8, help="input resolution (images are resized to it)")
    channels: list[int] = cfg_field(default_factory=lambda: [32, 64, 128, 128], ge=1,
                                    help="conv stage widths; every stage after the first halves the resolution")
    hidden: int = cfg_field(256, ge=1, help="width of the MLP before the heads")
    pooled_features: bool = cfg_field(False, help="also feed the globally averaged features to the MLP "
                                                  "(position-free evidence for shape and colour)")
    max_objects: int = cfg_field(3, ge=1, help="largest object count the count head can say")


class AttributeProbe(nn.Module):
    """CNN with one head per scene attribute (see the module docstring)."""

    def __init__(self, config: ProbeModelConfig, labels: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.config = config
        self.labels = labels or default_labels(config.max_objects)
        layers: list[nn.Module] = []
        in_ch = 3 + 2  # RGB + (x, y) coordinate channels
        for i, ch in enumerate(config.channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1), nn.GroupNorm(min(8, ch), ch), nn.SiLU(),
                       nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(min(8, ch), ch), nn.SiLU()]
            in_ch = ch
        self.features = nn.Sequential(*layers)
        side = math.ceil(config.image_size / 2 ** (len(config.channels) - 1))
        mlp_in = in_ch * side * side + (in_ch if config.pooled_features else 0)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(mlp_in, config.hidden), nn.SiLU())
        self.heads = nn.ModuleDict({h: nn.Linear(config.hidden, len(self.labels[h])) for h in CLASS_HEADS})
        self.center = nn.Linear(config.hidden, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) in [-1, 1] -> logits per class head and ``center`` (B, 2) in [0, 1]."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        b = images.shape[0]
        coords = torch.linspace(-1.0, 1.0, size, device=images.device, dtype=images.dtype)
        xs = coords.view(1, 1, 1, size).expand(b, 1, size, size)
        ys = coords.view(1, 1, size, 1).expand(b, 1, size, size)
        fmap = self.features(torch.cat([images, xs, ys], dim=1))
        flat = [fmap.flatten(1), fmap.mean(dim=(2, 3))] if self.config.pooled_features else [fmap.flatten(1)]
        h = self.mlp(torch.cat(flat, dim=1))
        out = {name: head(h) for name, head in self.heads.items()}
        out["center"] = torch.sigmoid(self.center(h))
        return out


def probe_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
               center_weight: float = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of per-head cross-entropies plus ``center_weight`` × centre MSE; also the parts as floats."""
    parts = {h: F.cross_entropy(outputs[h].float(), targets[h]) for h in CLASS_HEADS}
    parts["center"] = F.mse_loss(outputs["center"].float(), targets["center"]) * center_weight
    total = torch.stack(list(parts.values())).sum()
    return total, {k: float(v.detach()) for k, v in parts.items()}


def save_probe(probe: AttributeProbe, folder: str | Path) -> None:
    """Write ``model.safetensors`` + ``config.json`` (architecture + labels) into an existing folder."""
    save_tensors(folder, probe.state_dict(), {"model": to_dict(probe.config), "labels": probe.labels})


def load_probe(folder: str | Path) -> AttributeProbe:
    """Rebuild a saved probe (eval mode)."""
    from vilex.config import from_dict

    tensors, config = load_tensors(folder)
    if "model" not in config or "labels" not in config:
        raise UserError(f"{folder}: config.json is not an attribute-probe config (needs 'model' and 'labels')")
    probe = AttributeProbe(from_dict(ProbeModelConfig, config["model"]), config["labels"])
    probe.load_state_dict(tensors)
    return probe.eval()


# ----------------------------------------------------------------------------- judging
@torch.no_grad()
def predict(probe: AttributeProbe, images: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """Predicted label names per head (lists) and ``center`` (np [B, 2]) for images in [-1, 1]."""
    names: dict[str, list[str]] = {h: [] for h in CLASS_HEADS}
    centers = []
    for i in range(0, images.shape[0], batch_size):
        out = probe(images[i:i + batch_size].float())
        for h in CLASS_HEADS:
            names[h] += [probe.labels[h][j] for j in out[h].argmax(-1).tolist()]
        centers.append(out["center"].numpy())
    return {**names, "center": np.concatenate(centers) if centers else np.zeros((0, 2))}


def judge(probe: AttributeProbe, images: torch.Tensor, scenes: Sequence[world.Scene]) -> dict[str, np.ndarray]:
    """Per image: is each predicted attribute right (bool per class head), and the centre error (L2)."""
    if len(scenes) != images.shape[0]:
        raise ValueError(f"judge: {images.shape[0]} images but {len(scenes)} scenes")
    pred = predict(probe, images)
    facts = [scene_facts(s) for s in scenes]
    result = {h: np.array([p == f[h] for p, f in zip(pred[h], facts)], dtype=bool) for h in CLASS_HEADS}
    truth = np.array([f["center"] for f in facts], dtype=np.float64).reshape(-1, 2)
    result["center_error"] = np.linalg.norm(pred["center"] - truth, axis=-1)
    return result


def summarize(judgement: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy per head (and mean centre error) over all images or those where ``mask`` is True."""
    out: dict[str, float] = {}
    for key, values in judgement.items():
        v = values if mask is None else values[mask]
        name = key if key == "center_error" else f"{key}_accuracy"
        out[name] = round(float(v.mean()), 4) if len(v) else float("nan")
    out["n"] = int(len(next(iter(judgement.values()))) if mask is None else int(mask.sum()))
    return out


def chance_levels(labels: dict[str, list[str]]) -> dict[str, float]:
    """Accuracy of uniform guessing per class head (a reference for the numbers above)."""
    return {f"{h}_accuracy": round(1.0 / len(labels[h]), 4) for h in CLASS_HEADS}


# ----------------------------------------------------------------------------- training
@dataclass
class ProbeTrainConfig(Stage0TrainSpec):
    """How the probe is trained (optimisation and data)."""

    max_steps: int = cfg_field(2500, ge=1, help="optimizer steps")
    lr: float = cfg_field(2e-3, gt=0)
    grad_clip: float | None = cfg_field(None, gt=0, help="max global grad norm (null = no clipping)")
    log_every: int = cfg_field(50, ge=1)
    global_batch_size: int = cfg_field(64, ge=1, help="scenes per optimizer step")
    noise_std_max: float = cfg_field(0.08, ge=0, help="per-image Gaussian pixel noise std ~ U(0, this), [-1,1] units")
    center_weight: float = cfg_field(10.0, ge=0)
    num_workers: int = cfg_field(1, ge=0, help="DataLoader workers rendering scenes (0 = in this process)")


@dataclass
class ProbeConfig:
    """One probe experiment (configs/toy/probe.yaml)."""

    seed: int = cfg_field(0, help="seed of the training and held-out scene streams")
    work_dir: str = cfg_field("runs/toy/probe", help="checkpoints and the training log (not shipped)")
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    train: ProbeTrainConfig = field(default_factory=ProbeTrainConfig)
    eval_scenes: int = cfg_field(1024, ge=1, help="held-out scenes the final accuracies are measured on")


def evaluate_probe(probe: AttributeProbe, seed: int, n_scenes: int) -> dict[str, Any]:
    """Accuracy per head on ``n_scenes`` held-out renders: all scenes, and those with a clear largest object."""
    scenes = heldout_scenes(seed, n_scenes)
    images = images_to_unit_range(render_batch(scenes, probe.config.image_size))
    judgement = judge(probe.eval(), images, scenes)
    clear = np.array([clear_largest(s) for s in scenes])
    return {"all": summarize(judgement), "clear_largest": summarize(judgement, clear),
            "chance": chance_levels(probe.labels)}


class ProbeTrainer(Stage0Trainer):
    """The probe's heads on freshly rendered scenes with a little pixel noise."""

    name = "train-probe"

    def __init__(self, cfg: ProbeConfig) -> None:
        super().__init__(cfg)
        self.probe = AttributeProbe(cfg.model)
        self.prepare(self.probe, [{"params": list(self.probe.parameters()), "lr": cfg.train.lr,
                                   "weight_decay": cfg.train.weight_decay}])
        self.noise_gen = torch.Generator().manual_seed(cfg.seed)  # stateful: its state is part of a checkpoint

    def batches(self, state: RunState) -> Iterator[Any]:
        return self.scene_batches(state, self.cfg.model.image_size,
                                  self.cfg.train.num_workers, {"max_objects": self.cfg.model.max_objects})

    def micro_step(self, batch: Any) -> torch.Tensor:
        _, images_u8, scenes = batch
        images = images_to_unit_range(images_u8)
        std = torch.rand(images.shape[0], 1, 1, 1, generator=self.noise_gen) * self.cfg.train.noise_std_max
        images = images + std * torch.randn(images.shape, generator=self.noise_gen)
        loss, self.parts = probe_loss(self.probe(images), probe_targets(scenes, self.probe.labels),
                                      self.cfg.train.center_weight)
        return loss

    def log_metrics(self, window_seconds: float, window_steps: int) -> dict[str, float]:
        return {f"train/{k}": float(v) for k, v in self.parts.items()}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"noise_generator": self.noise_gen.get_state()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.noise_gen.set_state(tensors["noise_generator"])


def train_probe(cfg: ProbeConfig, out: str | Path, log_file: str | Path | None = None,
                resume: str | None = None) -> dict[str, Any]:
    """Train (or resume) the probe on freshly rendered scenes, measure it on held-out ones, save it to ``out``."""
    trainer = ProbeTrainer(cfg)
    summary = trainer.train(resume)
    probe = trainer.probe
    window = summary["losses"][-cfg.train.log_every:]
    metrics = {"heldout": evaluate_probe(probe, cfg.seed, cfg.eval_scenes),
               "final_train_loss": round(float(np.mean(window)), 4) if window else None,
               **trainer.run_metrics(summary),
               "parameters": sum(p.numel() for p in probe.parameters())}
    train_log = Path(cfg.work_dir) / "train_log.jsonl"
    if log_file and train_log.is_file():
        with open(log_file, "a") as fh:
            fh.write(train_log.read_text())
    with atomic_dir(out) as tmp:
        save_probe(probe, tmp)
        write_recipe(tmp, "probe", to_dict(cfg), cfg.seed, time.time() - trainer.started, metrics)
        if train_log.is_file():
            (tmp / "train_log.jsonl").write_text(train_log.read_text())
    return metrics
