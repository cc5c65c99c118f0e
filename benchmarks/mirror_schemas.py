"""benchmarks/mirror_schemas.py — the hub schemas of the paper's 15 benchmark datasets, and row builders in them.

A schema belongs to a DATASET (the task YAML's ``dataset_path`` / ``dataset_name``), not to a task: every lmms-eval
task reading that dataset (``refcoco_bbox_val`` and ``refcoco_bbox_rec_val``, ``coco2017_cap_val`` and
``coco2017_cap_test``) mirrors through the same entry. Datasets are keyed by their name without the hub
organisation, because lmms-eval moved them from ``lmms-lab/*`` to ``lmms-lab-encoder/*`` (lmms-eval #1416) and the
copies are the same.

Each entry records, per config:

* ``features``: column names and ``datasets`` feature types as the dataset card's ``dataset_info`` documents them
  (the ``sources`` line of each entry names the card and revision the excerpt came from);
* ``splits``: the documented split names (a task YAML naming another split fails: the schema is stale);
* ``required``: the columns the installed task code reads (``lmms_eval/tasks/<task>/utils.py`` and the YAML's
  ``doc_to_target``), the ones ``vilex eval prepare --check`` insists on;
* ``rows(n, split)``: ``n`` rows in that schema, with answers in the task's own format, built from
  :mod:`benchmarks.mirror_images` (drawn scenes, packaged photos, rendered signs).

Rows are deterministic (seeded by dataset, config, split and row index), so a mirror made twice is the same data.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from benchmarks.mirror_images import (NUMBER_WORDS, PHOTOS, SHAPES, Visual, frames, photo, pool, scene,
                                      ten_answers, text_card)


@dataclass(frozen=True)
class ConfigSchema:
    features: Callable[[], Any]  # -> datasets.Features (built lazily: importing datasets costs a second)
    splits: tuple[str, ...]
    required: tuple[str, ...]
    rows: Callable[[int, str], list[dict[str, Any]]]


@dataclass(frozen=True)
class DatasetSchema:
    name: str  # hub dataset name without its organisation
    configs: dict[str | None, ConfigSchema]
    sources: tuple[str, ...]
    companion: dict[str | None, tuple[str, ...]] | None = None  # config -> other configs its task code loads too


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


def _refs(v: Visual, k: int) -> list[str]:
    """``k`` reference captions (the visual's own, then reworded ones: nocaps has 10 per image)."""
    out = list(v.captions)
    lead = ("there is ", "this is ", "we can see ")
    i = 0
    while len(out) < k:
        out.append(lead[i % len(lead)] + v.captions[i % len(v.captions)])
        i += 1
    return out[:k]


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def _features(spec: dict[str, Any]) -> Any:
    from datasets import Features

    return Features(spec)


# ---------------------------------------------------------------- features (from the dataset cards)
def _F() -> Any:
    from datasets import Image, List, Value

    return Value, List, Image


def coco_caption_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                      "answer": List(Value("string")), "id": Value("int64"), "license": Value("int8"),
                      "file_name": Value("string"), "coco_url": Value("string"), "height": Value("int32"),
                      "width": Value("int32"), "date_captured": Value("string")})


def nocaps_features() -> Any:
    Value, List, Image = _F()
    return _features({"image": Image(), "image_coco_url": Value("string"), "image_date_captured": Value("string"),
                      "image_file_name": Value("string"), "image_height": Value("int32"),
                      "image_width": Value("int32"), "image_id": Value("int32"), "image_license": Value("int8"),
                      "image_open_images_id": Value("string"), "annotations_ids": List(Value("int32")),
                      "annotations_captions": List(Value("string"))})


def textcaps_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_id": Value("string"), "question": Value("string"), "image": Image(),
                      "image_id": Value("string"), "image_classes": List(Value("string")),
                      "flickr_original_url": Value("string"), "flickr_300k_url": Value("string"),
                      "image_width": Value("int64"), "image_height": Value("int64"), "set_name": Value("string"),
                      "image_name": Value("string"), "image_path": Value("string"),
                      "caption_id": List(Value("int64")), "caption_str": List(Value("string")),
                      "reference_strs": List(Value("string"))})


