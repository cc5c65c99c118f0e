"""`vilex serve` without a browser: the page's handlers on the shipped toy assets, the start-up checks, and the page's
actions over HTTP (tests/test_serve_browser.py drives the same page in headless Chromium).

The handlers are called directly: bad uploads, bad settings and a prompt that leaves no room for the tokens must give
a message (never an exception); every number shown (PSNR) must be the one computed from the image shown; answers must
be what the benchmark harness would answer.
"""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # sampling steps: enough to exercise every code path, cheap on 2 cores
SAMPLING = {"seed": 0, "steps": STEPS, "guidance": 3.0}


@pytest.fixture(scope="module")
def handlers():
    from serve.gallery import toy_test_scenes
    from serve.handlers import Handlers
    from serve.models import load_models, resolve_checkpoints

    models = load_models(resolve_checkpoints(), torch.device("cpu"))
    return Handlers(models, toy_test_scenes(3, models.pipeline.decoder.image_size))


@pytest.fixture(scope="module")
def scene_image(handlers):
    return handlers.pick_scene(0).image


def _reference(handlers, image: Image.Image) -> torch.Tensor:
    """The input as PSNR compares against: its centred square at the decoder's resolution, (1, 3, S, S) in [0, 1]."""
    import numpy as np

    from vilex.models.encoder import center_square

    square = np.asarray(center_square(image, handlers.image_size), dtype=np.float32) / 255.0
    return torch.from_numpy(square).permute(2, 0, 1).unsqueeze(0)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- choosing the image
