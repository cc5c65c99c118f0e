"""handlers.py — what every control of the page does, as plain functions over the loaded models (no gradio here).

Handlers return what the page shows (PIL images, ``(image, caption)`` lists for galleries, markdown text) and never
raise for a visitor's mistake: a file that is not an image, an image over the data layer's decompression-bomb limit,
a prompt that leaves no room for the ViLex tokens, a missing image or a bad seed is a message on the page. An
unexpected error is logged with its traceback on the server and shown as one line.

Sampling reuses the pipeline (``reconstruct``, ``generate``, ``compose``) as ``vilex reconstruct`` and
``vilex compose`` call it. Every call passes the request's seed, so it draws from its own ``torch.Generator``, never
the global RNG, and runs under its model's lock: the pipeline's scheduler holds per-call state, so two visitors'
requests must not interleave on it. (The page's queue also runs one request per model at a time; the locks keep
the handlers safe when they are called from threads directly, as the tests do.)

Images: an upload is decoded by the data layer's ``decode_image`` (EXIF orientation, alpha on white, the
decompression-bomb rule applied from the header before any pixel is decoded). ViLex sees its centred square, as in
``vilex reconstruct``, and PSNR is measured against that square at the decoder's resolution; a VLM gets the whole
image through its own preprocessing (``ImageSpec``), as in training and lmms-eval.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from serve.gallery import ToyScene
from serve.models import LoadedModels
from vilex.data.decode import DEFAULT_MAX_PIXELS, SKIP_REASONS, BadSample, decode_image
from vilex.errors import UserError
from vilex.metrics import psnr
from vilex.models.encoder import center_square
from vilex.pipeline import to_pil

log = logging.getLogger(__name__)

NO_IMAGE = "No image yet: upload one or pick a toy scene above."
DISPLAY_MIN_SIDE = 256  # smaller images are shown enlarged (whole-pixel nearest neighbour, see ``enlarge``)
DISPLAY_MAX_SIDE = 768  # larger uploads are shown reduced (the page sends every shown image as a PNG)
THUMBNAIL_MIN_SIDE = 96
WORKING_MAX_SIDE = 2048  # the models read a few hundred pixels at most; a larger upload is kept at this size
MAX_STEPS = 500
MAX_SEED = 2**63 - 1
MAX_COMPOSED = 8


@dataclass(frozen=True)
class SamplingDefaults:
    """The page's initial settings (the ``vilex serve`` options)."""

    seed: int = 0
    steps: int = 25  # what the toy claims and the training-time validation grids use
    guidance_scale: float = 3.0  # CFG against the empty prompt, as `vilex reconstruct`
    tfg_scale: float = 3.0  # Text-Free Guidance w, as `vilex compose`
    num_images: int = 2  # composed samples per request
    max_new_tokens: int = 32  # the longest VLM answer


@dataclass
class ImageView:
    """A newly chosen image: the working copy (kept per visitor), how each tab shows it, its caption and questions."""

    image: Image.Image | None
    square: Image.Image | None  # the centred square at the decoder's resolution, enlarged: ViLex's view
    full: Image.Image | None  # the whole image, enlarged: the VLMs' view
    caption: str
    questions: list[tuple[str, str]]  # dropdown (label, value): the toy world's questions with their answers
    message: str


@dataclass
class ReconstructView:
    """The Reconstruct tab: reconstructions from m tokens, from the caption, and from 1, 4, … n tokens."""

    input: Image.Image | None = None
    tokens: Image.Image | None = None
    tokens_psnr: str = ""
    caption: Image.Image | None = None
    caption_psnr: str = ""
    ladder: list[tuple[Image.Image, str]] = field(default_factory=list)  # (image, PSNR text) per count, as done
    message: str = ""


@dataclass
class TokensView:
    """Only the m-token reconstruction (what moving the slider changes)."""

    tokens: Image.Image | None = None
    tokens_psnr: str = ""
    message: str = ""


@dataclass
class ComposeView:
    """The Compose tab: ViLex tokens + prompt under Text-Free Guidance, next to the prompt alone."""

    input: Image.Image | None = None
    composed: list[tuple[Image.Image, str]] = field(default_factory=list)
    prompt_only: Image.Image | None = None
    message: str = ""


def enlarge(image: Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest neighbour) until its shorter side is at least ``min_side``:
    a browser smooths a small image when it scales it, which blurs exactly the detail a reconstruction is judged on."""
    factor = -(-min_side // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def for_display(image: Image.Image) -> Image.Image:
    """``image`` at a size the page shows well: small ones enlarged (``enlarge``), large ones reduced."""
    if max(image.size) <= DISPLAY_MAX_SIDE:
        return enlarge(image)
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.BICUBIC)
    return shown


def token_ladder(n: int) -> list[int]:
    """1, 4, 16, … below ``n``, then ``n``: the token counts shown side by side."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 4
    return counts + [n]


