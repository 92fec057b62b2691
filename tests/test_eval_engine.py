"""The packed log-likelihood loop equals one plain forward per (context, continuation) pair."""

from __future__ import annotations

import random

import pytest
import torch

from famex.eval.engine import _rows, continuation_logprobs


@pytest.fixture(scope="module", params=["llama", "apertus"])
def model(request):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from famex.models.presets import preset_config

    torch.manual_seed(0)
    if request.param == "llama":
        config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        config = preset_config("tiny-apertus", vocab_size=97)
    m = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # wide weights: the context matters to every prediction
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


def slow_reference(model, ctx, cont, max_length):
    """lm-eval's convention by hand: score ``(ctx + cont)[:-1]`` cut from the left, one row alone."""
    tokens = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits[-len(cont):], dim=-1)
    target = torch.tensor(cont)
    return logp[torch.arange(len(cont)), target].sum().item(), bool((logp.argmax(-1) == target).all())


def make_pairs(model, seed=0):
    """Questions with 2-5 choices of 1-4 tokens sharing a context, plus a greedy continuation."""
    rng = random.Random(seed)
    pairs = []
    for q in range(7):
        ctx = [rng.randrange(97) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(2, 5)):
            pairs.append((ctx, [rng.randrange(97) for _ in range(rng.randint(1, 4))]))
    # A continuation that is the model's own greedy choice, so "is greedy" is true at least once.
    ctx, cont = [5, 6, 7], []
    with torch.no_grad():
        for _ in range(3):
            cont.append(int(model(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    pairs.append((ctx, cont))
    pairs.append((ctx, cont[:1]))
    return pairs


@pytest.mark.parametrize("share,batch", [(True, 1), (True, 3), (False, 4)])
def test_equals_one_forward_per_pair(model, share, batch):
    pairs = make_pairs(model)
    got = continuation_logprobs(model, pairs, max_length=256, batch_size=batch, share_context=share)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        ref_ll, ref_greedy = slow_reference(model, ctx, cont, 256)
        assert ll == pytest.approx(ref_ll, abs=2e-5)
        assert greedy == ref_greedy
    assert got[-2][1] and got[-1][1]
    lls = [ll for ll, _ in got]
    assert max(lls) - min(lls) > 1.0  # the comparison is not between near-equal numbers


def test_long_contexts_are_cut_from_the_left_like_lm_eval(model):
    """Rows that would exceed max_length fall back to one row per choice, cut from the left."""
    rng = random.Random(1)
    ctx = [rng.randrange(97) for _ in range(40)]
    pairs = [(ctx, [1, 2, 3]), (ctx, [4, 5]), (ctx, [6]), ([9] * 10, [1, 2])]
    got = continuation_logprobs(model, pairs, max_length=24, batch_size=2)
    for (c, x), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(slow_reference(model, c, x, 24)[0], abs=2e-5)


def test_packing_plan():
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2, 3], [7, 8, 9]), ([1, 2], [3])]
    rows = _rows(pairs, max_length=100, share=True)
    assert [(r.prefix, [i for i, _ in r.conts], r.length, r.blocks) for r in rows] == [
        ([1, 2, 3], [0, 1, 2], 3 + 1 + 0 + 2, 2), ([1, 2], [3], 2, 0),
    ]
    # Without 4-D masks a row may hold at most one block: plain causal attention covers it.
    rows = _rows([([1, 2], [3]), ([1, 2], [4]), ([1, 2], [5, 6])], max_length=100, share=False)
    assert [[i for i, _ in r.conts] for r in rows] == [[0, 1, 2]]
    rows = _rows([([1, 2], [3, 4]), ([1, 2], [5, 6]), ([1, 2], [7])], max_length=100, share=False)
    assert [[i for i, _ in r.conts] for r in rows] == [[0], [1], [2]]


def test_eager_attention_is_not_packed():
    """Eager attention does not read boolean 4-D masks as SDPA does: the default must not pack there."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    pairs = make_pairs(m)
    got = continuation_logprobs(m, pairs, max_length=256, batch_size=3)
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(slow_reference(m, ctx, cont, 256)[0], abs=2e-5)
