"""toy/scenes/contact_sheet.py — a PNG grid of images with their captions written below each one.

Small images are upscaled with NEAREST (every toy pixel stays a crisp block) and captions are
word-wrapped to the tile width with PIL's default font, so the sheet needs no font files.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from toy.scenes.errors import ToyWorldError


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + ([current] if current else [])


def make_contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    columns: int = 6,
    image_px: int = 96,
    tile_width: int = 160,
    caption_lines: int = 8,
    font_size: int = 10,
) -> Image.Image:
    """A white sheet of ``columns`` tiles per row: the image upscaled to ``image_px`` and its caption
    wrapped below (at most ``caption_lines`` lines; a longer caption ends with "…")."""
    if len(images) != len(captions):
        raise ToyWorldError(f"contact sheet: {len(images)} images but {len(captions)} captions")
    if not images:
        raise ToyWorldError("contact sheet: no images")
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    pad = 6
    tile_h = pad + image_px + pad + caption_lines * line_h + pad
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile_width, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x0, y0 = (i % columns) * tile_width, (i // columns) * tile_h
        thumb = image.convert("RGB").resize((image_px, image_px), Image.NEAREST)
        sheet.paste(thumb, (x0 + (tile_width - image_px) // 2, y0 + pad))
        lines = _wrap(caption, draw, font, tile_width - 2 * pad)
        if len(lines) > caption_lines:
            lines = lines[: caption_lines - 1] + [lines[caption_lines - 1] + " …"]
        for j, line in enumerate(lines):
            draw.text((x0 + pad, y0 + pad + image_px + pad + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def contact_sheet_from_split(split_dir: str | Path, out_png: str | Path, n: int = 24, **kwargs) -> Path:
    """Contact sheet of the first ``n`` scenes of a toy split (coarse captions), saved to ``out_png``."""
    from toy.scenes.generate import read_metadata

    split_dir, out_png = Path(split_dir), Path(out_png)
    rows = read_metadata(split_dir)[:n]
    images = []
    for row in rows:
        with Image.open(split_dir / row["file_name"]) as im:
            images.append(im.convert("RGB"))
    sheet = make_contact_sheet(images, [r["caption"] for r in rows], **kwargs)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG", optimize=False, compress_level=6)
    return out_png
