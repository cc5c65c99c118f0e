"""Decoding (every mode, every skip reason) and views (crop / letterbox / normalisation)."""
import numpy as np
import pytest
import torch
from bad_images import ZOO_MAX_PIXELS, ZOO_MIN_SIDE, encode, gradient_rgb, zoo
from PIL import Image

from vilex.data import (
    BadSample,
    SkipCounter,
    ViewConfig,
    decode_image,
    decode_image_with_info,
    fit_image,
    render_view,
)
from vilex.data.decode import to_rgb

ZOO = {image.name: image for image in zoo()}


def _decode(name: str) -> Image.Image:
    return decode_image(ZOO[name].data, max_pixels=ZOO_MAX_PIXELS, min_side=ZOO_MIN_SIDE)


@pytest.mark.parametrize("image", zoo(), ids=lambda image: image.name)
def test_every_zoo_image_gets_its_reason(image):
    if image.reason is None:
        rgb, info = decode_image_with_info(image.data, max_pixels=ZOO_MAX_PIXELS, min_side=ZOO_MIN_SIDE)
        assert rgb.mode == "RGB" and rgb.size == (info.width, info.height)
    else:
        with pytest.raises(BadSample) as caught:
            decode_image(image.data, max_pixels=ZOO_MAX_PIXELS, min_side=ZOO_MIN_SIDE)
        assert caught.value.reason == image.reason


def test_stored_modes_are_reported():
    modes = {name: decode_image_with_info(ZOO[name].data)[1].mode
             for name in ("grey_L", "grey_alpha_LA", "palette_P", "rgba", "cmyk", "grey16_I16")}
    assert modes == {"grey_L": "L", "grey_alpha_LA": "LA", "palette_P": "P", "rgba": "RGBA", "cmyk": "CMYK",
                     "grey16_I16": "I;16"}


def test_rgba_is_composited_on_white():
    rgb = _decode("rgba")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # fully transparent black pixel -> white
    assert rgb.getpixel((5, 5)) == (255, 127, 127)  # red at alpha 128 over white


def test_palette_transparency_is_white_and_gif_gives_first_frame():
    palette = _decode("palette_P")
    assert palette.getpixel((0, 0)) == (255, 255, 255) and palette.getpixel((3, 3)) == (0, 255, 0)
    assert _decode("animated").getpixel((3, 3)) == (255, 0, 0)  # frame 0 red, frame 1 blue


def test_uint16_is_scaled_not_clipped():
    grey = np.asarray(_decode("grey16_I16"))[..., 0]
    assert grey[0, 0] == 255  # 65535
    assert grey[0, 1] == 0
    assert grey[5, 5] == 4  # round(1000 * 255 / 65535); Pillow's clipping convert would give 255
    assert np.asarray(Image.fromarray(np.full((2, 2), 1000, np.uint16)).convert("L"))[0, 0] == 255


def test_int32_and_float_modes():
    in_16bit_range = Image.fromarray(np.array([[0, 65535], [32768, 257]], dtype=np.int32))
    assert in_16bit_range.mode == "I"
    assert np.asarray(to_rgb(in_16bit_range))[..., 0].tolist() == [[0, 255], [128, 1]]
    signed = Image.fromarray(np.array([[-10, 0], [10, 0]], dtype=np.int32))
    assert np.asarray(to_rgb(signed))[..., 0].tolist() == [[0, 128], [255, 128]]  # rescaled from [min, max]
    unit_float = Image.fromarray(np.array([[0, 0.5], [1, 0.25]], dtype=np.float32))
    assert np.asarray(to_rgb(unit_float))[..., 0].tolist() == [[0, 128], [255, 64]]
    wide_float = Image.fromarray(np.array([[-1, 1], [3, 3]], dtype=np.float32))
    assert np.asarray(to_rgb(wide_float))[..., 0].tolist() == [[0, 128], [255, 255]]


def test_cmyk_converts_to_the_rgb_it_came_from():
    diff = np.abs(np.asarray(_decode("cmyk"), dtype=int) - np.asarray(gradient_rgb(), dtype=int))
    assert diff.max() <= 8  # JPEG loss only; an un-inverted Adobe CMYK would be off by ~255


