"""decode.py — image bytes -> one RGB ``PIL.Image``, or a ``BadSample`` that names why not.

Every source hands raw bytes to ``decode_image``, so a broken file is classified the same way
whether it came from a folder, a parquet row or a tar member. Checks run cheapest first, so a
decompression bomb is rejected from its header and never decoded:

    empty -> open header (not_an_image, PIL's bomb limit) -> size limits (decompression_bomb,
    too_small) -> full decode (truncated / corrupt) -> EXIF orientation -> pixel mode to RGB

Pixel modes (why not a bare ``.convert("RGB")``):

* alpha (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) is composited on WHITE — a bare
  convert would keep whatever colour hides under transparent pixels (often black);
* 16-bit grey (I;16*) is SCALED to 8 bit (v * 255 / 65535); Pillow's convert clips at 255, which
  turns almost every 16-bit image white;
* 32-bit integer (I): values inside [0, 65535] are read as 16-bit and scaled the same way, other
  ranges are rescaled linearly from [min, max]; float (F): [0, 1] is scaled by 255, other ranges
  from [min, max]. A constant image outside those ranges becomes black.
* everything else (L, 1, P, CMYK, YCbCr, ...) uses Pillow's own conversion; a mode with no RGB
  conversion is the ``unsupported_mode`` reason.

Animated files (GIF, APNG, WebP) give their first frame. PIL's own bomb guard
(``Image.MAX_IMAGE_PIXELS``, a warning then an error) also applies: both are turned into the
``decompression_bomb`` reason, so the effective limit is min(max_pixels, PIL's limit).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 8192 * 8192  # below PIL's own default (89.5 M) so ours is the limit that fires
DEFAULT_MIN_SIDE = 8

# Every reason a sample can be skipped for (the keys of the skip counts). One closed set, so a
# typo in a source cannot invent a reason that no summary or test knows about.
SKIP_REASONS: dict[str, str] = {
    "empty": "0 bytes (or a null image value)",
    "not_an_image": "the bytes are not an image format Pillow knows",
    "decompression_bomb": "more pixels than max_pixels (or PIL's own bomb limit)",
    "too_small": "shorter side below min_side",
    "truncated": "the image data ends early",
    "corrupt": "the decoder failed for another reason (broken stream, bad EXIF, bad sidecar)",
    "unsupported_mode": "a pixel mode with no conversion to RGB",
    "unreadable": "the file or member could not be read (missing, a directory, I/O or permission error)",
    "missing_image": "a record with no image in it (e.g. a webdataset sample with only .txt)",
    "bad_shard": "a tar shard that could not be opened or listed to its end (counted once per shard)",
    "remote_error": "a remote shard's read still failing after remote.retries (that sample and the rest of its shard)",
}

_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What the file was before conversion (for ``vilex data inspect``)."""

    format: str  # "JPEG", "PNG", ... as Pillow names it
    mode: str  # the stored pixel mode, e.g. "I;16" or "CMYK"
    width: int  # after EXIF orientation
    height: int


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Decode ``data`` into an RGB image (EXIF-oriented, alpha on white); raise ``BadSample`` otherwise."""
    return decode_image_with_info(data, max_pixels=max_pixels, min_side=min_side)[0]


def decode_image_with_info(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> tuple[Image.Image, ImageInfo]:
    """``decode_image`` plus the stored format, mode and (oriented) size."""
    if len(data) == 0:
        raise BadSample("empty")
    # PIL reports a moderate bomb as a warning; make it an exception here so it becomes a counted
    # reason instead of a log line followed by a multi-gigabyte decode.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = _open_header(data)
        width, height = im.size
        if width * height > max_pixels:
            raise BadSample("decompression_bomb", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
        if min(width, height) < min_side:
            raise BadSample("too_small", f"{width}x{height}, shorter side < min_side {min_side}")
        _load_pixels(im)
    stored_format, stored_mode = im.format or "unknown", im.mode
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - any failure here is a broken EXIF block in the file
        raise BadSample("corrupt", f"bad EXIF orientation data: {e}") from None
    rgb = to_rgb(im)
    return rgb, ImageInfo(stored_format, stored_mode, rgb.width, rgb.height)


def _open_header(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise BadSample("not_an_image", f"{len(data)} bytes starting {data[:8]!r}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a plugin choking on a header is a property of the data
        raise _decoder_failure(e, "cannot read header: ") from None


def _load_pixels(im: Image.Image) -> None:
    # Some libraries flip PIL's process-global ``ImageFile.LOAD_TRUNCATED_IMAGES`` on at import time
    # (lmms-eval's task module does), after which a truncated file decodes with grey padding and no error.
    # A truncated image must stay a counted skip whatever else is imported, so force the strict mode here.
    strict = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("decompression_bomb", str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise _decoder_failure(e) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = strict


def _decoder_failure(error: Exception, prefix: str = "") -> BadSample:
    """A decoder exception as a skip reason: ``truncated`` when the data ends early, else ``corrupt``."""
    ends_early = isinstance(error, EOFError) or "truncated" in str(error).lower()
    return BadSample("truncated" if ends_early else "corrupt", f"{prefix}{type(error).__name__}: {error}")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB following the rules in this module's docstring."""
    try:
        return _convert_to_rgb(im)
    except (ValueError, OSError) as e:  # Pillow has no conversion path for this mode
        raise BadSample("unsupported_mode", f"mode {im.mode}: {e}") from None


def _convert_to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _UINT16_MODES:
        return _grey_array_to_rgb(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    if mode == "I":
        values = np.asarray(im).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _grey_array_to_rgb(values * (255.0 / 65535.0))
        return _grey_array_to_rgb(_rescale_to_255(values))
    if mode == "F":
        values = np.asarray(im).astype(np.float64)
        if values.size and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
            return _grey_array_to_rgb(values * 255.0)
        return _grey_array_to_rgb(_rescale_to_255(values))
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _rescale_to_255(values: np.ndarray) -> np.ndarray:
    finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        return np.zeros_like(finite)
    low, high = float(finite.min()), float(finite.max())
    return (finite - low) * (255.0 / (high - low))


def _grey_array_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
