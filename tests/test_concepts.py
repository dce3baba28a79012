"""Multi-Concept T2I-Zero: Correction by Similarities, concept token lookup, Cross-Token NMS processor."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import T5Tokenizer

from dit_cache.concepts import (
    CrossTokenNMSProcessor,
    apply_cross_token_nms,
    concept_token_groups,
    correct_by_similarities,
    remove_cross_token_nms,
)
from dit_cache.kernels import cross_token_nms_reference


# --------------------------------------------------------------------------- CbS
def _embeds(batch=2, n=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(batch, n, d, generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, 7:] = 0  # row 0: content 0..5, </s> at 6, padding 7..9
    mask[1, 9:] = 0  # row 1: content 0..7, </s> at 8
    return f, mask


def _naive_cbs(f, mask, c, tau, gamma, alpha):
    """Direct transcription of the formula for one (prompt, concept) pair."""
    last = max(i for i in range(len(mask)) if mask[i] == 1)
    content = [i for i in range(len(mask)) if mask[i] == 1 and i != last]
    top = max((f[c] * f[i]).max() for i in content)
    f_tilde = torch.zeros_like(f[c])
    for i in content:
        s_bar = f[c] * f[i] / top
        if abs(i - c) <= gamma:
            f_tilde += torch.where(s_bar >= tau, s_bar, 0.0) * f[i]
    f_tilde = f_tilde * f[c].norm() / f_tilde.norm()
    return (1 - alpha) * f[c] + alpha * f_tilde


def test_alpha_zero_is_identity():
    f, mask = _embeds()
    out = correct_by_similarities(f, mask, [1, 3], alpha=0.0)
    assert torch.equal(out, f) and out is not f


@pytest.mark.parametrize("tau, gamma, alpha", [(0.5, 2, 0.25), (0.2, 1, 0.6), (0.0, 0, 1.0), (0.5, 5, 0.25)])
def test_matches_formula_and_leaves_other_rows_bitwise(tau, gamma, alpha):
    f, mask = _embeds()
    concepts = [1, 4]
    out = correct_by_similarities(f, mask, concepts, tau=tau, gamma=gamma, alpha=alpha)
    for b in range(2):
        for c in concepts:
            expected = _naive_cbs(f[b], mask[b], c, tau, gamma, alpha)
            torch.testing.assert_close(out[b, c], expected)
            assert not torch.allclose(out[b, c], f[b, c])
    others = [i for i in range(10) if i not in concepts]
    assert torch.equal(out[:, others], f[:, others])


def test_masked_rows_and_eos_never_contribute():
    f, mask = _embeds()
    out = correct_by_similarities(f, mask, [4, 5], gamma=3, tau=0.1)
    g = f.clone()
    g[0, 6:] = 1000 * torch.randn(4, 16)  # </s> and padding of row 0
    g[1, 8:] = -1000.0  # </s> and padding of row 1
    out_g = correct_by_similarities(g, mask, [4, 5], gamma=3, tau=0.1)
    assert torch.equal(out_g[:, [4, 5]], out[:, [4, 5]])


def test_alpha_one_keeps_the_norm():
    f, mask = _embeds(seed=3)
    out = correct_by_similarities(f, mask, [[0, 2, 5], [3, 7]], alpha=1.0)
    for b, cs in enumerate([[0, 2, 5], [3, 7]]):
        torch.testing.assert_close(out[b, cs].norm(dim=-1), f[b, cs].norm(dim=-1))


def test_per_row_indices_and_zero_concept_row():
    f, mask = _embeds()
    f[1, 2] = 0  # max(S) = 0: left unchanged
    out = correct_by_similarities(f, mask, [[1], [2]], alpha=0.5)
    assert not torch.equal(out[0, 1], f[0, 1]) and torch.equal(out[0, 2], f[0, 2])
    assert torch.equal(out[1, 1], f[1, 1]) and torch.equal(out[1, 2], f[1, 2])


@pytest.mark.parametrize("indices, match", [
    ([10], "out of range"),
    ([-1], "out of range"),
    ([8], "padding"),  # padding of row 0
    ([6], "padding"),  # </s> of row 0
    ([[1], [1], [1]], "one list per batch row"),
])
def test_bad_indices_raise(indices, match):
    f, mask = _embeds()
    with pytest.raises(ValueError, match=match):
        correct_by_similarities(f, mask, indices)


def test_bad_mask_shape_raises():
    f, mask = _embeds()
    with pytest.raises(ValueError, match="attention_mask"):
        correct_by_similarities(f, mask[:, :5], [1])


# --------------------------------------------------------------------------- tokens
@pytest.fixture(scope="module")
def tokenizer():
    words = ["a", "red", "cube", "and", "blue", "sphere", "on"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    vocab += [(ch, -10.0) for ch in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -5.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tokens(tok, prompt):
    return tok.convert_ids_to_tokens(tok(prompt)["input_ids"])


def concept_token_indices(tokenizer, prompt, words):
    """Every concept's positions, concept by concept (what Correction by Similarities reads)."""
    return [t for group in concept_token_groups(tokenizer, prompt, words) for t in group]


