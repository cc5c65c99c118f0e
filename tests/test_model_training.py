"""Tests of the training forward: frozen means frozen, gradients reach ViT and pooler, loss targets per
prediction type, min-SNR weights, gradient checkpointing (same numbers, really recomputes), TailDrop,
bf16 decoder, pooler output normalisation."""
import copy

import pytest
import torch

from vilex.errors import UserError
from vilex.models import ViLexModel
from vilex.models.configs import DecoderConfig, TailDropConfig
from vilex.models.decoders import build_frozen_decoder
from vilex.models.taildrop import sample_num_keep
from vilex.models.tiny import build_tiny_pixel_decoder, build_tiny_sd, tiny_vilex_config


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "decoder", pad="!")


@pytest.fixture(scope="module")
def pixel_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel")
    return {ptype: build_tiny_pixel_decoder(root / ptype, prediction_type=ptype)
            for ptype in ("epsilon", "v_prediction", "sample")}


def _batch(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1
    pixels = model.encoder.preprocess((images + 1) / 2)
    x0 = model.decoder.to_model_space(images, torch.Generator().manual_seed(seed))
    return pixels, x0


def test_gradients_reach_encoder_and_decoder_stays_frozen(sd_folder):
    model = ViLexModel.from_config(tiny_vilex_config(sd_folder))
    model.train()
    assert not model.decoder.training and not model.decoder.unet.training and not model.decoder.text_encoder.training
    before = copy.deepcopy(model.decoder.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # over ALL params, on purpose
    pixels, x0 = _batch(model)
    out = model(pixels, x0, generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and out["loss_per_sample"].shape == (4,) and out["num_keep"].shape == (4,)
    out["loss"].backward()
    groups = model.trainable_parameter_groups()
    assert set(groups) == {"vit", "pooler"}
    for name, params in groups.items():
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    assert all(p.grad is None and not p.requires_grad for p in model.decoder.parameters())
    vit_before = [p.detach().clone() for p in groups["vit"]]
    optimizer.step()
    after = model.decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(vit_before, groups["vit"]))


def test_trainable_groups_cover_exactly_the_encoder(sd_folder):
    model = ViLexModel.from_config(tiny_vilex_config(sd_folder))
    groups = model.trainable_parameter_groups()
    ids = {id(p) for params in groups.values() for p in params}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert ids == {id(p) for p in model.encoder.parameters()}


def test_penultimate_feature_layer_freezes_unused_vit_parts(sd_folder):
    cfg = tiny_vilex_config(sd_folder)
    cfg.vit.feature_layer = -2
    model = ViLexModel.from_config(cfg)
    vit = model.encoder.vit.model
    assert not any(p.requires_grad for p in vit.post_layernorm.parameters())
    assert not any(p.requires_grad for p in vit.encoder.layers[-1].parameters())
    assert all(p.requires_grad for p in vit.encoder.layers[0].parameters())
    pixels, x0 = _batch(model, 2)
    model.train()
    model(pixels, x0, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is not None for p in model.trainable_parameter_groups()["vit"])


def _oracle(decoder, x0, kind):
    """A stand-in UNet that returns the true target of ``kind`` (it knows x0)."""
    alphas = decoder.scheduler.alphas_cumprod

    def predict(x_t, t, cond):
        a = alphas[t].view(-1, 1, 1, 1).float()
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]

    return predict


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_loss_target_per_prediction_type(pixel_folders, ptype):
    decoder = build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(pixel_folders[ptype])))
    assert decoder.prediction_type == ptype
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    cond = decoder.encode_text(None, None, [[]] * 6)
    decoder.predict = _oracle(decoder, x0, ptype)
    loss = decoder.diffusion_loss(x0, cond, torch.Generator().manual_seed(3))
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, torch.zeros(6), rtol=0, atol=1e-4)
    for other in {"epsilon", "v_prediction", "sample"} - {ptype}:  # a wrong target is far from 0
        decoder.predict = _oracle(decoder, x0, other)
        assert decoder.diffusion_loss(x0, cond, torch.Generator().manual_seed(3)).mean() > 1e-2


