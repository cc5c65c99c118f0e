"""Sequence packing: first-fit-decreasing rows, position ids restarting per sample, and a packed micro-batch giving the
same loss and gradients as the same samples padded one per row (no attention across samples)."""
import pytest
import torch

from vlm.data import ConversationDataset, ImageSpec, read_llava_json
from vlm.model import VLM
from vlm.packing import Collator, first_fit_decreasing, pack_rows
from vlm.templates import IGNORE, build_template
from vlm.tiny import build_tiny_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_fit_decreasing():
    lengths = [50, 90, 20, 60, 10, 150, 40]
    bins = first_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert bins == [[5], [1, 4], [3, 6], [0, 2]]  # longest first, each into the first row with room
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins[1:])  # an over-long item gets a row of its own


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = build_tiny_world(tmp_path_factory.mktemp("pack"), n_align=4, n_instruct=8)
    cfg = world.config(world.root / "out")
    vlm = VLM.build(cfg.model)
    vlm.set_trainable(["projector", "llm"])
    tok = vlm.tokenizer
    ds = ConversationDataset(read_llava_json(world.instruct / "data.json"), tok,
                             build_template("instruct", tok, "<image>"),
                             image_spec=ImageSpec(vlm.image_size, (0.5,) * 3, (0.5,) * 3), image_token="<image>",
                             image_token_id=vlm.image_token_id, num_image_tokens=vlm.num_image_tokens,
                             max_length=96, image_root=world.instruct)
    return vlm, [ds[i] for i in range(8)]


def _loss_and_grads(vlm, batch):
    vlm.zero_grad(set_to_none=True)
    loss = vlm(**batch.model_inputs("cpu"))["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_packed_rows_restart_positions_and_keep_image_order(setup):
    vlm, examples = setup
    batch = Collator(vlm.tokenizer.pad_token_id, packing=True, row_length=200)(examples)
    assert batch.input_ids.shape[0] < len(examples)  # several samples per row
    assert batch.attention_mask is None and batch.num_samples == 8
    assert batch.real_tokens == sum(e.tokens.length for e in examples)
    row = batch.position_ids[0].tolist()
    starts = [i for i, p in enumerate(row) if p == 0]
    assert len(starts) >= 2 and starts[0] == 0
    for a, b in zip(starts, starts[1:]):
        assert row[a:b] == list(range(b - a))
    assert batch.pixel_values.shape[0] == sum(e.pixel_values is not None for e in examples)


@pytest.fixture(params=["sdpa_varlen", "sdpa"])
def attn(request, setup):
    """Both attention paths: ours (one sdpa call per packed sample) and transformers' sdpa (block-diagonal mask)."""
    vlm, _ = setup
    before = vlm.llm.config._attn_implementation
    vlm.llm.set_attn_implementation(request.param)
    yield request.param
    vlm.llm.set_attn_implementation(before)


def test_packed_loss_and_gradients_equal_unpacked(setup, attn, monkeypatch):
    from vlm import varlen_attention

    calls = []
    real = varlen_attention.varlen_sdpa
    monkeypatch.setattr(varlen_attention, "varlen_sdpa", lambda q, k, v, lengths, *a: calls.append(lengths) or
                        real(q, k, v, lengths, *a))
    vlm, examples = setup
    assert any(e.pixel_values is None for e in examples) and any(e.pixel_values is not None for e in examples)
    pad_id = vlm.tokenizer.pad_token_id
    padded = Collator(pad_id, packing=False, row_length=200)(examples)
    packed = Collator(pad_id, packing=True, row_length=200)(examples)
    assert packed.padded_tokens < padded.padded_tokens
    loss_u, grads_u = _loss_and_grads(vlm, padded)
    assert not calls  # a padded batch (2D mask) takes transformers' sdpa path in either case
    loss_p, grads_p = _loss_and_grads(vlm, packed)
    if attn == "sdpa_varlen":  # one call per layer, split at the samples' boundaries
        n_layers = vlm.llm.config.num_hidden_layers
        assert len(calls) == n_layers and sum(len(r) for r in calls[0]) >= len(examples)
        assert calls[0] == [[int(n) for n in torch.diff(torch.nonzero(torch.cat([row == 0, torch.tensor([True])]))
                                                            .flatten())] for row in packed.position_ids]
    else:
        assert not calls
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_u.keys() == grads_p.keys() and len(grads_u) > 10
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)

    # negative control: the same packed rows with plain causal attention (samples see each other) differ
    leaky = packed.model_inputs("cpu")
    leaky["position_ids"] = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
    with torch.no_grad():
        assert abs(float(vlm(**leaky)["loss"]) - float(loss_u)) > 1e-4


