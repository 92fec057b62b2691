"""Packed chunks: labels and positions against a slow reference, and cross-document masking that
reproduces each document's solo logits (Apertus student and the Llama-architecture teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from famex.data.packing import IGNORE_INDEX, PackedChunks, block_causal_mask, chunk_permutation, model_inputs
from famex.data.prepare import DataConfig, prepare
from famex.stage import read_meta


def slow_stream(data_dir, split):
    meta = read_meta(data_dir)
    tokens, doc_of = [], []
    d = 0
    for shard in meta["splits"][split]["shards"]:
        toks = np.load(data_dir / shard["tokens_file"]).tolist()
        pos = 0
        for n in np.load(data_dir / shard["docs_file"]).tolist():
            tokens += toks[pos: pos + n]
            doc_of += [d] * n
            d += 1
            pos += n
    return tokens, doc_of


def test_chunks_match_slow_reference(tiny_data):
    ds = PackedChunks(tiny_data, "train")
    T = ds.seq_len
    tokens, doc_of = slow_stream(tiny_data, "train")
    assert len(ds) == (len(tokens) - 1) // T
    for i in [0, 1, len(ds) // 2, len(ds) - 1]:
        c = ds[i]
        for t in range(T):
            g = i * T + t
            assert c["input_ids"][t] == tokens[g]
            same = doc_of[g + 1] == doc_of[g]
            assert c["labels"][t] == (tokens[g + 1] if same else IGNORE_INDEX)
            # position inside the document, restarting at the chunk start
            start = g
            while start > i * T and doc_of[start - 1] == doc_of[g]:
                start -= 1
            assert c["position_ids"][t] == g - start
            assert c["segment_ids"][t] == doc_of[g] - doc_of[i * T]


def test_mask_is_block_diagonal_causal():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = block_causal_mask(seg)[0, 0]
    for q in range(6):
        for k in range(6):
            assert m[q, k] == (k <= q and seg[0, q] == seg[0, k])


def test_permutation_is_seeded():
    assert np.array_equal(chunk_permutation(100, 3), chunk_permutation(100, 3))
    assert not np.array_equal(chunk_permutation(100, 3), chunk_permutation(100, 4))
    assert sorted(chunk_permutation(100, 3).tolist()) == list(range(100))


@pytest.fixture(scope="module")
def three_doc_chunk(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("three")
    docs = ["The cat sat on the mat and looked out of the window at the birds.",
            "Stock markets rose on Tuesday after the central bank kept rates unchanged.",
            "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants."]
    src = write_jsonl(root / "d.jsonl", docs)
    out = prepare(DataConfig(input=[str(src)], out=str(root / "data"), tokenizer=str(tokenizer_dir), seq_len=40,
                             val_fraction=0.0, workers=1))
    ds = PackedChunks(out, "train")
    chunk = ds[0]
    assert chunk["segment_ids"].unique().numel() == 3
    return chunk


def assert_packed_equals_solo(model, chunk, attn: str = "sdpa"):
    """Packed logits through ``attn`` (the masks `model_inputs` makes for it) equal each document's
    solo run through plain SDPA with no mask at all."""
    batch = {k: v[None] for k, v in chunk.items()}
    with torch.no_grad():
        model.set_attn_implementation(attn)
        try:
            packed = model(**model_inputs(batch, attn)).logits[0]
        finally:
            model.set_attn_implementation("sdpa")
        worst = 0.0
        for s in chunk["segment_ids"].unique():
            idx = (chunk["segment_ids"] == s).nonzero().squeeze(1)
            solo = model(input_ids=chunk["input_ids"][idx][None]).logits[0]
            worst = max(worst, (solo - packed[idx]).abs().max().item())
        unmasked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert worst <= 1e-4, worst
    # Without the mask later documents see earlier ones: the check above is not vacuous.
    assert (unmasked - packed).abs().max().item() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_cross_document_masking_apertus(three_doc_chunk, teacher, attn, eager_flex):
    from famex.models import build_student

    tok = teacher[1]
    student = build_student("tiny-apertus", len(tok), tok).eval()
    assert_packed_equals_solo(student, three_doc_chunk, attn)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_cross_document_masking_llama_teacher(three_doc_chunk, teacher, attn, eager_flex):
    assert_packed_equals_solo(teacher[0], three_doc_chunk, attn)


def test_flex_inputs_carry_a_block_mask_not_a_dense_one(three_doc_chunk):
    """The flex path hands attention a BlockMask (no [B,1,T,T] tensor); flash gets no mask."""
    from torch.nn.attention.flex_attention import BlockMask

    batch = {k: v[None] for k, v in three_doc_chunk.items()}
    flex = model_inputs(batch, "flex_attention")["attention_mask"]
    assert isinstance(flex, BlockMask)
    dense = block_causal_mask(batch["segment_ids"])[0, 0]
    T = dense.shape[-1]
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(flex.mask_mod(torch.tensor(0), torch.tensor(0), q, k), dense)
    assert "attention_mask" not in model_inputs(batch, "flash_attention_2")


def test_attn_option_resolves_per_device_and_refuses_what_cannot_run():
    from famex.errors import FamexError
    from famex.models import resolve_attn

    assert resolve_attn("auto", "cpu") == "sdpa"
    assert resolve_attn("auto", "cuda") == "flex_attention"  # the GPU default: a BlockMask, no T×T tensor
    assert resolve_attn("flex", "cpu") == "flex_attention"  # forward only (teacher logits, eval)
    with pytest.raises(FamexError, match="no backward pass on CPU"):
        resolve_attn("flex", "cpu", training=True)
    with pytest.raises(FamexError, match="unknown attention implementation"):
        resolve_attn("dense", "cpu")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(FamexError, match="flash-attn package"):
            resolve_attn("flash_attention_2", "cuda")