def describe_bad_image(name: str, error: BadSample) -> str:
    """One line for the page saying why an upload cannot be used."""
    if error.reason == "not_an_image":
        return (f"⚠️ **{name}** is not an image (Pillow does not know its format). Upload a PNG, JPEG, WebP, GIF, "
                "BMP or TIFF file.")
    if error.reason == "decompression_bomb":
        side = int(DEFAULT_MAX_PIXELS ** 0.5)
        return (f"⚠️ **{name}** is too large ({error.detail}). Images over {DEFAULT_MAX_PIXELS:,} pixels "
                f"({side} × {side}) are refused before they are decoded (the data layer's decompression-bomb rule).")
    if error.reason == "too_small":
        return f"⚠️ **{name}** is too small ({error.detail})."
    return f"⚠️ **{name}** cannot be used: {SKIP_REASONS[error.reason]} ({error.detail})."


def failure_message(error: Exception) -> str:
    """A user's mistake as its own one line; anything else as one line here and a traceback in the server log.
    Call it inside the ``except`` block (it logs the exception being handled)."""
    if isinstance(error, UserError):
        return f"⚠️ {error}"
    log.exception("vilex serve: unexpected error")
    return f"⚠️ Internal error ({type(error).__name__}: {error}); the server log has the traceback."