def test_high_noise_fraction_moves_that_share_of_the_loss_to_the_noisiest_timesteps(pixel_folders):
    seen = []

    def spy_predict(decoder):
        def predict(x_t, t, cond):
            seen.append(t.clone())
            return torch.zeros_like(x_t)
        return predict

    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    for fraction in (0.0, 0.5):
        config = DecoderConfig(type="pixel_unet", name_or_path=str(pixel_folders["v_prediction"]),
                               high_noise_fraction=fraction, high_noise_min_t=990)
        decoder = build_frozen_decoder(config)
        decoder.predict = spy_predict(decoder)
        decoder.diffusion_loss(x0, decoder.encode_text(None, None, [[]] * 8), torch.Generator().manual_seed(3))
    uniform, shifted = seen
    assert (shifted[:4] >= 990).all() and torch.equal(shifted[4:], uniform[4:])
    assert (uniform < 990).sum() >= 6  # uniform draws land there about 1 % of the time
    # the default draw is the plain uniform one (configs from before the option reproduce)
    assert torch.equal(uniform, torch.randint(0, 1000, (8,), generator=_after_normals(x0.shape, 3)))


def _after_normals(shape, seed):
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g


def test_min_snr_weights(pixel_folders):
    for ptype, expected in (("epsilon", lambda s: torch.clamp(s, max=5) / s),
                            ("v_prediction", lambda s: torch.clamp(s, max=5) / (s + 1)),
                            ("sample", lambda s: torch.clamp(s, max=5))):
        decoder = build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(pixel_folders[ptype]),
                                                     snr_gamma=5.0))
        t = torch.tensor([0, 10, 300, 999])
        a = decoder.scheduler.alphas_cumprod[t]
        torch.testing.assert_close(decoder.loss_weights(t), expected(a / (1 - a)), rtol=1e-5, atol=0)
    assert torch.equal(build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(
        pixel_folders["epsilon"]))).loss_weights(t), torch.ones(4))


def test_same_generator_same_loss(sd_folder):
    model = ViLexModel.from_config(tiny_vilex_config(sd_folder))
    model.train()
    pixels, x0 = _batch(model)
    a = model(pixels, x0, generator=torch.Generator().manual_seed(7))
    b = model(pixels, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["num_keep"], b["num_keep"]) and torch.equal(a["loss_per_sample"], b["loss_per_sample"])
    model.eval()
    assert model(pixels, x0, generator=torch.Generator().manual_seed(7))["num_keep"].tolist() == [8] * 4


def _count_calls(module):
    """Count calls with a PRE-hook: checkpoint recomputation stops early, so a post-hook may never fire."""
    counter = {"n": 0}
    module.register_forward_pre_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
    return counter


def test_gradient_checkpointing_same_loss_and_grads_and_recomputes(sd_folder):
    cfg = tiny_vilex_config(sd_folder)
    results = {}
    for on in (False, True):
        cfg.vit.gradient_checkpointing = on
        cfg.decoder.gradient_checkpointing = on
        torch.manual_seed(0)
        model = ViLexModel.from_config(cfg)
        model.train()
        counters = {
            "vit": _count_calls(model.encoder.vit.model.encoder.layers[0].self_attn),
            "text": _count_calls(model.decoder.text_encoder.encoder.layers[0].self_attn),
            "unet": _count_calls(model.decoder.unet.mid_block.resnets[1]),  # after cross-attn: needs grad
        }
        pixels, x0 = _batch(model)
        out = model(pixels, x0, generator=torch.Generator().manual_seed(1))
        forward_calls = {k: c["n"] for k, c in counters.items()}
        out["loss"].backward()
        results[on] = (out["loss"].detach(), [p.grad.clone() for p in model.encoder.parameters()],
                       {k: c["n"] - forward_calls[k] for k, c in counters.items()})
    loss_off, grads_off, recomputed_off = results[False]
    loss_on, grads_on, recomputed_on = results[True]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    for g_on, g_off in zip(grads_on, grads_off):
        torch.testing.assert_close(g_on, g_off, rtol=1e-4, atol=1e-7)
    assert recomputed_off == {"vit": 0, "text": 0, "unet": 0}
    assert all(v >= 1 for v in recomputed_on.values()), recomputed_on  # backward re-ran the forward


