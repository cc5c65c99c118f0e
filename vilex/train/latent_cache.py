"""latent_cache.py — cache the VAE posterior (mean, std) of every training image, keyed so it is never stale.

Encoding images with the frozen VAE every step costs as much as a good part of the UNet step (the
diffusers textual-inversion example does exactly that). The posterior of an image does not change during
training, so we store its mean and std once and SAMPLE ``z = mean + std * eps`` each step — the same
distribution ``vae.encode(x).latent_dist.sample()`` gives, without the encoder pass.

The cache folder name is a hash of everything that determines the latents: the VAE's config and weights,
the decoder view (resolution, crop/letterbox, pad colour, normalisation) and the data source (its config and
a fingerprint of its listing: keys plus file sizes and modification times). A different VAE, resolution,
transform or changed data therefore gets a new folder; an old one is never reused by mistake.

Layout (written atomically): ``<dir>/<key>/shard-00000.safetensors`` (``mean``, ``std``: (rows, C, h, w))
… plus ``index.json`` (sample key -> [shard, row], what the key was made of, skip counts). Shards are read
lazily with ``safe_open`` so a web-scale cache is not loaded into memory at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from vilex.checkpoint import atomic_dir
from vilex.config import to_dict
from vilex.errors import UserError
from vilex.train import distributed as D

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 4096
INDEX_FILE = "index.json"


def _weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _source_fingerprint(source: Any) -> str:
    """Keys of the source's listing plus sizes/mtimes of its files (cheap: no decoding)."""
    h = hashlib.sha256()
    root = getattr(source, "root", None)
    n = len(source) if hasattr(source, "__len__") else 0
    for i in range(n):
        key = source.key(i)
        h.update(key.encode())
        if root is not None:
            try:
                st = os.stat(Path(root) / key)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
    for path in getattr(source, "shards", None) or getattr(source, "paths", None) or []:
        try:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{path}:missing".encode())
    return h.hexdigest()


def cache_key(decoder: Any, data_cfg: Any, view: Any, source: Any, dtype: str) -> tuple[str, dict]:
    """The folder name of a cache and the facts it was made from (stored in index.json for humans)."""
    vae = decoder.vae
    facts = {
        "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
        "vae_weights_sha256": _weights_hash(vae),
        "vae_dtype": str(decoder.dtype),
        "view": to_dict(view),
        "source": {k: v for k, v in to_dict(data_cfg).items()
                   if k in ("type", "path", "hf_format", "image_column", "split", "max_pixels", "min_side")},
        "source_fingerprint": _source_fingerprint(source),
        "dtype": dtype,
        "format": 1,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return digest, facts


class LatentCache:
    """Read side: ``sample(keys, generator)`` -> model-space latents for those samples."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        meta = json.loads((self.folder / INDEX_FILE).read_text())
        self.index: dict[str, tuple[int, int]] = {k: (int(s), int(r)) for k, (s, r) in meta["index"].items()}
        self.skipped = meta.get("skipped", {})
        self._shards = [safe_open(str(self.folder / name), framework="pt") for name in meta["shards"]]
        self.hits = 0

    def __len__(self) -> int:
        return len(self.index)

    def posterior(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for key in keys:
            if key not in self.index:
                raise UserError(f"latent cache {self.folder} has no entry for sample '{key}': the data changed "
                                f"after the cache was built; delete that folder or set latent_cache.enabled=false")
            shard, row = self.index[key]
            f = self._shards[shard]
            means.append(f.get_slice("mean")[row:row + 1])
            stds.append(f.get_slice("std")[row:row + 1])
        self.hits += len(keys)
        return torch.cat(means).float(), torch.cat(stds).float()

    def sample(self, keys: Sequence[str], decoder: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 in model space: the decoder's own posterior sampling, from the cached (mean, std)."""
        mean, std = self.posterior(keys)
        return decoder.model_space_from_posterior(mean.to(decoder.device), std.to(decoder.device), generator)

    # ------------------------------------------------------------------ building
    @classmethod
    def open_or_build(cls, cfg: Any, decoder: Any, data_cfg: Any, view: Any, rank: int = 0,
                      world_size: int = 1) -> "LatentCache":
        """Open the cache for (VAE, view, data) or build it (rank 0 builds; the others wait)."""
        from vilex.data import build_source

        source = build_source(data_cfg)
        key, facts = cache_key(decoder, data_cfg, view, source, cfg.dtype)
        folder = Path(cfg.dir).expanduser() / key
        if rank == 0 and not (folder / INDEX_FILE).is_file():
            log.info("latent cache miss: building %s", folder)
            build_cache(folder, decoder, source, view, facts, cfg.dtype)
        elif rank == 0:
            log.info("latent cache hit: %s", folder)
        D.barrier()
        return cls(folder)


@torch.no_grad()
def build_cache(folder: Path, decoder: Any, source: Any, view: Any, facts: dict, dtype: str,
                batch_size: int = 16) -> None:
    """Encode every decodable image once and write the posterior shards + index atomically."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from vilex.data import ImageLoader

    loader = ImageLoader(source, views={"decoder": view}, batch_size=batch_size, shuffle=False, epochs=1,
                         drop_last=False)
    store = torch.float16 if dtype == "float16" else torch.float32
    index: dict[str, list[int]] = {}
    shards: list[str] = []
    buf_mean: list[torch.Tensor] = []
    buf_std: list[torch.Tensor] = []
    rows = 0
    with atomic_dir(folder) as tmp:
        def flush() -> None:
            nonlocal buf_mean, buf_std, rows
            if not buf_mean:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"mean": torch.cat(buf_mean).to(store).contiguous(),
                       "std": torch.cat(buf_std).to(store).contiguous()}, str(tmp / name))
            shards.append(name)
            buf_mean, buf_std, rows = [], [], 0

        for batch in tqdm(loader, desc="caching latents", disable=len(source) < 64):
            mean, std = decoder.encode_posterior(batch.images["decoder"])
            for i, key in enumerate(batch.keys):
                if rows == ROWS_PER_SHARD:
                    flush()
                index[key] = [len(shards), rows]
                buf_mean.append(mean[i:i + 1].cpu())
                buf_std.append(std[i:i + 1].cpu())
                rows += 1
        flush()
        summary = loader.summary()
        (tmp / INDEX_FILE).write_text(json.dumps({"index": index, "shards": shards, "facts": facts,
                                                  "skipped": summary.get("skipped", {})}, default=str))
    log.info("latent cache: %d images encoded into %s (skipped: %s)", len(index), folder,
             summary.get("skipped") or "none")