def test_an_upload_that_is_not_an_image_is_a_message(handlers, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not pixels")
    view = handlers.load_upload(notes)
    assert view.image is None and view.square is None
    assert "notes.txt" in view.message and "is not an image" in view.message


def test_a_huge_image_is_refused_by_the_decompression_bomb_rule(handlers, tmp_path):
    from vilex.data.decode import DEFAULT_MAX_PIXELS

    huge = tmp_path / "huge.png"
    huge.write_bytes(_png(Image.new("1", (9000, 9000))))  # 81 M pixels in a 10 kB file
    view = handlers.load_upload(huge)
    assert view.image is None
    assert "huge.png" in view.message and "too large" in view.message
    assert "9000x9000" in view.message and f"{DEFAULT_MAX_PIXELS:,}" in view.message


def test_a_truncated_image_says_why(handlers, tmp_path):
    broken = tmp_path / "broken.png"
    data = _png(Image.new("RGB", (64, 64), (10, 200, 30)).effect_spread(3))
    broken.write_bytes(data[: len(data) // 2])
    view = handlers.load_upload(broken)
    assert view.image is None and "broken.png" in view.message and "cannot be used" in view.message


def test_an_uploaded_image_is_kept_and_shown_as_vilex_sees_it(handlers, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(Image.new("RGBA", (64, 40), (200, 30, 30, 0))))  # transparent: white, as the data layer
    view = handlers.load_upload(photo)
    assert view.image.size == (64, 40) and view.image.getpixel((0, 0)) == (255, 255, 255)
    assert view.square.size == (256, 256)  # the 32 px centred square, enlarged 8x for the page
    assert view.full.size == (448, 280)  # the whole image (what a VLM gets), enlarged 7x
    assert view.caption == "" and view.questions == []
    assert "64 × 40" in view.message


def test_a_large_upload_is_kept_at_the_working_size(handlers, tmp_path):
    from serve.handlers import WORKING_MAX_SIDE

    big = tmp_path / "big.png"
    big.write_bytes(_png(Image.new("RGB", (3000, 1000), (0, 0, 90))))
    view = handlers.load_upload(big)
    assert view.image.size == (WORKING_MAX_SIDE, 683) and "3000 × 1000" in view.message
    assert view.full.size == (768, 256)  # shown reduced


def test_a_gallery_scene_comes_with_its_caption_and_questions(handlers):
    scene = handlers.scenes[1]
    view = handlers.pick_scene(1)
    assert view.image is scene.image and view.caption == scene.caption
    assert [value for _, value in view.questions] == [q for q, _ in scene.questions]
    assert all(f"(toy world: {a})" in label for (label, _), (_, a) in zip(view.questions, scene.questions))
    assert "No toy scene 7" in handlers.pick_scene(7).message


def test_the_gallery_scenes_do_not_depend_on_the_gallery_size():
    from serve.gallery import toy_test_scenes

    small, large = toy_test_scenes(2, 32), toy_test_scenes(4, 32)
    assert [s.id for s in small] == [s.id for s in large[:2]]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(small, large))


# ----------------------------------------------------------------------------- reconstruct
def test_the_psnr_shown_is_that_of_the_reconstruction_shown(handlers, scene_image):
    from serve.handlers import enlarge
    from vilex.metrics import psnr
    from vilex.pipeline import to_pil

    view = handlers.reconstruct_tokens(scene_image, 4, **SAMPLING)
    out = handlers.pipeline.reconstruct([scene_image], num_tokens=4, guidance_scale=3.0, num_inference_steps=STEPS,
                                        seed=0, output_type="pt")
    expected = float(psnr(out.cpu(), _reference(handlers, scene_image))[0])
    assert view.message == ""
    assert view.tokens_psnr == f"**4 tokens** · PSNR **{expected:.2f} dB**"
    assert view.tokens.tobytes() == enlarge(to_pil(out)[0]).tobytes()


def test_the_seed_is_fixed_and_changeable(handlers, scene_image):
    first = handlers.reconstruct_tokens(scene_image, 16, **SAMPLING)
    again = handlers.reconstruct_tokens(scene_image, 16, **SAMPLING)
    other = handlers.reconstruct_tokens(scene_image, 16, **{**SAMPLING, "seed": 1})
    assert first.tokens.tobytes() == again.tokens.tobytes() and first.tokens_psnr == again.tokens_psnr
    assert first.tokens.tobytes() != other.tokens.tobytes()


def test_reconstruct_all_shows_m_tokens_the_caption_and_every_token_count(handlers, scene_image):
    views = [_snapshot(v) for v in handlers.reconstruct_all(scene_image, "a red circle", 4, **SAMPLING)]
    first, last = views[0], views[-1]
    assert first["tokens_psnr"].startswith("**4 tokens**") and first["ladder"] == []  # shown before the others
    assert last["tokens_psnr"] == first["tokens_psnr"] and last["message"] == ""
    assert last["caption_psnr"].startswith("**caption** · PSNR") and last["caption_psnr"].endswith(" dB**")
    assert [c.split(" · ")[0] for c in last["ladder"]] == ["**1 token**", "**4 tokens**", "**16 tokens**"]
    assert last["ladder"][1] == first["tokens_psnr"]  # m = 4 is the same reconstruction, reused


def test_an_upload_has_no_caption_reconstruction_until_one_is_typed(handlers, scene_image):
    *_, last = handlers.reconstruct_all(scene_image, "", 1, **SAMPLING)
    assert last.caption is None and last.caption_psnr.startswith("No caption")


def _snapshot(view) -> dict:
    """The texts of a view as they were when yielded (the handler updates one view object as it goes)."""
    return {"tokens_psnr": view.tokens_psnr, "caption_psnr": view.caption_psnr,
            "ladder": [caption for _, caption in view.ladder], "message": view.message}


@pytest.mark.parametrize("settings, says", [
    ({"seed": None}, "seed: enter a whole number"),
    ({"seed": -1}, "seed: enter a whole number"),
    ({"seed": 1.5}, "seed: enter a whole number"),
    ({"steps": 0}, "sampling steps: enter a whole number from 1"),
    ({"guidance": "lots"}, "guidance scale: enter a number"),
])
def test_bad_settings_are_messages(handlers, scene_image, settings, says):
    tokens = handlers.reconstruct_tokens(scene_image, 4, **{**SAMPLING, **settings})
    (everything,) = handlers.reconstruct_all(scene_image, "", 4, **{**SAMPLING, **settings})
    assert tokens.tokens is None and says in tokens.message
    assert everything.tokens is None and says in everything.message


def test_no_image_is_a_message_everywhere(handlers):
    from serve.handlers import NO_IMAGE

    assert handlers.reconstruct_tokens(None, 4, **SAMPLING).message == NO_IMAGE
    assert [v.message for v in handlers.reconstruct_all(None, "", 4, **SAMPLING)] == [NO_IMAGE]
    assert handlers.compose(None, "on a red background", 1.0, 4, 1, **SAMPLING).message == NO_IMAGE
    assert handlers.answer("siglip", None, "how many objects?", True, [])[-1]["content"] == NO_IMAGE


def test_an_unexpected_error_is_one_line_on_the_page_and_a_traceback_in_the_log(handlers, scene_image,
                                                                                  monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("the UNet fell over")

    monkeypatch.setattr(handlers.pipeline, "reconstruct", broken)
    with caplog.at_level("ERROR", logger="serve.handlers"):
        view = handlers.reconstruct_tokens(scene_image, 4, **SAMPLING)
    assert view.message.startswith("⚠️ Internal error (RuntimeError: the UNet fell over)")
    assert "Traceback" not in view.message and "\n" not in view.message
    assert caplog.records and caplog.records[0].exc_info is not None


# ----------------------------------------------------------------------------- compose
def test_the_token_budget_says_how_many_tokens_fit_beside_the_prompt(handlers, scene_image):
    long_prompt = "a red circle on a blue background " * 9
    used = len(handlers.pipeline.decoder.tokenize([long_prompt])[0])
    fit = handlers.context_length - 2 - used
    assert 0 < fit < handlers.num_tokens  # the prompt leaves room for some tokens, not all 16
    assert f"at most {fit} ViLex tokens fit with it, not 16" in handlers.token_budget(long_prompt, 16)
    assert f"up to {fit} ViLex tokens fit" in handlers.token_budget(long_prompt, fit)
    view = handlers.compose(scene_image, long_prompt, 1.0, 16, 1, **SAMPLING)
    assert view.composed == [] and view.prompt_only is None
    assert f"so at most {fit} ViLex tokens with this prompt" in view.message


def test_a_prompt_longer_than_the_context_says_so(handlers):
    message = handlers.token_budget("red " * 100, 1)
    assert "The prompt has 100 tokens" in message and "holds at most 75" in message


def test_compose_gives_the_samples_next_to_the_prompt_alone(handlers, scene_image):
    from serve.handlers import enlarge

    prompt = "on a red background"
    view = handlers.compose(scene_image, prompt, 1.25, 16, 2, **SAMPLING)
    assert view.message == "" and len(view.composed) == 2
    assert [caption for _, caption in view.composed] == ["16 tokens + prompt, w = 1.25 · sample 1",
                                                          "16 tokens + prompt, w = 1.25 · sample 2"]
    composed = handlers.pipeline.compose(scene_image, prompt, tfg_scale=1.25, num_tokens=16, num_images=2,
                                         guidance_scale=3.0, num_inference_steps=STEPS, seed=0)
    alone = handlers.pipeline.generate([prompt], guidance_scale=3.0, num_inference_steps=STEPS, seed=0)
    assert [image.tobytes() for image, _ in view.composed] == [enlarge(im).tobytes() for im in composed]
    assert view.prompt_only.tobytes() == enlarge(alone[0]).tobytes()
    assert handlers.compose(scene_image, "  ", 1.25, 16, 1, **SAMPLING).message.startswith("⚠️ Type a prompt")


# ----------------------------------------------------------------------------- ask
def test_each_vlm_answers_what_the_benchmark_harness_would(handlers, scene_image):
    from benchmarks.lmms_plugin import VilexVLM
    from benchmarks.toy_tasks import QA_POST_PROMPT

    question = "how many objects are there?"
    name = "vilex_tokens"
    chat = handlers.answer(name, scene_image, question, True, [{"role": "user", "content": "hi"}])
    harness = VilexVLM(pretrained=str(handlers.models.vlms[name].path))
    expected = harness.generate_one(question + QA_POST_PROMPT, {"max_new_tokens": 32}, [scene_image], "test")
    assert chat[1:] == [{"role": "user", "content": question}, {"role": "assistant", "content": expected}]
    assert set(handlers.models.vlms) == {"siglip", "vilex", "vilex_tokens"}
    for other in handlers.models.vlms:
        assert handlers.answer(other, scene_image, question, True, [])[-1]["content"].strip() != ""


def test_an_empty_question_or_an_unknown_model_changes_nothing_or_says_so(handlers, scene_image):
    assert handlers.answer("siglip", scene_image, "   ", True, [{"role": "user", "content": "x"}]) == [
        {"role": "user", "content": "x"}]
    assert "No VLM named 'gpt'" in handlers.answer("gpt", scene_image, "hi", True, [])[-1]["content"]


# ----------------------------------------------------------------------------- two visitors at once
def test_two_visitors_at_once_get_what_each_would_get_alone(handlers, scene_image):
    other_image = handlers.pick_scene(2).image
    requests = [(scene_image, 1), (other_image, 2), (scene_image, 3), (other_image, 4)]
    alone = [handlers.reconstruct_tokens(image, 4, **{**SAMPLING, "seed": seed}).tokens.tobytes()
             for image, seed in requests]
    together: list[bytes | None] = [None] * len(requests)

    def visit(i: int) -> None:
        image, seed = requests[i]
        together[i] = handlers.reconstruct_tokens(image, 4, **{**SAMPLING, "seed": seed}).tokens.tobytes()

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


# ----------------------------------------------------------------------------- start-up
def _serve(args: list[str], capsys) -> tuple[int, str]:
    """``vilex serve ARGS``: (exit code, stderr); INFO logs off, so stderr holds only what a mistake prints."""
    from vilex.cli.main import main

    code = main(["--log-level", "WARNING", "serve", *args])
    return code, capsys.readouterr().err


def test_a_checkpoint_that_does_not_exist_is_refused_at_start_up_in_one_line(tmp_path, capsys):
    code, err = _serve(["--vilex", str(tmp_path / "nope")], capsys)
    assert code == 2 and err == f"error: ViLex checkpoint not found: {tmp_path / 'nope'}\n"
    code, err = _serve(["--vlm", f"mine={tmp_path / 'gone'}"], capsys)
    assert code == 2 and err == f"error: VLM checkpoint not found: {tmp_path / 'gone'}\n"


def test_a_port_in_use_is_refused_before_loading_the_models(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _serve(["--vlm", "--port", str(port)], capsys)
    assert code == 2 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


def test_vlm_arguments_name_their_column():
    from serve.models import parse_vlm_arg

    assert parse_vlm_arg("ours=runs/vlm/vilex") == ("ours", "runs/vlm/vilex")
    assert parse_vlm_arg("runs/a=b/vlm") == (None, "runs/a=b/vlm")
    assert parse_vlm_arg("assets/toy/vlm/siglip") == (None, "assets/toy/vlm/siglip")


def test_vilex_help_does_not_import_gradio():
    code = ("import sys; from vilex.cli.main import build_parser; build_parser(); "
            "print('gradio' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- the page over HTTP
def test_the_page_answers_over_http(handlers, tmp_path):
    """The page's wiring without a browser: upload, reconstruct, compose and ask through gradio's own client."""
    from gradio_client import Client, handle_file

    from serve.app import build_app, launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(handlers)
    launch(app, "127.0.0.1", port, share=False, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        text = tmp_path / "notes.txt"
        text.write_text("hello")
        *_, message = client.predict(handle_file(str(text)), api_name="/upload")
        assert "is not an image" in message
        scene = tmp_path / "scene.png"
        handlers.scenes[0].image.save(scene)
        *_, message = client.predict(handle_file(str(scene)), api_name="/upload")
        assert message.startswith("**scene.png**: 32 × 32 px")
        image, psnr_text, message = client.predict(1, 0, STEPS, 3.0, api_name="/reconstruct_tokens")
        assert Image.open(image).size == (256, 256) and psnr_text.startswith("**1 token** · PSNR") and message == ""
        _, composed, prompt_only, message = client.predict("on a red background", 1.25, 16, 2, 0, STEPS, 3.0,
                                                           api_name="/compose")
        assert len(composed) == 2 and Image.open(prompt_only).size == (256, 256) and message == ""
        chat = client.predict("how many objects are there?", True, [], api_name="/ask_0")
        assert [turn["role"] for turn in chat] == ["user", "assistant"]
    finally:
        app.close()
