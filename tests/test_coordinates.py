"""Coordinate input channels (vilex/models/coordinates.py): the grid, the channel rule, the zero-initialised
warm start that keeps a saved UNet's function, and ViLex's frozen decoders: the pixel_unet type runs a
coordinate UNet, the stable_diffusion type calls its UNet with x_t alone."""
import pytest
import torch

from vilex.errors import ConfigError
from vilex.models.coordinates import coordinate_channels, coordinate_grid, unet_forward, with_coordinates
from toy.decoder_model import UNetSpec, build_unet, load_init_unet

TINY_UNET = dict(block_out_channels=[16, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])


def test_grid_is_x_left_to_right_and_y_top_to_bottom_at_pixel_centres():
    grid = coordinate_grid(2, 4, 8)
    assert grid.shape == (2, 2, 4, 8)
    x, y = grid[0]
    assert torch.allclose(x[0], torch.linspace(-7 / 8, 7 / 8, 8)) and torch.equal(x[0], x[3])
    assert torch.allclose(y[:, 0], torch.linspace(-3 / 4, 3 / 4, 4)) and torch.equal(y[:, 0], y[:, 7])
    sample = torch.randn(3, 3, 4, 8)
    assert torch.equal(with_coordinates(sample, 0), sample)
    added = with_coordinates(sample, 2)
    assert added.shape == (3, 5, 4, 8) and torch.equal(added[:, :3], sample) and torch.equal(added[1, 3:], grid[0])


def test_channel_rule_reads_the_unet_config_and_refuses_other_layouts():
    plain = build_unet(UNetSpec(**TINY_UNET), 16, 32)
    coords = build_unet(UNetSpec(**TINY_UNET, coordinate_channels=2), 16, 32)
    assert coordinate_channels(plain) == 0 and coordinate_channels(coords) == 2
    assert (coords.config.in_channels, coords.config.out_channels) == (5, 3)
    out = unet_forward(coords, torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 32))
    assert out.shape == (2, 3, 16, 16)

    class Inpainting:  # SD-inpainting's layout: 9 in, 4 out (mask + masked latents), not coordinates
        class config:
            in_channels, out_channels = 9, 4
    with pytest.raises(ConfigError, match="only 0 or 2 extra"):
        coordinate_channels(Inpainting())
    with pytest.raises(ConfigError, match="coordinate_channels"):
        UNetSpec(**TINY_UNET, coordinate_channels=1).validate()


def test_warm_start_adds_zero_coordinate_channels_and_keeps_the_saved_function(tmp_path):
    torch.manual_seed(0)
    saved = build_unet(UNetSpec(**TINY_UNET), 16, 32)
    with torch.no_grad():  # diffusers zero-inits conv_out: give it weights so the comparison means something
        saved.conv_out.weight.normal_(0, 0.1)
    saved.save_pretrained(str(tmp_path / "unet"))
    coords = build_unet(UNetSpec(**TINY_UNET, coordinate_channels=2), 16, 32)
    assert load_init_unet(coords, tmp_path) == {"from": str(tmp_path), "zero_initialised_coordinate_channels": 2}
    assert torch.count_nonzero(coords.conv_in.weight[:, 3:]) == 0

    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    with torch.no_grad():
        before = unet_forward(saved, x, t, cond)
        after = unet_forward(coords, x, t, cond)
    assert before.abs().mean() > 1e-3 and torch.allclose(before, after, atol=1e-5)
    # the coordinate weights get a gradient, so training can start using them
    unet_forward(coords, x, t, cond).square().mean().backward()
    assert coords.conv_in.weight.grad[:, 3:].abs().sum() > 0

    # the other way (a coordinate UNet into a plain one) is a different architecture: refused
    coords.save_pretrained(str(tmp_path / "c" / "unet"))
    with pytest.raises(ConfigError, match="coordinate channels 2 saved vs 0 configured"):
        load_init_unet(build_unet(UNetSpec(**TINY_UNET), 16, 32), tmp_path / "c")


def test_frozen_pixel_decoder_runs_a_coordinate_unet(tmp_path):
    from vilex.models.configs import DecoderConfig
    from vilex.models.decoders import build_frozen_decoder
    from vilex.models.tiny import build_tiny_pixel_decoder

    folder = build_tiny_pixel_decoder(tmp_path / "dec", width=32, image_size=16)
    unet = build_unet(UNetSpec(**TINY_UNET, coordinate_channels=2), 16, 32)
    unet.save_pretrained(str(folder / "unet"))
    decoder = build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(folder)))
    assert decoder.model_space_shape == (3, 16, 16)  # what the decoder draws, not what its UNet reads
    cond = decoder.encode_text(prompt_ids=decoder.tokenize(["a red circle"]))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
    pred = decoder.predict(x, t, cond)
    assert pred.shape == (1, 3, 16, 16) and torch.isfinite(pred).all()
    with torch.no_grad():
        assert torch.allclose(pred, unet_forward(decoder.unet, x, t, cond), atol=1e-6)
        moved = unet_forward(decoder.unet, x, t, cond) - decoder.unet(
            torch.cat([x, torch.zeros(1, 2, 16, 16)], 1), t, encoder_hidden_states=cond).sample
    assert moved.abs().max() > 0  # the coordinates are really fed in


