"""Compute cost of a family expansion in FLOPs, stage by stage (the paper's Table 2).

Two conventions side by side, always labelled:
- the paper's: N·D FLOPs per forward token and 3·N·D per training token, N = all parameters
  including embeddings (multiply–accumulates counted once); Table 2's figures match it;
- the usual one (Kaplan et al.): 2·N·D per forward token, 6·N·D per training token. The JSON key
  is ``flops_6nd`` for both kinds of stage (for a forward-only stage it holds 2·N·D).

Everything here is arithmetic on parameter and token counts (no model is built, nothing is
read); `apertus_v11_cost` fills in the paper's configuration, with parameter counts from
`famex.models.model_info` (meta device) and token counts from the presets' iterations × global
batch × 4096. What this module does not do: read recipes or run directories (the ``famex cost``
command does that), or time anything.

What the paper's printed figures imply (each printed to one significant decimal):
- logits 1.4E22 = N·D with N = 8.05B → D ∈ [1.68T, 1.80T): one teacher forward over the
  training set, which is the 1.68T tokens every student reads (800k × 512 × 4096, "1.7T");
- students 0.2 / 0.8 / 2.0 E22 = 3·N·D over those 1.68T tokens (4B: 1.93E22, 3.8% under 2.0);
- Apertus-8B 3.7E23 = 3·N·D over 15T tokens gives 3.62E23 (2.1% under; 3.7 needs D ≈ 15.3T);
- "2.4E22 for the whole family" = logits + 0.5B + 1.5B (1.4 + 0.2 + 0.8) only; with the 4B it
  is 4.4E22 = 11.9% of 3.7E23 (the "<12%" of the text). Our unrounded figures: 2.33E22 and
  4.26E22 = 11.7% of 3.62E23.
"""

from __future__ import annotations

from typing import Any, Iterable

from famex.errors import FamexError

PAPER_CONVENTION = (
    "paper (Table 2): N·D FLOPs per forward token, 3·N·D per training token, "
    "N = all parameters incl. embeddings, D = tokens (multiply-accumulates counted once)"
)
USUAL_CONVENTION = "usual: 2·N·D FLOPs per forward token, 6·N·D per training token (column flops_6nd)"

KINDS = {"forward": (1, 2), "train": (3, 6)}
"""FLOPs per parameter per token: (paper's convention, usual convention)."""

SEQ_LEN = 4096
"""The paper's training sequence length (tokens per sequence of a global batch)."""

PRETRAIN_TOKENS_8B = 15_000_000_000_000
"""Apertus-8B pre-training tokens (15T)."""

QAD_TOKENS = {"base": 130_000_000, "instruct": 60_000_000}
"""The paper's QAD budgets: ≈130M pre-training tokens (base), ≈60M SFT tokens (instruct)."""

GPTQ_CALIBRATION_TOKENS = 128 * 2048
"""128 sequences of 2048 tokens, GPTQ's customary calibration set (the paper gives no figure)."""

PAPER_TABLE2 = {
    "logits": 1.4e22,
    "apertus-v1.1-0.5b": 0.2e22,
    "apertus-v1.1-1.5b": 0.8e22,
    "apertus-v1.1-4b": 2.0e22,
    "apertus-8b pre-training": 3.7e23,
}
"""Table 2 of the paper as printed (FLOPs)."""

PAPER_FAMILY_TOTAL = 2.4e22
"""The text's "2.4E22 for the whole family" (= logits + 0.5B + 1.5B)."""


def stage_cost(name: str, params: int, tokens: int, kind: str = "forward", paper_flops: float | None = None) -> dict[str, Any]:
    """FLOPs of one stage: ``params`` (all of them) applied to ``tokens`` forward or in training."""
    if kind not in KINDS:
        raise FamexError(f"stage {name!r}: unknown kind {kind!r}; use 'forward' (inference, logits) or 'train'")
    if params < 0 or tokens < 0:
        raise FamexError(f"stage {name!r}: parameters ({params}) and tokens ({tokens}) must be >= 0")
    paper, usual = KINDS[kind]
    row: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "tokens": int(tokens),
        "params": int(params),
        "flops": float(paper * params * tokens),
        "flops_6nd": float(usual * params * tokens),
    }
    if paper_flops is not None:
        row["paper_flops"] = float(paper_flops)
    return row


