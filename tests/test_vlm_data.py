"""VLM data: labels verified against the template (a broken sample raises with its id), LLaVA JSON structure errors,
truncation and bad images counted, and the deterministic micro-batch plan."""
import json

import numpy as np
import pytest
import torch

from vilex.errors import DataError
from vlm.data import ConversationDataset, ImageSpec, Skipped, read_llava_json
from vlm.model import load_tokenizer
from vlm.packing import Collator
from vlm.sampler import MicroBatchPlan
from vlm.templates import IGNORE, SampleError, TemplateMismatchError, build_template
from vlm.tiny import build_tiny_llm, write_tiny_llava_data

N_IMG = 5  # image tokens per image in these tests


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = build_tiny_llm(tmp_path_factory.mktemp("llm"))
    return load_tokenizer(folder, "<image>")


def _dataset(records, tok, template="instruct", root=None, **kw):
    tokenizer, image_id = tok
    kw.setdefault("max_length", 200)
    return ConversationDataset(records, tokenizer, build_template(template, tokenizer, "<image>"),
                               image_spec=ImageSpec(8, (0.5,) * 3, (0.5,) * 3), image_token="<image>",
                               image_token_id=image_id, num_image_tokens=N_IMG, image_root=root, **kw)


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def _learned_text(tokenizer, sample):
    """Decode exactly the tokens the loss learns (targets are next tokens, so they are read off ``targets``)."""
    return tokenizer.decode(sample.targets[sample.targets != IGNORE])


def test_instruct_labels_are_exactly_the_assistant_turns(tok, tmp_path):
    tokenizer, image_id = tok
    rec = {"id": "s1", "image": "x.png", "conversations": _conv("<image>\nwhat color is it?", "blue",
                                                                 "how many shapes?", "two small shapes")}
    t = _dataset([rec], tok, root=tmp_path).tokens(0)
    assert _learned_text(tokenizer, t) == "blue<|im_end|>\ntwo small shapes<|im_end|>\n"
    ids = t.input_ids.tolist()
    assert ids.count(image_id) == N_IMG
    first = ids.index(image_id)
    assert ids[first:first + N_IMG] == [image_id] * N_IMG  # one contiguous image span
    # every position whose NEXT token is prompt/system/image text is masked
    learned = (t.targets != IGNORE).nonzero().flatten().tolist()
    assert all(ids[p + 1] != image_id for p in learned[:-1])
    full = tokenizer.decode(t.input_ids)
    assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>")
    assert t.targets[-1] == IGNORE and t.truncated_tokens == 0


def test_align_template_learns_caption_and_eos_only(tok, tmp_path):
    tokenizer, image_id = tok
    rec = {"id": "c1", "image": "x.png", "conversations": _conv("<image>\nDescribe the photo.", "a red circle")}
    t = _dataset([rec], tok, template="align", root=tmp_path).tokens(0)
    assert _learned_text(tokenizer, t) == "a red circle<|endoftext|>"
    assert t.input_ids[:N_IMG].tolist() == [image_id] * N_IMG  # "<image> caption EOS", the instruction dropped
    assert tokenizer.decode(t.input_ids[N_IMG:]) == "a red circle<|endoftext|>"


def test_text_only_samples_mix_in(tok):
    tokenizer, image_id = tok
    t = _dataset([{"id": "t1", "conversations": _conv("hello there", "yes")}], tok).tokens(0)
    assert not t.has_image and image_id not in t.input_ids.tolist()
    assert _learned_text(tokenizer, t) == "yes<|im_end|>\n"


def test_segment_boundary_merge_raises_with_the_sample_id(tok):
    """A Vicuna-style 'ASSISTANT: ' header ends in a space that BPE merges into the answer ('Ġyes'): labels split at
    the segment boundary would be shifted by one token. LLaVA warns and masks the sample; we refuse it."""
    tokenizer, image_id = tok
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
                               "{% else %}{{ 'ASSISTANT: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
    ds = _dataset([{"id": "broken-42", "conversations": _conv("is it red?", "yes")}], (tokenizer, image_id))
    with pytest.raises(TemplateMismatchError) as e:
        ds.tokens(0)
    msg = str(e.value)
    assert msg.startswith("sample 'broken-42': template/tokenization mismatch at token ")
    assert "Ġyes" in msg or "Ġy" in msg
    assert msg.endswith("the labels would be misaligned")

    tokenizer.chat_template = "{{ messages | length }}" + tokenizer.chat_template  # changes with more turns
    ds = _dataset([{"id": "unstable-7", "conversations": _conv("is it red?", "yes")}], (tokenizer, image_id))
    with pytest.raises(TemplateMismatchError, match="sample 'unstable-7': the chat template is not prefix-stable"):
        ds.tokens(0)


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "conversations": _conv("<image>\nq", "x")}, "sample 'a': has no image but 1 image placeholder(s)"),
    ({"id": "b", "image": "i.png", "conversations": _conv("q", "x")},
     "sample 'b': has an image but 0 image placeholder"),
    ({"id": "c", "image": "i.png", "conversations": _conv("<image><image>", "x")},
     "sample 'c': has an image but 2 image placeholder(s)"),
    ({"id": "d", "conversations": [{"from": "gpt", "value": "x"}]},
     "sample 'd': turns must alternate human/gpt starting with human; turn 0 is assistant"),
    ({"id": "e", "conversations": [{"from": "bot", "value": "x"}]}, "sample 'e': turn 0 has unknown role 'bot'"),
    ({"id": "f", "conversations": _conv("q")}, "sample 'f': the conversation must end with a gpt turn"),
])
def test_malformed_samples_fail_fast_naming_their_id(tok, tmp_path, record, message):
    with pytest.raises(SampleError) as e:
        _dataset([record], tok, root=tmp_path).tokens(0)
    assert str(e.value).startswith(message)


