"""The toy world: determinism, disjoint splits, captions/answers/masks true to the scene graph, CLI and demo.

The caption and QA checks re-derive every word from the exact stored values with the test's own
arithmetic (grid cells, size bins, shade thresholds, counts), not with the generator's helpers.
"""
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vilex.cli.main import main
from toy.scenes import ToyWorldError
from toy.scenes import world
from toy.scenes.contact_sheet import make_contact_sheet
from toy.scenes.generate import generate_dataset, parse_splits, read_metadata, split_counts

N, SEED, SIZE = 40, 3, 32


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "data"
    generate_dataset(out, n=N, seed=SEED, size=SIZE, progress=False)
    return out


def _rows(root: Path) -> dict[str, list[dict]]:
    info = json.loads((root / "dataset_info.json").read_text())
    return {split: read_metadata(root / split) for split in info["split_counts"]}


# --- determinism and splits ------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files_and_another_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, n=N, seed=SEED, size=SIZE, progress=False)
    first = _hashes(dataset)
    assert len(first) == 2 + 3 * 2 + 2 * N  # info + stats, 3 splits × (jsonl + parquet), image + mask per scene
    assert _hashes(again) == first

    other = tmp_path / "other"
    generate_dataset(other, n=N, seed=SEED + 1, size=SIZE, progress=False)
    other_hashes = _hashes(other)
    assert other_hashes.keys() == first.keys()
    images = [k for k in first if "/images/" in k]
    differing = sum(first[k] != other_hashes[k] for k in images)
    assert differing >= N - 2  # a different seed draws different scenes (allow a chance single-object repeat)
    assert first["train/metadata.jsonl"] != other_hashes["train/metadata.jsonl"]


def test_splits_are_contiguous_disjoint_and_hold_no_duplicate_scene(dataset):
    rows = _rows(dataset)
    assert {k: len(v) for k, v in rows.items()} == {"train": 32, "val": 4, "test": 4}
    indices = [r["index"] for split in ("train", "val", "test") for r in rows[split]]
    assert indices == list(range(N))
    ids = [r["id"] for v in rows.values() for r in v]
    assert len(set(ids)) == N
    keys = [world.Scene.from_dict(r["scene"]).dedupe_key() for v in rows.values() for r in v]
    assert len(set(keys)) == N
    image_hashes = {hashlib.sha256((dataset / r["split"] / r["file_name"]).read_bytes()).hexdigest()
                    for v in rows.values() for r in v}
    assert len(image_hashes) == N
    for split, split_rows in rows.items():
        assert all(r["split"] == split for r in split_rows)


def test_repeated_scenes_and_empty_masks_are_redrawn_and_counted(tmp_path, monkeypatch):
    real_sample = world.sample_scene
    calls = []

    def flaky_sample(rng, **kw):
        calls.append(real_sample(rng, **kw))
        if len(calls) == 2:  # the second draw repeats the first scene
            return calls[0]
        if len(calls) == 3:  # the third draw holds an object too small to own a pixel at 32px
            return world.Scene("gray", world.BACKGROUND_COLOURS["gray"],
                               (world.ToyObject("circle", "red", (215, 35, 35), 0.0, 0.005, 0.5, 0.5),))
        return calls[-1]

    monkeypatch.setattr(world, "sample_scene", flaky_sample)
    stats = generate_dataset(tmp_path / "d", n=6, seed=0, size=32, splits="train=1", progress=False)
    assert stats["redrawn"] == {"duplicate": 1, "empty_mask": 1}
    rows = read_metadata(tmp_path / "d" / "train")
    assert len({world.Scene.from_dict(r["scene"]).dedupe_key() for r in rows}) == 6
    assert all(o["area_px"] > 0 for r in rows for o in r["scene"]["objects"])