def linear_shapes(info: dict[str, Any]) -> list[tuple[int, int, str]]:
    """``(out, in, input)`` of the linear layers of one decoder layer, from `model_info` fields.

    ``input`` names the activation a layer reads; layers reading the same one share a GPTQ
    Hessian (q/k/v; gate/up). Apertus' MLP is ``up → xIELU → down``; other types are taken
    to be Llama-style gated. The head size is taken as d_model / heads.
    """
    d, mlp, heads, kv = info["d_model"], info["mlp"], info["heads"], info["kv_heads"]
    head_dim = d // heads
    shapes = [
        (heads * head_dim, d, "attn_in"), (kv * head_dim, d, "attn_in"), (kv * head_dim, d, "attn_in"),
        (d, heads * head_dim, "attn_out"),
        (mlp, d, "mlp_in"), (d, mlp, "mlp_act"),
    ]
    if info.get("model_type") != "apertus":
        shapes.append((mlp, d, "mlp_in"))  # gate_proj
    return shapes


def gptq_cost(name: str, info: dict[str, Any], tokens: int = GPTQ_CALIBRATION_TOKENS) -> dict[str, Any]:
    """GPTQ of one model: calibration forward + Hessians + the column-by-column solve.

    Counted in multiply-accumulates like the paper: N·D for the forward over the calibration
    tokens, ``in²·D`` per distinct layer input for the Hessian X^T X, ``out·in²`` per linear layer
    for the error-propagating updates and ``in³`` per Hessian for its Cholesky factorisation.
    For a 4B model on 262k tokens the Hessians cost about as much as the forward (the MLP down
    projection's input is 16k wide). An estimate for comparison, not a measurement.
    """
    shapes = linear_shapes(info)
    layers = info["layers"]
    inputs = {inp: n_in for _, n_in, inp in shapes}
    hessian = layers * sum(n_in * n_in for n_in in inputs.values()) * tokens
    solve = layers * (sum(n_out * n_in * n_in for n_out, n_in, _ in shapes) + sum(n_in ** 3 for n_in in inputs.values()))
    row = stage_cost(name, info["params_total"], tokens, "forward")
    row["flops"] += float(hessian + solve)
    row["flops_6nd"] += float(2 * (hessian + solve))
    row["kind"] = "gptq"
    return row


def _total(stages: Iterable[dict[str, Any]]) -> dict[str, float]:
    stages = list(stages)
    return {
        "flops": sum(s["flops"] * s.get("count", 1) for s in stages),
        "flops_6nd": sum(s["flops_6nd"] * s.get("count", 1) for s in stages),
    }