def test_targets_never_cross_sample_boundaries(setup):
    vlm, examples = setup
    packed = Collator(vlm.tokenizer.pad_token_id, packing=True, row_length=200)(examples)
    for r in range(packed.input_ids.shape[0]):
        pos = packed.position_ids[r]
        last_of_sample = torch.cat([pos[1:] == 0, torch.tensor([True])])
        assert (packed.targets[r][last_of_sample] == IGNORE).all()


def test_pack_rows_minimises_processed_tokens():
    def area(bins, lengths):
        return len(bins) * max(sum(lengths[i] for i in b) for b in bins)

    lengths = [70, 70, 70, 45, 45, 45, 45, 45, 45]  # 480 tokens
    ffd = first_fit_decreasing(lengths, 160)
    assert len(ffd) == 4 and area(ffd, lengths) == 640  # 70+70 | 70+45+45 | 45+45+45 | 45
    rows = pack_rows(lengths, 160)
    assert sorted(i for r in rows for i in r) == list(range(9))
    assert area(rows, lengths) == 480 and len(rows) == 3  # three even rows of 70+45+45: no padding at all
    assert pack_rows([10, 20, 30], 100) == [[2, 1, 0]]  # everything fits one row
    assert pack_rows([150, 90, 10], 100) == first_fit_decreasing([150, 90, 10], 100)  # over-long item: plain FFD


def test_text_only_and_empty_micro_batches_keep_every_trainable_parameter_in_the_graph(setup):
    """All ranks must run the same modules (ZeRO-3) and every trainable parameter needs a gradient (DDP)."""
    from vlm.data import Skipped

    vlm, examples = setup
    collate = Collator(vlm.tokenizer.pad_token_id, packing=True, row_length=200)
    text_only = collate([e for e in examples if e.pixel_values is None])
    empty = collate([Skipped("gone", "unreadable")])
    for batch in (text_only, empty):
        vlm.zero_grad(set_to_none=True)
        loss = vlm(**batch.model_inputs("cpu"))["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in vlm.parameters() if p.requires_grad)
    with torch.no_grad():
        assert float(vlm(**empty.model_inputs("cpu"))["loss"]) == 0.0
    assert all(float(p.grad.abs().sum()) == 0 for p in vlm.projectors.parameters())  # the zero image adds nothing


def test_sdpa_varlen_generation_falls_back_to_sdpa_and_matches_it(setup):
    """With a KV cache (query shorter than keys) the varlen path hands over to sdpa: greedy outputs are identical."""
    vlm, examples = setup
    with_image = next(e for e in examples if e.pixel_values is not None)
    ids, pixels = with_image.tokens.input_ids.unsqueeze(0), with_image.pixel_values[None]
    before = vlm.llm.config._attn_implementation
    outs = {}
    try:
        for impl in ("sdpa", "sdpa_varlen"):
            vlm.llm.set_attn_implementation(impl)
            with torch.no_grad():
                outs[impl] = vlm.generate(ids, pixel_values=pixels, max_new_tokens=6)
    finally:
        vlm.llm.set_attn_implementation(before)
    assert torch.equal(outs["sdpa"], outs["sdpa_varlen"])


def test_segment_lengths_split_rows_where_positions_restart():
    from vlm.varlen_attention import segment_lengths

    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segment_lengths(pos) == [[3, 2, 1], [6]]
    assert segment_lengths(torch.tensor([[3, 4, 0, 1]])) == [[2, 2]]  # a row that starts mid-sample
