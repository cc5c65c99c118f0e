"""Tests of ViLexPipeline and the stage-1 CLI: checkpoint round trip, Text-Free Guidance, token-count errors,
reproducible sampling, same layout in training and inference, the encode/reconstruct/compose commands, and stage-1
checkpoints named by any natural path (run folder, checkpoint-<step>, pipeline/) with --device on every command."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vilex.cli.main import main
from vilex.errors import UserError
from vilex.models import ViLexModel
from vilex.models.encoder import center_square
from vilex.models.tiny import build_tiny_sd, tiny_vilex_config
from vilex.pipeline import ViLexPipeline

STEPS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    decoder = build_tiny_sd(root / "decoder", pad="!", prediction_type="v_prediction")
    model = ViLexModel.from_config(tiny_vilex_config(decoder, num_tokens=8))
    return model.save_pretrained(root / "ckpt")


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return ViLexPipeline.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(20, 20), (24, 16)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _pil(paths):
    return [Image.open(p).convert("RGB") for p in paths]


def test_checkpoint_layout_and_round_trip(checkpoint, pipe, images, tmp_path):
    from transformers import SiglipVisionModel

    assert sorted(p.name for p in checkpoint.iterdir()) == ["manifest.json", "pooler", "vilex_config.json", "vit"]
    config = json.loads((checkpoint / "vilex_config.json").read_text())
    assert config["decoder"]["type"] == "stable_diffusion" and config["pooler"]["num_tokens"] == 8
    tokens = pipe.encode(_pil(images), num_tokens=5)
    assert tokens.shape == (2, 5, 32) and tokens.dtype == torch.float32
    pipe.save_pretrained(tmp_path / "again")
    again = ViLexPipeline.from_pretrained(tmp_path / "again", decoder=pipe.decoder)
    assert torch.equal(again.encode(_pil(images), num_tokens=5), tokens)
    vit = SiglipVisionModel.from_pretrained(checkpoint / "vit")  # plain HF class, as stage 2 loads it
    pixels = pipe.encoder.preprocess(_pil(images))
    torch.testing.assert_close(vit(pixels).last_hidden_state, pipe.encoder.vit(pixels), rtol=0, atol=0)


def test_trained_weights_survive_the_round_trip(checkpoint, tmp_path, images):
    model = ViLexModel.from_pretrained(checkpoint)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "changed")
    reloaded = ViLexModel.from_pretrained(tmp_path / "changed", decoder=model.decoder)
    for (name, a), b in zip(model.encoder.state_dict().items(), reloaded.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def test_token_count_errors(pipe, images):
    with pytest.raises(UserError, match=r"^num_tokens=9 is out of range: this encoder makes 8 ViLex tokens, "
                                        r"so 1..8 fit$"):
        pipe.encode(_pil(images), num_tokens=9)
    long_prompt = " ".join(["red"] * 70)
    assert len(pipe.decoder.tokenize([long_prompt])[0]) == 70
    with pytest.raises(UserError, match=r"^8 ViLex tokens \+ 70 prompt tokens do not fit the 77-token text "
                                        r"context: at most 75 fit together \(BOS and EOS take 2\), so at most "
                                        r"5 ViLex tokens with this prompt$"):
        pipe.compose(_pil(images)[0], long_prompt, num_inference_steps=STEPS)
    assert len(pipe.compose(_pil(images)[0], long_prompt, num_tokens=5, num_inference_steps=1)) == 1
    with pytest.raises(UserError, match=r"^the prompt has 80 tokens but the 77-token text context holds at most 75"):
        pipe.compose(_pil(images)[0], " ".join(["red"] * 80), num_tokens=1, num_inference_steps=STEPS)


def test_tfg_endpoints(pipe, images):
    tokens = pipe.encode(_pil(images), num_tokens=4)
    cond_v, cond_vc = pipe.compose_conditioning(tokens, "on the beach")
    x_t = torch.randn(2, *pipe.decoder.model_space_shape)
    t = torch.tensor(500)
    pred_v = pipe.decoder.predict(x_t, t.expand(2), cond_v)
    pred_vc = pipe.decoder.predict(x_t, t.expand(2), cond_vc)
    assert (pred_v - pred_vc).abs().max() > 1e-4  # the prompt changes the prediction
    torch.testing.assert_close(pipe.predict_guided(x_t, t, cond_v, cond_vc, tfg_scale=0.0), pred_v,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe.predict_guided(x_t, t, cond_v, cond_vc, tfg_scale=1.0), pred_vc,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe.predict_guided(x_t, t, cond_v, cond_vc, tfg_scale=2.0), 2 * pred_vc - pred_v,
                               rtol=1e-4, atol=1e-4)


def test_compose_prompt_follows_the_vilex_tokens(pipe, images):
    tokens = pipe.encode(_pil(images)[:1], num_tokens=3)
    _, layout = pipe.decoder.encode_text(tokens, 3, pipe.decoder.tokenize(["on the beach"]), return_layout=True)
    prompt_ids = pipe.decoder.tokenize(["on the beach"])[0]
    assert layout.vilex_mask[0, 1:4].all() and not layout.vilex_mask[0, 4:].any()
    assert layout.input_ids[0, 4:4 + len(prompt_ids)].tolist() == prompt_ids


def test_sampling_is_reproducible(pipe, images):
    a = pipe.reconstruct(_pil(images), num_tokens=2, num_inference_steps=STEPS, seed=3, output_type="pt")
    b = pipe.reconstruct(_pil(images), num_tokens=2, num_inference_steps=STEPS, seed=3, output_type="pt")
    c = pipe.reconstruct(_pil(images), num_tokens=2, num_inference_steps=STEPS, seed=4, output_type="pt")
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    pil = pipe.reconstruct(_pil(images), num_tokens=2, num_inference_steps=STEPS, seed=3)
    assert [im.size for im in pil] == [(16, 16), (16, 16)]


def test_training_and_inference_call_the_conditioning_with_the_same_layout(checkpoint, pipe, images):
    """Spy on the one conditioning entry point in ViLexModel.forward (training) and ViLexPipeline.decode."""
    model = ViLexModel.from_pretrained(checkpoint, decoder=pipe.decoder)
    model.train()
    calls = []
    original = type(pipe.decoder).encode_text

    def spy(self, *args, **kwargs):
        kwargs["return_layout"] = True
        cond, layout = original(self, *args, **kwargs)
        calls.append((cond.detach(), layout))
        return cond

    pixels = model.encoder.preprocess(_pil(images))
    x0 = torch.randn(2, *pipe.decoder.model_space_shape)
    type(pipe.decoder).encode_text = spy
    try:
        for m in range(1, 9):
            calls.clear()
            model(pixels, x0, num_keep=m)
            pipe.decode(pipe.encode(_pil(images), m), guidance_scale=1.0, num_inference_steps=1)
            (train_cond, train_layout), (infer_cond, infer_layout) = calls
            for field in ("input_ids", "vilex_mask", "attention_mask", "eos_index", "num_vilex"):
                assert torch.equal(getattr(train_layout, field), getattr(infer_layout, field)), (m, field)
            torch.testing.assert_close(train_cond, infer_cond, rtol=1e-5, atol=1e-6)
    finally:
        type(pipe.decoder).encode_text = original


# ----------------------------------------------------------------------------- CLI
def test_cli_encode(checkpoint, images, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "tokens.safetensors"
    rc = main(["encode", "--checkpoint", str(checkpoint), "--images", *map(str, images), "--num-tokens", "3",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("tokens").shape == (2, 3, 32)
        assert f.metadata()["num_tokens"] == "3"


def test_cli_reconstruct_grid(checkpoint, images, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["reconstruct", "--checkpoint", str(checkpoint), "--images", *map(str, images), "--num-tokens", "1",
               "4", "8", "--steps", str(STEPS), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    grid = Image.open(out)
    assert grid.size == (4 * 16, 2 * 16)  # columns: original + 3 token counts; rows: 2 images
    original = np.asarray(center_square(Image.open(images[0]), 16))
    assert np.array_equal(np.asarray(grid)[:16, :16], original)


def test_cli_compose(checkpoint, images, tmp_path):
    out = tmp_path / "composed.png"
    rc = main(["compose", "--checkpoint", str(checkpoint), "--image", str(images[0]), "--prompt", "on the beach",
               "--tfg-scale", "2", "--num-images", "2", "--steps", str(STEPS), "--out", str(out), "--device", "cpu"])
    assert rc == 0 and Image.open(out).size == (2 * 16, 16)


def test_cli_bad_paths_exit_2(checkpoint, images, tmp_path, capsys):
    rc = main(["encode", "--checkpoint", str(tmp_path / "nope"), "--images", str(images[0]), "--out",
               str(tmp_path / "t.safetensors")])
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: ViLex checkpoint not found: {tmp_path / 'nope'}"
    rc = main(["reconstruct", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "missing.png"),
               "--out", str(tmp_path / "g.png")])
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: image not found: {tmp_path / 'missing.png'}"
    (tmp_path / "text.png").write_text("not an image")
    rc = main(["compose", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "text.png"), "--prompt", "x",
               "--out", str(tmp_path / "o.png")])
    assert rc == 2 and capsys.readouterr().err.startswith(f"error: cannot read image {tmp_path / 'text.png'}")
    rc = main(["encode", "--checkpoint", str(checkpoint), "--images", str(images[0]), "--num-tokens", "9",
               "--out", str(tmp_path / "t.safetensors"), "--device", "cpu"])
    assert rc == 2 and "this encoder makes 8 ViLex tokens, so 1..8 fit" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints by any natural path
@pytest.fixture(scope="module")
def run_folder(checkpoint, tmp_path_factory):
    """A `vilex pretrain` run's layout: checkpoints/checkpoint-2/pipeline = ``checkpoint``, checkpoint-4/pipeline =
    other pooler weights (so which one is "the latest" shows in the tokens), beside the training state."""
    run = tmp_path_factory.mktemp("run")
    model = ViLexModel.from_pretrained(checkpoint)
    for step in (2, 4):
        folder = run / "checkpoints" / f"checkpoint-{step}"
        if step == 4:
            with torch.no_grad():
                for p in model.encoder.pooler.parameters():
                    p.add_(0.05)
        model.save_pretrained(folder / "pipeline")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "summary.json").write_text("{}")
    return run


def test_resolve_vilex_checkpoint_takes_run_checkpoint_and_pipeline_folders(checkpoint, run_folder):
    from vilex.pipeline import resolve_vilex_checkpoint

    latest = run_folder / "checkpoints" / "checkpoint-4" / "pipeline"
    assert resolve_vilex_checkpoint(run_folder) == latest
    assert resolve_vilex_checkpoint(run_folder / "checkpoints") == latest
    assert resolve_vilex_checkpoint(str(run_folder / "checkpoints" / "checkpoint-2")) == (
        run_folder / "checkpoints" / "checkpoint-2" / "pipeline")
    assert resolve_vilex_checkpoint(latest) == latest
    assert resolve_vilex_checkpoint(checkpoint) == checkpoint  # a shipped/saved pipeline folder


def test_resolve_vilex_checkpoint_wrong_paths_say_what_was_expected(tmp_path):
    from vilex.pipeline import resolve_vilex_checkpoint

    with pytest.raises(UserError, match=f"^ViLex checkpoint not found: {tmp_path / 'nope'}$"):
        resolve_vilex_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        resolve_vilex_checkpoint(tmp_path / "empty")
    assert str(e.value) == (f"{tmp_path / 'empty'} is not a ViLex checkpoint: expected a folder with "
                            "vilex_config.json (vit/, pooler/), a `vilex pretrain` checkpoint-<step> folder (with "
                            "pipeline/), or a run folder (with checkpoints/checkpoint-<step>/)")
    (tmp_path / "vlm" / "checkpoints" / "checkpoint-3" / "projector").mkdir(parents=True)  # e.g. a VLM stage folder
    with pytest.raises(UserError, match=r"vlm: its latest checkpoint checkpoint-3 has no pipeline/vilex_config.json "
                                        r"\(a ViLex checkpoint is made by `vilex pretrain`\)$"):
        resolve_vilex_checkpoint(tmp_path / "vlm")


def test_cli_encode_takes_any_checkpoint_path(checkpoint, run_folder, images, tmp_path):
    from safetensors.torch import load_file

    def tokens(ckpt):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        assert main(["encode", "--checkpoint", str(ckpt), "--images", *map(str, images), "--out", str(out),
                     "--device", "cpu"]) == 0
        return load_file(str(out))["tokens"]

    original, latest = tokens(checkpoint), tokens(run_folder / "checkpoints" / "checkpoint-4" / "pipeline")
    assert not torch.equal(original, latest)
    assert torch.equal(tokens(run_folder), latest)  # the run folder = its latest checkpoint
    assert torch.equal(tokens(run_folder / "checkpoints" / "checkpoint-2"), original)


def test_every_stage1_command_has_the_same_device_option(checkpoint, images, tmp_path, capsys):
    from vilex.cli.main import build_parser

    parser = build_parser()
    commands = {"encode": ["--images", "a.png", "--out", "t.safetensors"],
                "reconstruct": ["--images", "a.png", "--out", "g.png"],
                "compose": ["--image", "a.png", "--prompt", "x", "--out", "o.png"],
                "eval-recon": ["--data", "d", "--out", "o"],
                "toy claims": ["--test-split", "s", "--out", "o"]}
    for name, rest in commands.items():
        args = parser.parse_args([*name.split(), "--checkpoint", "c", *rest])
        assert args.device == "auto", name
    # one resolver for all: no CUDA here, so asking for it is the same one-line error everywhere
    for name, rest in [("encode", ["--images", str(images[0]), "--out", str(tmp_path / "t.safetensors")]),
                       ("eval-recon", ["--data", str(tmp_path), "--out", str(tmp_path / "o")])]:
        if torch.cuda.is_available():
            break
        assert main([name, "--checkpoint", str(checkpoint), *rest, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == "error: --device=cuda: no CUDA device is available here"


def test_vlm_vilex_tower_takes_the_same_paths(run_folder):
    from vlm.config import TowerConfig
    from vlm.towers import build_tower

    def vit_weights(path):
        return build_tower(TowerConfig(type="vilex_tokens", name_or_path=str(path))).state_dict()

    latest = vit_weights(run_folder / "checkpoints" / "checkpoint-4" / "pipeline")
    for path in (run_folder, run_folder / "checkpoints" / "checkpoint-4"):
        assert all(torch.equal(v, latest[k]) for k, v in vit_weights(path).items())
    older = vit_weights(run_folder / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(v, latest[k]) for k, v in older.items())  # the pooler differs
    with pytest.raises(UserError, match="summary.json is not a ViLex checkpoint: expected a folder with "):
        build_tower(TowerConfig(type="vilex", name_or_path=str(run_folder / "summary.json")))