def test_split_counts_and_bad_splits():
    assert split_counts(40, {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": 32, "val": 4, "test": 4}
    assert split_counts(11, {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": 9, "val": 1, "test": 1}
    assert parse_splits("train=0.5, test=0.5") == {"train": 0.5, "test": 0.5}
    with pytest.raises(ToyWorldError, match="n=2 leaves splits 'val', 'test' empty; raise n or drop those splits"):
        split_counts(2, {"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(ToyWorldError, match="must sum to 1, got 0.9"):
        parse_splits("train=0.8,val=0.1")
    with pytest.raises(ToyWorldError, match="bad split 'val=x'"):
        parse_splits("train=0.9,val=x")


# --- captions, answers, masks agree with the scene graph --------------------------------------------
_GRID3_ROWS, _GRID3_COLS = ["top", "middle", "bottom"], ["left", "center", "right"]


def _expected_grid3(cx: float, cy: float) -> str:
    col, row = min(math.floor(cx * 3), 2), min(math.floor(cy * 3), 2)
    return "center" if (col, row) == (1, 1) else f"{_GRID3_ROWS[row]} {_GRID3_COLS[col]}"


def _expected_size(size: float, words: list[str]) -> str:
    lo, hi = 0.08, 0.24
    assert lo <= size <= hi
    return words[min(math.floor((size - lo) / (hi - lo) * len(words)), len(words) - 1)]


def _expected_shade(obj: dict) -> str:
    if obj["colour"] in ("white", "black"):
        assert obj["shade"] == 0.0
        return ""
    return "dark" if obj["shade"] < -1 / 3 else "light" if obj["shade"] > 1 / 3 else ""


def _split_phrases(caption: str) -> tuple[list[str], str]:
    m = re.fullmatch(r"(.+) on an? (\w+) background", caption)
    assert m, caption
    body, background = m.groups()
    *rest, last = body.split(" and ")
    head = " and ".join(rest)
    return ([*head.split(", "), last] if head else [last]), background


def test_every_caption_agrees_with_the_exact_values(dataset):
    for rows in _rows(dataset).values():
        for r in rows:
            objs = r["scene"]["objects"]
            phrases, background = _split_phrases(r["caption"])
            assert background == r["scene"]["background"]
            assert len(phrases) == len(objs)
            for phrase, o in zip(phrases, objs):
                m = re.fullmatch(r"a (small|large) (\w+) (\w+) at the (.+)", phrase)
                assert m, phrase
                assert m.groups() == (_expected_size(o["size"], ["small", "large"]), o["colour"], o["shape"],
                                      _expected_grid3(o["cx"], o["cy"]))

            fine_phrases, fine_background = _split_phrases(r["caption_fine"])
            assert fine_background == background and len(fine_phrases) == len(objs)
            for phrase, o in zip(fine_phrases, objs):
                m = re.fullmatch(r"a (tiny|small|medium|large|huge) (?:(dark|light) )?(\w+) (\w+) "
                                 r"in column (\d) row (\d)", phrase)
                assert m, phrase
                size, shade, colour, shape, col, row = m.groups()
                assert size == _expected_size(o["size"], ["tiny", "small", "medium", "large", "huge"])
                assert (shade or "") == _expected_shade(o)
                assert (colour, shape) == (o["colour"], o["shape"])
                expected_cell = (min(math.floor(o["cx"] * 5), 4) + 1, min(math.floor(o["cy"] * 5), 4) + 1)
                assert (int(col), int(row)) == expected_cell


def test_colour_names_and_rgb_values_are_true(dataset):
    for rows in _rows(dataset).values():
        for r in rows:
            bg = r["scene"]["background"]
            assert tuple(r["scene"]["background_rgb"]) == world.BACKGROUND_COLOURS[bg]
            for o in r["scene"]["objects"]:
                base = np.array(world.OBJECT_COLOURS[o["colour"]], float)
                target = 255.0 if o["shade"] > 0 else 0.0
                expected = base + (target - base) * abs(o["shade"]) * world.SHADE_MIX
                assert np.abs(np.array(o["rgb"]) - expected).max() <= world.RGB_NOISE + 0.5
                assert world.nearest_colour_name(o["rgb"]) == o["colour"]
                assert world.delta_e(o["rgb"], world.BACKGROUND_COLOURS[bg]) >= world.MIN_BACKGROUND_DELTA_E
                assert o["bbox"] == pytest.approx([o["cx"] - o["size"], o["cy"] - o["size"],
                                                   o["cx"] + o["size"], o["cy"] + o["size"]], abs=1e-4)


def test_palette_jitter_never_leaves_its_colour_name():
    rng = np.random.default_rng(0)
    for _ in range(300):
        for o in world.sample_scene(rng).objects:
            assert world.nearest_colour_name(o.rgb) == o.colour


def test_every_answer_agrees_with_the_scene_graph(dataset):
    n_scenes = 0
    for rows in _rows(dataset).values():
        for r in rows:
            n_scenes += 1
            objs = r["scene"]["objects"]
            shapes = [o["shape"] for o in objs]
            colours = [o["colour"] for o in objs]
            pairs = [(o["colour"], o["shape"]) for o in objs]
            answers_by_type: dict[str, list[str]] = {}
            for qa in r["qa"]:
                q, a, t = qa["question"], qa["answer"], qa["type"]
                answers_by_type.setdefault(t, []).append(a)
                if m := re.fullmatch(r"what colour is the (\w+)\?", q):
                    assert t == "colour" and shapes.count(m[1]) == 1
                    assert a == colours[shapes.index(m[1])]
                elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
                    assert t == "shape" and colours.count(m[1]) == 1
                    assert a == shapes[colours.index(m[1])]
                elif q == "how many objects are there?":
                    assert t == "count" and a == str(len(objs))
                elif m := re.fullmatch(r"how many (\w+)s are there\?", q):
                    assert t == "count" and a == str(shapes.count(m[1]))
                elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", q):
                    assert t == "position" and pairs.count((m[1], m[2])) == 1
                    o = objs[pairs.index((m[1], m[2]))]
                    assert a == _expected_grid3(o["cx"], o["cy"])
                    for v in (o["cx"], o["cy"]):  # never asked on a cell border
                        assert min(abs(v - 1 / 3), abs(v - 2 / 3)) >= world.POSITION_QA_MARGIN
                elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
                    assert t == "existence" and a == ("yes" if (m[1], m[2]) in pairs else "no")
                else:
                    pytest.fail(f"unexpected question {q!r}")
            assert sorted(answers_by_type["existence"]) == ["no", "yes"]  # balanced per scene
            # every unambiguous colour question is asked
            assert len(answers_by_type.get("colour", [])) == sum(shapes.count(s) == 1 for s in shapes)
    assert n_scenes == N


def test_masks_agree_with_the_rendering(dataset):
    for rows in _rows(dataset).values():
        for r in rows:
            split_dir = dataset / r["split"]
            image = np.asarray(Image.open(split_dir / r["file_name"]).convert("RGB"), dtype=float)
            labels = np.asarray(Image.open(split_dir / r["mask_file_name"]))
            objs = r["scene"]["objects"]
            assert image.shape == (SIZE, SIZE, 3) and labels.shape == (SIZE, SIZE)
            assert labels.max() <= len(objs)
            for i, o in enumerate(objs, start=1):
                pixels = image[labels == i]
                assert len(pixels) == o["area_px"] > 0
                # > half of a mask pixel is the object, so it is nearer the object's colour than half the
                # distance to the farthest other colour in the scene (+ rounding to integers)
                others = [r["scene"]["background_rgb"]] + [p["rgb"] for p in objs if p is not o]
                bound = 0.5 * max(np.linalg.norm(np.subtract(c, o["rgb"])) for c in others) + 1.0
                assert np.linalg.norm(pixels - o["rgb"], axis=1).max() < bound
                assert world.nearest_colour_name(pixels.mean(axis=0)) == o["colour"]
            # no object is more than ~half hidden by the objects drawn above it
            assert min(world.visible_fractions(world.Scene.from_dict(r["scene"]))) >= 0.6


def test_render_is_anti_aliased_and_size_is_configurable():
    scene = world.Scene("gray", world.BACKGROUND_COLOURS["gray"], (
        world.ToyObject("circle", "red", (215, 35, 35), 0.0, 0.2, 0.3, 0.3),
        world.ToyObject("triangle", "blue", (40, 90, 225), 0.0, 0.15, 0.7, 0.7),
    ))
    image, masks = world.render(scene, 64)
    assert image.size == (64, 64) and masks.shape == (2, 64, 64) and masks.dtype == bool
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
    assert {(128, 128, 128), (215, 35, 35), (40, 90, 225)} <= colours
    assert len(colours) > 3  # blended edge pixels exist
    assert not (masks[0] & masks[1]).any()
    small, small_masks = world.render(scene, 32)
    assert small.size == (32, 32) and 0 < small_masks[0].sum() < masks[0].sum()
    assert world.caption_coarse(scene) == ("a large red circle at the top left and a small blue triangle at the "
                                           "bottom right on a gray background")
    assert world.caption_fine(scene) == ("a large red circle in column 2 row 2 and a medium blue triangle "
                                         "in column 4 row 4 on a gray background")


def test_grid_and_word_functions():
    assert world.grid3_name(0.1, 0.1) == "top left"
    assert world.grid3_name(0.5, 0.5) == "center"
    assert world.grid3_name(0.5, 0.95) == "bottom center"
    assert world.grid3_name(0.9, 0.5) == "middle right"
    assert world.grid3_name(1.0, 1.0) == "bottom right"
    assert world.grid5_cell(0.0, 0.99) == (1, 5)
    assert [world.size_word_fine(s) for s in (0.08, 0.12, 0.16, 0.2, 0.24)] == \
        ["tiny", "small", "medium", "large", "huge"]
    assert (world.size_word_coarse(0.159), world.size_word_coarse(0.161)) == ("small", "large")
    assert (world.shade_word(-0.5), world.shade_word(0.0), world.shade_word(0.5)) == ("dark", "", "light")
    assert "white" not in world.allowed_object_colours("white")
    assert "blue" not in world.allowed_object_colours("navy")


def test_stats_count_what_was_written(dataset):
    stats = json.loads((dataset / "dataset_stats.json").read_text())
    rows = [r for v in _rows(dataset).values() for r in v]
    n_objects = sum(len(r["scene"]["objects"]) for r in rows)
    assert stats["scenes"] == N and stats["objects"] == n_objects
    assert stats["scenes_per_split"] == {"train": 32, "val": 4, "test": 4}
    assert sum(stats["shapes"].values()) == sum(stats["colours"].values()) == n_objects
    assert sum(stats["backgrounds"].values()) == N
    assert sum(int(k) * v for k, v in stats["objects_per_scene"].items()) == n_objects
    assert stats["existence_answers"] == {"yes": N, "no": N}
    assert stats["qa_total"] == sum(len(r["qa"]) for r in rows) == sum(stats["qa_types"].values())
    assert stats["caption_words_mean"]["coarse"] == pytest.approx(np.mean([len(r["caption"].split()) for r in rows]),
                                                                  abs=1e-4)
    assert stats["caption_vocab_size"]["coarse"] == len({w for r in rows for w in r["caption"].split()})
    info = json.loads((dataset / "dataset_info.json").read_text())
    assert (info["seed"], info["n"], info["size"]) == (SEED, N, SIZE)
    assert info["palette"]["objects"]["red"] == list(world.OBJECT_COLOURS["red"])


# --- CLI, formats, demo ----------------------------------------------------------------------------
def test_cli_generate_writes_the_layout(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["toy", "generate", "--out", str(out), "--n", "12", "--seed", "1", "--size", "32",
                 "--splits", "train=0.5,test=0.5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scenes_per_split"] == {"train": 6, "test": 6}
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "dataset_stats.json", "test", "train"]
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        rows = read_metadata(out / split)
        assert len(rows) == 6
        listed = sorted(Path(r["file_name"]).name for r in rows)
        assert sorted(p.name for p in (out / split / "images").iterdir()) == listed
        assert len(list((out / split / "masks").iterdir())) == 6
        assert pq.read_table(out / split / "metadata.parquet").to_pylist() == rows
        assert all(Image.open(out / split / r["file_name"]).size == (32, 32) for r in rows)

    # refusing to write over a non-empty folder; --overwrite replaces the toy dataset
    assert main(["toy", "generate", "--out", str(out), "--n", "4", "--splits", "train=1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["toy", "generate", "--out", str(out), "--n", "4", "--splits", "train=1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "dataset_stats.json", "train"]


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "error: n (number of scenes) must be an integer >= 1, got 0"),
    (["--size", "3"], "error: size must be an integer in [16, 512] pixels, got 3"),
    (["--splits", "train=0.7,val=0.1"], "error: split fractions must sum to 1, got 0.8 for {'train': 0.7, 'val': 0.1}"),
])
def test_cli_bad_argument_exits_2_with_one_line(tmp_path, capsys, args, message):
    assert main(["toy", "generate", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [message]
    assert not (tmp_path / "x").exists()


def test_hf_imagefolder_loads_all_splits_with_masks(dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(dataset), metadata_filenames=["metadata.jsonl"],
                               cache_dir=str(tmp_path / "hf"))
    assert {k: len(v) for k, v in ds.items()} == {"train": 32, "validation": 4, "test": 4}
    row = ds["test"][0]
    first = read_metadata(dataset / "test")[0]
    assert row["caption"] == first["caption"] and row["image"].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(row["mask"]), np.asarray(Image.open(dataset / "test" / first["mask_file_name"])))


def test_contact_sheet_places_upscaled_images_and_captions():
    images = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    sheet = make_contact_sheet(images, ["red", "green", "a much longer caption " * 4], columns=2, image_px=96,
                               tile_width=160, caption_lines=4, font_size=10)
    tile_h = 6 + 96 + 6 + 4 * 13 + 6
    assert sheet.size == (2 * 160, 2 * tile_h)
    assert sheet.getpixel((32 + 50, 6 + 50)) == (255, 0, 0)
    assert sheet.getpixel((160 + 32 + 50, 6 + 50)) == (0, 255, 0)
    assert sheet.getpixel((32 + 50, tile_h + 6 + 50)) == (0, 0, 255)
    caption_area = np.asarray(sheet.crop((0, 6 + 96 + 6, 160, tile_h)))
    assert (caption_area < 128).any()  # some text was drawn


def test_demo_writes_data_sheet_stats_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "24", "--short-steps", "0", "--eval-scenes", "0",
                 "--vlm-steps", "2", "--suite-docs", "0"]) == 0
    assert (out / "data" / "train" / "metadata.jsonl").is_file()
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert stats == json.loads((out / "data" / "dataset_stats.json").read_text())
    assert stats["scenes"] == 24
    assert Image.open(out / "contact_sheet.png").size[0] > 0
    report = (out / "report.md").read_text()
    assert report.startswith("# ViLex demo report")
    assert "![contact sheet](contact_sheet.png)" in report
    assert "| scenes | 24 |" in report
    # stage 2's short VLM run fits its batches to a tiny dataset (19 training scenes) and reports its losses
    assert "| align | 1 | 38 |" in report and "| instruct | 2 |" in report
    assert main(["demo", "--out", str(out), "--n", "24", "--short-steps", "0", "--eval-scenes", "0",
                 "--vlm-steps", "0", "--suite-docs", "0"]) == 0  # re-running replaces its own data
