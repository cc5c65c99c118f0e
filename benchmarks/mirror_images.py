"""benchmarks/mirror_images.py — the images (and what is true of them) behind `vilex eval mirror`'s datasets.

Two sources, both offline and deterministic:

* **drawn scenes**: one to four coloured shapes (circle, square, triangle) on a plain background, drawn here with
  PIL. Everything a task asks about is known exactly: each object's colour, shape, box (COCO ``[x, y, w, h]``),
  polygon (COCO's flat ``[x1, y1, x2, y2, …]``), its position word; so referring expressions, counts, existence
  questions and yes/no pairs are true of the pixels. The toy world's generator (``toy.scenes``) sits above this
  package (tests/test_layering.py), so the mirror draws its own, simpler scenes.
* **photos shipped inside installed packages**: scikit-image's sample images (``skimage.data``: astronaut, coffee,
  chelsea the cat, rocket, …) and scikit-learn's two sample photos, each with hand-written captions and VQA-style
  questions below. Real photographs exercise the tasks' ``convert("RGB")`` and resizing paths on real JPEG/PNG
  content (grayscale and RGBA sources included).

Rendered text (``text_card``) stands in for TextVQA / TextCaps images: words drawn into the image, the OCR tokens
known.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (25, 25, 25)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass
class Obj:
    """One drawn object: what it is and where (pixel coordinates of the image it belongs to)."""

    shape: str
    colour: str
    box: list[float]  # COCO [x, y, w, h]
    polygon: list[float]  # COCO flat [x1, y1, x2, y2, ...]
    column: str  # left | middle | right
    row: str  # top | bottom

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Visual:
    """An image and what is true of it: captions (>= 5), VQA questions with 10 human-style answers, objects."""

    key: str  # stable id: "scene-<seed>" or "photo-<name>"
    image: Image.Image
    captions: list[str]
    qa: list[tuple[str, list[str]]]
    objects: list[Obj] = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # text visible in the image (OCR tokens)
    labels: list[str] = field(default_factory=list)  # object classes in the image (Open Images style)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def ten_answers(main: str, others: tuple[str, ...] = (), n_main: int = 8) -> list[str]:
    """VQA's 10 human answers: ``n_main`` agree, the rest differ (the accuracy metric counts agreements)."""
    rest = list(others) or [main]
    return [main] * n_main + [rest[i % len(rest)] for i in range(10 - n_main)]


def _position(cx: float, cy: float, w: int, h: int) -> tuple[str, str]:
    column = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "middle"
    return column, ("top" if cy < h / 2 else "bottom")


def _polygon(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if shape == "triangle":
        return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    return [(x + s / 2 + s / 2 * math.cos(2 * math.pi * k / 16), y + s / 2 + s / 2 * math.sin(2 * math.pi * k / 16))
            for k in range(16)]


def scene(seed: int, width: int = 192, height: int = 128) -> Visual:
    """A drawn scene (1-4 objects in distinct cells of a 3 x 2 grid) and its captions, questions and objects."""
    rng = random.Random(seed)
    bg_name = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (width, height), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(img)
    cells = rng.sample([(c, r) for c in range(3) for r in range(2)], rng.randint(1, 4))
    palette = [c for c in COLOURS if not (bg_name == "black" and c == "purple")]
    objects = []
    for c, r in sorted(cells):
        shape, colour = rng.choice(SHAPES), rng.choice(palette)
        cw, ch = width / 3, height / 2
        s = rng.uniform(0.5, 0.8) * min(cw, ch)
        x, y = c * cw + rng.uniform(2, cw - s - 2), r * ch + rng.uniform(2, ch - s - 2)
        poly = [(round(px, 2), round(py, 2)) for px, py in _polygon(shape, x, y, s)]
        draw.polygon(poly, fill=COLOURS[colour])
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        box = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]  # COCO [x, y, w, h]
        column, row = _position(box[0] + box[2] / 2, box[1] + box[3] / 2, width, height)
        objects.append(Obj(shape, colour, box, [v for p in poly for v in p], column, row))
    names = [o.name for o in objects]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    n = len(objects)
    count = NUMBER_WORDS[n]
    captions = [
        f"a {listing} on a {bg_name} background",
        f"{count} {'shape' if n == 1 else 'shapes'} on a plain {bg_name} background",
        f"a simple drawing of {'a ' + names[0] if n == 1 else count + ' coloured shapes'}",
        f"the picture shows a {listing}",
        f"{'a single' if n == 1 else 'several'} flat coloured {'shape' if n == 1 else 'shapes'} on {bg_name}",
    ]
    first = objects[0]
    absent = next(s for s in SHAPES + ("star",) if s not in {o.shape for o in objects})
    qa = [
        ("How many shapes are there?", ten_answers(str(n), (count,))),
        (f"What color is the {first.shape} on the {first.column}?", ten_answers(first.colour)),
        (f"Is there a {absent} in the picture?", ten_answers("no")),
        (f"What shape is the {first.colour} object?", ten_answers(first.shape)),
        ("What color is the background?", ten_answers(bg_name, ("grey" if bg_name == "gray" else bg_name,))),
    ]
    return Visual(f"scene-{seed}", img, captions, qa, objects, labels=[o.shape for o in objects])


