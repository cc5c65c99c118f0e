"""Tests of ViLexPipeline and the stage-1 CLI: checkpoint round trip, Text-Free Guidance, token-count errors,
reproducible sampling, same layout in training and inference, and the encode/reconstruct/compose commands."""
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

    assert sorted(p.name for p in checkpoint.iterdir()) == ["pooler", "vilex_config.json", "vit"]
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
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: checkpoint folder not found: {tmp_path / 'nope'}"
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
