"""The cost model reproduces Table 2 of the paper and says what its own numbers give."""

from __future__ import annotations

import json
import math

import pytest

from famex.errors import FamexError
from famex.eval.cost import (
    PAPER_CONVENTION, apertus_v11_cost, family_cost, format_cost_table, gptq_cost, stage_cost, student_tokens,
)


@pytest.fixture(scope="module")
def report():
    return apertus_v11_cost()


def printed(x: float, exponent: int, decimals: int = 1) -> float:
    """``x`` as the paper prints it: mantissa at a fixed exponent, ``decimals`` after the point."""
    return round(x / 10 ** exponent, decimals)


# Table 2 as printed: (figure, exponent it is printed at).
TABLE2 = {
    "logits": (1.4, 22), "apertus-v1.1-0.5b": (0.2, 22), "apertus-v1.1-1.5b": (0.8, 22),
    "apertus-v1.1-4b": (2.0, 22), "apertus-8b pre-training": (3.7, 23),
}


def test_table2_reproduced(report):
    rows = {s["name"]: s for s in report["stages"]}
    rows[report["reference"]["name"]] = report["reference"]
    for name, (figure, exponent) in TABLE2.items():
        ours = rows[name]["flops"]
        paper = figure * 10 ** exponent
        assert rows[name]["paper_flops"] == pytest.approx(paper)
        assert printed(ours, exponent) == figure or abs(ours / paper - 1) <= 0.05, (name, ours, paper)


def test_table2_inputs_and_convention(report):
    rows = {s["name"]: s for s in report["stages"]}
    # Parameter counts: all parameters (embeddings included, tied ones once).
    assert rows["apertus-v1.1-0.5b"]["params"] == 438_349_352
    assert round(rows["apertus-v1.1-1.5b"]["params"] / 1e9, 3) == 1.510
    assert round(rows["apertus-v1.1-4b"]["params"] / 1e9, 3) == 3.825
    assert round(rows["logits"]["params"] / 1e9, 3) == 8.053
    # Tokens: iterations x global batch x 4096; the store covers the same 1.68T tokens once.
    assert student_tokens("apertus-v1.1-0.5b") == 800_000 * 512 * 4096
    assert student_tokens("apertus-v1.1-4b") == 400_000 * 1024 * 4096
    assert rows["logits"]["tokens"] == 800_000 * 512 * 4096
    assert report["reference"]["tokens"] == 15 * 10**12
    # N·D forward, 3·N·D training; the usual 2·N·D / 6·N·D beside them.
    n, d = rows["logits"]["params"], rows["logits"]["tokens"]
    assert rows["logits"]["flops"] == n * d and rows["logits"]["flops_6nd"] == 2 * n * d
    n, d = rows["apertus-v1.1-1.5b"]["params"], rows["apertus-v1.1-1.5b"]["tokens"]
    assert rows["apertus-v1.1-1.5b"]["flops"] == 3 * n * d and rows["apertus-v1.1-1.5b"]["flops_6nd"] == 6 * n * d
    assert report["convention"] == PAPER_CONVENTION and "6·N·D" in report["convention_6nd"]


def test_family_totals_against_pretraining(report):
    subs = {s["name"]: s for s in report["subtotals"]}
    small = next(s for k, s in subs.items() if "whole family" in k)
    all3 = subs["logits + 0.5B + 1.5B + 4B"]
    # The paper's 2.4E22 is logits + 0.5B + 1.5B (1.4 + 0.2 + 0.8); ours prints 2.3E22.
    assert small["paper_flops"] == pytest.approx(2.4e22) and printed(small["flops"], 22) == 2.3
    # With the 4B: the paper's figures give 4.4E22 = 11.9% of 3.7E23; ours 4.26E22 = 11.7% of 3.62E23.
    assert all3["paper_flops"] == pytest.approx(4.4e22)
    assert round(100 * all3["paper_flops"] / report["reference"]["paper_flops"], 1) == 11.9
    assert printed(all3["flops"], 22, 2) == 4.26
    assert round(100 * all3["fraction_of_reference"], 1) == 11.7
    # Quantization is a rounding error next to distillation.
    total = report["total"]["flops"]
    assert total > all3["flops"] and (total - all3["flops"]) / total < 1e-3


def test_quantization_stages(report):
    rows = {s["name"]: s for s in report["stages"]}
    qad = rows["qad base apertus-v1.1-4b"]
    assert qad["tokens"] == 130_000_000 and qad["count"] == 2 and qad["flops"] == 3 * qad["params"] * qad["tokens"]
    assert rows["qad instruct apertus-v1.1-0.5b"]["tokens"] == 60_000_000
    gptq = rows["gptq apertus-v1.1-4b"]
    assert gptq["kind"] == "gptq" and gptq["flops"] > gptq["params"] * gptq["tokens"]


def test_gptq_cost_counted_by_hand():
    info = {"layers": 2, "d_model": 4, "mlp": 8, "heads": 2, "kv_heads": 1, "model_type": "apertus", "params_total": 1000}
    tokens = 10
    # Per layer, head_dim 2: q 4x4, k 2x4, v 2x4, o 4x4, up 8x4, down 4x8 (out x in).
    # Hessians: inputs of width 4 (attn in), 4 (attn out), 4 (mlp in), 8 (mlp act).
    hessian = 2 * (16 + 16 + 16 + 64) * tokens
    solve = 2 * (4 * 16 + 2 * 16 + 2 * 16 + 4 * 16 + 8 * 16 + 4 * 64 + (64 + 64 + 64 + 512))
    row = gptq_cost("g", info, tokens)
    assert row["flops"] == 1000 * tokens + hessian + solve
    assert row["flops_6nd"] == 2 * row["flops"]
    gated = gptq_cost("g", {**info, "model_type": "llama"}, tokens)
    assert gated["flops"] - row["flops"] == 2 * 8 * 16  # gate_proj shares up_proj's Hessian


def test_json_shape_and_markdown(report):
    text = json.dumps(report)
    back = json.loads(text)
    assert set(back) >= {"convention", "stages", "total", "reference", "subtotals"}
    for s in back["stages"]:
        assert set(s) >= {"name", "tokens", "params", "flops", "flops_6nd"}
    table = format_cost_table(report)
    assert table.startswith("| stage |")
    assert "| logits | forward | 8.05B | 1.68T | 1.35E22 | 2.70E22 | 1.40E22 | 0.965 |" in table
    assert "11.7% of apertus-8b pre-training (paper's figures: 4.40E22 = 11.9%)" in table
    assert "qad base apertus-v1.1-4b (×2)" in table
    plain = format_cost_table(report["stages"][:2])
    assert plain.count("\n") == 4 and "Convention" not in plain


def test_bad_stages():
    with pytest.raises(FamexError, match="unknown kind 'backward'"):
        stage_cost("x", 10, 10, "backward")
    with pytest.raises(FamexError, match="must be >= 0"):
        stage_cost("x", 10, -1)
    a = stage_cost("a", 1, 1)
    with pytest.raises(FamexError, match="repeat"):
        family_cost([a, a])
    with pytest.raises(FamexError, match="unknown stages"):
        family_cost([a], subtotals={"s": ["b"]})
    with pytest.raises(FamexError, match="no paper iterations"):
        student_tokens("tiny-apertus")
    out = family_cost([a, stage_cost("b", 2, 3, "train")])
    assert out["total"]["flops"] == 1 + 18 and out["total"]["fraction_of_reference"] is None
    assert not math.isnan(out["total"]["flops_6nd"])