def text_card(seed: int, width: int = 224, height: int = 96) -> Visual:
    """Words rendered on a sign (TextVQA / TextCaps style): the OCR tokens are exactly the drawn words."""
    rng = random.Random(seed)
    signs = [("OPEN", "24", "HOURS"), ("STOP",), ("EXIT",), ("FRESH", "COFFEE"), ("PLATFORM", "3"), ("SALE", "50%")]
    words = list(rng.choice(signs))
    colour = rng.choice(list(COLOURS))
    img = Image.new("RGB", (width, height), BACKGROUNDS["white"])
    draw = ImageDraw.Draw(img)
    draw.rectangle([6, 6, width - 7, height - 7], outline=COLOURS[colour], width=4)
    text = " ".join(words)
    draw.text((16, height // 2 - 8), text, fill=COLOURS[colour])
    phrase = text.lower()
    captions = [f"a sign that says {phrase}", f"a white sign with {colour} letters reading {phrase}",
                f"the words {phrase} written on a board", f"a {colour} framed sign saying {phrase}",
                f"a simple sign with the text {phrase}"]
    qa = [("What does the sign say?", ten_answers(phrase, (words[0].lower(),), n_main=7)),
          ("What is the first word on the sign?", ten_answers(words[0].lower())),
          ("What color is the text?", ten_answers(colour))]
    return Visual(f"text-{seed}", img, captions, qa, words=words, labels=["sign"])


# Hand-written descriptions of the photos scikit-image and scikit-learn ship (the loader names the function).
PHOTOS: dict[str, dict[str, Any]] = {
    "chelsea": {"captions": ["a tabby cat lying down and looking to the side", "an orange and grey cat resting",
                             "a close up of a striped cat", "a cat with green eyes lying on a floor",
                             "a tabby cat relaxing indoors"],
                "qa": [("What animal is this?", ten_answers("cat", ("kitten",))),
                       ("What color are the cat's eyes?", ten_answers("green", ("yellow",), n_main=7))],
                "labels": ["cat"]},
    "astronaut": {"captions": ["an astronaut in a white space suit posing with a flag",
                               "a smiling astronaut holding a helmet", "a portrait of an astronaut in a spacesuit",
                               "a woman astronaut in front of an american flag", "an astronaut official portrait"],
                  "qa": [("What is the person wearing?", ten_answers("space suit", ("spacesuit",), n_main=6)),
                         ("Is there a flag in the picture?", ten_answers("yes"))],
                  "labels": ["person", "flag"]},
    "coffee": {"captions": ["a cup of coffee on a saucer with a spoon", "a red cup of coffee on a table",
                            "a coffee cup and saucer seen from above", "a hot drink in a cup on a plate",
                            "a cup of black coffee with a spoon beside it"],
               "qa": [("What drink is in the cup?", ten_answers("coffee")),
                      ("How many cups are there?", ten_answers("1", ("one",)))],
               "labels": ["cup", "spoon"]},
    "rocket": {"captions": ["a rocket on a launch pad", "a space rocket standing on the launch tower",
                            "a rocket ready for launch under a clear sky", "a tall rocket at a launch site",
                            "a launch pad with a rocket and its tower"],
               "qa": [("What vehicle is shown?", ten_answers("rocket")),
                      ("Is it night?", ten_answers("no"))],
               "labels": ["rocket"]},
    "camera": {"captions": ["a black and white photo of a man with a camera on a tripod",
                            "a cameraman in a field looking through his camera", "a photographer with a tripod",
                            "a man in a dark coat operating a camera", "a grayscale picture of a photographer"],
               "qa": [("What is the man holding?", ten_answers("camera", ("tripod",), n_main=7)),
                      ("Is this picture in color?", ten_answers("no"))],
               "labels": ["person", "camera"]},
    "coins": {"captions": ["many old coins laid out in rows", "a grayscale picture of coins on a table",
                           "rows of round coins", "a collection of coins on a dark background",
                           "coins arranged in a grid"],
              "qa": [("What objects are shown?", ten_answers("coins", ("coin",))),
                     ("Are the coins round?", ten_answers("yes"))],
              "labels": ["coin"]},
    "china": {"captions": ["a chinese temple with a red roof under a blue sky", "a pagoda among green trees",
                           "a traditional building with trees in front", "an old temple in a park",
                           "a red and white temple roof against the sky"],
              "qa": [("What kind of building is this?", ten_answers("temple", ("pagoda",), n_main=6)),
                     ("Is the sky blue?", ten_answers("yes"))],
              "labels": ["building", "tree"]},
    "flower": {"captions": ["a close up of a pink flower", "a flower with pink petals and a yellow center",
                            "a blooming flower in a garden", "pink petals of a single flower",
                            "a macro photo of a flower"],
               "qa": [("What is this?", ten_answers("flower")),
                      ("What color is the flower?", ten_answers("pink", ("purple",), n_main=7))],
               "labels": ["flower"]},
}


def _load_photo(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


@lru_cache(maxsize=None)
def _photo_image(name: str, max_side: int) -> Image.Image:
    img = _load_photo(name)
    img.thumbnail((max_side, max_side))  # a mirror is small; the task code resizes anyway
    return img


def photo(index: int, max_side: int = 256) -> Visual:
    """The ``index``-th packaged photo (cycling) with its captions and questions."""
    name = list(PHOTOS)[index % len(PHOTOS)]
    spec = PHOTOS[name]
    return Visual(f"photo-{name}", _photo_image(name, max_side).copy(), list(spec["captions"]), list(spec["qa"]),
                  labels=list(spec["labels"]))


def frames(seed: int, n: int = 8, width: int = 160, height: int = 96) -> tuple[list[Image.Image], str, str]:
    """``n`` video frames of one shape moving left to right (SEED-Bench video questions carry 8 frames), with the
    shape's colour and the direction it moves."""
    rng = random.Random(seed)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    out = []
    for k in range(n):
        img = Image.new("RGB", (width, height), BACKGROUNDS["white"])
        s = height / 3
        x = 4 + (width - s - 8) * k / max(1, n - 1)
        ImageDraw.Draw(img).polygon(_polygon(shape, x, height / 2 - s / 2, s), fill=COLOURS[colour])
        out.append(img)
    return out, f"{colour} {shape}", "to the right"


def pool(kind: str) -> Callable[[int], Visual]:
    """Row index -> Visual for a family of images: ``scene`` (drawn shapes), ``photo`` (packaged photos),
    ``text`` (rendered signs) or ``mixed`` (photos and scenes alternating)."""
    if kind == "scene":
        return lambda i: scene(1000 + i)
    if kind == "photo":
        return photo
    if kind == "text":
        return lambda i: text_card(2000 + i)
    if kind == "mixed":
        return lambda i: photo(i // 2) if i % 2 == 0 else scene(3000 + i)
    raise ValueError(f"unknown image pool {kind!r}")