def test_exif_orientation_6_rotates_90_clockwise():
    rotated = _decode("exif_rotated")  # stored 16x8: left half red, right half blue
    assert rotated.size == (8, 16)
    top, bottom = rotated.getpixel((4, 2)), rotated.getpixel((4, 13))
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_pil_bomb_warning_becomes_a_reason(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x12 = 192 px: PIL warns (> 100) but does not raise (< 200)
    with pytest.raises(BadSample) as caught:
        decode_image(ZOO["rgb"].data, max_pixels=10**9, min_side=1)
    assert caught.value.reason == "decompression_bomb"
    assert "192 pixels" in caught.value.detail


def test_bomb_header_is_rejected_without_decoding():
    with pytest.raises(BadSample) as caught:
        decode_image(ZOO["bomb_header"].data, max_pixels=10**12)  # PIL's own error fires first
    assert caught.value.reason == "decompression_bomb"
    with pytest.raises(BadSample, match="64x64 = 4096 pixels > max_pixels 4095"):
        decode_image(ZOO["big"].data, max_pixels=4095)
    assert decode_image(ZOO["big"].data, max_pixels=4096).size == (64, 64)


def test_min_side_is_configurable():
    assert decode_image(ZOO["tiny"].data, min_side=1).size == (1, 1)
    with pytest.raises(BadSample, match="too_small: 16x12, shorter side < min_side 13"):
        decode_image(ZOO["rgb"].data, min_side=13)


def test_unsupported_mode_and_unknown_reason():
    with pytest.raises(BadSample) as caught:
        to_rgb(Image.new("La", (4, 4)))  # premultiplied LA: Pillow has no conversion from it
    assert caught.value.reason == "unsupported_mode"
    with pytest.raises(ValueError, match="unknown skip reason 'trunkated'"):
        BadSample("trunkated")


def test_skip_counter_describes_alphabetically():
    counter = SkipCounter()
    for reason in ["truncated", "empty", "truncated", "empty", "empty"]:
        counter.add(reason)
    assert counter.counts == {"empty": 3, "truncated": 2}
    assert counter.describe() == "5 skipped (empty=3, truncated=2)"
    assert SkipCounter(counter.counts) == counter
    assert SkipCounter().describe() == "0 skipped"


# ----------------------------------------------------------------------------- views
def _red_16x8() -> Image.Image:
    return Image.new("RGB", (16, 8), (255, 0, 0))


def test_crop_fills_the_square_and_letterbox_pads():
    cropped = fit_image(_red_16x8(), 8, "crop")
    assert cropped.size == (8, 8)
    assert np.all(np.asarray(cropped) == (255, 0, 0))
    boxed = np.asarray(fit_image(_red_16x8(), 8, "letterbox", pad_color=(0, 255, 0)))
    assert boxed.shape == (8, 8, 3)
    assert np.all(boxed[:2] == (0, 255, 0)) and np.all(boxed[6:] == (0, 255, 0))  # 16x8 -> 8x4, 2 rows each side
    assert np.all(boxed[2:6] == (255, 0, 0))


def test_crop_takes_the_centre():
    pixels = np.zeros((8, 24, 3), dtype=np.uint8)
    pixels[:, 8:16] = (0, 0, 255)  # blue centre third
    assert np.all(np.asarray(fit_image(Image.fromarray(pixels), 8, "crop")) == (0, 0, 255))


def test_view_normalisation_is_explicit():
    minus_one_to_one = render_view(_red_16x8(), ViewConfig(size=4))
    assert minus_one_to_one.shape == (3, 4, 4) and minus_one_to_one.dtype == torch.float32
    assert torch.equal(minus_one_to_one[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    zero_to_one = render_view(_red_16x8(), ViewConfig(size=4, fit="letterbox", pad_color=(0, 255, 0),
                                                       mean=(0, 0, 0), std=(1, 1, 1)))
    assert torch.equal(zero_to_one[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))  # pad row
    assert torch.equal(zero_to_one[:, 2, 2], torch.tensor([1.0, 0.0, 0.0]))  # image row
    custom = render_view(Image.new("RGB", (4, 4), (51, 102, 204)), ViewConfig(size=4, mean=(0.2, 0.4, 0.8),
                                                                              std=(0.5, 0.5, 0.5)))
    assert torch.allclose(custom[:, 1, 1], torch.zeros(3), atol=1e-6)


def test_one_image_two_resolutions():
    image = decode_image(encode(gradient_rgb(32, 24), "PNG"))
    encoder = render_view(image, ViewConfig(size=16))
    decoder = render_view(image, ViewConfig(size=8, fit="letterbox"))
    assert encoder.shape == (3, 16, 16) and decoder.shape == (3, 8, 8)
    assert torch.all(decoder[:, :1] == -1)  # 32x24 letterboxed to 8x6: one black pad row top (-1 in [-1, 1])


def test_truncated_stays_a_skip_even_if_another_library_allows_truncated_images(monkeypatch):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES = True at import; our decoder must not follow it."""
    import io

    from PIL import Image, ImageFile

    from vilex.data.decode import BadSample, decode_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadSample) as ei:
        decode_image(truncated)
    assert ei.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is left as the other library set it