def flickr_features() -> Any:
    Value, List, Image = _F()
    return _features({"image": Image(), "caption": List(Value("string")), "sentids": List(Value("string")),
                      "img_id": Value("string"), "filename": Value("string")})


def vqav2_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_type": Value("string"), "multiple_choice_answer": Value("string"),
                      "answers": List({"answer": Value("string"), "answer_confidence": Value("string"),
                                       "answer_id": Value("int64")}),
                      "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
                      "question": Value("string"), "image": Image()})


def gqa_instructions_features() -> Any:
    Value, List, Image = _F()
    return _features({"id": Value("string"), "imageId": Value("string"), "question": Value("string"),
                      "answer": Value("string"), "fullAnswer": Value("string"), "isBalanced": Value("bool"),
                      "groups": {"global": Value("string"), "local": Value("string")},
                      "entailed": List(Value("string")), "equivalent": List(Value("string")),
                      "types": {"structural": Value("string"), "semantic": Value("string"),
                                "detailed": Value("string")},
                      "semantic": List({"operation": Value("string"), "argument": Value("string"),
                                        "dependencies": List(Value("int64"))}),
                      "semanticStr": Value("string")})


def gqa_images_features() -> Any:
    Value, List, Image = _F()
    return _features({"id": Value("string"), "image": Image()})


def textvqa_features() -> Any:
    Value, List, Image = _F()
    return _features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                      "question_tokens": List(Value("string")), "image": Image(), "image_width": Value("int32"),
                      "image_height": Value("int32"), "flickr_original_url": Value("string"),
                      "flickr_300k_url": Value("string"), "answers": List(Value("string")),
                      "image_classes": List(Value("string")), "set_name": Value("string"),
                      "ocr_tokens": List(Value("string"))})


def okvqa_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                      "answers": List(Value("string")), "question_type": Value("string"),
                      "answer_type": Value("string")})


def vizwiz_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                      "answers": List(Value("string")), "category": Value("string")})


def scienceqa_features() -> Any:
    Value, List, Image = _F()
    return _features({"image": Image(), "question": Value("string"), "choices": List(Value("string")),
                      "answer": Value("int8"), "hint": Value("string"), "task": Value("string"),
                      "grade": Value("string"), "subject": Value("string"), "topic": Value("string"),
                      "category": Value("string"), "skill": Value("string"), "lecture": Value("string"),
                      "solution": Value("string")})


def ai2d_features() -> Any:
    Value, List, Image = _F()
    return _features({"question": Value("string"), "options": List(Value("string")), "answer": Value("string"),
                      "image": Image()})


def pope_features() -> Any:
    Value, List, Image = _F()
    return _features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                      "answer": Value("string"), "image_source": Value("string"), "image": Image(),
                      "category": Value("string")})


def mme_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                      "answer": Value("string"), "category": Value("string")})


def seedbench_features() -> Any:
    Value, List, Image = _F()
    return _features({"answer": Value("string"), "choice_a": Value("string"), "choice_b": Value("string"),
                      "choice_c": Value("string"), "choice_d": Value("string"), "data_id": Value("string"),
                      "data_type": Value("string"), "question": Value("string"), "question_id": Value("string"),
                      "question_type_id": Value("string"), "segment": Value("string"), "image": List(Image())})


def refcoco_features() -> Any:
    Value, List, Image = _F()
    return _features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                      "answer": List(Value("string")), "segmentation": List(Value("float32")),
                      "bbox": List(Value("float32")), "iscrowd": Value("int8"), "file_name": Value("string")})


# ---------------------------------------------------------------- row builders
CAPTION_PROMPT = "Please carefully observe the image and come up with a caption for the image."


