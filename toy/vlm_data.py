"""toy/vlm_data.py — toy-world texts for stage 2: LLaVA JSON from a toy split, and the toy LLM's chat documents.

``vilex toy vlm-data`` turns a split written by ``vilex toy generate`` (``metadata.jsonl`` rows with ``file_name``,
``caption``, ``caption_fine``, ``qa``) into LLaVA-format JSON for ``vilex train-vlm``:

* ``align.json``    one sample per scene and caption: ``<image>\\nDescribe the image in one sentence.`` -> the coarse
                    caption, and another -> the fine caption (the align template learns only the caption);
* ``instruct.json`` one multi-turn conversation per scene: every question of the scene in a seeded random order, the
                    first turn carrying ``<image>\\n``, plus (``caption_prob``) a separate one-turn caption sample, plus
                    (``text_only_prob``) a text-only sample whose question is answered from the fine caption given in
                    the prompt (keeps the LLM's reading of toy text alive, as LLaVA mixes in ShareGPT).

The prompts are EXACTLY those of the lmms-eval toy suite (``benchmarks.toy_tasks``): a question is
``question + QA_POST_PROMPT`` and the caption request is ``CAPTION_PROMPT``, so a model is evaluated on the prompt it
was trained with. Image paths are relative to the split folder (use it as ``image_root``).

The toy LLM (toy/pretrain_llm.py) is pretrained on the text-only side of the same formats
(``chat_qa_messages``): a caption in place of the image, then the question.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from benchmarks.toy_tasks import CAPTION_PROMPT, QA_POST_PROMPT
from vilex.errors import DataError, UserError

IMAGE_TOKEN = "<image>"
KINDS = ("align", "instruct")


def qa_prompt(question: str) -> str:
    """The user text of a toy question, as the lmms-eval toy QA tasks send it."""
    return f"{question}{QA_POST_PROMPT}"


def chat_qa_messages(context: str | None, qas: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """Chat messages (role/content) for questions about one scene; ``context`` (a caption, or ``<image>``) opens the
    first user turn on its own line."""
    messages: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(qas):
        text = qa_prompt(question)
        if i == 0 and context is not None:
            text = f"{context}\n{text}"
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return messages


def _to_llava(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages]


def read_split(split_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``split_dir/metadata.jsonl`` (a missing file or row field is one DataError line)."""
    meta = Path(split_dir) / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"toy split {split_dir}: no metadata.jsonl (make one with `vilex toy generate`)")
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("id", "file_name", "caption", "caption_fine", "qa") if k not in row]
        if missing:
            raise DataError(f"{meta}: line {n} lacks {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{meta}: no rows")
    return rows


def chance_levels(answers: Sequence[str]) -> dict[str, float]:
    """Two chance levels of one question type: a uniform guess among the answers it has (``uniform``) and always
    giving its most frequent answer (``majority``), both counted over ``answers``."""
    counts = Counter(answers)
    n = max(1, len(answers))
    return {"uniform": round(1.0 / max(1, len(counts)), 4), "majority": round(max(counts.values(), default=0) / n, 4)}


def qa_chance(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per question type of a split: number of questions and both chance levels (``chance_levels``)."""
    by_type: dict[str, list[str]] = {}
    for row in rows:
        for qa in row["qa"]:
            by_type.setdefault(qa["type"], []).append(qa["answer"])
    return {t: {"n": len(a), **chance_levels(a)} for t, a in sorted(by_type.items())}


def align_records(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two captioning samples per scene (coarse and fine caption)."""
    out = []
    for row in rows:
        for which in ("caption", "caption_fine"):
            out.append({"id": f"{row['id']}/{which}", "image": row["file_name"],
                        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                                          {"from": "gpt", "value": row[which]}]})
    return out


def instruct_records(rows: Sequence[dict[str, Any]], seed: int = 0, caption_prob: float = 0.25,
                     text_only_prob: float = 0.1) -> list[dict[str, Any]]:
    """Per scene: all QA as one multi-turn conversation (shuffled), maybe a caption sample and a text-only sample."""
    out = []
    for row in rows:
        rng = np.random.default_rng([int(seed), int(row.get("index", len(out)))])
        qas = [(q["question"], q["answer"]) for q in row["qa"]]
        order = rng.permutation(len(qas))
        if qas:
            out.append({"id": f"{row['id']}/qa", "image": row["file_name"],
                        "conversations": _to_llava(chat_qa_messages(IMAGE_TOKEN, [qas[i] for i in order]))})
        if rng.random() < caption_prob:
            out.append({"id": f"{row['id']}/caption", "image": row["file_name"],
                        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                                          {"from": "gpt", "value": row["caption"]}]})
        if qas and rng.random() < text_only_prob:
            k = int(rng.integers(len(qas)))
            out.append({"id": f"{row['id']}/text",
                        "conversations": _to_llava(chat_qa_messages(row["caption_fine"], [qas[k]]))})
    return out


def write_vlm_data(split_dir: str | Path, out_dir: str | Path, kinds: Sequence[Literal["align", "instruct"]] = KINDS,
                   seed: int = 0, caption_prob: float = 0.25, text_only_prob: float = 0.1) -> dict[str, Any]:
    """Write ``out_dir/<kind>.json`` for each kind; returns counts and the split's chance level per question type
    (also in ``out_dir/vlm_data.json``)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise UserError(f"unknown kind(s) {sorted(unknown)}; kinds: {', '.join(KINDS)}")
    for name, p in (("caption_prob", caption_prob), ("text_only_prob", text_only_prob)):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {p}")
    rows = read_split(split_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"split": str(Path(split_dir).resolve()), "image_root": str(Path(split_dir).resolve()),
                            "scenes": len(rows), "seed": seed, "qa_chance": qa_chance(rows), "files": {}}
    for kind in kinds:
        records = (align_records(rows) if kind == "align"
                   else instruct_records(rows, seed, caption_prob, text_only_prob))
        path = out / f"{kind}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=0))
        tmp.replace(path)
        turns = sum(len(r["conversations"]) // 2 for r in records)
        info["files"][kind] = {"path": str(path), "samples": len(records),
                               "with_image": sum(1 for r in records if "image" in r), "turns": turns}
    (out / "vlm_data.json").write_text(json.dumps(info, indent=1))
    return info
