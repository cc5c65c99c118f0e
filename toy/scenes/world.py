"""toy/scenes/world.py — the procedural toy world: scene graphs, rendering, masks, captions and QA.

A ``Scene`` is a background colour plus 1–3 objects (shape, named colour with a small RGB jitter,
continuous size and centre). Everything else is a deterministic function of the scene graph:
the anti-aliased image and per-object masks (``render``), a coarse and a fine caption
(``caption_coarse`` / ``caption_fine``) and question/answer pairs (``questions``, which only needs
an RNG to pick the negative of the yes/no pair).

Geometry (all resolution-free, in [0, 1] image units, y pointing DOWN as in image coordinates):
``cx, cy`` is the centre of the object's bounding box and ``size`` its half-width, so the bbox is
``[cx-size, cy-size, cx+size, cy+size]`` for every shape. Shapes are analytic inside-tests (the
``SHAPES`` table: adding a shape is one entry); rendering evaluates them on a supersampled grid and
box-averages, so the image and the masks come from the very same coverage and always agree.

Non-obvious decisions:
- Colour names are checked in CIELAB (``nearest_colour_name``): in plain RGB a light yellow is nearer
  orange than yellow. The palette and the jitter were chosen so that every jittered colour is still
  nearest (ΔE76) to its own name, and colours too close to the background are never drawn on it.
- Shade jitter mixes the base colour towards white (``light``) or black (``dark``) by up to
  ``SHADE_MIX``; white and black are achromatic and never shaded (a "light white" is no word).
- Exact values are rounded to 4 decimals AT SAMPLING, so the values stored in metadata are the very
  values the caption words were derived from (no boundary case can flip on a JSON round trip).
- A placement is rejected when any object would be more than ``max_occlusion`` hidden by the ones
  drawn after it, so every mask, count and answer stays true.
- A mask pixel belongs to an object when MORE than half of that pixel's area is the object's
  visible surface (``MASK_COVERAGE``); so masks never overlap, and mixed edge pixels belong to none.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

GENERATOR_VERSION = "toy-world-1"

# --- palettes -------------------------------------------------------------------------------------
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 225),
    "purple": (140, 55, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "beige": (225, 210, 170),
    "navy": (25, 35, 90),
}
ACHROMATIC_COLOURS: frozenset[str] = frozenset({"white", "black"})  # never shaded light/dark
SHADE_MIX = 0.25  # |shade| = 1 mixes a quarter of the way to white (light) or black (dark)
RGB_NOISE = 6  # extra per-channel jitter, uniform in [-RGB_NOISE, RGB_NOISE]
MIN_BACKGROUND_DELTA_E = 35.0  # an object colour is allowed on a background only this far away (ΔE76)

# --- sizes, shades, grids: the words captions use -------------------------------------------------
SIZE_RANGE: tuple[float, float] = (0.08, 0.24)  # half-width of the bbox, image units
COARSE_SIZE_WORDS: tuple[str, ...] = ("small", "large")
FINE_SIZE_WORDS: tuple[str, ...] = ("tiny", "small", "medium", "large", "huge")
SHADE_WORD_THRESHOLD = 1.0 / 3.0  # shade < -1/3: "dark", > 1/3: "light", otherwise no word
GRID3_ROWS: tuple[str, ...] = ("top", "middle", "bottom")
GRID3_COLS: tuple[str, ...] = ("left", "center", "right")
GRID5 = 5  # fine captions say "column c row r" with c, r in 1..5 (column from the left, row from the top)
POSITION_QA_MARGIN = 0.04  # ask "where is …" only when the centre is this far from a 3×3 cell border

MASK_COVERAGE = 0.5
OCCLUSION_RESOLUTION = 128  # canonical grid on which sample_scene measures occlusion
DECIMALS = 4

# --- shapes: analytic inside-tests on offsets (dx, dy) from the centre, half-width s ---------------
ShapeTest = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _circle(dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    return dx * dx + dy * dy <= s * s


def _square(dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    return (np.abs(dx) <= s) & (np.abs(dy) <= s)


def _triangle(dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    # apex at the top centre, base along the bottom edge of the bbox
    return (dy <= s) & (np.abs(dx) <= (dy + s) / 2.0)


def _diamond(dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    return np.abs(dx) + np.abs(dy) <= s


SHAPES: dict[str, ShapeTest] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
}
SHAPE_PLURALS: dict[str, str] = {name: name + "s" for name in SHAPES}


# --- scene graph ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyObject:
    """One object: ``colour`` is the palette name, ``rgb`` the jittered value actually drawn."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    shade: float  # in [-1, 1]: < 0 darker, > 0 lighter than the palette colour (0 for achromatic)
    size: float  # half-width of the bbox, image units
    cx: float
    cy: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in image units."""
        return (self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rgb"] = list(self.rgb)
        d["bbox"] = [round(v, DECIMALS) for v in self.bbox]
        return d


@dataclass(frozen=True)
class Scene:
    """A background and objects in drawing order (later objects are drawn on top)."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[ToyObject, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "background_rgb": list(self.background_rgb),
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(
            ToyObject(shape=o["shape"], colour=o["colour"], rgb=tuple(o["rgb"]), shade=float(o["shade"]),
                      size=float(o["size"]), cx=float(o["cx"]), cy=float(o["cy"]))
            for o in d["objects"]
        )
        return cls(background=d["background"], background_rgb=tuple(d["background_rgb"]), objects=objs)

    def dedupe_key(self, cells: int = 32) -> str:
        """Hash of the scene quantised to 1/``cells`` of the image: equal keys = the same scene."""
        q = sorted(
            (o.shape, o.colour, round(o.cx * cells), round(o.cy * cells), round(o.size * cells))
            for o in self.objects
        )
        return hashlib.sha1(json.dumps([self.background, q]).encode()).hexdigest()


