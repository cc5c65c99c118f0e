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
… plus ``index.json`` (sample key -> [shard, row], what the key was made of, skip counts) and ``manifest.json``
(every file's size and hash, vilex/checkpoint.py). Shards are read lazily with ``safe_open`` so a web-scale cache
is not loaded into memory at once.

The cache is derived data, so it is verified, never trusted: opening it checks that the index parses and every file
has its recorded size (a stat each), and a broken cache is rebuilt with a warning. Each shard's content hash is
checked the first time a process reads it (a web-scale cache is not re-hashed at every start), and every read is
checked for NaN/inf; a failure marks the folder (``CORRUPT``) so the next start rebuilds it, and stops the run with
one line (--resume auto continues from the last checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from vilex.checkpoint import MANIFEST_NAME, atomic_dir, file_hash, folder_problem
from vilex.config import to_dict
from vilex.errors import UserError
from vilex.train import distributed as D

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 4096
INDEX_FILE = "index.json"
CORRUPT_MARK = "CORRUPT"


class CorruptCacheError(UserError):
    """A latent cache whose files do not match what was written."""


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

    def __init__(self, folder: Path, meta: dict | None = None) -> None:
        """``meta``: the index as ``read_checked`` returned it (else it is read and checked here)."""
        self.folder = Path(folder)
        if meta is None:
            problem, meta = read_checked(self.folder)
            if problem is not None:
                raise CorruptCacheError(f"latent cache {self.folder} is corrupt: {problem}; delete that folder (it "
                                        f"is rebuilt on the next start)")
        self.index: dict[str, tuple[int, int]] = {k: (int(s), int(r)) for k, (s, r) in meta["index"].items()}
        self.skipped = meta.get("skipped", {})
        self._names: list[str] = list(meta["shards"])
        manifest = self.folder / MANIFEST_NAME
        self._hashes = ({k: v["xxh3_128"] for k, v in json.loads(manifest.read_text())["files"].items()}
                        if manifest.is_file() else {})
        self._shards: dict[int, Any] = {}
        self.hits = 0

    def _shard(self, i: int) -> Any:
        """Shard ``i``, opened (and its content hash checked) on first use by this process."""
        if i not in self._shards:
            from safetensors import safe_open

            name = self._names[i]
            want = self._hashes.get(name)
            if want is not None and file_hash(self.folder / name) != want:
                self._corrupt(f"{name} has changed bytes (content hash differs from the manifest)")
            try:
                self._shards[i] = safe_open(str(self.folder / name), framework="pt")
            except Exception as e:  # safetensors raises its own error type for a damaged file
                self._corrupt(f"{name} cannot be read ({e})")
        return self._shards[i]

    def _corrupt(self, problem: str) -> None:
        """Mark the folder so the next start rebuilds it, and stop in one line."""
        try:
            (self.folder / CORRUPT_MARK).write_text(problem + "\n")
        except OSError:
            pass
        raise CorruptCacheError(f"latent cache {self.folder} is corrupt: {problem}; it is marked and will be rebuilt "
                                f"when the run restarts (--resume auto continues from the last checkpoint)")

    def __len__(self) -> int:
        return len(self.index)

    def posterior(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for key in keys:
            if key not in self.index:
                raise UserError(f"latent cache {self.folder} has no entry for sample '{key}': the data changed "
                                f"after the cache was built; delete that folder or set latent_cache.enabled=false")
            shard, row = self.index[key]
            f = self._shard(shard)
            means.append(f.get_slice("mean")[row:row + 1])
            stds.append(f.get_slice("std")[row:row + 1])
        self.hits += len(keys)
        mean, std = torch.cat(means).float(), torch.cat(stds).float()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            self._corrupt(f"non-finite latents for samples {list(keys)[:3]}")
        return mean, std

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
        meta = None
        if rank == 0 and folder.exists():
            problem, meta = read_checked(folder)
            if problem is not None:
                log.warning("latent cache %s is broken (%s): rebuilding it", folder, problem)
                shutil.rmtree(folder)
        if rank == 0 and not (folder / INDEX_FILE).is_file():
            log.info("latent cache miss: building %s", folder)
            build_cache(folder, decoder, source, view, facts, cfg.dtype)
            meta = None
        elif rank == 0:
            log.info("latent cache hit: %s", folder)
        D.barrier()
        return cls(folder, meta)


def read_checked(folder: Path) -> tuple[str | None, dict | None]:
    """(problem, index): what is wrong with a cache folder at a glance (None = usable: a corruption mark left by a
    reader, an index that does not parse, a missing or resized file), and its parsed index when usable. Contents
    are hashed lazily, per shard, when read."""
    if (folder / CORRUPT_MARK).is_file():
        return f"marked corrupt by a reader ({(folder / CORRUPT_MARK).read_text().strip()})", None
    try:
        meta = json.loads((folder / INDEX_FILE).read_text())
        shards = list(meta["shards"])
        meta["index"].items()
    except FileNotFoundError:
        return f"{INDEX_FILE} is missing", None
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{INDEX_FILE} is unreadable", None
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing", None
    problem = folder_problem(folder, hashes=False)
    return problem, (meta if problem is None else None)


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
