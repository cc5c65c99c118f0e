"""models.py — the checkpoints ``vilex serve`` shows: resolved before anything loads, then loaded once.

Every option defaults to the shipped toy assets, so ``vilex serve`` alone works on a CPU: ``assets/toy/vilex``
against ``assets/toy/decoder``, and the three toy VLMs ``assets/toy/vlm/{siglip,vilex,vilex_tokens}``. The toy
assets are found next to this package (or where ``VILEX_TOY_ASSETS`` points, as for ``vilex demo``), so the page
starts from any working directory.

All paths are checked first, with the same resolvers every other command uses (``resolve_vilex_checkpoint``,
``vlm.model.resolve_checkpoint``): a wrong path is one line and exit code 2 at start-up, not a failure after
minutes of loading the other models.

Each served model carries a lock: the pipeline's scheduler holds per-call state (``set_timesteps``) and a VLM's
``generate`` is not meant to run twice at once, so one request at a time runs on each model.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vilex.errors import UserError

log = logging.getLogger(__name__)

TOY_ASSETS = Path(os.environ.get("VILEX_TOY_ASSETS", Path(__file__).resolve().parents[1] / "assets" / "toy"))
TOY_VLMS = ("siglip", "vilex", "vilex_tokens")  # assets/toy/vlm/<name>: the SigLIP, ViLex and ViLex + tokens towers


@dataclass(frozen=True)
class Checkpoints:
    """Resolved checkpoint folders: the ViLex pipeline (plus a decoder override) and the VLMs by display name."""

    vilex: Path
    decoder: str | None
    vlms: dict[str, Path]


def parse_vlm_arg(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain ``PATH`` -> (None, PATH). NAME is a word (letters, digits, ``_.+-``),
    so a path that merely contains ``=`` stays a path."""
    name, sep, path = text.partition("=")
    if sep and path and re.fullmatch(r"[\w.+-]+", name):
        return name, path
    return None, text


def _unique(name: str, taken: dict[str, Path]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def resolve_checkpoints(vilex: str | None = None, decoder: str | None = None,
                        vlms: list[str] | None = None) -> Checkpoints:
    """Check every checkpoint path (a UserError naming the first wrong one); ``None`` means the shipped toy asset
    (``vlms=None``: the three toy VLMs; ``vlms=[]``: no VLM)."""
    from vilex.pipeline import resolve_vilex_checkpoint
    from vlm.model import resolve_checkpoint

    if vilex is None:
        try:
            vilex_path = resolve_vilex_checkpoint(TOY_ASSETS / "vilex")
        except UserError as e:
            raise UserError(f"no --vilex given and the shipped toy ViLex is not usable: {e}") from None
        # the shipped config names its decoder repository-relative; this makes the page work from any directory
        decoder = decoder or str(TOY_ASSETS / "decoder")
    else:
        vilex_path = resolve_vilex_checkpoint(vilex)
    if vlms is None:
        named = [(name, str(TOY_ASSETS / "vlm" / name)) for name in TOY_VLMS]
    else:
        named = []
        for text in vlms:
            name, path = parse_vlm_arg(text)
            named.append((name or Path(path).expanduser().resolve().name, path))
    resolved: dict[str, Path] = {}
    for name, path in named:
        resolved[_unique(name, resolved)] = resolve_checkpoint(path)
    return Checkpoints(vilex_path, decoder, resolved)


@dataclass
class ServedVLM:
    """One VLM of the Ask tab: the model, how an image becomes its input, and its lock."""

    name: str
    path: Path
    model: Any  # vlm.model.VLM
    image_spec: Any  # vlm.data.ImageSpec
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tower(self) -> str:
        return str(self.model.config.tower.type)


@dataclass
class LoadedModels:
    """Everything the page runs: the ViLex pipeline (with its lock) and the VLMs in display order."""

    checkpoints: Checkpoints
    pipeline: Any  # vilex.pipeline.ViLexPipeline
    vlms: dict[str, ServedVLM]
    pipeline_lock: threading.Lock = field(default_factory=threading.Lock)


def warm_up(pipeline: Any) -> None:
    """One 1-step reconstruction of a blank image, so the first visitor does not wait for torch's first-call set-up
    (about a second on the toy assets on a CPU)."""
    from PIL import Image

    pipeline.reconstruct([Image.new("RGB", (pipeline.decoder.image_size,) * 2)], num_tokens=1,
                         num_inference_steps=1, seed=0, output_type="pt")


def load_models(checkpoints: Checkpoints, device: Any) -> LoadedModels:
    """Load the pipeline and every VLM onto ``device`` (a torch device) in inference mode."""
    from vilex.pipeline import ViLexPipeline
    from vlm.data import ImageSpec
    from vlm.model import VLM

    pipeline = ViLexPipeline.from_pretrained(checkpoints.vilex, decoder_name_or_path=checkpoints.decoder,
                                             device=device)
    pipeline.set_progress_bar_config(disable=True)
    warm_up(pipeline)
    log.info("ViLex %s: %d tokens, decoder %s at %d px", checkpoints.vilex, pipeline.num_tokens,
             pipeline.config.decoder.name_or_path, pipeline.decoder.image_size)
    vlms = {}
    for name, path in checkpoints.vlms.items():
        model = VLM.from_checkpoint(path).to(device).eval()
        tower = model.tower
        spec = ImageSpec(tower.image_size, tower.image_mean, tower.image_std, model.config.tower.image_fit)
        vlms[name] = ServedVLM(name, path, model, spec)
        log.info("VLM %s: %s (tower %s)", name, path, vlms[name].tower)
    return LoadedModels(checkpoints, pipeline, vlms)