@dataclass(frozen=True)
class QA:
    """One question with its answer; ``type`` is colour | shape | count | position | existence."""

    question: str
    answer: str
    type: str


QA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "existence")


# --- word functions (public: the judge and the probes re-derive words with them) ------------------
def srgb_to_lab(rgb: Any) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255; any leading shape, last axis = 3."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def delta_e(rgb_a: Any, rgb_b: Any) -> float:
    """CIE76 colour difference between two sRGB colours."""
    return float(np.linalg.norm(srgb_to_lab(rgb_a) - srgb_to_lab(rgb_b)))


def nearest_colour_name(rgb: Any, palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    """The palette name nearest (ΔE76) to ``rgb``; default palette: ``OBJECT_COLOURS``."""
    palette = OBJECT_COLOURS if palette is None else palette
    names = list(palette)
    d = np.linalg.norm(srgb_to_lab([palette[n] for n in names]) - srgb_to_lab(rgb), axis=-1)
    return names[int(np.argmin(d))]


def allowed_object_colours(background: str) -> list[str]:
    """Object colours that stay distinct from ``background`` (even at their most jittered)."""
    return list(_allowed_object_colours(background))


@functools.cache
def _allowed_object_colours(background: str) -> tuple[str, ...]:
    bg = BACKGROUND_COLOURS[background]
    return tuple(name for name, rgb in OBJECT_COLOURS.items()
            if min(delta_e(c, bg) for c in _jitter_extremes(name)) >= MIN_BACKGROUND_DELTA_E)


def _jitter_extremes(colour: str) -> list[tuple[float, float, float]]:
    base = np.array(OBJECT_COLOURS[colour], dtype=np.float64)
    shades = [0.0] if colour in ACHROMATIC_COLOURS else [-1.0, 0.0, 1.0]
    out = []
    for s in shades:
        c = _shaded(base, s)
        for n in itertools.product((-1, 0, 1), repeat=3):  # the corners and faces of the noise cube
            out.append(tuple(np.clip(c + RGB_NOISE * np.array(n), 0, 255)))
    return out


def _shaded(base: np.ndarray, shade: float) -> np.ndarray:
    target = np.full(3, 255.0) if shade > 0 else np.zeros(3)
    return base + (target - base) * abs(shade) * SHADE_MIX


def grid3_cell(cx: float, cy: float) -> tuple[int, int]:
    """``(col, row)`` in 0..2 of the 3×3 grid (col from the left, row from the top)."""
    return min(int(cx * 3), 2), min(int(cy * 3), 2)


def grid3_name(cx: float, cy: float) -> str:
    """The 3×3 position words, e.g. "top left", "top center", "middle right", "center" (both middle)."""
    col, row = grid3_cell(cx, cy)
    if (col, row) == (1, 1):
        return "center"
    return f"{GRID3_ROWS[row]} {GRID3_COLS[col]}"


def grid5_cell(cx: float, cy: float) -> tuple[int, int]:
    """``(column, row)`` in 1..5 of the fine 5×5 grid (column from the left, row from the top)."""
    return min(int(cx * GRID5), GRID5 - 1) + 1, min(int(cy * GRID5), GRID5 - 1) + 1


def size_word_coarse(size: float) -> str:
    """"small" below the middle of ``SIZE_RANGE``, else "large"."""
    return _bin_word(size, COARSE_SIZE_WORDS)


def size_word_fine(size: float) -> str:
    """tiny / small / medium / large / huge: five equal bins over ``SIZE_RANGE``."""
    return _bin_word(size, FINE_SIZE_WORDS)


def _bin_word(size: float, words: tuple[str, ...]) -> str:
    lo, hi = SIZE_RANGE
    i = int((size - lo) / (hi - lo) * len(words))
    return words[min(max(i, 0), len(words) - 1)]


def shade_word(shade: float) -> str:
    """"dark", "light" or "" (no word) for a shade value in [-1, 1]."""
    if shade < -SHADE_WORD_THRESHOLD:
        return "dark"
    if shade > SHADE_WORD_THRESHOLD:
        return "light"
    return ""


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# --- sampling -------------------------------------------------------------------------------------
def sample_scene(
    rng: np.random.Generator,
    *,
    min_objects: int = 1,
    max_objects: int = 3,
    shapes: tuple[str, ...] | None = None,
    backgrounds: tuple[str, ...] | None = None,
    max_occlusion: float = 0.4,
    max_tries: int = 200,
) -> Scene:
    """Draw one scene: a background, then objects placed so none is > ``max_occlusion`` hidden.

    ``shapes`` / ``backgrounds`` restrict the vocabularies (default: all of ``SHAPES`` /
    ``BACKGROUND_COLOURS``). Deterministic given the state of ``rng``.
    """
    shapes = tuple(SHAPES) if shapes is None else tuple(shapes)
    backgrounds = tuple(BACKGROUND_COLOURS) if backgrounds is None else tuple(backgrounds)
    unknown = [s for s in shapes if s not in SHAPES] + [b for b in backgrounds if b not in BACKGROUND_COLOURS]
    if unknown or not shapes or not backgrounds:
        raise ValueError(f"unknown or empty shapes/backgrounds: {unknown or 'empty'}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    colours = allowed_object_colours(background)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    grid = _unit_grid(OCCLUSION_RESOLUTION)
    for _ in range(max_tries):  # whole-scene restarts, in case one placement keeps failing
        objects: list[ToyObject] = []
        for _ in range(max_tries):
            candidate = _sample_object(rng, shapes, colours)
            if min(_visible_fractions([*objects, candidate], grid)) >= 1.0 - max_occlusion:
                objects.append(candidate)
                if len(objects) == n_objects:
                    return Scene(background, BACKGROUND_COLOURS[background], tuple(objects))
    raise RuntimeError(f"could not place {n_objects} objects with max_occlusion={max_occlusion}")


def _sample_object(rng: np.random.Generator, shapes: tuple[str, ...], colours: list[str]) -> ToyObject:
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = colours[int(rng.integers(len(colours)))]
    shade = 0.0 if colour in ACHROMATIC_COLOURS else round(float(rng.uniform(-1.0, 1.0)), DECIMALS)
    noise = rng.uniform(-RGB_NOISE, RGB_NOISE, size=3)
    rgb = np.clip(np.rint(_shaded(np.array(OBJECT_COLOURS[colour], float), shade) + noise), 0, 255)
    size = round(float(rng.uniform(*SIZE_RANGE)), DECIMALS)
    cx = round(float(rng.uniform(size, 1.0 - size)), DECIMALS)
    cy = round(float(rng.uniform(size, 1.0 - size)), DECIMALS)
    return ToyObject(shape, colour, tuple(int(v) for v in rgb), shade, size, cx, cy)


def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample-point centres of an n×n grid over the unit square: ``(xs[1, n], ys[n, 1])``."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    return c[None, :], c[:, None]


def _shape_mask(obj: ToyObject, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    xs, ys = grid
    return np.broadcast_to(SHAPES[obj.shape](xs - obj.cx, ys - obj.cy, obj.size), (ys.shape[0], xs.shape[1]))


def _visible_masks(objects: list[ToyObject] | tuple[ToyObject, ...], grid) -> tuple[list[np.ndarray], list[np.ndarray]]:
    full = [_shape_mask(o, grid) for o in objects]
    visible = []
    covered = np.zeros_like(full[0]) if full else None
    for m in reversed(full):  # walk front to back: what is drawn later hides what is below
        visible.append(m & ~covered)
        covered = covered | m
    return full, visible[::-1]


def _visible_fractions(objects, grid) -> list[float]:
    full, visible = _visible_masks(objects, grid)
    return [float(v.sum()) / max(float(f.sum()), 1.0) for f, v in zip(full, visible)]


def visible_fractions(scene: Scene, resolution: int = OCCLUSION_RESOLUTION) -> list[float]:
    """Fraction of each object's area left visible after occlusion by later objects."""
    return _visible_fractions(scene.objects, _unit_grid(resolution))


# --- rendering ------------------------------------------------------------------------------------
def render(scene: Scene, size: int = 32, supersample: int = 4) -> tuple[Image.Image, np.ndarray]:
    """Anti-aliased RGB image of ``size``×``size`` and the per-object masks.

    Returns ``(image, masks)``: ``masks`` is a bool array ``[n_objects, size, size]`` in scene order;
    a pixel is in an object's mask when > ``MASK_COVERAGE`` of its area is that object's visible
    surface. A tiny, heavily occluded object can have an empty mask at small sizes: callers that
    need every mask non-empty (``generate_dataset``) check ``masks.any(axis=(1, 2))``.
    """
    n = size * supersample
    grid = _unit_grid(n)
    canvas = np.empty((n, n, 3), dtype=np.float64)
    canvas[:] = scene.background_rgb
    _, visible = _visible_masks(scene.objects, grid)
    for obj, vis in zip(scene.objects, visible):
        canvas[vis] = obj.rgb
    image = _box_down(canvas, supersample)
    coverage = np.stack([_box_down(v.astype(np.float64), supersample) for v in visible]) if visible else \
        np.zeros((0, size, size))
    masks = coverage > MASK_COVERAGE  # strict: two objects cannot both own a pixel
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB"), masks


def _box_down(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k, a.shape[1] // k
    return a.reshape(h, k, w, k, *a.shape[2:]).mean(axis=(1, 3))


def label_map(masks: np.ndarray) -> np.ndarray:
    """One uint8 map from per-object masks: 0 = background / mixed edge, i = object i (1-based)."""
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for i, m in enumerate(masks, start=1):
        out[m] = i
    return out


def masks_from_label_map(labels: np.ndarray, n_objects: int) -> np.ndarray:
    """Inverse of ``label_map``: bool ``[n_objects, H, W]``."""
    return np.stack([labels == i for i in range(1, n_objects + 1)]) if n_objects else \
        np.zeros((0, *labels.shape), dtype=bool)


# --- captions -------------------------------------------------------------------------------------
def caption_coarse(scene: Scene) -> str:
    """What a person writes: "a large red circle at the top left and a small blue square at the
    bottom right on a gray background" (objects in scene order)."""
    phrases = [f"a {size_word_coarse(o.size)} {o.colour} {o.shape} at the {grid3_name(o.cx, o.cy)}"
               for o in scene.objects]
    return f"{_join(phrases)} on {_article(scene.background)} {scene.background} background"


def caption_fine(scene: Scene) -> str:
    """Finer words: five size levels, dark/light shades, a 5×5 grid: "a huge light red circle in
    column 1 row 2 and a tiny blue square in column 5 row 5 on a gray background"."""
    phrases = []
    for o in scene.objects:
        col, row = grid5_cell(o.cx, o.cy)
        words = [size_word_fine(o.size), shade_word(o.shade), o.colour, o.shape]
        phrases.append(f"a {' '.join(w for w in words if w)} in column {col} row {row}")
    return f"{_join(phrases)} on {_article(scene.background)} {scene.background} background"


# Alt-text style: what a web caption says about a picture, and what it leaves out. Attributes are named with these
# probabilities; the words never state a position, a size or a count (a contrastive encoder trained on them has no
# signal for those, as a web-trained SigLIP has little for what alt-text rarely says).
WEB_MENTION_PROB = 0.6  # each object is mentioned with this probability (a caption may mention none)
WEB_MAX_MENTIONS = 2  # so that no caption accounts for every object of a 3-object scene
WEB_COLOUR_PROB = 0.7
WEB_SHAPE_PROB = 0.6
WEB_BACKGROUND_PROB = 0.4
WEB_THING_WORDS: tuple[str, ...] = ("thing", "shape", "object")
WEB_GENERIC: tuple[str, ...] = ("shapes", "simple shapes", "some shapes", "an abstract picture", "geometric art")


def caption_web(scene: Scene, rng: np.random.Generator) -> str:
    """A web-like caption: a random subset of the objects with some of their attributes, in random order, maybe
    the background: "a red circle", "shapes on a navy background", "a green square and a yellow thing"."""
    mentioned = [o for o in scene.objects if rng.random() < WEB_MENTION_PROB][:WEB_MAX_MENTIONS]
    phrases = []
    for i in rng.permutation(len(mentioned)):
        o = mentioned[int(i)]
        colour = o.colour if rng.random() < WEB_COLOUR_PROB else ""
        noun = o.shape if rng.random() < WEB_SHAPE_PROB else WEB_THING_WORDS[int(rng.integers(len(WEB_THING_WORDS)))]
        words = " ".join(w for w in (colour, noun) if w)
        phrases.append(f"{_article(words)} {words}")
    background = rng.random() < WEB_BACKGROUND_PROB
    if not phrases:
        subject = WEB_GENERIC[int(rng.integers(len(WEB_GENERIC)))]
        return f"{subject} on {_article(scene.background)} {scene.background} background" if background else subject
    subject = _join(phrases)
    return f"{subject} on {_article(scene.background)} {scene.background} background" if background else subject


# --- questions ------------------------------------------------------------------------------------
def questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Unambiguous QA pairs about ``scene``, in a fixed order of types.

    - colour: "what colour is the <shape>?" for each shape held by exactly one object;
    - shape: "what shape is the <colour> object?" for each colour held by exactly one object;
    - count: "how many objects are there?" and "how many <shape>s are there?" (a random shape, may be 0);
    - position: "where is the <colour> <shape>?" (3×3 words) for each unique colour+shape whose centre
      is at least ``POSITION_QA_MARGIN`` from a cell border;
    - existence: exactly one "yes" (an object in the scene) and one "no" (a colour+shape not in it).
    """
    objs = scene.objects
    shape_counts = _counts(o.shape for o in objs)
    colour_counts = _counts(o.colour for o in objs)
    pair_counts = _counts((o.colour, o.shape) for o in objs)
    out: list[QA] = []
    for o in objs:
        if shape_counts[o.shape] == 1:
            out.append(QA(f"what colour is the {o.shape}?", o.colour, "colour"))
    for o in objs:
        if colour_counts[o.colour] == 1:
            out.append(QA(f"what shape is the {o.colour} object?", o.shape, "shape"))
    out.append(QA("how many objects are there?", str(len(objs)), "count"))
    shape = list(SHAPES)[int(rng.integers(len(SHAPES)))]
    out.append(QA(f"how many {SHAPE_PLURALS[shape]} are there?", str(shape_counts.get(shape, 0)), "count"))
    for o in objs:
        if pair_counts[(o.colour, o.shape)] == 1 and _far_from_grid3_border(o.cx, o.cy):
            out.append(QA(f"where is the {o.colour} {o.shape}?", grid3_name(o.cx, o.cy), "position"))
    present = objs[int(rng.integers(len(objs)))]
    out.append(QA(f"is there {_article(present.colour)} {present.colour} {present.shape}?", "yes", "existence"))
    absent = [(c, s) for c in allowed_object_colours(scene.background) for s in SHAPES if (c, s) not in pair_counts]
    c, s = absent[int(rng.integers(len(absent)))]
    out.append(QA(f"is there {_article(c)} {c} {s}?", "no", "existence"))
    return out


def _counts(items) -> dict:
    out: dict = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return out


def _far_from_grid3_border(cx: float, cy: float) -> bool:
    def ok(v: float) -> bool:
        return all(abs(v - b) >= POSITION_QA_MARGIN for b in (1.0 / 3.0, 2.0 / 3.0))

    return ok(cx) and ok(cy)
