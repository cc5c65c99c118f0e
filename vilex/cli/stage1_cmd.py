"""stage1_cmd.py — top-level commands that use a trained ViLex checkpoint: encode, reconstruct, compose.

    vilex encode      --checkpoint C --images a.png b.png --num-tokens 16 --out tokens.safetensors
    vilex reconstruct --checkpoint C --images a.png b.png --num-tokens 1 4 16 --out grid.png
    vilex compose     --checkpoint C --image dog.png --prompt "on the beach" --tfg-scale 3 --out out.png

The reconstruct grid has one row per input image: the original (center-cropped and resized to the decoder's
resolution, as the encoder sees it) in
the first column, then one column per token count. ``--checkpoint`` takes the ViLex checkpoint folder, a
`vilex pretrain` checkpoint-<step> folder or the run folder (its latest checkpoint):
``vilex.pipeline.resolve_vilex_checkpoint``. Heavy imports stay inside the run functions so ``vilex --help`` is
instant. Missing/undecodable images and bad checkpoints are one-line UserErrors.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vilex.cli.main import command
from vilex.errors import UserError

log = logging.getLogger(__name__)


CHECKPOINT_HELP = ("a ViLex checkpoint: its folder (vilex_config.json, vit/, pooler/), a `vilex pretrain` "
                   "checkpoint-<step> folder, or the run folder (= its latest checkpoint)")


def add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, as every command that takes a stage-1 checkpoint spells it."""
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device``, resolved by ``vilex.train.distributed.resolve_device`` (the same on every command)."""
    p.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda | cuda:N")


def _common(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arg(p)
    p.add_argument("--decoder", default=None, help="override the frozen decoder's hub id / folder from the checkpoint")
    add_device_arg(p)


def _sampling(p: argparse.ArgumentParser, guidance: float) -> None:
    p.add_argument("--guidance-scale", type=float, default=guidance,
                   help="classifier-free guidance against the empty prompt (1 = off)")
    p.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def load_images(paths: list[str]):
    """Open images as RGB; a missing or undecodable file is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
    return images


def _pipeline(args: argparse.Namespace):
    from vilex.pipeline import ViLexPipeline
    from vilex.train.distributed import resolve_device

    return ViLexPipeline.from_pretrained(args.checkpoint, decoder_name_or_path=args.decoder,
                                         device=resolve_device(args.device, "--device"))


def _check_out(out: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"--out must end with {' or '.join(suffixes)}, got {out}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- encode
def _configure_encode(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--images", nargs="+", required=True, help="image files")
    p.add_argument("--num-tokens", type=int, default=None, help="keep the first m tokens (default: all n)")
    p.add_argument("--out", required=True, help="output .safetensors (key 'tokens': (B, m, D))")


@command("encode", help="encode images into ViLex tokens (a .safetensors file)")(_configure_encode)
def run_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    out = _check_out(args.out, (".safetensors",))
    images = load_images(args.images)
    pipe = _pipeline(args)
    tokens = pipe.encode(images, args.num_tokens).cpu().contiguous()
    metadata = {"images": "\n".join(args.images), "num_tokens": str(tokens.shape[1]),
                "checkpoint": str(args.checkpoint)}
    save_file({"tokens": tokens}, str(out), metadata=metadata)
    log.info("wrote %s: tokens %s", out, tuple(tokens.shape))
    return 0


# ----------------------------------------------------------------------------- reconstruct
def _configure_reconstruct(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--images", nargs="+", required=True, help="image files (one grid row each)")
    p.add_argument("--num-tokens", type=int, nargs="+", default=[1, 4, 16],
                   help="token counts (one grid column each)")
    p.add_argument("--out", required=True, help="output grid .png/.jpg")
    _sampling(p, guidance=3.0)


def make_grid(rows: list[list], cell: int):
    """A PIL grid: ``rows`` of PIL images, each center-cropped/resized into a ``cell`` x ``cell`` square."""
    from PIL import Image

    from vilex.models.encoder import center_square

    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncols * cell, len(rows) * cell), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(center_square(im, cell) if im.size != (cell, cell) else im, (j * cell, i * cell))
    return grid


@command("reconstruct", help="reconstruct images from 1..n ViLex tokens (a grid PNG)")(_configure_reconstruct)
def run_reconstruct(args: argparse.Namespace) -> int:
    out = _check_out(args.out, (".png", ".jpg", ".jpeg"))
    images = load_images(args.images)
    pipe = _pipeline(args)
    columns = []
    for m in args.num_tokens:
        log.info("reconstructing %d image(s) from %d token(s)", len(images), m)
        columns.append(pipe.reconstruct(images, num_tokens=m, guidance_scale=args.guidance_scale,
                                        num_inference_steps=args.steps, seed=args.seed))
    rows = [[original] + [col[i] for col in columns] for i, original in enumerate(images)]
    make_grid(rows, pipe.decoder.image_size).save(out)
    log.info("wrote %s (%d rows x %d columns: original, %s tokens)", out, len(rows), 1 + len(columns),
             ", ".join(map(str, args.num_tokens)))
    return 0


# ----------------------------------------------------------------------------- compose
def _configure_compose(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--image", required=True, help="the subject image")
    p.add_argument("--prompt", required=True, help="text to combine with the image's ViLex tokens")
    p.add_argument("--tfg-scale", type=float, default=3.0, help="Text-Free Guidance scale w (0 = image only)")
    p.add_argument("--num-tokens", type=int, default=None, help="ViLex tokens to use (default: all n)")
    p.add_argument("--num-images", type=int, default=1, help="samples (written side by side)")
    p.add_argument("--out", required=True, help="output .png/.jpg")
    _sampling(p, guidance=1.0)


@command("compose", help="generate from an image's ViLex tokens + a text prompt (Text-Free Guidance)")(
    _configure_compose)
def run_compose(args: argparse.Namespace) -> int:
    out = _check_out(args.out, (".png", ".jpg", ".jpeg"))
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    image = load_images([args.image])[0]
    pipe = _pipeline(args)
    samples = pipe.compose(image, args.prompt, tfg_scale=args.tfg_scale, num_tokens=args.num_tokens,
                           guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                           num_images=args.num_images, seed=args.seed)
    make_grid([samples], pipe.decoder.image_size).save(out)
    log.info("wrote %s", out)
    return 0