def test_concept_token_indices(tokenizer):
    prompt = "a red cube on a blue zorb"
    tokens = _tokens(tokenizer, prompt)
    idx = concept_token_indices(tokenizer, prompt, ["RED", "zorb"])
    assert [tokens[i] for i in idx[:1]] == ["▁red"]
    assert len(idx) > 2 and "".join(tokens[i] for i in idx[1:]) == "▁zorb"  # multi-piece word
    assert idx[1:] == list(range(idx[1], idx[1] + len(idx) - 1))


def test_concept_word_occurring_twice(tokenizer):
    prompt = "a red cube and a red sphere"
    tokens = _tokens(tokenizer, prompt)
    assert concept_token_indices(tokenizer, prompt, ["red"]) == [i for i, t in enumerate(tokens) if t == "▁red"]
    assert len(concept_token_indices(tokenizer, prompt, ["red"])) == 2


def test_concept_phrases_are_one_group_each(tokenizer):
    prompt = "a red cube and a blue  sphere"  # two spaces: any whitespace separates the words of a phrase
    tokens = _tokens(tokenizer, prompt)
    groups = concept_token_groups(tokenizer, prompt, ["red cube", "blue sphere"])
    assert [[tokens[i] for i in group] for group in groups] == [["▁red", "▁cube"], ["▁blue", "▁sphere"]]
    assert concept_token_indices(tokenizer, prompt, ["red cube", "blue sphere"]) == groups[0] + groups[1]
    with pytest.raises(ValueError, match="'cube red'"):  # a phrase matches in order only
        concept_token_groups(tokenizer, prompt, ["cube red"])


def test_overlapping_concepts_raise(tokenizer):
    with pytest.raises(ValueError, match="overlap.*give each concept its own words"):
        concept_token_groups(tokenizer, "a red cube and a blue sphere", ["red cube", "cube"])


def test_missing_word_raises(tokenizer):
    with pytest.raises(ValueError, match="'cat'.*▁red"):
        concept_token_indices(tokenizer, "a red cube", ["cube", "cat"])
    with pytest.raises(ValueError, match="'re'"):  # whole words only
        concept_token_indices(tokenizer, "a red cube", ["re"])


# --------------------------------------------------------------------------- Cross-Token NMS processor
@pytest.fixture(scope="module")
def pixart():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, caption_channels=16, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False,
    ).eval()
    g = torch.Generator().manual_seed(1)
    text_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # [uncond, cond]
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        encoder_attention_mask=text_mask,
        timestep=torch.tensor([500, 500]),
    )
    return model, inputs


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_processor_inactive_is_bitwise_stock_and_remove_restores(pixart):
    model, inputs = pixart
    stock = _run(model, inputs)
    procs = apply_cross_token_nms(model, [1, 3], 4, 4)
    try:
        assert len(procs) == 2 and all(b.attn2.processor is p for b, p in zip(model.transformer_blocks, procs))
        for p in procs:
            p.active = False
        assert torch.equal(_run(model, inputs), stock)
        for p in procs:
            p.active = True
        active = _run(model, inputs)
        assert not torch.allclose(active[1], stock[1], atol=1e-3)  # conditional half changed
        torch.testing.assert_close(active[0], stock[0], rtol=1e-5, atol=1e-5)  # unconditional half untouched
    finally:
        remove_cross_token_nms(model)
    assert all(isinstance(b.attn2.processor, AttnProcessor2_0) for b in model.transformer_blocks)
    assert torch.equal(_run(model, inputs), stock)


def test_nms_on_chosen_blocks_only(pixart):
    model, inputs = pixart
    stock = _run(model, inputs)
    procs = apply_cross_token_nms(model, [1, 3], 4, 4, blocks=[1])
    try:
        first, second = model.transformer_blocks
        assert len(procs) == 1 and second.attn2.processor is procs[0]
        assert isinstance(first.attn2.processor, AttnProcessor2_0)
        assert not torch.allclose(_run(model, inputs)[1], stock[1], atol=1e-3)
    finally:
        remove_cross_token_nms(model)
    assert torch.equal(_run(model, inputs), stock)