def test_bf16_decoder(sd_folder):
    cfg = tiny_vilex_config(sd_folder)
    cfg.decoder.dtype = "bfloat16"
    model = ViLexModel.from_config(cfg)
    assert model.decoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.encoder.parameters())
    pixels, x0 = _batch(model, 2)
    assert x0.dtype == torch.float32
    out = model(pixels, x0, generator=torch.Generator().manual_seed(0))
    assert out["loss_per_sample"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.trainable_parameter_groups()["pooler"])


def test_match_embeddings_output_norm(sd_folder):
    model = ViLexModel.from_config(tiny_vilex_config(sd_folder))
    table = model.decoder.embedding_table.float()
    pooler = model.encoder.pooler
    torch.testing.assert_close(pooler.embed_mean, table.mean(0))
    torch.testing.assert_close(pooler.embed_std, table.std(0))
    tokens = model.encoder(_batch(model, 3)[0])
    assert tokens.shape == (3, 8, model.decoder.embed_width)
    standardized = (tokens - pooler.embed_mean) / pooler.embed_std  # LN output: zero mean, unit var per token
    torch.testing.assert_close(standardized.mean(-1), torch.zeros(3, 8), rtol=0, atol=1e-4)
    torch.testing.assert_close(standardized.var(-1, unbiased=False), torch.ones(3, 8), rtol=0, atol=1e-3)
    ratio = tokens.norm(dim=-1).mean() / table.norm(dim=-1).mean()
    assert 0.7 < ratio < 1.3  # tokens sit at the scale of real word embeddings


def test_num_tokens_must_fit_decoder_context(tmp_path):
    folder = build_tiny_pixel_decoder(tmp_path / "short", context_length=10)
    cfg = tiny_vilex_config(folder, decoder_type="pixel_unet", num_tokens=9)
    with pytest.raises(UserError, match=r"^pooler.num_tokens=9 does not fit: the decoder's text context has 10 "
                                        r"positions, so at most 8 ViLex tokens fit \(BOS and EOS take 2\)$"):
        ViLexModel.from_config(cfg)
    cfg.pooler.num_tokens = 8
    assert ViLexModel.from_config(cfg).encoder.num_tokens == 8