def coco_caption_rows(n: int, split: str) -> list[dict[str, Any]]:
    # coco_process_result: image_id = int(question_id.split("_")[-1].split(".")[0]); references = answer (5 each)
    images = pool("mixed")
    rows = []
    for i in range(n):
        v = images(i + _seed("coco", split) % 7)
        image_id = 900_000 + i
        name = f"{image_id:012d}.jpg"
        rows.append({"question_id": name, "image": v.image, "question": CAPTION_PROMPT, "answer": _refs(v, 5),
                     "id": 700_000 + i, "license": 1, "file_name": name, "coco_url": f"mirror://coco2017/{name}",
                     "height": v.size[1], "width": v.size[0], "date_captured": "2013-11-14 16:28:13"})
    return rows


def nocaps_rows(n: int, split: str) -> list[dict[str, Any]]:
    # nocaps_process_result: image_id (int), references = annotations_captions (10 per image on the card's data)
    images = pool("mixed")
    rows = []
    for i in range(n):
        v = images(i + 3)
        oid = hashlib.sha256(f"nocaps-{split}-{i}".encode()).hexdigest()[:16]
        rows.append({"image": v.image, "image_coco_url": f"mirror://nocaps/{oid}.jpg",
                     "image_date_captured": "2018-11-21 11:04:50", "image_file_name": f"{oid}.jpg",
                     "image_height": v.size[1], "image_width": v.size[0], "image_id": i, "image_license": 0,
                     "image_open_images_id": oid, "annotations_ids": [i * 10 + k for k in range(10)],
                     "annotations_captions": _refs(v, 10)})
    return rows


def textcaps_rows(n: int, split: str) -> list[dict[str, Any]]:
    # textcaps_process_result: image_id (str, used as the COCO image id), references = caption_str
    rows = []
    for i in range(n):
        v = text_card(4000 + i) if i % 3 != 2 else photo(i)
        image_id = hashlib.sha256(f"textcaps-{split}-{i}".encode()).hexdigest()[:16]
        refs = _refs(v, 5)
        rows.append({"question_id": str(i), "question": "Provide a one-sentence caption for the provided image.",
                     "image": v.image, "image_id": image_id, "image_classes": v.labels,
                     "flickr_original_url": f"mirror://textcaps/{image_id}_o.jpg",
                     "flickr_300k_url": f"mirror://textcaps/{image_id}_z.jpg", "image_width": v.size[0],
                     "image_height": v.size[1], "set_name": split, "image_name": image_id,
                     "image_path": f"{split}/{image_id}.jpg", "caption_id": [i * 5 + k for k in range(5)],
                     "caption_str": refs, "reference_strs": [r.lower() for r in refs]})
    return rows


def flickr_rows(n: int, split: str) -> list[dict[str, Any]]:
    # flickr_process_result: image_id = int(img_id), references = caption (5 each)
    rows = []
    for i in range(n):
        v = photo(i) if i % 2 == 0 else scene(5000 + i)
        img_id = 1_000_000 + i
        rows.append({"image": v.image, "caption": _refs(v, 5), "sentids": [str(img_id * 5 + k) for k in range(5)],
                     "img_id": str(img_id), "filename": f"{img_id}.jpg"})
    return rows


def _qa(v: Visual, i: int) -> tuple[str, list[str]]:
    return v.qa[i % len(v.qa)]


def vqav2_rows(n: int, split: str) -> list[dict[str, Any]]:
    # vqav2_process_results: 10 answer dicts (doc["answers"][k]["answer"]), question_id; prompt reads question
    images = pool("mixed")
    rows = []
    for i in range(n):
        v = images(i)
        q, answers = _qa(v, i)
        main = max(set(answers), key=answers.count)
        rows.append({"question_type": " ".join(q.lower().split()[:3]), "multiple_choice_answer": main,
                     "answers": [{"answer": a, "answer_confidence": "yes" if a == main else "maybe",
                                  "answer_id": k + 1} for k, a in enumerate(answers)],
                     "image_id": 800_000 + i, "answer_type": _answer_type(main), "question_id": 800_000_000 + i,
                     "question": q, "image": v.image})
    return rows


def _gqa_image_id(i: int) -> str:
    return f"m{i // 2}"