@pytest.mark.parametrize("blocks", [[2], [-1], [], [0.5]])
def test_nms_bad_blocks_raise_and_apply_nothing(pixart, blocks):
    model, _ = pixart
    with pytest.raises(ValueError, match=r"block indices in \[0, 1\]"):
        apply_cross_token_nms(model, [1, 3], 4, 4, blocks=blocks)
    assert all(isinstance(b.attn2.processor, AttnProcessor2_0) for b in model.transformer_blocks)


def test_processor_probabilities(pixart):
    model, _ = pixart
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(2)
    hidden, context = torch.randn(2, 16, attn.query_dim, generator=g), torch.randn(2, 6, 16, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    bias = ((1 - text_mask) * -10000.0)[:, None]  # as PixArtTransformer2DModel prepares it
    proc = CrossTokenNMSProcessor([1, 2], 4, 4, suppression=0.0, renormalize=False)
    with torch.no_grad():
        probs, _ = proc.attention_probs(attn, hidden, context, bias)
        raw = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(hidden)),
                                        attn.head_to_batch_dim(attn.to_k(context)),
                                        attn.prepare_attention_mask(bias, 6, 2))
    heads = attn.heads
    assert torch.equal(probs[:heads], raw[:heads])  # uncond half untouched
    assert torch.equal(probs[heads:], cross_token_nms_reference(raw[heads:], [1, 2], 4, 4))
    assert (probs[:heads, :, 4:] == 0).all() and (probs[heads:, :, 5:] == 0).all()  # padded columns stay 0
    assert ((probs[heads:, :, [1, 2]] != 0).sum(-1) == 1).all()
    phrase = CrossTokenNMSProcessor([[1, 3], 2], 4, 4, suppression=0.0, renormalize=False)
    with torch.no_grad():
        grouped, _ = phrase.attention_probs(attn, hidden, context, bias)
    assert torch.equal(grouped[heads:], cross_token_nms_reference(raw[heads:], [[1, 3], 2], 4, 4))
    assert ((grouped[heads:, :, 1] != 0) == (grouped[heads:, :, 3] != 0)).all()  # a phrase's tokens stay together


def test_processor_with_concepts_per_sample(pixart):
    model, _ = pixart
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(3)
    hidden, context = torch.randn(4, 16, attn.query_dim, generator=g), torch.randn(4, 6, 16, generator=g)
    per_sample = [[[1], [2]], [[3], [4, 5]]]  # two conditional samples, concepts at different positions
    proc = CrossTokenNMSProcessor(per_sample, 4, 4, renormalize=False, per_sample=True)
    with torch.no_grad():
        probs, _ = proc.attention_probs(attn, hidden, context)
        raw = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(hidden)),
                                        attn.head_to_batch_dim(attn.to_k(context)), None)
    heads = attn.heads
    assert torch.equal(probs[:2 * heads], raw[:2 * heads])  # the unconditional half
    for i, concepts in enumerate(per_sample):
        rows = slice((2 + i) * heads, (3 + i) * heads)
        assert torch.equal(probs[rows], cross_token_nms_reference(raw[rows], concepts, 4, 4))
    wrong = CrossTokenNMSProcessor(per_sample[:1], 4, 4, per_sample=True)
    with pytest.raises(ValueError, match="one concept list per image"):
        wrong.attention_probs(attn, hidden, context)
    with pytest.raises(ValueError, match="one concept list per conditional sample"):
        CrossTokenNMSProcessor([], 4, 4, per_sample=True)


def test_set_step():
    proc = CrossTokenNMSProcessor([1], 2, 2, step_fraction=0.3)
    assert [proc.set_step(i, 10) or proc.active for i in range(10)] == [True] * 3 + [False] * 7
    proc = CrossTokenNMSProcessor([1], 2, 2)
    assert [proc.set_step(i, 4) or proc.active for i in range(4)] == [True, True, False, False]


def test_processor_refuses_scales_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"suppression must be in \[0, 1\], got 1.5"):
        CrossTokenNMSProcessor([[1], [2]], 4, 4, suppression=1.5)
    with pytest.raises(ValueError, match=r"step_fraction must be in \[0, 1\], got -0.5"):
        CrossTokenNMSProcessor([[1], [2]], 4, 4, step_fraction=-0.5)