# ----------------------------------------------------------------------------- TailDrop
def test_taildrop_reproducible_and_bounded():
    cfg = TailDropConfig(prob=1.0, distribution="uniform", min_tokens=2)
    a = sample_num_keep(4000, 16, cfg, torch.Generator().manual_seed(0))
    b = sample_num_keep(4000, 16, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min().item() == 2 and a.max().item() == 16
    counts = torch.bincount(a, minlength=17)[2:].float()
    assert counts.min() > 0.7 * counts.mean()  # roughly uniform over 2..16
    assert not torch.equal(a, sample_num_keep(4000, 16, cfg, torch.Generator().manual_seed(1)))


def test_taildrop_probability_and_short_bias():
    never = sample_num_keep(500, 16, TailDropConfig(prob=0.0), torch.Generator().manual_seed(0))
    assert never.tolist() == [16] * 500
    half = sample_num_keep(4000, 16, TailDropConfig(prob=0.5), torch.Generator().manual_seed(0))
    assert 0.4 < (half < 16).float().mean().item() < 0.55  # 50% apply, 1/16 of those still draw 16
    short = sample_num_keep(4000, 75, TailDropConfig(prob=1.0, distribution="short"), torch.Generator().manual_seed(0))
    uniform = sample_num_keep(4000, 75, TailDropConfig(prob=1.0), torch.Generator().manual_seed(0))
    assert short.min().item() == 1 and short.max().item() <= 75
    assert short.float().median() < 15 < uniform.float().median()
    assert (short == 1).float().mean() > 0.1  # log-uniform: P(m=1) = log 2 / log 76 ~ 0.16


def test_trainer_api_views_loss_from_tokens_and_posterior(sd_folder, pixel_folders):
    from vilex.data import DataConfig
    from vilex.train.data import model_views

    model = ViLexModel.from_config(tiny_vilex_config(sd_folder))
    views = model_views(model, DataConfig())
    assert {side: (v.size, v.mean, v.std) for side, v in views.items()} == {
        "encoder": (16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "decoder": (16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
    pixels, x0 = _batch(model, 3)
    model.train()
    a = model(pixels, x0, generator=torch.Generator().manual_seed(5))
    b = model.loss_from_tokens(model.encoder(pixels), x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["loss_per_sample"], b["loss_per_sample"]) and torch.equal(a["num_keep"], b["num_keep"])
    decoder = model.decoder
    assert decoder.has_vae
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = decoder.encode_posterior(images)
    assert mean.shape == std.shape == (3, 4, 8, 8) and (std > 0).all()
    direct = decoder.to_model_space(images, torch.Generator().manual_seed(9))
    cached = decoder.model_space_from_posterior(mean, std, torch.Generator().manual_seed(9))
    torch.testing.assert_close(direct, cached, rtol=0, atol=0)
    torch.testing.assert_close(decoder.model_space_from_posterior(mean, torch.zeros_like(std)),
                               mean * decoder.vae.config.scaling_factor)
    pixel = build_frozen_decoder(DecoderConfig(type="pixel_unet", name_or_path=str(pixel_folders["epsilon"])))
    assert not pixel.has_vae


def test_channels_last_unet_same_loss(sd_folder):
    import dataclasses

    cfg = tiny_vilex_config(sd_folder)
    cl = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, channels_last=True))
    torch.manual_seed(0)
    plain = ViLexModel.from_config(cfg)
    torch.manual_seed(0)
    fast = ViLexModel.from_config(cl)
    assert fast.decoder.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pixels, x0 = _batch(plain)
    a = plain(pixels, x0, generator=torch.Generator().manual_seed(1), num_keep=4)["loss"]
    b = fast(pixels, x0, generator=torch.Generator().manual_seed(1), num_keep=4)["loss"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_context_positions_let_the_pooler_tell_where_a_patch_is():
    """Without position codes the pooler's attention is blind to the patches' order (a ViT whose last features lost
    their positions gives it nothing to place objects with); with 'sincos2d' the same features in another order
    give other tokens. The codes separate every patch of the grid, rows and columns alike."""
    from vilex.models.encoder import AttentionPooler, sincos_positions

    codes = sincos_positions(64, 32)
    assert codes.shape == (64, 32) and torch.cdist(codes, codes).add(torch.eye(64)).min() > 0.1
    grid = codes.view(8, 8, 32)  # (row, column, channel)
    assert torch.equal(grid[:, :1, :16].expand(8, 8, 16), grid[..., :16])  # first half: the row only
    assert torch.equal(grid[:1, :, 16:].expand(8, 8, 16), grid[..., 16:])  # second half: the column only
    assert sincos_positions(10, 33).shape == (10, 33)  # not a square, odd width: 1-D codes, zero-padded
    torch.manual_seed(0)
    patches = torch.randn(2, 64, 24)
    shuffled = patches[:, torch.randperm(64)]
    for positions, order_matters in (("none", False), ("sincos2d", True)):
        pooler = AttentionPooler(num_tokens=4, input_width=24, output_width=16, width=32, depth=1, heads=2,
                                 context_positions=positions).eval()
        with torch.no_grad():
            same = torch.allclose(pooler(patches), pooler(shuffled), atol=1e-5)
        assert same != order_matters, positions
    with pytest.raises(UserError, match="context_positions"):
        AttentionPooler(num_tokens=4, input_width=24, output_width=16, width=32, depth=1, heads=2,
                        context_positions="learned")
