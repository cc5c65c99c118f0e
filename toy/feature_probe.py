"""toy/feature_probe.py — what a frozen vision tower's features carry: linear probes for scene attributes.

ViLex's premise is that a language-supervised encoder misses what its captions do not say. In the toy world that is
measurable: a logistic regression reads each attribute from the tower's final patch features (frozen; rendered
scenes at the tower's resolution), from the mean over patches ("mean": what a pooled embedding keeps) and from all
patches side by side ("tokens": where each feature is, what a VLM's projector receives). The same probe on the
ViLex-trained ViT and on its SigLIP initialisation shows what stage 1 taught it.

Targets (``TARGETS``): background, object count, the largest object's colour, shape and 3×3 cell, and the shape of
the smallest object of scenes with two or three objects (the detail a caption naming "a red circle" leaves out).
Scenes come from the held-out stream of ``seed`` (never a training scene), the first ``n_train`` to fit and the next
``n_test`` to score; ``majority`` is the accuracy of always answering the most frequent training label.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from toy.recipe import heldout_scenes, images_to_unit_range, render_batch
from toy.scenes import world


def _largest(scene: world.Scene) -> world.ToyObject:
    return max(scene.objects, key=lambda o: o.size)


def _smallest(scene: world.Scene) -> world.ToyObject:
    return min(scene.objects, key=lambda o: o.size)


def _cell(o: world.ToyObject) -> str:
    return world.grid3_name(o.cx, o.cy)


# target -> (label of a scene, or None when the scene does not ask it)
TARGETS: dict[str, Callable[[world.Scene], str | None]] = {
    "background": lambda s: s.background,
    "count": lambda s: str(len(s.objects)),
    "largest_colour": lambda s: _largest(s).colour,
    "largest_shape": lambda s: _largest(s).shape,
    "largest_cell": lambda s: _cell(_largest(s)),
    "smallest_shape": lambda s: _smallest(s).shape if len(s.objects) > 1 else None,
}


@torch.no_grad()
def tower_features(vision_model: Any, images: torch.Tensor, batch_size: int = 128) -> dict[str, np.ndarray]:
    """{"mean": (N, D), "tokens": (N, P·D)} from a ``SiglipVisionModel``'s last hidden state."""
    vision_model.eval()
    means, tokens = [], []
    for i in range(0, len(images), batch_size):
        hidden = vision_model(pixel_values=images[i:i + batch_size]).last_hidden_state.float()
        means.append(hidden.mean(1).numpy())
        tokens.append(hidden.flatten(1).numpy())
    return {"mean": np.concatenate(means), "tokens": np.concatenate(tokens)}


def fit_and_score(x_train: np.ndarray, y_train: list[str], x_test: np.ndarray, y_test: list[str]) -> float:
    """Test accuracy of a standardised, L2-regularised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(x_train), y_train)
    return float(clf.score(scaler.transform(x_test), y_test))


@torch.no_grad()
def patch_row_accuracy(vision_model: Any, images: torch.Tensor, n_train: int) -> float:
    """How well ONE last-layer patch feature tells its own grid row (logistic probe, fitted on the patches of the
    first ``n_train`` images, scored on the rest; chance 1 / rows). An attention pooler sees the patches as a set:
    what a patch feature does not say about where it is, the pooler cannot know without position codes."""
    vision_model.eval()
    hidden = torch.cat([vision_model(pixel_values=images[i:i + 128]).last_hidden_state.float()
                        for i in range(0, len(images), 128)]).numpy()
    n, patches, width = hidden.shape
    side = round(patches ** 0.5)
    rows = np.tile(np.arange(patches) // side, n).astype(str)
    x = hidden.reshape(-1, width)
    cut = n_train * patches
    return fit_and_score(x[:cut], list(rows[:cut]), x[cut:], list(rows[cut:]))


def probe_tower(vision_model: Any, seed: int = 7, n_train: int = 1500, n_test: int = 500) -> dict[str, Any]:
    """{target: {"mean": acc, "tokens": acc, "majority": acc, "n_test": n}} for one tower, and "patch_row":
    ``patch_row_accuracy`` on a tenth of the scenes."""
    size = int(vision_model.config.image_size)
    scenes = heldout_scenes(seed, n_train + n_test)
    images = images_to_unit_range(render_batch(scenes, size))
    feats = tower_features(vision_model, images)
    out: dict[str, Any] = {}
    for name, label in TARGETS.items():
        labels = [label(s) for s in scenes]
        train = [i for i in range(n_train) if labels[i] is not None]
        test = [i for i in range(n_train, n_train + n_test) if labels[i] is not None]
        y_train, y_test = [labels[i] for i in train], [labels[i] for i in test]
        majority = max(set(y_train), key=y_train.count)
        result = {pool: round(fit_and_score(f[train], y_train, f[test], y_test), 4) for pool, f in feats.items()}
        out[name] = {**result, "majority": round(float(np.mean([y == majority for y in y_test])), 4),
                     "n_test": len(test)}
    few = max(2, (n_train + n_test) // 10)
    side = round((feats["tokens"].shape[1] // feats["mean"].shape[1]) ** 0.5)
    out["patch_row"] = {"accuracy": round(patch_row_accuracy(vision_model, images[:few], few * 3 // 4), 4),
                        "chance": round(1 / side, 4)}
    return out


def probe_table(results: dict[str, dict[str, Any]], pooling: str = "tokens") -> str:
    """A markdown table: one row per target, one column per tower (``pooling`` features), plus the majority rate."""
    towers = list(results)
    lines = [f"| target | {' | '.join(towers)} | majority |", "|---|" + "---:|" * (len(towers) + 1)]
    for target in TARGETS:
        row = [f"{results[t][target][pooling]:.3f}" for t in towers]
        lines.append(f"| {target} | {' | '.join(row)} | {results[towers[0]][target]['majority']:.3f} |")
    if all("patch_row" in results[t] for t in towers):  # one patch's own row: the same for either pooling
        row = [f"{results[t]['patch_row']['accuracy']:.3f}" for t in towers]
        lines.append(f"| patch's own row, from that patch alone | {' | '.join(row)} | "
                     f"{results[towers[0]]['patch_row']['chance']:.3f} (chance) |")
    return "\n".join(lines)


def compare_towers(towers: dict[str, Any], n_train: int = 1500, n_test: int = 500,
                   seed: int = 7) -> dict[str, dict[str, Any]]:
    """``probe_tower`` for each ``SiglipVisionModel`` folder of ``towers`` (name -> folder), on the same scenes."""
    from transformers import SiglipVisionModel

    return {name: probe_tower(SiglipVisionModel.from_pretrained(str(folder)), seed, n_train, n_test)
            for name, folder in towers.items()}
