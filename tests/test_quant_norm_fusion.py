"""Norm fusion leaves fp32 logits unchanged and equalizes the input-column norms, for Apertus and Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import ApertusConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig

from famex.errors import FamexError
from famex.quant.norm_fusion import NORM_FUSION_TABLE, equalizing_scales, fuse_norms


def _tiny(arch: str):
    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
    config = {"apertus": ApertusConfig, "llama": LlamaConfig}[arch](**kw)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:  # non-trivial norm weights, or the check could not fail
                p.copy_(torch.rand_like(p) * 2 + 0.1)
            elif p.ndim == 2:
                p.mul_(torch.rand(p.shape[1]) * 4 + 0.05)  # very unequal input columns
    return model


@pytest.mark.parametrize("arch", ["apertus", "llama"])
def test_fusion_keeps_logits_and_equalizes_columns(arch):
    model = _tiny(arch)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    norms_before = [p.clone() for n, p in model.named_parameters() if "layernorm" in n]
    assert fuse_norms(model) == 2 * 2
    with torch.no_grad():
        after = model(input_ids=ids).logits
    rel = (after - before).abs().max() / before.abs().max()
    assert rel <= 1e-5, float(rel)
    norms_after = [p for n, p in model.named_parameters() if "layernorm" in n]
    assert all(not torch.allclose(a, b) for a, b in zip(norms_after, norms_before))
    for block in model.model.layers:
        for _, paths in NORM_FUSION_TABLE[arch]:
            w = torch.cat([block.get_submodule(p).weight.detach() for p in paths])
            col = w.norm(dim=0)
            torch.testing.assert_close(col, torch.full_like(col, float(col.mean())), rtol=1e-5, atol=0)
        # never across up -> down: down_proj's input columns are not touched
        down = block.mlp.down_proj.weight.detach().norm(dim=0)
        assert down.std() / down.mean() > 0.1


def test_equalizing_scales_formula():
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    a[:, 2] = b[:, 2] = 0.0
    s = equalizing_scales([a, b])
    norms = torch.cat([a, b]).norm(dim=0)
    alive = norms > 0
    target = (norms[alive] ** 2).mean().sqrt()
    torch.testing.assert_close(s[alive], target / norms[alive])
    assert s[2] == 1.0
    torch.testing.assert_close(torch.cat([a, b]).mul(s).norm(), torch.cat([a, b]).norm())  # Frobenius norm kept


def test_unknown_architecture_is_refused():
    config = MistralConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    model.config.model_type = "gpt_unknown"
    with pytest.raises(FamexError, match="norm fusion is not defined"):
        fuse_norms(model)