def test_truncation_is_explicit_and_counted(tok, tmp_path):
    rec = {"id": "long", "image": "i.png", "conversations": _conv("<image>\nq", "a " * 60)}
    t = _dataset([rec], tok, root=tmp_path, max_length=40).tokens(0)
    assert t.length == 40 and t.truncated_tokens > 0
    with pytest.raises(SampleError, match="sample 'long': .* tokens > max_length 40"):
        _dataset([rec], tok, root=tmp_path, max_length=40, on_too_long="error").tokens(0)
    with pytest.raises(SampleError, match="sample 'long': max_length 20 would cut into its image tokens"):
        _dataset([rec], tok, root=tmp_path, max_length=20).tokens(0)


def test_bad_images_error_or_counted_skip(tok, tmp_path):
    path = write_tiny_llava_data(tmp_path, n=4, kind="instruct", text_only_every=0)
    records = read_llava_json(path)
    (tmp_path / records[1]["image"]).unlink()
    (tmp_path / records[2]["image"]).write_bytes(b"not a png at all")
    strict = _dataset(records, tok, root=tmp_path, on_bad_image="error")
    assert strict[0].pixel_values.shape == (3, 8, 8)
    with pytest.raises(SampleError, match=r"sample 'instruct-0001': image images/0001.png: unreadable"):
        strict[1]
    lenient = _dataset(records, tok, root=tmp_path)  # skip is the default
    items = [lenient[i] for i in range(4)]
    assert [type(x).__name__ for x in items] == ["Example", "Skipped", "Skipped", "Example"]
    batch = Collator(tok[0].pad_token_id, packing=True, row_length=200)(items)
    assert batch.num_samples == 2 and batch.skipped == {"not_an_image": 1, "unreadable": 1}
    assert batch.pixel_values.shape == (2, 3, 8, 8)
    empty = Collator(tok[0].pad_token_id, packing=True, row_length=200)([items[1]])
    assert empty.num_samples == 0 and empty.skipped == {"unreadable": 1} and (empty.targets == IGNORE).all()
    assert isinstance(items[1], Skipped) and items[1].sample_id == "instruct-0001"


def test_read_llava_json_errors(tmp_path):
    with pytest.raises(DataError, match="conversation file not found"):
        read_llava_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('[{"id": 1, "conversations": []},')
    with pytest.raises(DataError, match="bad.json: invalid JSON at line 1"):
        read_llava_json(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(DataError, match="record 0 is not a sample"):
        read_llava_json(tmp_path / "obj.json")
    (tmp_path / "ok.jsonl").write_text('{"id": "a", "conversations": []}\n\n{"id": "b", "conversations": []}\n')
    assert [r["id"] for r in read_llava_json(tmp_path / "ok.jsonl")] == ["a", "b"]


def test_micro_batch_plan_is_deterministic_and_groups_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=50).tolist()
    plan = MicroBatchPlan(lengths, global_batch_size=16, micro_batch_size=2, world_size=2, seed=3,
                          group_by_length=True)
    assert (plan.grad_accum, plan.steps_per_epoch, plan.dropped_per_epoch) == (4, 3, 2)
    again = MicroBatchPlan(lengths, 16, 2, 2, seed=3, group_by_length=False)
    for step in range(plan.steps_per_epoch * 2):  # two epochs
        ks = range(step * plan.grad_accum, (step + 1) * plan.grad_accum)
        grouped = [plan.indices(r, k) for k in ks for r in range(2)]
        plain = [again.indices(r, k) for k in ks for r in range(2)]
        assert sorted(sum(grouped, [])) == sorted(sum(plain, []))  # same samples per step, only split differently
        assert len(set(sum(grouped, []))) == 16
        flat = [lengths[i] for mb in grouped for i in mb]
        assert flat == sorted(flat, reverse=True)  # micro-batches hold neighbouring lengths
    assert plan.indices(1, 7) == MicroBatchPlan(lengths, 16, 2, 2, 3, True).indices(1, 7)  # a pure function
    assert again.indices(0, 0) != again.indices(0, again.micro_batches_per_epoch)  # reshuffled each epoch
    with pytest.raises(Exception, match="not a multiple of micro_batch_size x processes = 4 x 3"):
        MicroBatchPlan(lengths, 16, 4, 3, 0, True)


def test_image_spec_fits(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (20, 10), (255, 0, 0))
    for fit in ("resize", "crop", "letterbox"):
        x = ImageSpec(8, (0.5,) * 3, (0.5,) * 3, fit).render(img)
        assert x.shape == (3, 8, 8)
    box = ImageSpec(8, (0.5,) * 3, (0.5,) * 3, "letterbox").render(img)
    assert torch.allclose(box[:, 0, 0], torch.tensor([0.0, 0.0, 0.0]), atol=0.01)  # padded with the mean colour
