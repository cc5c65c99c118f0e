"""The 64-px toy world's parts: web-like captions, the miniature Stable Diffusion (a trained AutoencoderKL + a latent
UNet in StableDiffusionPipeline's layout, loaded by stock diffusers and by ViLex's `stable_diffusion` decoder type),
and the linear feature probe. Tiny settings, a few steps each, through the `vilex` CLI into tmp_path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toy.recipe import Stream, heldout_scenes, read_recipe, toy_rng
from toy.scenes import world
from vilex.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TINY_VAE = ["--set", "image_size=32", "--set", "vae.block_out_channels=[8,16]", "--set", "vae.norm_num_groups=8",
            "--set", "train.global_batch_size=4", "--set", "train.crop_size=16", "--set", "train.num_workers=0",
            "--set", "train.log_every=1", "--set", "train.warmup_steps=1", "--set", "gate.n_scenes=8"]
TINY_LATENT_UNET = [
    "--set", "image_size=32", "--set", "unet.block_out_channels=[16,16]", "--set", "unet.norm_num_groups=8",
    "--set", "unet.down_block_types=[CrossAttnDownBlock2D,DownBlock2D]",
    "--set", "unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D]",
    "--set", "text_encoder.pretrained=null", "--set", "text_encoder.width=32", "--set", "text_encoder.layers=1",
    "--set", "train.global_batch_size=4", "--set", "train.num_workers=0", "--set", "train.log_every=1",
    "--set", "train.warmup_steps=1", "--set", "gate.enabled=false",
]
# words that state a position, a size or a count: a web caption never has one
NOT_WEB_WORDS = {*world.GRID3_ROWS, *world.GRID3_COLS, *world.FINE_SIZE_WORDS, *world.COARSE_SIZE_WORDS,
                 "column", "row", "one", "two", "three", "1", "2", "3", "4", "5", "dark", "light"}


# ----------------------------------------------------------------------------- web-like captions
def test_web_captions_name_only_what_is_there_and_never_positions_sizes_or_counts():
    scenes = heldout_scenes(3, 400)
    rng = toy_rng(3, Stream.CHOICES)
    captions = [world.caption_web(s, rng) for s in scenes]
    for scene, caption in zip(scenes, captions):
        words = set(caption.replace(",", " ").split())
        assert not words & NOT_WEB_WORDS, caption
        named_colours = words & set(world.OBJECT_COLOURS)
        named_shapes = words & set(world.SHAPES)
        assert named_colours <= {o.colour for o in scene.objects} | {scene.background}, caption
        assert named_shapes <= {o.shape for o in scene.objects}, caption
        assert caption.count(" and ") + caption.count(", ") <= 1, caption  # at most two objects are mentioned
    # the captions vary: some name nothing, some the background, few name every object of a 3-object scene
    assert len(set(captions)) > 150
    assert any(c in world.WEB_GENERIC for c in captions) and any("background" in c for c in captions)
    # a scene's caption is a function of the seeded draw (the generator writes the same one again)
    assert world.caption_web(scenes[0], toy_rng(9, Stream.CHOICES)) == world.caption_web(scenes[0],
                                                                                         toy_rng(9, Stream.CHOICES))


def test_generated_datasets_carry_the_web_caption(tmp_path):
    assert main(["toy", "generate", "--out", str(tmp_path / "d"), "--n", "20", "--seed", "2", "--size", "64"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert all(isinstance(r["caption_web"], str) and r["caption_web"] for r in rows)
    assert all(r["width"] == 64 for r in rows)


# ----------------------------------------------------------------------------- the miniature SD
@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    assert main(["toy", "pretrain-vae", "--out", str(root / "vae"), "--set", f"work_dir={root / 'work'}",
                 "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", *TINY_VAE]) == 0
    return root


def test_pretrain_vae_writes_an_autoencoderkl_with_a_measured_scaling_factor(tiny_vae):
    from diffusers import AutoencoderKL

    from toy.pretrain_vae import evaluate_vae

    vae = AutoencoderKL.from_pretrained(str(tiny_vae / "vae"))
    recipe = read_recipe(tiny_vae / "vae")
    metrics = recipe["metrics"]
    assert metrics["steps_done"] == 4 and metrics["latent_shape"] == [4, 16, 16]
    # the scaling factor is 1 / std of the held-out posterior means, as SD 1.5's 0.18215 was measured
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["latent_std"], rel=1e-3)
    assert metrics["gate"] == {"min_psnr_db": 30.0, "passed": metrics["heldout_psnr_db"] >= 30.0}
    again = evaluate_vae(vae, 32, 0, 8)
    assert again["heldout_psnr_db"] == metrics["heldout_psnr_db"]


def test_pretrain_vae_resume_is_exact(tmp_path, tiny_vae):
    """The fixture's 4-step run, its last checkpoint removed (a kill after step 3), --resume auto: same weights."""
    import shutil

    from safetensors.torch import load_file

    work = tmp_path / "work"
    shutil.copytree(tiny_vae / "work", work)
    shutil.rmtree(work / "checkpoints" / "checkpoint-4")
    assert main(["toy", "pretrain-vae", "--out", str(tmp_path / "vae"), "--set", f"work_dir={work}",
                 "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", *TINY_VAE,
                 "--resume", "auto"]) == 0
    assert read_recipe(tmp_path / "vae")["metrics"]["resumed_from_step"] == 2
    resumed = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    straight = load_file(str(tiny_vae / "vae" / "diffusion_pytorch_model.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in resumed)


def test_the_psnr_is_that_of_8_bit_images():
    from toy.pretrain_vae import psnr

    x = -torch.ones(1, 3, 4, 4)  # 8-bit 0
    assert 100 < psnr(x, x).item() < float("inf")  # identical: large, not infinite
    y = x.clone()
    y[..., 0, 0] = -1 + 2 / 255  # 8-bit 1 in one pixel of 16, every channel: MSE 1/16
    assert psnr(y, x).item() == pytest.approx(10 * np.log10(255 ** 2 / (1 / 16)), abs=1e-3)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory, tiny_vae, toy_tokenizer):
    root = tmp_path_factory.mktemp("sd")
    assert main(["toy", "pretrain-decoder", "--config", "configs/toy/sd.yaml", "--out", str(root / "sd"),
                 "--set", f"vae={tiny_vae / 'vae'}", "--set", f"tokenizer={toy_tokenizer}",
                 "--set", f"work_dir={root / 'work'}", "--set", "train.max_steps=3", *TINY_LATENT_UNET]) == 0
    return root / "sd"


def test_the_mini_sd_is_a_stock_stable_diffusion_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (tiny_sd / "vae" / "recipe.json").is_file()  # the VAE's own recipe travels with it
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.in_channels == 4
    out = pipe("a red circle at the top left on a gray background", num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_vilex_trains_against_the_mini_sd_as_a_stable_diffusion_decoder(tiny_sd):
    from toy.decoder_model import LatentSpace
    from vilex.models.configs import DecoderConfig
    from vilex.models.decoders import StableDiffusionDecoder, build_frozen_decoder

    decoder = build_frozen_decoder(DecoderConfig(type="stable_diffusion", name_or_path=str(tiny_sd)))
    assert isinstance(decoder, StableDiffusionDecoder)
    assert decoder.image_size == 32 and decoder.model_space_shape == (4, 16, 16)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    # the decoder's model space is the one the UNet was trained in: the same scaled posterior mean
    mean, _ = decoder.encode_posterior(images)
    space = LatentSpace(tiny_sd / "vae")
    expected = space.vae.encode(images).latent_dist.mean * space.scaling
    assert torch.allclose(decoder.model_space_from_posterior(mean, torch.zeros_like(mean)), expected, atol=1e-5)


@pytest.mark.slow  # ~20 s on 2 cores: 32 scenes sampled twice by the 3.9M-parameter UNet
def test_decoder_commitment_of_a_trained_mini_sd_keeps_a_render_noised_to_0_3_and_not_pure_noise():
    """From renders noised to 0.3 x T the trained UNet keeps the scenes' shapes (they are decided above that noise
    level); sampled from pure noise it draws fewer of them right (the shipped mini SD, checkpoints/toy/sd: on these 32
    scenes shape 0.97 kept vs 0.69 sampled; its gate's scenes, chosen for a clear largest object, read 0.84)."""
    from toy.decoder_commitment import attribute_commitment

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "toy" / "sd"
    result = attribute_commitment(folder, "assets/toy/probe_64", [0.3, 1.0], n_scenes=32, seed=1)
    assert result["autoencoded"]["shape_accuracy"] >= 0.85
    kept, sampled = result["by_strength"]["0.3"], result["by_strength"]["1"]
    assert kept["shape_accuracy"] >= 0.75 and kept["cell_accuracy"] >= 0.8
    assert sampled["shape_accuracy"] < kept["shape_accuracy"] - 0.1
    with pytest.raises(ValueError, match="init_images"):
        from toy.decoder_gate import load_decoder_folder, sample_images

        unet, text_encoder, tokenizer, scheduler, latents = load_decoder_folder(folder)
        sample_images(unet, text_encoder, tokenizer, scheduler, ["a red circle"], latents=latents, strength=0.5)


def test_a_fine_caption_fixes_the_3x3_cell_only_where_its_5x5_cell_lies_inside_one():
    from toy.decoder_gate import cells_a_fine_caption_allows
    from toy.probe import largest_object
    from toy.scenes.world import ToyObject, grid3_name

    def allowed(cx, cy):
        return cells_a_fine_caption_allows(ToyObject("circle", "red", (255, 0, 0), shade=0.0, size=0.1, cx=cx, cy=cy))

    assert allowed(0.1, 0.1) == {"top left"}  # column 1 row 1: inside the top-left third
    assert allowed(0.5, 0.5) == {"center"}  # column 3 row 3
    assert allowed(0.3, 0.5) == {"middle left", "center"}  # column 2 straddles the first 3x3 border
    assert allowed(0.3, 0.7) == {"middle left", "center", "bottom left", "bottom center"}  # column 2 row 4
    n_open = [len(allowed((c + 0.5) / 5, (r + 0.5) / 5)) for c in range(5) for r in range(5)]
    assert n_open.count(1) == 9 and n_open.count(2) == 12 and n_open.count(4) == 4
    rng = np.random.default_rng(0)
    for _ in range(200):  # the scene's own cell is always among those the caption allows
        big = largest_object(world.sample_scene(rng))
        assert grid3_name(big.cx, big.cy) in cells_a_fine_caption_allows(big)


def test_decoder_commitment_at_full_strength_is_the_gates_own_sampling(tiny_sd, tmp_path, capsys):
    from toy.decoder_gate import DecoderGateSpec, decoder_quality_gate, load_decoder_folder

    probe = "assets/toy/probe"  # the shipped 32-px attribute probe judges the 32-px tiny decoder's samples
    out = tmp_path / "commitment.json"
    assert main(["toy", "decoder-commitment", "--decoder", str(tiny_sd), "--probe", probe, "--n", "8",
                 "--seed", "5", "--steps", "4", "--strengths", "1.0", "0.5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["by_strength"]) == ["0.5", "1"] and result["first_timestep"]["1"] > 900
    assert result["first_timestep"]["0.5"] <= 500
    table = capsys.readouterr().out
    assert "| autoencoded render | 0 |" in table and "| strength 0.5 |" in table
    spec = DecoderGateSpec(probe=probe, n_scenes=8, ddim_steps=4, guidance_scale=3.0)
    gate, _ = decoder_quality_gate(*load_decoder_folder(tiny_sd)[:4], probe, spec, 5, load_decoder_folder(tiny_sd)[4])
    assert result["by_strength"]["1"] == gate["generated"]["all"]
    placement, fine = gate["generated"]["fine_captions_placement"], gate["generated"]["fine_captions"]
    assert placement["n"] == fine["n"] == 4 and 0 <= placement["share_whose_5x5_cell_fixes_the_3x3_cell"] <= 1
    # a sample in the scene's own cell is in a cell the caption allows: the lenient reading is never the lower one
    assert placement["cell_within_the_captions_5x5_cell"] >= fine["cell_accuracy"]
    assert main(["toy", "decoder-commitment", "--decoder", str(tiny_sd), "--probe", probe, "--strengths", "0"]) == 2


@pytest.mark.slow  # ~1 min: two ViLex steps at 64-px encoder input, then every claims arm on 4 scenes twice
def test_the_64px_vilex_config_trains_against_the_mini_sd_and_the_claims_measure_it(tiny_sd, tmp_path):
    """configs/vilex/toy_64.yaml end to end on a stand-in mini SD: ViLex from the web-caption SigLIP against it
    (latent cache on), then `vilex toy claims` against that decoder with a probe of its image size."""
    from toy.scenes.generate import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n=40, seed=0, size=32, overwrite=True, progress=False)
    run = tmp_path / "run"
    sets = {"model.decoder.name_or_path": tiny_sd, "data.train.path": data / "train", "data.val.path": data / "val",
            "train.output_dir": run, "latent_cache.dir": tmp_path / "latents", "train.max_steps": 2,
            "train.global_batch_size": 4, "train.checkpoint_every": 2, "train.optim.warmup_steps": 1,
            "log.tensorboard": "false", "val.every": 100}
    args = ["pretrain", "--config", "configs/vilex/toy_64.yaml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert any((tmp_path / "latents").rglob("*")), "the latent cache was not used"
    out = tmp_path / "claims"
    assert main(["toy", "claims", "--checkpoint", str(run), "--test-split", str(data / "test"), "--out", str(out),
                 "--n", "4", "--decoder", str(tiny_sd), "--probe", "assets/toy/probe", "--device", "cpu"]) == 0
    claims = json.loads((out / "checkpoint_claims.json").read_text())
    assert set(claims["arms"]) == {"caption_coarse", "caption_fine", "vilex_1", "vilex_4", "vilex_16"}
    assert claims["n"] == 4 and all(np.isfinite(arm["psnr"]["mean"]) for arm in claims["arms"].values())
    assert (out / "checkpoint_reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shipped = tmp_path / "shipped"  # ship-vilex measures against the same decoder and probe
    assert main(["toy", "ship-vilex", "--run", str(run), "--out", str(shipped), "--test-split", str(data / "test"),
                 "--n", "4", "--decoder", str(tiny_sd), "--probe", "assets/toy/probe", "--device", "cpu",
                 "--feature-probe-scenes", "0"]) == 0
    shipped_metrics = json.loads((shipped / "recipe.json").read_text())["metrics"]
    assert shipped_metrics["claims"]["n"] == 4
    assert (shipped_metrics["decoder"], shipped_metrics["probe"]) == (str(tiny_sd), "assets/toy/probe")
    assert "feature_probe" not in shipped_metrics  # 0 scenes: skipped


def test_a_latent_unet_refuses_coordinate_channels(tmp_path, tiny_vae, toy_tokenizer):
    code = main(["toy", "pretrain-decoder", "--config", "configs/toy/sd.yaml", "--out", str(tmp_path / "sd"),
                 "--set", f"vae={tiny_vae / 'vae'}", "--set", f"tokenizer={toy_tokenizer}",
                 "--set", f"work_dir={tmp_path / 'work'}", "--set", "train.max_steps=1", *TINY_LATENT_UNET,
                 "--set", "unet.coordinate_channels=2"])
    assert code == 2 and not (tmp_path / "sd").exists()


# ----------------------------------------------------------------------------- the feature probe
class _FakeTower(torch.nn.Module):
    """A 'tower' whose features are the object count (one-hot) plus noise, or noise alone."""

    def __init__(self, informative: bool) -> None:
        super().__init__()
        self.informative = informative
        self.config = type("C", (), {"image_size": 16})()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, pixel_values):
        noise = torch.randn(pixel_values.shape[0], 4, 6, generator=self.gen)
        if self.informative:  # the count is visible as how many non-background pixels there are
            fg = (pixel_values - pixel_values[:, :, :1, :1]).abs().sum(1).gt(0.1).float().mean((1, 2))
            noise[:, :, 0] += fg[:, None] * 50
        return type("O", (), {"last_hidden_state": noise})()


def test_feature_probe_reads_what_features_carry_and_not_what_they_miss():
    from toy.feature_probe import probe_table, probe_tower

    informative = probe_tower(_FakeTower(True), seed=5, n_train=300, n_test=200)
    blind = probe_tower(_FakeTower(False), seed=5, n_train=300, n_test=200)
    # foreground area separates counts well, and says nothing about the background colour's name
    assert informative["count"]["tokens"] > informative["count"]["majority"] + 0.15
    chance = {"count": 1 / 3, "largest_colour": 1 / 8, "background": 1 / 5}
    for target, level in chance.items():
        assert blind[target]["tokens"] < max(level, blind[target]["majority"]) + 0.12
    assert informative["smallest_shape"]["n_test"] < 200  # single-object scenes do not ask it
    table = probe_table({"a": informative, "b": blind})
    assert table.splitlines()[0] == "| target | a | b | majority |" and "smallest_shape" in table
    # one patch's own row: noise features do not say it (2 rows: chance 0.5), features carrying it do
    assert blind["patch_row"]["chance"] == 0.5 and blind["patch_row"]["accuracy"] < 0.7
    assert "| patch's own row, from that patch alone |" in table


def test_patch_row_probe_reads_positions_that_features_carry():
    from toy.feature_probe import patch_row_accuracy

    class Placed(_FakeTower):
        def forward(self, pixel_values):
            out = super().forward(pixel_values)
            out.last_hidden_state[:, :, 1] += torch.tensor([0.0, 0.0, 5.0, 5.0])  # patches 2, 3: the second row
            return out

    images = torch.zeros(40, 3, 16, 16)
    assert patch_row_accuracy(Placed(False), images, 30) > 0.95
    assert patch_row_accuracy(_FakeTower(False), images, 30) < 0.7


def test_the_committed_mini_sd_met_its_gate_and_warm_starts_its_config():
    """checkpoints/toy/sd (the mini SD whose gate is met; fp16 EMA UNet) starts a run of configs/toy/sd.yaml through
    `init_unet`: same architecture, every tensor copied; its recipe records the gate it passed and the runs before."""
    from pathlib import Path

    from toy.decoder_model import build_unet, load_init_unet
    from toy.pretrain_decoder import DecoderPretrainConfig
    from vilex.config import load_config

    repo = Path(__file__).resolve().parents[1]
    warm = repo / "checkpoints" / "toy" / "sd"
    cfg = load_config(DecoderPretrainConfig, repo / "configs" / "toy" / "sd.yaml", [f"init_unet={warm}"])
    unet = build_unet(cfg.unet, cfg.image_size // 4, cfg.text_encoder.width, channels=4)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert load_init_unet(unet, cfg.init_unet) == {"from": str(warm), "zero_initialised_coordinate_channels": 0}
    after = unet.state_dict()
    assert all(after[k].dtype == torch.float32 for k in after)
    assert sum(not torch.equal(before[k], after[k]) for k in after) > 0.9 * len(after)
    recipe = json.loads((warm / "recipe.json").read_text())
    gate = recipe["metrics"]["gate"]
    assert gate["passed"] is True and gate["below_threshold"] == {}
    assert all(gate["generated"]["all"][k] >= v for k, v in gate["thresholds"].items())
    assert recipe["metrics"]["steps_done"] == 7769
    assert recipe["metrics"]["warm_start"]["from"] == "checkpoints/toy/sd_unet_15747"  # 15747 steps before these