def gqa_instruction_rows(n: int, split: str) -> list[dict[str, Any]]:
    # gqa_process_docs joins imageId to the images config's id; doc_to_target "answer"; prompt reads question
    rows = []
    for i in range(n):
        v = scene(6000 + i // 2)
        first = v.objects[0]
        if i % 2 == 0:
            q, a = f"What color is the {first.shape}?", first.colour
            full, types = f"The {first.shape} is {first.colour}.", ("query", "attr", "color")
            program = [("select", first.shape, []), ("query", "color", [0])]
        else:
            present = "yes" if len(v.objects) > 1 else "no"
            q, a = "Are there several shapes?", present
            full, types = f"{present.capitalize()}, there {'are' if present == 'yes' else 'is only one'}.", \
                ("verify", "obj", "exist")
            program = [("select", "shape", []), ("exist", "?", [0])]
        rows.append({"id": str(20_000_000 + i), "imageId": _gqa_image_id(i), "question": q, "answer": a,
                     "fullAnswer": full, "isBalanced": True, "groups": {"global": None, "local": types[2]},
                     "entailed": [], "equivalent": [str(20_000_000 + i)],
                     "types": {"structural": types[0], "semantic": types[1], "detailed": types[2]},
                     "semantic": [{"operation": op, "argument": arg, "dependencies": deps}
                                  for op, arg, deps in program],
                     "semanticStr": " ".join(f"{op}: {arg}" for op, arg, _ in program)})
    return rows


def gqa_image_rows(n: int, split: str) -> list[dict[str, Any]]:
    # the images config holds one row per image id referenced by the instructions config's first n rows
    return [{"id": _gqa_image_id(2 * k), "image": scene(6000 + k).image} for k in range((n + 1) // 2)]


def textvqa_rows(n: int, split: str) -> list[dict[str, Any]]:
    # textvqa_process_results: answers (10 strings), question_id; doc_to_text: question (+ ocr_tokens if ocr)
    rows = []
    for i in range(n):
        v = text_card(7000 + i)
        q, answers = _qa(v, i)
        image_id = hashlib.sha256(f"textvqa-{i}".encode()).hexdigest()[:16]
        rows.append({"image_id": image_id, "question_id": 30_000 + i, "question": q,
                     "question_tokens": q.lower().rstrip("?").split(), "image": v.image, "image_width": v.size[0],
                     "image_height": v.size[1], "flickr_original_url": f"mirror://textvqa/{image_id}_o.jpg",
                     "flickr_300k_url": f"mirror://textvqa/{image_id}_z.jpg", "answers": answers,
                     "image_classes": v.labels, "set_name": "val", "ocr_tokens": [w.lower() for w in v.words]})
    return rows


def okvqa_rows(n: int, split: str) -> list[dict[str, Any]]:
    # ok_vqa_process_results: answers (10 strings), question_id
    images = pool("mixed")
    rows = []
    for i in range(n):
        v = images(i + 1)
        q, answers = _qa(v, i + 1)
        rows.append({"question_id": str(4_000_000 + i), "image": v.image, "question": q, "answers": answers,
                     "question_type": "other", "answer_type": "other"})
    return rows


def vizwiz_rows(n: int, split: str) -> list[dict[str, Any]]:
    # vizwiz_vqa_process_results: answers (10 strings, "unanswerable" included as VizWiz has it), question_id
    images = pool("mixed")
    rows = []
    for i in range(n):
        v = images(i + 2)
        if i % 4 == 3:  # VizWiz's unanswerable questions (the prompt asks for 'Unanswerable')
            q, answers, category = "What is the expiration date on this?", ten_answers("unanswerable"), \
                "unanswerable"
        else:
            q, answers = _qa(v, i)
            main = max(set(answers), key=answers.count)
            category = _answer_type(main) if _answer_type(main) != "yes/no" else "yes/no"
        rows.append({"question_id": f"VizWiz_{split}_{i:08d}.jpg", "image": v.image, "question": q,
                     "answers": answers, "category": category})
    return rows


def _shape_choices(v: Visual, rng_index: int) -> tuple[str, list[str], int]:
    """A multiple-choice question about the first object's shape: (question, choices, answer index)."""
    first = v.objects[0]
    choices = list(SHAPES)
    rot = rng_index % len(choices)
    choices = choices[rot:] + choices[:rot]
    return f"Which shape is {first.colour}?", choices, choices.index(first.shape)


def scienceqa_rows(n: int, split: str) -> list[dict[str, Any]]:
    # sqa_doc_to_text: hint, question, choices; sqa_doc_to_target: letter of int(answer); sqa_doc_to_visual: image
    rows = []
    for i in range(n):
        v = scene(8000 + i)
        if i % 2 == 0:
            q, choices, answer = _shape_choices(v, i)
            hint = "The picture shows flat shapes drawn on a plain background."
            topic, skill = "geometry", "Identify shapes"
        else:
            n_obj = len(v.objects)
            choices = [str(k) for k in range(1, 5)]
            q, answer, hint = "How many shapes are in the picture?", choices.index(str(n_obj)), ""
            topic, skill = "counting", "Count objects"
        rows.append({"image": v.image, "question": q, "choices": choices, "answer": answer, "hint": hint,
                     "task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": topic,
                     "category": "Shapes", "skill": skill, "lecture": "Shapes have sides and corners.",
                     "solution": f"The answer is {choices[answer]}."})
    return rows


def ai2d_rows(n: int, split: str) -> list[dict[str, Any]]:
    # ai2d_doc_to_text: question, options; ai2d_doc_to_target: letter of int(answer) (a string on the card)
    rows = []
    for i in range(n):
        v = scene(9000 + i)
        first = v.objects[0]
        colours = [first.colour] + [c for c in ("red", "green", "blue", "yellow", "purple") if c != first.colour]
        options = colours[:4]
        rot = i % 4
        options = options[rot:] + options[:rot]
        rows.append({"question": f"What color is the {first.shape} in the diagram?", "options": options,
                     "answer": str(options.index(first.colour)), "image": v.image})
    return rows


POPE_CATEGORIES = ("adversarial", "popular", "random")


def pope_rows(n: int, split: str) -> list[dict[str, Any]]:
    # pope_process_results: answer in yes/no (asserted), question_id; the card pools the three POPE subsets
    rows = []
    for i in range(n):
        v = scene(10_000 + i // 2)
        present = {o.shape for o in v.objects}
        if i % 2 == 0:
            shape, answer = sorted(present)[0], "yes"
        else:
            shape, answer = next(s for s in SHAPES + ("star",) if s not in present), "no"
        rows.append({"id": str(i), "question_id": str(i + 1), "question": f"Is there a {shape} in the image?",
                     "answer": answer, "image_source": f"mirror_scene_{10_000 + i // 2}", "image": v.image,
                     "category": POPE_CATEGORIES[(i // 2) % 3]})
    return rows


# MME's 14 subtasks (lmms_eval/tasks/mme/utils.py eval_type_dict), ordered so that a few rows already cover both
# the perception and the cognition score.
MME_CATEGORIES = ("existence", "commonsense_reasoning", "count", "numerical_calculation", "position",
                  "text_translation", "color", "code_reasoning", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")


def _mme_pair(category: str, k: int) -> tuple[Visual, str, str]:
    """(image, yes-question, no-question) for one MME subtask: both true/false of the image."""
    if category in ("OCR", "text_translation", "code_reasoning"):
        v = text_card(11_000 + k)
        word = v.words[0]
        return v, f'Is the word "{word}" written in the image?', 'Is the word "BANANA" written in the image?'
    if category in ("posters", "celebrity", "scene", "landmark", "artwork", "commonsense_reasoning"):
        v = photo(k)
        absent = next(lbl for spec in PHOTOS.values() for lbl in spec["labels"] if lbl not in v.labels)
        return v, f"Is there a {v.labels[0]} in this image?", f"Is there a {absent} in this image?"
    v = scene(12_000 + k)
    first, n_obj = v.objects[0], len(v.objects)
    if category in ("count", "numerical_calculation"):
        return v, f"Are there {NUMBER_WORDS[n_obj]} shapes in this image?", \
            f"Are there {NUMBER_WORDS[n_obj + 1]} shapes in this image?"
    if category == "position":
        other = "right" if first.column != "right" else "left"
        return v, f"Is the {first.name} on the {first.column} side of the image?", \
            f"Is the {first.name} on the {other} side of the image?"
    if category == "color":
        other = "green" if first.colour != "green" else "red"
        return v, f"Is the {first.shape} {first.colour}?", f"Is the {first.shape} {other}?"
    absent = next(s for s in SHAPES + ("star",) if s not in {o.shape for o in v.objects})
    return v, f"Is there a {first.shape} in this image?", f"Is there a {absent} in this image?"


def mme_rows(n: int, split: str) -> list[dict[str, Any]]:
    # mme_process_results: answer Yes/No, category (picks perception vs cognition), question_id; the aggregation
    # asserts exactly TWO answers per question_id (an image's yes and no question): rows come in such pairs
    rows = []
    for p in range((n + 1) // 2):
        category = MME_CATEGORIES[p % len(MME_CATEGORIES)]
        v, yes_q, no_q = _mme_pair(category, p)
        qid = f"{category}/{p:04d}.png"
        for q, a in ((yes_q, "Yes"), (no_q, "No")):
            rows.append({"question_id": qid, "image": v.image, "question": f"{q} Please answer yes or no.",
                         "answer": a, "category": category})
    return rows


def seedbench_rows(n: int, split: str) -> list[dict[str, Any]]:
    # seed_doc_to_visual: every image of doc["image"] (1 for image questions, 8 frames for video ones,
    # lmms-eval #132); seed_process_result: answer letter, data_type (image | video), question_id
    rows = []
    for i in range(n):
        if i % 4 == 3:
            imgs, thing, direction = frames(13_000 + i)
            choices = ["to the left", "to the right", "up", "down"]
            rot = i % 4
            choices = choices[rot:] + choices[:rot]
            q, answer, data_type, qtype = f"In which direction does the {thing} move?", \
                "ABCD"[choices.index(direction)], "video", "11"
            data_id, segment = f"mirror_video_{i}.mp4", None
        else:
            v = scene(13_000 + i)
            first = v.objects[0]
            choices = [first.colour] + [c for c in ("red", "green", "blue", "yellow", "purple")
                                        if c != first.colour][:3]
            rot = i % 4
            choices = choices[rot:] + choices[:rot]
            imgs, q, answer, data_type, qtype = [v.image], f"What color is the {first.shape}?", \
                "ABCD"[choices.index(first.colour)], "image", "2"
            data_id, segment = f"mirror_{13_000 + i}.jpg", None
        rows.append({"answer": answer, "choice_a": choices[0], "choice_b": choices[1], "choice_c": choices[2],
                     "choice_d": choices[3], "data_id": data_id, "data_type": data_type, "question": q,
                     "question_id": str(100_000 + i), "question_type_id": qtype, "segment": segment,
                     "image": imgs})
    return rows


def refcoco_rows(n: int, split: str) -> list[dict[str, Any]]:
    # refcoco utils: bbox [x, y, w, h] (drawn / normalised), answer = referring expressions (the REC variant
    # explodes them, one doc each), segmentation = flat polygon, question_id = annotation id
    rows = []
    for i in range(n):
        v = scene(14_000 + i // 2)
        obj = v.objects[i % len(v.objects)]
        same_shape = [o for o in v.objects if o.shape == obj.shape]
        expressions = [f"the {obj.name}", f"{obj.name} on the {obj.column}"]
        if len(same_shape) == 1:
            expressions.append(f"the {obj.shape}")
        rows.append({"question_id": str(500_000 + i), "image": v.image,
                     "question": "Please carefully observe the area circled in the image and come up with a "
                                 "caption for the area.",
                     "answer": expressions, "segmentation": obj.polygon, "bbox": obj.box, "iscrowd": 0,
                     "file_name": f"mirror_{14_000 + i // 2}_{500_000 + i}.jpg"})
    return rows


# ---------------------------------------------------------------- the registry
CARD = "https://huggingface.co/datasets/{}/blob/{}/README.md (dataset_info)"

SCHEMAS: dict[str, DatasetSchema] = {s.name.lower(): s for s in (
    DatasetSchema("COCO-Caption2017", {None: ConfigSchema(
        coco_caption_features, ("val", "test"), ("image", "question_id", "id", "answer"), coco_caption_rows)},
        ("lmms_eval/tasks/coco_cap/utils.py (coco_doc_to_visual, coco_process_result)",
         "lmms-lab COCO-Caption card layout: question_id, image, question, answer: sequence, id, license: int8, "
         "file_name, coco_url, height/width: int32, date_captured — as in lmms-lab's copies, e.g. "
         "https://huggingface.co/datasets/llizhx/sampled_coco2014_val_300_5 (the 2017 card's features section was "
         "not readable from here; splits val/test from https://huggingface.co/datasets/lmms-lab/COCO-Caption2017"
         "/viewer)")),
    DatasetSchema("NoCaps", {None: ConfigSchema(
        nocaps_features, ("validation", "test"), ("image", "image_id", "annotations_captions"), nocaps_rows)},
        (CARD.format("lmms-lab/NoCaps", "main"), "lmms_eval/tasks/nocaps/utils.py (nocaps_process_result)")),
    DatasetSchema("TextCaps", {None: ConfigSchema(
        textcaps_features, ("train", "val", "test"), ("image", "image_id", "caption_str"), textcaps_rows)},
        (CARD.format("lmms-lab/TextCaps", "09a9d5e2f0829b732faf722b8c4a9c2e9ef9e575"),
         "lmms_eval/tasks/textcaps/utils.py (textcaps_process_result)")),
    DatasetSchema("flickr30k", {None: ConfigSchema(
        flickr_features, ("test",), ("image", "img_id", "caption"), flickr_rows)},
        (CARD.format("lmms-lab/flickr30k", "0d6d9049be2e08261be315e731e0d8054c1d1c03"),
         "lmms_eval/tasks/flickr30k/utils.py (flickr_process_result)")),
    DatasetSchema("VQAv2", {None: ConfigSchema(
        vqav2_features, ("validation", "testdev", "test"), ("image", "question", "answers", "question_id"),
        vqav2_rows)},
        (CARD.format("lmms-lab/VQAv2", "main"), "lmms_eval/tasks/vqav2/utils.py (vqav2_process_results)")),
    DatasetSchema("GQA", {
        "testdev_balanced_instructions": ConfigSchema(
            gqa_instructions_features, ("testdev",), ("imageId", "question", "answer"), gqa_instruction_rows),
        "testdev_balanced_images": ConfigSchema(gqa_images_features, ("testdev",), ("id", "image"),
                                                gqa_image_rows)},
        (CARD.format("lmms-lab/GQA", "eab7d48d497521fffcc1fc1bc654f5394790b01e") + ": *_images configs = id, "
         "image; *_instructions configs = id, imageId, question, isBalanced (+ answer, fullAnswer on testdev)",
         "GQA's question format (groups, types, semantic, semanticStr, entailed, equivalent: "
         "https://cs.stanford.edu/people/dorarad/gqa/download.html), not confirmed column by column on the card",
         "lmms_eval/tasks/gqa/utils.py (gqa_process_docs loads testdev_balanced_images and joins imageId -> id)"),
        companion={"testdev_balanced_instructions": ("testdev_balanced_images",)}),
    DatasetSchema("textvqa", {None: ConfigSchema(
        textvqa_features, ("train", "validation", "test"), ("image", "question", "answers", "question_id"),
        textvqa_rows)},
        ("https://huggingface.co/datasets/pppop7/textvqa/blob/main/README.md (a duplicate of lmms-lab/textvqa; "
         "dataset_info)", "lmms_eval/tasks/textvqa/utils.py (textvqa_doc_to_text, textvqa_process_results)")),
    DatasetSchema("OK-VQA", {None: ConfigSchema(
        okvqa_features, ("val2014",), ("image", "question", "answers", "question_id"), okvqa_rows)},
        (CARD.format("lmms-lab/OK-VQA", "main"), "lmms_eval/tasks/ok_vqa/utils.py (ok_vqa_process_results)")),
    DatasetSchema("VizWiz-VQA", {None: ConfigSchema(
        vizwiz_features, ("val", "test"), ("image", "question", "answers", "question_id"), vizwiz_rows)},
        (CARD.format("lmms-lab/VizWiz-VQA", "main"),
         "lmms_eval/tasks/vizwiz_vqa/utils.py (vizwiz_vqa_process_results)")),
    DatasetSchema("ScienceQA", {
        "ScienceQA-IMG": ConfigSchema(scienceqa_features, ("validation", "test"),
                                      ("image", "question", "choices", "answer", "hint"), scienceqa_rows),
        "ScienceQA-FULL": ConfigSchema(scienceqa_features, ("validation", "test"),
                                       ("image", "question", "choices", "answer", "hint"), scienceqa_rows)},
        (CARD.format("lmms-lab/ScienceQA", "main"),
         "lmms_eval/tasks/scienceqa/utils.py (sqa_doc_to_text, sqa_doc_to_target, sqa_process_results)")),
    DatasetSchema("ai2d", {None: ConfigSchema(
        ai2d_features, ("test",), ("image", "question", "options", "answer"), ai2d_rows)},
        (CARD.format("lmms-lab/ai2d", "main"), "lmms_eval/tasks/ai2d/utils.py (ai2d_doc_to_text, "
                                               "ai2d_doc_to_target: int(doc['answer']))")),
    DatasetSchema("POPE", {None: ConfigSchema(
        pope_features, ("test",), ("image", "question", "answer", "question_id"), pope_rows)},
        ("https://huggingface.co/datasets/giobin/POPE/blob/main/README.md (a copy of lmms-lab/POPE's default "
         "config; dataset_info)", "lmms_eval/tasks/pope/utils.py (pope_process_results asserts yes/no)")),
    DatasetSchema("MME", {None: ConfigSchema(
        mme_features, ("test",), ("image", "question", "answer", "category", "question_id"), mme_rows)},
        (CARD.format("lmms-lab/MME", "main"),
         "lmms_eval/tasks/mme/utils.py (eval_type_dict: the 14 subtasks; mme_aggregate_results: two answers "
         "per question_id)")),
    DatasetSchema("SEED-Bench", {None: ConfigSchema(
        seedbench_features, ("test",),
        ("image", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
         "question_id"), seedbench_rows)},
        ("https://huggingface.co/datasets/AILab-CVC/SEED-Bench/blob/main/SEED-Bench.py (the source features: "
         "answer, choice_a-d, data_id, data_type, question, question_id, question_type_id, segment)",
         "lmms-lab's parquet copies add image: sequence of image (as on "
         + CARD.format("lmms-lab/SEED-Bench-2", "main") + "); video questions carry 8 frames (lmms-eval #132)",
         "lmms_eval/tasks/seedbench/utils.py (seed_doc_to_visual, seed_process_result)")),
    DatasetSchema("RefCOCO", {None: ConfigSchema(
        refcoco_features, ("val", "test", "testA", "testB"),
        ("image", "bbox", "answer", "question_id", "segmentation"), refcoco_rows)},
        (CARD.format("lmms-lab/RefCOCO", "main"),
         "lmms_eval/tasks/refcoco/utils.py and utils_rec.py (bbox [x, y, w, h]; segmentation polygon; the REC "
         "task's process_docs explodes answer)")),
)}


def schema_for(dataset_path: str | None, dataset_name: str | None = None) -> tuple[DatasetSchema, ConfigSchema]:
    """The mirror schema of a task's dataset; KeyError naming what is missing."""
    key = str(dataset_path or "").rstrip("/").split("/")[-1].lower()
    if key not in SCHEMAS:
        raise KeyError(f"no mirror schema for dataset {dataset_path!r} (mirrored: "
                       f"{', '.join(s.name for s in SCHEMAS.values())})")
    ds = SCHEMAS[key]
    if dataset_name not in ds.configs:
        raise KeyError(f"no mirror schema for {dataset_path!r} config {dataset_name!r} (mirrored configs: "
                       f"{sorted(str(c) for c in ds.configs)})")
    return ds, ds.configs[dataset_name]
