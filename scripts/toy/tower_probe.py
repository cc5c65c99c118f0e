"""Linear probes on a VLM vision tower's frozen patch features: what can the toy VLM read from them?

On single-object toy scenes (no binding needed) a logistic regression predicts the object's shape, colour and 3x3
cell from the tower's image tokens exactly as the VLM receives them (``vlm.towers.build_tower``, same
``feature_layer``): from the mean over tokens, and from all tokens concatenated (keeps where each token is).
An attribute a probe cannot read is one the VLM cannot be expected to answer questions about.

    python scripts/toy/tower_probe.py --tower siglip:assets/toy/siglip/vision --tower vilex:assets/toy/vilex
    python scripts/toy/tower_probe.py ... --data runs/toy/data --n-train 1200 --n-test 300 --feature-layer -2
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ATTRIBUTES = ("shape", "colour", "cell")


def _single_object_rows(split: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (split / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["n_objects"] == 1][:n]


def _label(row: dict, attribute: str) -> str:
    obj = row["scene"]["objects"][0]
    if attribute == "cell":
        return f"{min(2, int(obj['cy'] * 3))},{min(2, int(obj['cx'] * 3))}"
    return obj[attribute]


@torch.no_grad()
def _features(tower, split: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """(pooling -> (N, dims)): per feature group the mean over its tokens, or all its tokens flattened; concatenated
    over the groups (vilex_tokens has two)."""
    from vlm.data import ImageSpec

    spec = ImageSpec(tower.image_size, tower.image_mean, tower.image_std)
    groups: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), 64):
        x = torch.stack([spec.render(Image.open(split / r["file_name"]).convert("RGB")) for r in rows[start:start + 64]])
        for name, f in tower(x).items():
            groups.setdefault(name, []).append(f.float())
    feats = [torch.cat(g) for g in groups.values()]
    return {"mean": torch.cat([f.mean(1) for f in feats], 1).numpy(),
            "all_tokens": torch.cat([f.flatten(1) for f in feats], 1).numpy()}


def probe(tower_type: str, path: str, data: Path, n_train: int, n_test: int, feature_layer: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vlm.config import TowerConfig
    from vlm.towers import build_tower

    tower = build_tower(TowerConfig(type=tower_type, name_or_path=path, feature_layer=feature_layer)).eval()
    train_rows, test_rows = _single_object_rows(data / "train", n_train), _single_object_rows(data / "test", n_test)
    f_train, f_test = _features(tower, data / "train", train_rows), _features(tower, data / "test", test_rows)
    out: dict = {"tower": f"{tower_type}:{path}", "train": len(train_rows), "test": len(test_rows)}
    for pool in ("mean", "all_tokens"):
        xtr, xte = f_train[pool], f_test[pool]
        scaler = StandardScaler().fit(xtr)
        xtr, xte = scaler.transform(xtr), scaler.transform(xte)
        for attr in ATTRIBUTES:
            ytr, yte = [_label(r, attr) for r in train_rows], [_label(r, attr) for r in test_rows]
            clf = LogisticRegression(max_iter=3000, C=0.1).fit(xtr, ytr)
            out[f"{attr}/{pool}"] = round(float(clf.score(xte, yte)), 3)
    for attr in ATTRIBUTES:
        counts = Counter(_label(r, attr) for r in test_rows)
        out[f"{attr}/majority"] = round(max(counts.values()) / len(test_rows), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tower", action="append", required=True, metavar="TYPE:PATH",
                    help="a vlm tower (siglip:FOLDER, vilex:CHECKPOINT, vilex_tokens:CHECKPOINT); repeatable")
    ap.add_argument("--data", type=Path, default=Path("runs/toy/data"), help="a `vilex toy generate` folder")
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--feature-layer", type=int, default=-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for spec in args.tower:
        tower_type, path = spec.split(":", 1)
        print(json.dumps(probe(tower_type, path, args.data, args.n_train, args.n_test, args.feature_layer)))


if __name__ == "__main__":
    main()
