"""Tests of the one conditioning function: equals diffusers' encode_prompt, same layout in training and
inference for every m, tokenizer-specific padding, and clear errors when tokens do not fit."""
import pytest
import torch

from vilex.errors import UserError
from vilex.models.conditioning import SpecialTokens, build_text_conditioning, build_text_layout
from vilex.models.configs import DecoderConfig
from vilex.models.decoders import build_frozen_decoder
from vilex.models.tiny import build_tiny_sd

PROMPTS = ["a photo of a red cat", "", "two blue squares on a gray background, watercolor style!"]


@pytest.fixture(scope="module", params=["eos", "!"], ids=["sd1_like_pad_eos", "sd2_like_pad_bang"])
def decoder(request, tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("sd") / "decoder", pad=request.param)
    return build_frozen_decoder(DecoderConfig(type="stable_diffusion", name_or_path=str(folder)))


def _sd_pipeline(decoder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=decoder.vae, text_encoder=decoder.text_encoder, tokenizer=decoder.tokenizer,
                                   unet=decoder.unet, scheduler=decoder.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_pad_id_comes_from_the_tokenizer(decoder):
    tok = decoder.tokenizer
    assert decoder.special.pad == tok.pad_token_id
    if tok.pad_token == "!":  # SD2 / OpenCLIP-H convention: pad id 0 = "!"
        assert decoder.special.pad == 0 != decoder.special.eos
    else:  # SD1 / CLIP-L convention: pad = EOS
        assert decoder.special.pad == decoder.special.eos


def test_plain_prompt_equals_diffusers_encode_prompt(decoder):
    reference, _ = _sd_pipeline(decoder).encode_prompt(PROMPTS, "cpu", 1, False)
    ours = decoder.encode_text(None, None, decoder.tokenize(PROMPTS))
    assert ours.shape == reference.shape == (3, 77, decoder.embed_width)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_embedding_rows_as_vilex_tokens_equal_encode_prompt(decoder):
    """Feeding the embedding-table rows of a prompt as ViLex tokens gives exactly the prompt's conditioning."""
    reference, _ = _sd_pipeline(decoder).encode_prompt(PROMPTS, "cpu", 1, False)
    table = decoder.embedding_table
    for i, ids in enumerate(decoder.tokenize(PROMPTS)):
        rows = table[torch.tensor(ids, dtype=torch.long)].unsqueeze(0)
        ours = decoder.encode_text(rows, len(ids))
        torch.testing.assert_close(ours, reference[i:i + 1], rtol=0, atol=1e-6)


def test_layout_matches_the_tokenizer(decoder):
    """Non-ViLex positions, attention mask and EOS index are those of a real m-word text."""
    words = ["red", "green", "blue", "cat", "dog", "hat"]
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        m = len(decoder.tokenize([text])[0])  # ViLex tokens stand where this text's m tokens stand
        real = decoder.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt")
        layout = build_text_layout(decoder.special, m, batch_size=1, num_available=75)
        mask = layout.vilex_mask[0]
        assert mask.nonzero().flatten().tolist() == list(range(1, m + 1))
        assert torch.equal(layout.input_ids[0][~mask], real.input_ids[0][~mask])
        assert torch.equal(layout.attention_mask[0], real.attention_mask[0])
        assert layout.eos_index.item() == m + 1 == int((real.input_ids[0] == decoder.special.eos).nonzero()[0])


def test_training_and_inference_layouts_agree_for_every_m(decoder):
    """Training (all n tokens + num_keep tensor) and inference (first m tokens) build identical inputs."""
    n = 8
    torch.manual_seed(1)
    tokens = torch.randn(3, n, decoder.embed_width) * 0.02
    for m in range(1, n + 1):
        train_cond, train_layout = decoder.encode_text(tokens, torch.full((3,), m), return_layout=True)
        infer_cond, infer_layout = decoder.encode_text(tokens[:, :m], m, return_layout=True)
        for field in ("input_ids", "vilex_mask", "attention_mask", "eos_index", "num_vilex"):
            assert torch.equal(getattr(train_layout, field), getattr(infer_layout, field)), (m, field)
        assert train_layout.eos_index.tolist() == [m + 1] * 3
        assert train_layout.input_ids[0, m + 2:].eq(decoder.special.pad).all()
        torch.testing.assert_close(train_cond, infer_cond, rtol=0, atol=0)


def test_mixed_lengths_in_one_batch_equal_separate_calls(decoder):
    torch.manual_seed(2)
    tokens = torch.randn(4, 6, decoder.embed_width) * 0.02
    keep = torch.tensor([1, 6, 3, 2])
    batched = decoder.encode_text(tokens, keep)
    for i, m in enumerate(keep.tolist()):
        torch.testing.assert_close(batched[i:i + 1], decoder.encode_text(tokens[i:i + 1, :m], m), rtol=0, atol=1e-6)


def test_dropped_tokens_get_no_gradient(decoder):
    tokens = (torch.randn(2, 5, decoder.embed_width) * 0.02).requires_grad_(True)
    decoder.encode_text(tokens, torch.tensor([2, 4])).sum().backward()
    assert tokens.grad[0, :2].abs().sum() > 0 and tokens.grad[0, 2:].abs().sum() == 0
    assert tokens.grad[1, :4].abs().sum() > 0 and tokens.grad[1, 4:].abs().sum() == 0


def test_vilex_plus_prompt_layout(decoder):
    prompt = decoder.tokenize(["on the beach"])
    _, layout = decoder.encode_text(torch.zeros(1, 3, decoder.embed_width), 3, prompt, return_layout=True)
    k = len(prompt[0])
    assert layout.input_ids[0, 0].item() == decoder.special.bos
    assert layout.input_ids[0, 4:4 + k].tolist() == prompt[0]
    assert layout.eos_index.item() == 4 + k
    assert layout.attention_mask[0].sum().item() == 5 + k


def test_clip_skip_uses_the_earlier_layer_then_final_norm(decoder):
    ids = decoder.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = decoder.text_encoder(ids, output_hidden_states=True)
    expected = decoder.text_encoder.final_layer_norm(out.hidden_states[-2])
    ours = build_text_conditioning(decoder.text_encoder, decoder.special, None, None,
                                   decoder.tokenize(PROMPTS[:1]), clip_skip=1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_too_many_tokens_say_how_many_fit():
    special = SpecialTokens(bos=1, eos=2, pad=2, context_length=77)
    with pytest.raises(UserError, match=r"^num_tokens=9 is more than the 8 ViLex tokens this encoder makes: "
                                        r"at most 8 fit$"):
        build_text_layout(special, 9, num_available=8)
    with pytest.raises(UserError, match=r"^8 ViLex tokens \+ 70 prompt tokens do not fit the 77-token text context: "
                                        r"at most 75 fit together \(BOS and EOS take 2\), so at most 5 ViLex "
                                        r"tokens with this prompt$"):
        build_text_layout(special, 8, [[5] * 70], num_available=8)
    with pytest.raises(UserError, match=r"^the prompt has 76 tokens but the 77-token text context holds at most 75"):
        build_text_layout(special, 0, [[5] * 76], num_available=8)
    layout = build_text_layout(special, 5, [[5] * 70], num_available=8)  # exactly full: no pad left
    assert layout.eos_index.item() == 76 and layout.attention_mask.sum().item() == 77