def _as_int(value: Any, what: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: enter a whole number from {low} to {high}, not {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise UserError(f"{what}: enter a whole number from {low} to {high}, not {value!r}")
    return int(number)


def _as_float(value: Any, what: str, low: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: enter a number, not {value!r}") from None
    if not np.isfinite(number) or number < low:
        raise UserError(f"{what}: enter a number >= {low:g}, not {value!r}")
    return number


def _tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def _plural(m: int) -> str:
    return f"{m} token" if m == 1 else f"{m} tokens"


def _psnr_text(what: str, value: float) -> str:
    """The line under a reconstruction: what it was made from, and its PSNR against the input."""
    return f"**{what}** · PSNR **{value:.2f} dB**"


class Handlers:
    """The page's actions over one set of loaded models and the toy gallery."""

    def __init__(self, models: LoadedModels, scenes: list[ToyScene], defaults: SamplingDefaults | None = None) -> None:
        self.models = models
        self.pipeline = models.pipeline
        self.scenes = scenes
        self.defaults = defaults or SamplingDefaults()

    # ------------------------------------------------------------------ facts the page shows
    @property
    def num_tokens(self) -> int:
        """n: the ViLex tokens the encoder makes."""
        return self.pipeline.num_tokens

    @property
    def image_size(self) -> int:
        """The decoder's resolution: reconstructions and PSNR are at this size."""
        return self.pipeline.decoder.image_size

    @property
    def context_length(self) -> int:
        """Text positions of the decoder's text encoder (BOS and EOS take two of them)."""
        return self.pipeline.decoder.context_length

    def gallery(self) -> list[tuple[Image.Image, str]]:
        """The toy scenes as (thumbnail, caption) pairs."""
        return [(enlarge(s.image, THUMBNAIL_MIN_SIDE), s.caption) for s in self.scenes]

    # ------------------------------------------------------------------ choosing the image
    def _view(self, image: Image.Image, caption: str, questions: list[tuple[str, str]], message: str) -> ImageView:
        return ImageView(image, enlarge(center_square(image, self.image_size)), for_display(image), caption,
                         questions, message)

    def load_upload(self, path: str | Path | None) -> ImageView:
        """An uploaded file -> the working image, or a message saying why it cannot be used (the image is cleared:
        the visitor meant to replace it)."""
        if path is None:
            return ImageView(None, None, None, "", [], NO_IMAGE)
        name = Path(path).name
        try:
            image = decode_image(Path(path).read_bytes())
        except BadSample as e:
            return ImageView(None, None, None, "", [], describe_bad_image(name, e))
        except OSError as e:
            return ImageView(None, None, None, "", [], f"⚠️ **{name}** could not be read: {e}")
        size = image.size
        if max(size) > WORKING_MAX_SIDE:
            image.thumbnail((WORKING_MAX_SIDE, WORKING_MAX_SIDE), Image.BICUBIC)
        return self._view(image, "", [], f"**{name}**: {size[0]} × {size[1]} px. ViLex sees its centred square at "
                                         f"{self.image_size} px; there is no caption for an upload (type one to "
                                         f"compare).")

    def pick_scene(self, index: int | None) -> ImageView:
        """Gallery scene ``index`` -> the working image, its coarse caption and its questions."""
        if not (isinstance(index, int) and 0 <= index < len(self.scenes)):
            return ImageView(None, None, None, "", [], f"⚠️ No toy scene {index!r}: pick one of the "
                                                       f"{len(self.scenes)} in the gallery.")
        scene = self.scenes[index]
        questions = [(f"{q} (toy world: {a})", q) for q, a in scene.questions]
        return self._view(scene.image, scene.caption, questions,
                          f"Held-out toy scene **{scene.id}** ({scene.image.width} px). Fine caption: "
                          f"“{scene.caption_fine}”.")

    # ------------------------------------------------------------------ reconstruct
    def _sampling(self, seed: Any, steps: Any, guidance: Any) -> dict[str, Any]:
        return {"seed": _as_int(seed, "seed", 0, MAX_SEED),
                "num_inference_steps": _as_int(steps, "sampling steps", 1, MAX_STEPS),
                "guidance_scale": _as_float(guidance, "guidance scale", 0.0)}

    def _scored(self, out: torch.Tensor, image: Image.Image) -> tuple[Image.Image, float]:
        """A generated batch of one as PIL, with its PSNR against the input's centred square (decoder's size)."""
        out = out.float().cpu()
        return to_pil(out)[0], float(psnr(out, _tensor(center_square(image, self.image_size)))[0])

    def _reconstruct(self, image: Image.Image, m: int, sampling: dict[str, Any]) -> tuple[Image.Image, float]:
        """The reconstruction from the image's first m tokens, and its PSNR."""
        with self.models.pipeline_lock:
            out = self.pipeline.reconstruct([image], num_tokens=m, output_type="pt", **sampling)
        return self._scored(out, image)

    def _from_caption(self, image: Image.Image, caption: str, sampling: dict[str, Any]) -> tuple[Image.Image, float]:
        """The decoder's image for ``caption`` alone (the caption baseline), and its PSNR against ``image``."""
        with self.models.pipeline_lock:
            out = self.pipeline.generate([caption], output_type="pt", **sampling)
        return self._scored(out, image)

    def reconstruct_tokens(self, image: Image.Image | None, m: Any, seed: Any, steps: Any,
                           guidance: Any) -> TokensView:
        """The reconstruction from m tokens and its PSNR (what the token slider shows)."""
        if image is None:
            return TokensView(message=NO_IMAGE)
        try:
            m = _as_int(m, "tokens", 1, self.num_tokens)
            recon, value = self._reconstruct(image, m, self._sampling(seed, steps, guidance))
        except Exception as e:  # noqa: BLE001 - the page shows it; unexpected ones are logged with a traceback
            return TokensView(message=failure_message(e))
        return TokensView(enlarge(recon), _psnr_text(_plural(m), value))

    def reconstruct_all(self, image: Image.Image | None, caption: str | None, m: Any, seed: Any, steps: Any,
                        guidance: Any) -> Iterator[ReconstructView]:
        """Reconstructions from m tokens, from the caption (when there is one) and from 1, 4, … n tokens, each with
        its PSNR; yields the view after each one, so the first shows while the others are sampled."""
        if image is None:
            yield ReconstructView(message=NO_IMAGE)
            return
        view = ReconstructView(input=enlarge(center_square(image, self.image_size)))
        try:
            m = _as_int(m, "tokens", 1, self.num_tokens)
            sampling = self._sampling(seed, steps, guidance)
        except UserError as e:
            view.message = failure_message(e)
            yield view
            return
        done: dict[int, tuple[Image.Image, float]] = {}
        try:
            done[m] = self._reconstruct(image, m, sampling)
            view.tokens, view.tokens_psnr = enlarge(done[m][0]), _psnr_text(_plural(m), done[m][1])
            yield view
            caption = (caption or "").strip()
            if caption:
                try:
                    recon, value = self._from_caption(image, caption, sampling)
                    view.caption, view.caption_psnr = enlarge(recon), _psnr_text("caption", value)
                except UserError as e:  # e.g. a caption longer than the text context: say so, go on with the rest
                    view.caption_psnr = failure_message(e)
            else:
                view.caption_psnr = "No caption: type one above to compare."
            yield view
            for k in token_ladder(self.num_tokens):
                if k not in done:  # the same seed gives the same image: m's reconstruction is reused
                    done[k] = self._reconstruct(image, k, sampling)
                view.ladder.append((enlarge(done[k][0]), _psnr_text(_plural(k), done[k][1])))
                yield view
        except Exception as e:  # noqa: BLE001 - the page shows it; unexpected ones are logged with a traceback
            view.message = failure_message(e)
            yield view

    # ------------------------------------------------------------------ compose
    def token_budget(self, prompt: str | None, m: Any) -> str:
        """How many ViLex tokens fit beside ``prompt``: ``[BOS, v_1..v_m, prompt, EOS]`` must fit the text context
        (the layout of vilex/models/conditioning.py)."""
        try:
            m = _as_int(m, "tokens", 1, self.num_tokens)
        except UserError as e:
            return failure_message(e)
        room = self.context_length - 2
        used = len(self.pipeline.decoder.tokenize([prompt])[0]) if (prompt or "").strip() else 0
        fit = min(max(room - used, 0), self.num_tokens)
        if used > room:
            return (f"⚠️ The prompt has {used} tokens but the {self.context_length}-token text context holds "
                    f"at most {room} (BOS and EOS take 2): shorten it.")
        if m > fit:
            return (f"⚠️ The prompt takes {used} of the {room} text positions: at most {fit} ViLex tokens fit with "
                    f"it, not {m}. Lower the token count or shorten the prompt.")
        return f"The prompt takes {used} of the {room} text positions: up to {fit} ViLex tokens fit with it."

    def compose(self, image: Image.Image | None, prompt: str | None, tfg_scale: Any, m: Any, num_images: Any,
                seed: Any, steps: Any, guidance: Any) -> ComposeView:
        """``num_images`` samples from the image's first m ViLex tokens + ``prompt`` under Text-Free Guidance
        (scale w), and the prompt alone from the same seed (its noise is the first sample's)."""
        if image is None:
            return ComposeView(message=NO_IMAGE)
        view = ComposeView(input=enlarge(center_square(image, self.image_size)))
        prompt = (prompt or "").strip()
        if not prompt:
            view.message = "⚠️ Type a prompt to compose with the image."
            return view
        try:
            m = _as_int(m, "tokens", 1, self.num_tokens)
            w = _as_float(tfg_scale, "TFG scale w", 0.0)
            count = _as_int(num_images, "images", 1, MAX_COMPOSED)
            sampling = self._sampling(seed, steps, guidance)
            with self.models.pipeline_lock:
                composed = self.pipeline.compose(image, prompt, tfg_scale=w, num_tokens=m, num_images=count,
                                                 output_type="pt", **sampling).float().cpu()
                alone = self.pipeline.generate([prompt], output_type="pt", **sampling).float().cpu()
        except Exception as e:  # noqa: BLE001 - e.g. no room for m tokens beside the prompt: it says how many fit
            view.message = failure_message(e)
            return view
        view.composed = [(enlarge(im), f"{_plural(m)} + prompt, w = {w:g} · sample {i + 1}")
                         for i, im in enumerate(to_pil(composed))]
        view.prompt_only = enlarge(to_pil(alone)[0])
        return view

    # ------------------------------------------------------------------ ask
    def answer(self, name: str, image: Image.Image | None, question: str | None, short_answer: bool,
               history: list[dict[str, str]] | None) -> list[dict[str, str]]:
        """The chat of VLM ``name`` with the answer to ``question`` about ``image`` appended (one turn: each question
        is asked on its own, as the models were trained and benchmarked). ``short_answer`` adds LLaVA's
        short-answer instruction, the one the toy VLMs learned with their questions."""
        from benchmarks.toy_tasks import QA_POST_PROMPT

        history = list(history or [])
        question = (question or "").strip()
        if not question:
            return history
        history.append({"role": "user", "content": question})
        served = self.models.vlms.get(name)
        if served is None:
            reply = f"⚠️ No VLM named {name!r} is loaded."
        elif image is None:
            reply = NO_IMAGE
        else:
            try:
                reply = self._generate_answer(served, image, question + (QA_POST_PROMPT if short_answer else ""))
            except Exception as e:  # noqa: BLE001 - the chat shows it; unexpected ones are logged with a traceback
                reply = failure_message(e)
        history.append({"role": "assistant", "content": reply or "(an empty answer)"})
        return history

    def _generate_answer(self, served: Any, image: Image.Image, prompt: str) -> str:
        model = served.model
        dtype = next(model.projectors.parameters()).dtype
        device = next(model.parameters()).device
        pixels = served.image_spec.render(image).unsqueeze(0).to(device, dtype=dtype)
        with served.lock:
            ids = model.prompt_ids(prompt).to(device)
            out = model.generate(ids, pixels, max_new_tokens=self.defaults.max_new_tokens)
        return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
