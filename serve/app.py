"""app.py — the page: gradio components wired to ``Handlers`` (the only module that imports gradio).

Layout: the image chooser (upload, a gallery of held-out toy scenes, the caption, a message line) above three tabs —
Reconstruct, Compose, Ask — that all work on the chosen image; the sampling settings (seed, steps, CFG) are shared.
Choosing an image reconstructs it at once; moving the token slider re-samples only the m-token reconstruction;
Compose and Ask run on their buttons (or Enter in their text boxes).

Queueing: one request at a time per model. The pipeline's events share the concurrency id ``vilex`` and each VLM has
its own, so visitors wait in line (the page shows their place) instead of interleaving on a model's state. Events
that touch no model (choosing an image, counting a prompt's tokens) are not limited.

Every element a test or a visitor reads has an ``elem_id`` (``recon-m`` and ``psnr-m``, ``ladder-<k>`` and
``ladder-psnr-<k>``, ``composed``, ``prompt-only``, ``chat-<i>``, the ``*-message`` lines …).
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import gradio as gr

from serve.handlers import MAX_COMPOSED, MAX_SEED, Handlers, ImageView, token_ladder

MAX_UPLOAD = "200mb"  # a larger file is refused by gradio before it reaches the server's disk
CACHE_CLEANUP = (3600, 3600)  # every hour, gradio deletes the uploads and shown images older than an hour
IMAGE_HEIGHT = 256
LADDER_HEIGHT = 192
SCENE_COLUMNS, SCENE_ROW_HEIGHT = 6, 105  # the scene gallery shows up to two rows; more scroll
PIXELATED = "pixelated"
CSS = f".{PIXELATED} img {{ image-rendering: pixelated; }}"  # enlarged renders keep their pixels sharp

INTRO = """# ViLex: an image as a few words a text-to-image model understands
ViLex encodes an image into **{n} continuous tokens** in the word-embedding space of a frozen text-to-image model's
text encoder, so the model draws the image back from them, alone (**Reconstruct**), or beside a text prompt
(**Compose**, Text-Free Guidance). The same vision encoder then serves as a VLM's vision tower (**Ask**).

ViLex `{vilex}` · decoder `{decoder}` at {size} px · {vlms}"""


def _image(label: str, elem_id: str, height: int = IMAGE_HEIGHT) -> gr.Image:
    return gr.Image(label=label, elem_id=elem_id, interactive=False, format="png", height=height,
                    elem_classes=[PIXELATED])


def _scene_gallery_height(count: int) -> int:
    rows = min(max(-(-count // SCENE_COLUMNS), 1), 2)
    return 40 + rows * SCENE_ROW_HEIGHT


def _shown(path: Any) -> str:
    """A checkpoint as the page names it: relative to the repository when inside it (assets/toy/vilex)."""
    from toy.claims_report import repo_relative

    if not Path(str(path)).exists():  # a hub id
        return str(path)
    return repo_relative(path) or str(path)


def _values(view: Any) -> tuple:
    """A handler's view dataclass as output values, in field order."""
    return tuple(getattr(view, f.name) for f in fields(view))