def _unet_inputs(decoder):
    """Record the sample tensor every UNet forward receives."""
    seen = []
    decoder.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else kwargs["sample"]).detach().clone()), with_kwargs=True)
    return seen


def test_only_the_pixel_unet_decoder_feeds_coordinates(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    import vilex.models.decoders as decoders
    from vilex.models.configs import DecoderConfig
    from vilex.models.tiny import build_tiny_pixel_decoder, build_tiny_sd

    # stable_diffusion: the UNet reads x_t, exactly its latent channels, and the coordinate code is never run
    sd = decoders.build_frozen_decoder(DecoderConfig(type="stable_diffusion",
                                                     name_or_path=str(build_tiny_sd(tmp_path / "sd"))))
    assert type(sd) is decoders.StableDiffusionDecoder and sd.extra_input_channels == 0
    seen = _unet_inputs(sd)
    monkeypatch.setattr(decoders, "with_coordinates", lambda *a: pytest.fail("coordinates in the SD decoder"))
    monkeypatch.setattr(decoders, "coordinate_channels", lambda *a: pytest.fail("coordinates in the SD decoder"))
    x0 = torch.randn(2, *sd.model_space_shape)
    cond = sd.encode_text(prompt_ids=sd.tokenize(["a red circle", "a cat"]))
    with torch.no_grad():
        sd.diffusion_loss(x0, cond, torch.Generator().manual_seed(0))
        x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        assert torch.equal(sd.predict(x_t, t, cond), sd.unet(x_t, t, encoder_hidden_states=cond).sample)
    assert len(seen) == 3 and all(s.shape == (2, 4, 8, 8) for s in seen)  # 4 latent channels, nothing appended
    assert torch.equal(seen[1], x_t)
    # an SD UNet that takes more channels than it predicts is refused at load (nothing is appended for it)
    folder = tmp_path / "sd"
    config = UNet2DConditionModel.load_config(str(folder / "unet"))
    UNet2DConditionModel.from_config({**config, "in_channels": 6}).save_pretrained(str(folder / "unet"))
    with pytest.raises(ConfigError, match="takes 6 input channels and predicts 4"):
        decoders.build_frozen_decoder(DecoderConfig(type="stable_diffusion", name_or_path=str(folder)))
    monkeypatch.undo()

    # pixel_unet with a coordinate UNet: x_t plus the (x, y) grid, every call
    pixel_folder = build_tiny_pixel_decoder(tmp_path / "pixel", width=32, image_size=16)
    build_unet(UNetSpec(**TINY_UNET, coordinate_channels=2), 16, 32).save_pretrained(str(pixel_folder / "unet"))
    pixel = decoders.build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(pixel_folder)))
    assert pixel.extra_input_channels == 2 and pixel.model_space_shape == (3, 16, 16)
    seen = _unet_inputs(pixel)
    cond = pixel.encode_text(prompt_ids=pixel.tokenize(["a red circle", "a cat"]))
    x_t = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        pixel.predict(x_t, torch.tensor([10, 900]), cond)
        pixel.diffusion_loss(torch.rand(2, 3, 16, 16) * 2 - 1, cond, torch.Generator().manual_seed(0))
    assert len(seen) == 2 and all(s.shape == (2, 5, 16, 16) for s in seen)
    assert torch.equal(seen[0][:, :3], x_t) and torch.equal(seen[0][:, 3:], coordinate_grid(2, 16, 16))
    assert torch.equal(seen[1][:, 3:], coordinate_grid(2, 16, 16))


def test_pooled_text_pathway_options_build_a_diffusers_unet_that_reads_them(tmp_path):
    from diffusers import UNet2DConditionModel

    spec = UNetSpec(**TINY_UNET, coordinate_channels=2, addition_embed_type="text",
                    resnet_time_scale_shift="scale_shift")
    unet = build_unet(spec, 16, 32)
    unet.save_pretrained(str(tmp_path / "unet"))
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    assert (loaded.config.addition_embed_type, loaded.config.resnet_time_scale_shift) == ("text", "scale_shift")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        a = unet_forward(loaded, x, t, torch.randn(2, 5, 32))
        b = unet_forward(loaded, x, t, torch.randn(2, 5, 32))
    assert a.shape == (2, 3, 16, 16) and not torch.allclose(a, b)  # the conditioning reaches the output