def family_cost(
    stages: list[dict[str, Any]],
    reference: dict[str, Any] | None = None,
    subtotals: dict[str, list[str]] | None = None,
    paper_subtotals: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The cost report: stages, their total, named subtotals, and each against ``reference``.

    ``stages`` are `stage_cost` rows (a row may carry ``count``: the stage runs that many times,
    e.g. QAD once per format). ``reference`` (e.g. the teacher's own pre-training) is reported
    beside the family, not added to it. ``subtotals`` name sums over stage names.
    """
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise FamexError(f"stage names repeat in the cost table: {names}; give each stage its own name")
    by_name = {s["name"]: s for s in stages}
    ref_flops = reference["flops"] if reference else None

    def share(flops: float) -> float | None:
        return flops / ref_flops if ref_flops else None

    total = _total(stages)
    out: dict[str, Any] = {
        "convention": PAPER_CONVENTION,
        "convention_6nd": USUAL_CONVENTION,
        "stages": stages,
        "total": {**total, "fraction_of_reference": share(total["flops"])},
        "reference": reference,
        "subtotals": [],
    }
    for label, members in (subtotals or {}).items():
        missing = [m for m in members if m not in by_name]
        if missing:
            raise FamexError(f"subtotal {label!r} names unknown stages {missing}; stages are {names}")
        sub = _total(by_name[m] for m in members)
        entry = {"name": label, "stages": members, **sub, "fraction_of_reference": share(sub["flops"])}
        if paper_subtotals and label in paper_subtotals:
            entry["paper_flops"] = paper_subtotals[label]
        out["subtotals"].append(entry)
    return out


def student_tokens(preset_name: str, seq_len: int = SEQ_LEN) -> int:
    """Training tokens of a paper student: iterations × global batch × sequence length."""
    from famex.models.presets import get_preset

    p = get_preset(preset_name)
    if p.iters is None or p.global_batch is None:
        raise FamexError(f"preset {preset_name!r} has no paper iterations/batch; give its token count explicitly")
    return p.iters * p.global_batch * seq_len


def apertus_v11_cost(
    logit_tokens: int | None = None,
    gptq_tokens: int = GPTQ_CALIBRATION_TOKENS,
    qad_formats: dict[str, int] | None = None,
    vocab_size: int = 131072,
) -> dict[str, Any]:
    """The paper's configuration: logits, the three students, GPTQ and QAD, against Apertus-8B.

    ``logit_tokens`` defaults to the students' token budget (the store is read once per student,
    one epoch). ``qad_formats`` counts QAD runs per student and kind, default base: FP8 + NVFP4
    (2), instruct: INT3 + INT4 + INT6 (3), the released formats.
    """
    from famex.models import model_info

    students = ["apertus-v1.1-0.5b", "apertus-v1.1-1.5b", "apertus-v1.1-4b"]
    teacher = model_info("apertus-8b", vocab_size=vocab_size)
    infos = {s: model_info(s, vocab_size=vocab_size) for s in students}
    tokens = {s: student_tokens(s) for s in students}
    logit_tokens = logit_tokens if logit_tokens is not None else max(tokens.values())
    qad_formats = qad_formats or {"base": 2, "instruct": 3}

    stages = [stage_cost("logits", teacher["params_total"], logit_tokens, "forward", PAPER_TABLE2["logits"])]
    for s in students:
        stages.append(stage_cost(s, infos[s]["params_total"], tokens[s], "train", PAPER_TABLE2[s]))
    for s in students:
        stages.append(gptq_cost(f"gptq {s}", infos[s], gptq_tokens))
        for kind, count in qad_formats.items():
            row = stage_cost(f"qad {kind} {s}", infos[s]["params_total"], QAD_TOKENS[kind], "train")
            row["count"] = count
            stages.append(row)
    reference = stage_cost("apertus-8b pre-training", teacher["params_total"], PRETRAIN_TOKENS_8B, "train",
                           PAPER_TABLE2["apertus-8b pre-training"])
    paper_logits_small = PAPER_TABLE2["logits"] + PAPER_TABLE2[students[0]] + PAPER_TABLE2[students[1]]
    subtotals = {
        "logits + 0.5B + 1.5B (the paper's \"whole family\")": ["logits", students[0], students[1]],
        "logits + 0.5B + 1.5B + 4B": ["logits", *students],
        "all stages (incl. GPTQ, QAD)": [s["name"] for s in stages],
    }
    paper_sub = {
        list(subtotals)[0]: PAPER_FAMILY_TOTAL,
        list(subtotals)[1]: paper_logits_small + PAPER_TABLE2[students[2]],
    }
    return family_cost(stages, reference=reference, subtotals=subtotals, paper_subtotals=paper_sub)


# ---------------------------------------------------------------- formatting


def _si(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:g}{unit}"


def _e(x: float | None) -> str:
    return "" if x is None else f"{x:.2E}".replace("E+", "E")


def format_cost_table(rows: list[dict[str, Any]] | dict[str, Any]) -> str:
    """Markdown table of stage rows, or of a whole `family_cost` report (with totals and shares)."""
    report = rows if isinstance(rows, dict) else None
    stages = report["stages"] if report else rows
    lines = [
        "| stage | kind | params | tokens | FLOPs (N·D / 3·N·D) | FLOPs (2·N·D / 6·N·D) | paper | ours / paper |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def line(name, kind, params, tokens, flops, flops_6nd, paper):
        ratio = f"{flops / paper:.3f}" if paper else ""
        lines.append(f"| {name} | {kind} | {params} | {tokens} | {_e(flops)} | {_e(flops_6nd)} | {_e(paper)} | {ratio} |")

    for s in stages:
        count = s.get("count", 1)
        name = s["name"] + (f" (×{count})" if count != 1 else "")
        line(name, s["kind"], _si(s["params"]), _si(s["tokens"]), s["flops"] * count, s["flops_6nd"] * count,
             s.get("paper_flops"))
    if report is None:
        return "\n".join(lines) + "\n"
    ref = report.get("reference")
    for sub in report["subtotals"]:
        line(f"**{sub['name']}**", "sum", "", "", sub["flops"], sub["flops_6nd"], sub.get("paper_flops"))
    if ref:
        line(f"*{ref['name']}* (reference)", ref["kind"], _si(ref["params"]), _si(ref["tokens"]), ref["flops"],
             ref["flops_6nd"], ref.get("paper_flops"))
    text = "\n".join(lines) + "\n\n" + f"Convention: {report['convention']}; {report['convention_6nd']}.\n"
    if ref:
        for sub in report["subtotals"]:
            text += f"- {sub['name']}: {_e(sub['flops'])} = {100 * sub['fraction_of_reference']:.1f}% of {ref['name']}"
            if sub.get("paper_flops") and ref.get("paper_flops"):
                text += f" (paper's figures: {_e(sub['paper_flops'])} = {100 * sub['paper_flops'] / ref['paper_flops']:.1f}%)"
            text += "\n"
    return text