def build_app(handlers: Handlers) -> gr.Blocks:
    """The page over ``handlers`` (not launched)."""
    d = handlers.defaults
    n = handlers.num_tokens
    vlm_names = list(handlers.models.vlms)
    checkpoints = handlers.models.checkpoints
    vlms = ("VLMs: " + ", ".join(f"{name} (tower {v.tower})" for name, v in handlers.models.vlms.items())
            if vlm_names else "no VLM (start with `--vlm CKPT` for the Ask tab)")
    with gr.Blocks(title="ViLex", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as app:
        gr.Markdown(INTRO.format(n=n, vilex=_shown(checkpoints.vilex),
                                 decoder=_shown(handlers.pipeline.config.decoder.name_or_path),
                                 size=handlers.image_size, vlms=vlms))
        image = gr.State(None)  # the visitor's working image (PIL), never round-tripped through the browser
        with gr.Row():
            with gr.Column(scale=3):
                scenes = gr.Gallery(value=handlers.gallery(), label="Pick a held-out toy scene", elem_id="scenes",
                                    columns=SCENE_COLUMNS, height=_scene_gallery_height(len(handlers.scenes)),
                                    allow_preview=False, format="png",
                                    elem_classes=[PIXELATED])
            with gr.Column(scale=2):
                upload = gr.File(label="…or upload an image", file_count="single", type="filepath",
                                 elem_id="upload", height=120)
                caption = gr.Textbox(label="Caption (the scene's coarse caption; type one for an upload)",
                                     elem_id="caption", lines=2)
                image_message = gr.Markdown(elem_id="image-message")
        with gr.Accordion("Sampling: seed, steps, guidance", open=False), gr.Row():
            seed = gr.Number(value=d.seed, precision=0, minimum=0, maximum=MAX_SEED, label="seed", elem_id="seed")
            steps = gr.Slider(1, max(100, d.steps), value=d.steps, step=1, label="DDIM steps", elem_id="steps")
            guidance = gr.Slider(0, max(10.0, d.guidance_scale), value=d.guidance_scale, step=0.25,
                                 label="CFG scale (1 = off)", elem_id="guidance")
        sampling = [seed, steps, guidance]

        with gr.Tabs():
            with gr.Tab("Reconstruct", id="reconstruct"):
                with gr.Row():
                    tokens = gr.Slider(1, n, value=n, step=1, label=f"ViLex tokens m (of {n})", elem_id="tokens",
                                       scale=4)
                    reconstruct = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct", scale=1)
                with gr.Row():
                    with gr.Column():
                        recon_input = _image(f"input (centred square, {handlers.image_size} px)", "recon-input")
                    with gr.Column():
                        recon_m = _image("from m ViLex tokens", "recon-m")
                        psnr_m = gr.Markdown(elem_id="psnr-m")
                    with gr.Column():
                        recon_caption = _image("from the caption", "recon-caption")
                        psnr_caption = gr.Markdown(elem_id="psnr-caption")
                counts = token_ladder(n)
                gr.Markdown(f"From the first {', '.join(map(str, counts))} of its {n} tokens (TailDrop trains every "
                            "prefix to stand alone), with the same seed:")
                ladder_images, ladder_psnr = [], []
                with gr.Row():
                    for k in counts:
                        with gr.Column(min_width=120):
                            ladder_images.append(_image(f"{k} token{'s' if k > 1 else ''}", f"ladder-{k}",
                                                        height=LADDER_HEIGHT))
                            ladder_psnr.append(gr.Markdown(elem_id=f"ladder-psnr-{k}"))
                recon_message = gr.Markdown(elem_id="reconstruct-message")
            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    prompt = gr.Textbox(label="prompt", elem_id="prompt", scale=4,
                                        placeholder="e.g. on a red background")
                    compose = gr.Button("Compose", variant="primary", elem_id="compose", scale=1)
                with gr.Row():
                    tfg = gr.Slider(0, max(10.0, d.tfg_scale), value=d.tfg_scale, step=0.25,
                                    label="Text-Free Guidance scale w (0 = the image only)", elem_id="tfg")
                    compose_tokens = gr.Slider(1, n, value=n, step=1, label="ViLex tokens", elem_id="compose-tokens")
                    num_images = gr.Slider(1, MAX_COMPOSED, value=d.num_images, step=1, label="samples",
                                           elem_id="num-images")
                budget = gr.Markdown(handlers.token_budget("", n), elem_id="budget")
                with gr.Row():
                    with gr.Column(scale=1):
                        compose_input = _image("input", "compose-input")
                    with gr.Column(scale=3):
                        composed = gr.Gallery(label="ViLex tokens + prompt (Text-Free Guidance)", elem_id="composed",
                                              columns=4, format="png", height=IMAGE_HEIGHT + 60, object_fit="contain",
                                              interactive=False, elem_classes=[PIXELATED])
                    with gr.Column(scale=1):
                        prompt_only = _image("the prompt alone (same seed)", "prompt-only")
                compose_message = gr.Markdown(elem_id="compose-message")
            with gr.Tab("Ask", id="ask"):
                with gr.Row():
                    question = gr.Textbox(label="question", elem_id="question", scale=4,
                                          placeholder="e.g. how many objects are there?")
                    ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
                with gr.Row():
                    scene_questions = gr.Dropdown(choices=[], label="the toy world's questions about this scene",
                                                  elem_id="scene-questions", scale=4)
                    short = gr.Checkbox(value=True, label="short answer (adds “Answer the question using a single "
                                                          "word or phrase.”)", elem_id="short", scale=2)
                    clear = gr.Button("Clear chats", elem_id="clear", scale=1)
                with gr.Row():
                    with gr.Column(scale=1, min_width=160):
                        ask_input = _image("input", "ask-input")
                    chats = []
                    for i, name in enumerate(vlm_names):
                        with gr.Column(scale=2):
                            chats.append(gr.Chatbot(label=f"{name} (tower {handlers.models.vlms[name].tower})",
                                                    elem_id=f"chat-{i}", height=320))
                if not vlm_names:
                    gr.Markdown("No VLM is loaded: start the page with `--vlm CKPT` (or without `--vlm` for the "
                                "shipped toy VLMs).")

        # ---------------------------------------------------------------- events
        # API names (``api_name``) let a client call the page's actions over HTTP (tests/test_serve.py does).
        chosen = [image, recon_input, compose_input, ask_input, caption, scene_questions, image_message]

        def show(view: ImageView) -> tuple:
            return (view.image, view.square, view.square, view.full, view.caption,
                    gr.Dropdown(choices=view.questions, value=None), view.message)

        def pick(evt: gr.SelectData) -> tuple:
            return show(handlers.pick_scene(evt.index))

        def reconstruct_all(*args: Any):
            for view in handlers.reconstruct_all(*args):
                done = view.ladder + [(None, "")] * (len(counts) - len(view.ladder))  # the rest still blank
                yield (view.input, view.tokens, view.tokens_psnr, view.caption, view.caption_psnr,
                       *(shown for shown, _ in done), *(text for _, text in done), view.message)

        recon = {"fn": reconstruct_all, "inputs": [image, caption, tokens, *sampling],
                 "outputs": [recon_input, recon_m, psnr_m, recon_caption, psnr_caption, *ladder_images, *ladder_psnr,
                             recon_message],
                 "concurrency_id": "vilex", "concurrency_limit": 1}
        free = {"concurrency_limit": None, "show_progress": "hidden"}  # touches no model

        if handlers.scenes:
            app.load(lambda: show(handlers.pick_scene(0)), None, chosen, api_visibility="private", **free).then(
                **recon, api_visibility="private")
        scenes.select(pick, None, chosen, api_visibility="private", **free).then(**recon, api_visibility="private")
        upload.upload(lambda path: show(handlers.load_upload(path)), upload, chosen, api_name="upload",
                      **free).then(**recon, api_visibility="private")
        gr.on([reconstruct.click, caption.submit], **recon, api_name="reconstruct")
        tokens.release(lambda *a: _values(handlers.reconstruct_tokens(*a)), [image, tokens, *sampling],
                       [recon_m, psnr_m, recon_message], api_name="reconstruct_tokens", concurrency_id="vilex",
                       concurrency_limit=1)

        gr.on([prompt.change, compose_tokens.change], handlers.token_budget, [prompt, compose_tokens], budget,
              api_name="token_budget", **free)
        gr.on([compose.click, prompt.submit], lambda *a: _values(handlers.compose(*a)),
              [image, prompt, tfg, compose_tokens, num_images, *sampling],
              [compose_input, composed, prompt_only, compose_message], api_name="compose", concurrency_id="vilex",
              concurrency_limit=1)

        scene_questions.input(lambda q: q or gr.skip(), scene_questions, question, api_visibility="private", **free)
        for i, name in enumerate(vlm_names):
            gr.on([ask.click, question.submit], lambda *a, name=name: handlers.answer(name, *a),
                  [image, question, short, chats[i]], chats[i], api_name=f"ask_{i}", concurrency_id=f"vlm-{i}",
                  concurrency_limit=1)
        if chats:
            clear.click(lambda: [[] for _ in chats] if len(chats) > 1 else [], None, chats, api_visibility="private",
                        **free)
    app.queue(default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, host: str, port: int, share: bool, block: bool = True) -> None:
    """Serve ``app`` on ``host:port`` (``block=False`` returns once it listens; tests and benchmarks use that)."""
    app.launch(server_name=host, server_port=port, share=share, show_error=False, max_file_size=MAX_UPLOAD,
               ssr_mode=False, css=CSS, prevent_thread_lock=not block, quiet=not block)
