"""make_tiny.py — build the inputs of configs/vilex/tiny.yaml: a tiny SD-like decoder and 64 toy scenes.

    python scripts/make_tiny.py runs/tiny [--decoder stable_diffusion|pixel_unet]
"""
import argparse
from pathlib import Path

from vilex.models.tiny import build_tiny_pixel_decoder, build_tiny_sd
from toy.scenes.generate import generate_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--decoder", choices=["stable_diffusion", "pixel_unet"], default="stable_diffusion")
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args()
    build = build_tiny_sd if args.decoder == "stable_diffusion" else build_tiny_pixel_decoder
    build(args.out / "decoder", image_size=16)
    generate_dataset(args.out / "data", n=args.n, seed=0, size=16, overwrite=True, progress=False)
    print(args.out)


if __name__ == "__main__":
    main()
