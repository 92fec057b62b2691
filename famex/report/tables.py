"""The report's tables as pure functions: summary rows (and stage metrics) in, Markdown text out.

Also the small data selections the tables and the plots share: the quantization ablation grid
(paper Fig. 4), the weight-averaging pairs (Fig. 5), the front of each kind of model (Fig. 3),
and the KD-vs-CE-only twins of the training section.

Conventions: losses in nats/token, accuracies shown in percent (stored as fractions), sizes in
decimal units (1 MB = 10^6 bytes), "Δ val loss" = quantized val loss − val loss of the BF16 model
it was quantized from.

What this module does not do: read files, draw, or decide which sections the report has.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from famex.report.pareto import frontier

METHODS = ("rtn", "gptq", "qad")
METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "qad": "QAD", "none": "—"}
# When one variant was evaluated twice (the quantized model and its export), the table shows the
# quantized model: that is what the methods produced; the export's numbers are in the summary.
SOURCE_PREFERENCE = {"quantize": 0, "export": 1}


# ---------------------------------------------------------------- formatting


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_signed(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:+.{digits}f}"


def fmt_se(v: float | None, se: float | None, digits: int = 3, signed: bool = False) -> str:
    """``v ± se`` (``v`` alone where the s.e. is unknown)."""
    if v is None:
        return "–"
    text = fmt_signed(v, digits) if signed else fmt(v, digits)
    return text if se is None else f"{text} ± {se:.{digits}f}"


def fmt_diff(v: float | None, se: float | None, digits: int = 3) -> str:
    """A paired difference ± its s.e., marked *within noise* when smaller than `NOISE_SE` s.e."""
    from famex.eval.stats import NOISE_SE, within_noise

    text = fmt_se(v, se, digits, signed=True)
    if within_noise(v, se):
        return f"{text} (within noise)"
    if v is not None and se:
        return f"{text} ({abs(v) / se:.0f} s.e.)" if abs(v) >= NOISE_SE * se else text
    return text


def fmt_pct(fraction: float | None, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage."""
    return "–" if fraction is None else f"{100 * fraction:.{digits}f}%"


def fmt_percent(percent: float | None, digits: int = 1) -> str:
    """A value already in percent."""
    return "–" if percent is None else f"{percent:.{digits}f}%"


#: A recovery whose 95% interval (± 1.96 s.e.) is wider than this many points is marked as noise.
RECOVERY_NOISE_POINTS = 10.0


def fmt_recovery(percent: float | None, se: float | None) -> str:
    """Few-shot recovery ± its s.e. in points, marked *noise* when its 95% interval is wider than
    ± `RECOVERY_NOISE_POINTS` (too few items to tell methods apart)."""
    if percent is None:
        return "–"
    if se is None:
        return fmt_percent(percent)
    text = f"{percent:.1f}% ± {se:.1f}"
    return f"{text} (noise: 95% CI ± {1.96 * se:.0f} points)" if 1.96 * se > RECOVERY_NOISE_POINTS else text


def fmt_acc(fraction: float | None, se: float | None) -> str:
    """A few-shot accuracy (fraction) in percent ± its stderr in points."""
    if fraction is None:
        return "–"
    return fmt_pct(fraction) if se is None else f"{100 * fraction:.1f}% ± {100 * se:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_sci(v: float | None) -> str:
    """Scientific notation as the paper prints FLOPs (``1.4E22``)."""
    if v is None:
        return "–"
    return f"{v:.2E}".replace("E+", "E")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are strings already (``|`` escaped here)."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def method_label(method: str | None, norm_fusion: bool | None) -> str:
    name = METHOD_NAMES.get(str(method), str(method))
    return f"{name} + NF" if norm_fusion else name


def variant_label(row: dict[str, Any]) -> str:
    """Short name of a model variant: ``distill-m int4 GPTQ + NF``."""
    parts = [str(row.get("model"))]
    if row.get("format") not in (None, "bf16"):
        parts += [str(row["format"]), method_label(row.get("method"), row.get("norm_fusion"))]
    else:
        parts.append("bf16")
    if row.get("weight_averaging"):
        parts.append("+ WA")
    if row.get("source_stage") == "export":
        parts.append("[export]")
    return " ".join(parts)


def format_order(name: str) -> tuple[int, str]:
    """Formats by their bit width, then name (int2, int3, int4, nvfp4, int6, fp8)."""
    m = re.search(r"\d+", name or "")
    return (int(m.group()) if m else 99, name or "")


# ---------------------------------------------------------------- the models and their front


def summary_table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "kind", "obj.", "format", "method", "WA", "val loss", "Δ val loss", "few-shot avg",
               "recovery", "size", "bits/weight", "Pareto"]
    body = [[
        r["model"], r.get("kind") or "–", r.get("objective") or "–", r.get("format") or "–",
        method_label(r.get("method"), r.get("norm_fusion")), fmt(bool(r.get("weight_averaging"))),
        fmt_se(r.get("val_loss"), r.get("val_loss_se")), fmt_diff(r.get("val_loss_increase"), r.get("val_loss_increase_se")),
        fmt_acc(r.get("fewshot_avg"), r.get("fewshot_avg_stderr")),
        fmt_recovery(r.get("recovery"), r.get("recovery_se")), fmt_bytes(r.get("size_bytes")), fmt(r.get("bits_per_weight"), 2),
        {True: "**yes**", False: "no", None: "–"}[r.get("on_pareto")],
    ] for r in rows]
    return md_table(headers, body)


def front(rows: list[dict[str, Any]], cost_key: str, quality_key: str, higher_is_better: bool) -> list[dict[str, Any]]:
    """The rows on the front, by increasing cost."""
    idx = frontier([r.get(cost_key) for r in rows], [r.get(quality_key) for r in rows], higher_is_better)
    return [rows[i] for i in idx]


def frontier_table(points: list[dict[str, Any]], cost_key: str, quality_key: str) -> str:
    cost_name = {"size_bytes": "size", "flops_per_token": "FLOPs/token"}.get(cost_key, cost_key)
    quality_name = {"val_loss": "val loss", "fewshot_avg": "few-shot avg"}.get(quality_key, quality_key)
    body = []
    for i, r in enumerate(points, 1):
        cost = fmt_bytes(r.get(cost_key)) if cost_key == "size_bytes" else fmt_sci(r.get(cost_key))
        quality = fmt(r.get(quality_key)) if quality_key == "val_loss" else fmt_pct(r.get(quality_key))
        body.append([i, variant_label(r), cost, quality, fmt(r.get("bits_per_weight"), 2), r.get("path") or "–"])
    return md_table(["#", "variant", cost_name, quality_name, "bits/weight", "path"], body)


# ---------------------------------------------------------------- quantization ablation (Fig. 4)


def ablation_grid(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[tuple[str, bool], dict]]]:
    """Quantized rows without weight averaging as ``{(model, kind): {format: {(method, nf): row}}}``."""
    grid: dict[tuple[str, str], dict[str, dict[tuple[str, bool], dict]]] = {}
    for r in rows:
        if r.get("format") in (None, "bf16") or r.get("weight_averaging") or r.get("method") in (None, "none"):
            continue
        cell = grid.setdefault((str(r["model"]), str(r.get("kind"))), {}).setdefault(str(r["format"]), {})
        key = (str(r["method"]), bool(r.get("norm_fusion")))
        old = cell.get(key)
        if old is None or SOURCE_PREFERENCE.get(r.get("source_stage"), 2) < SOURCE_PREFERENCE.get(old.get("source_stage"), 2):
            cell[key] = r
    return grid


def _columns(cells: Iterable[dict[tuple[str, bool], dict]]) -> list[tuple[str, bool]]:
    present = {k for c in cells for k in c}
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(present, key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))


def best_variants(cells: dict[tuple[str, bool], dict], key: str, higher_is_better: bool) -> list[tuple[str, bool]]:
    """The (method, norm fusion) keys with the best value of ``key`` among one format's variants (all tied ones)."""
    scored = {k: r[key] for k, r in cells.items() if r.get(key) is not None}
    if not scored:
        return []
    best = (max if higher_is_better else min)(scored.values())
    return [k for k in _columns([cells]) if scored.get(k) == best]


def ablation_table(formats: dict[str, dict[tuple[str, bool], dict]]) -> str:
    """One model's ablation: a row per format, a column per method (± norm fusion).

    Cells show Δ val loss (lower is better) and, where few-shot accuracy was evaluated, recovery
    (higher is better). The best cells of each row (all of them when tied) are in bold: by Δ val loss where any
    cell has one, else by recovery.
    """
    cols = _columns(formats.values())
    body = []
    for fmt_name in sorted(formats, key=format_order):
        cells = formats[fmt_name]
        best = (best_variants(cells, "val_loss_increase", higher_is_better=False)
                or best_variants(cells, "recovery", higher_is_better=True))
        bits = [r["bits_per_weight"] for r in cells.values() if r.get("bits_per_weight") is not None]
        line = [fmt_name, fmt(sum(bits) / len(bits), 2) if bits else "–"]
        for col in cols:
            r = cells.get(col)
            if r is None:
                line.append("")
                continue
            parts = []
            if r.get("val_loss_increase") is not None:
                parts.append(fmt_se(r["val_loss_increase"], r.get("val_loss_increase_se"), signed=True))
            if r.get("recovery") is not None:
                parts.append(fmt_recovery(r["recovery"], r.get("recovery_se")))
            text = " / ".join(parts) or "–"
            line.append(f"**{text}**" if col in best else text)
        line.append((", ".join(method_label(*k) for k in best) or "–") + _margin(cells, best))
        body.append(line)
    return md_table(["format", "bits/weight", *(method_label(m, nf) for m, nf in cols), "best"], body)


def _margin(cells: dict[tuple[str, bool], dict], best: list) -> str:
    """How far the best cell is ahead of the next one by Δ val loss, paired over the same chunks."""
    from famex.eval.stats import paired_se

    ranked = sorted((r["val_loss_increase"], k) for k, r in cells.items() if r.get("val_loss_increase") is not None)
    if len(best) != 1 or len(ranked) < 2:
        return ""
    first, second = cells[ranked[0][1]], cells[ranked[1][1]]
    diff = second["val_loss_increase"] - first["val_loss_increase"]
    se = paired_se(second.get("eval_dir"), first.get("eval_dir"))
    return f" (next {method_label(*ranked[1][1])}: {fmt_diff(diff, se)})"


# ---------------------------------------------------------------- weight averaging (Fig. 5)


def weight_averaging_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(without, with) weight averaging for each model variant evaluated both ways."""
    def key(r: dict) -> tuple:
        return (r["model"], r.get("kind"), r.get("format"), r.get("method"), bool(r.get("norm_fusion")))

    without: dict[tuple, dict] = {}
    for r in rows:
        if not r.get("weight_averaging"):
            without.setdefault(key(r), r)
    pairs = [(without[key(r)], r) for r in rows if r.get("weight_averaging") and key(r) in without]
    return sorted(pairs, key=lambda p: (p[0]["model"], p[0]["format"] != "bf16", format_order(str(p[0]["format"])),
                                        str(p[0]["method"]), bool(p[0]["norm_fusion"])))


def gap_closed(without: dict, with_: dict) -> float | None:
    """Share of the quantization loss gap that weight averaging removes, in percent."""
    a, b = without.get("val_loss_increase"), with_.get("val_loss_increase")
    if a is None or b is None or a <= 0:
        return None
    return 100.0 * (a - b) / a


def weight_averaging_table(pairs: list[tuple[dict, dict]]) -> str:
    body = []
    for a, b in pairs:
        body.append([
            a["model"], a.get("format"), method_label(a.get("method"), a.get("norm_fusion")),
            fmt(a.get("val_loss")), fmt(b.get("val_loss")),
            fmt_signed(a.get("val_loss_increase")), fmt_signed(b.get("val_loss_increase")),
            fmt_percent(gap_closed(a, b)), fmt_pct(a.get("fewshot_avg")), fmt_pct(b.get("fewshot_avg")),
        ])
    return md_table(["model", "format", "method", "val loss", "val loss (WA)", "Δ val loss", "Δ val loss (WA)",
                     "gap closed by WA", "few-shot", "few-shot (WA)"], body)


# ---------------------------------------------------------------- training and the logit store


def training_table(runs: list[dict[str, Any]]) -> str:
    body = []
    for run in runs:
        m = run["metrics"]
        source = run.get("student")
        # a student given as a directory (or a post-training run's input model) is named by its last part
        body.append([run["name"], Path(str(source)).name if source else "–", (run.get("objective") or "–").upper(),
                     fmt(m.get("tokens")), fmt(m.get("params")), fmt(m.get("train_loss")),
                     fmt(m.get("val_loss")), fmt(m.get("val_kl"))])
    return md_table(["run", "student", "objective", "tokens", "params", "final train loss", "val loss", "val KL"], body)


def twins(runs: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(KD, CE-only) pairs of distill runs that train the same student, for the baseline comparison."""
    kd = [r for r in runs if r.get("objective") == "kd"]
    ce = [r for r in runs if r.get("objective") == "ce"]
    return [(a, b) for a in kd for b in ce if a.get("student") is not None and a.get("student") == b.get("student")]


def eval_of(run: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The BF16 evaluation row of a training run's output model, if the run tree evaluated it."""
    here = Path(run["path"]).resolve()
    for r in rows:
        if r.get("format") == "bf16" and r.get("path") and Path(str(r["path"])).resolve() == here:
            return r
    return None


def paired_comparison(a: dict[str, Any], b: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """val loss of run a, of run b, and a − b ± its paired s.e. (from their evaluations where both
    were evaluated on the same chunks; else the training runs' own final validation, without s.e.)."""
    from famex.eval.stats import paired_se

    ea, eb = eval_of(a, rows), eval_of(b, rows)
    if ea is not None and eb is not None and ea.get("val_loss") is not None and eb.get("val_loss") is not None:
        va, vb = ea["val_loss"], eb["val_loss"]
        se = paired_se(ea.get("eval_dir"), eb.get("eval_dir"))
        return [fmt_se(va, ea.get("val_loss_se")), fmt_se(vb, eb.get("val_loss_se")), fmt_diff(va - vb, se)]
    va, vb = a["metrics"].get("val_loss"), b["metrics"].get("val_loss")
    delta = va - vb if va is not None and vb is not None else None
    return [fmt(va), fmt(vb), fmt_signed(delta) + (" (no s.e.: not evaluated)" if delta is not None else "")]


def twins_table(pairs: list[tuple[dict, dict]], rows: list[dict[str, Any]] | None = None) -> str:
    body = []
    for a, b in pairs:
        va, vb, delta = paired_comparison(a, b, rows or [])
        body.append([Path(str(a.get("student"))).name, a["name"], va, b["name"], vb, delta])
    return md_table(["student", "distilled", "val loss", "CE-only", "val loss", "KD − CE"], body)


def init_pairs(runs: list[dict[str, Any]], prunes: dict[str, dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(teacher-initialised, random-init) pairs of distill runs with the same objective whose students
    are `famex prune` directories of the same shape (the same options but ``random_init``).
    ``prunes`` maps each prune stage's output directory to its config."""
    def shape(run: dict[str, Any]) -> tuple | None:
        cfg = prunes.get(str(Path(str(run.get("student"))).resolve()))
        if cfg is None:
            return None
        keep = {k: cfg.get(k) for k in ("teacher", "layers", "mlp", "kv_heads", "hidden")}
        return (repr(sorted(keep.items())), run.get("objective"), bool(cfg.get("random_init")))

    shapes = {r["name"]: shape(r) for r in runs}
    return [(a, b) for a in runs for b in runs
            if shapes[a["name"]] and shapes[b["name"]] and not shapes[a["name"]][2] and shapes[b["name"]][2]
            and shapes[a["name"]][:2] == shapes[b["name"]][:2]]


def init_table(pairs: list[tuple[dict, dict]], rows: list[dict[str, Any]]) -> str:
    body = []
    for a, b in pairs:
        va, vb, delta = paired_comparison(a, b, rows)
        body.append([(a.get("objective") or "–").upper(), fmt(a["metrics"].get("params")), a["name"], va, b["name"], vb, delta])
    return md_table(["objective", "params", "from the teacher", "val loss", "random init", "val loss", "teacher − random"], body)


def qad_recovery_rows(formats: dict[str, dict[tuple[str, bool], dict]]) -> list[list[str]]:
    """Per format where QAD ran: its Δ val loss against RTN's and GPTQ's (same norm fusion), and the
    fraction of each gap QAD recovered, ``(gap − gap_QAD) / gap``. A QAD model below its BF16 model
    is flagged: that is further training of an under-trained model, not recovered quantization error."""
    from famex.eval.stats import paired_se

    body = []
    for fmt_name in sorted(formats, key=format_order):
        cells = formats[fmt_name]
        for (method, nf), q in sorted(cells.items()):
            if method != "qad" or q.get("val_loss_increase") is None:
                continue
            line = [fmt_name, "yes" if nf else "no", fmt_se(q["val_loss_increase"], q.get("val_loss_increase_se"), signed=True)]
            for base in ("rtn", "gptq"):
                b = cells.get((base, nf))
                gap = b.get("val_loss_increase") if b else None
                if gap is None:
                    line += ["–", "–"]
                    continue
                se = paired_se(q.get("eval_dir"), b.get("eval_dir"))
                line.append(fmt_diff(q["val_loss_increase"] - gap, se))
                line.append(fmt_pct((gap - q["val_loss_increase"]) / gap) if gap > 0 else "– (no gap)")
            if q["val_loss_increase"] < 0:
                line[2] += " (below BF16: training, not recovery)"
            body.append(line)
    return body


def qad_recovery_table(formats: dict[str, dict[tuple[str, bool], dict]]) -> str:
    body = qad_recovery_rows(formats)
    if not body:
        return ""
    return md_table(["format", "NF", "QAD Δ val loss", "QAD − RTN", "RTN gap recovered", "QAD − GPTQ",
                     "GPTQ gap recovered"], body)


# ---------------------------------------------------------------- findings: the run's claims, each with its noise


def _compare(label: str, a: dict[str, Any], b: dict[str, Any], note: str = "") -> list[str]:
    """One findings row: val loss of evaluation rows a and b and a − b ± its s.e., paired over their chunks."""
    from famex.eval.stats import paired_se

    va, vb = a.get("val_loss"), b.get("val_loss")
    diff = va - vb if va is not None and vb is not None else None
    return [label, str(a.get("variant")), fmt_se(va, a.get("val_loss_se")), str(b.get("variant")),
            fmt_se(vb, b.get("val_loss_se")), fmt_diff(diff, paired_se(a.get("eval_dir"), b.get("eval_dir"))), note]


def findings_rows(rows: list[dict[str, Any]], runs: list[dict[str, Any]], prunes: dict[str, dict[str, Any]],
                  teacher: dict[str, Any] | None) -> list[list[str]]:
    """The comparisons a family run is made to show, by validation loss: each distilled student against the
    teacher, distillation against its CE-only twin, a teacher-initialised student against a random-init one,
    and at each format GPTQ against RTN and QAD against GPTQ (with the fraction of GPTQ's gap QAD recovered)."""
    body = []
    for run in runs:
        ev = eval_of(run, rows)
        if ev is not None and teacher is not None:
            body.append(_compare("student − teacher", ev, teacher))
    for name, pairs in (("KD − CE-only", twins(runs)), ("from the teacher − random init", init_pairs(runs, prunes))):
        for a, b in pairs:
            ea, eb = eval_of(a, rows), eval_of(b, rows)
            if ea is not None and eb is not None:
                body.append(_compare(name, ea, eb))
    for (model, kind), formats in sorted(ablation_grid(rows).items()):
        for fmt_name in sorted(formats, key=format_order):
            cells = formats[fmt_name]
            for nf in (False, True):
                nf_text = " + NF" if nf else ""
                rtn, gptq, qad = (cells.get((m, nf)) for m in METHODS)
                if gptq and rtn and gptq.get("val_loss") is not None and rtn.get("val_loss") is not None:
                    body.append(_compare(f"GPTQ − RTN{nf_text}, {model} {fmt_name}", gptq, rtn))
                if qad and gptq and qad.get("val_loss") is not None and gptq.get("val_loss") is not None:
                    gap, q_gap = gptq.get("val_loss_increase"), qad.get("val_loss_increase")
                    note = (f"recovers {fmt_pct((gap - q_gap) / gap)} of GPTQ's gap to BF16"
                            if gap is not None and q_gap is not None and gap > 0 else "")
                    if q_gap is not None and q_gap < 0:
                        note += " (below BF16: training, not recovery)"
                    body.append(_compare(f"QAD − GPTQ{nf_text}, {model} {fmt_name}", qad, gptq, note.strip()))
    return body


def findings_table(body: list[list[str]]) -> str:
    return md_table(["comparison", "A", "val loss", "B", "val loss", "A − B", "note"], body)


def recovery_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Instruct variants' few-shot recovery (% of their BF16 model's few-shot average), noise marked."""
    return [[str(r.get("variant")), fmt_acc(r.get("fewshot_avg"), r.get("fewshot_avg_stderr")),
             fmt_recovery(r.get("recovery"), r.get("recovery_se"))]
            for r in rows if r.get("kind") == "instruct" and r.get("recovery") is not None]


PAPER_BYTES_PER_ENTRY = 8  # the paper stores each top-k entry as fp32 probability + int32 index


def logits_table(stores: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    """One row per logit store: (name, config, metrics)."""
    body = []
    for name, cfg, m in stores:
        k = cfg.get("top_k")
        paper = k * PAPER_BYTES_PER_ENTRY if isinstance(k, int) else None
        bpt = m.get("bytes_per_token")
        body.append([
            name, cfg.get("split") or "–", fmt(k), cfg.get("encoding") or "–", fmt(m.get("tokens")),
            fmt(bpt, 1), fmt(paper), f"{paper / bpt:.1f}×" if paper and bpt else "–",
            fmt_pct(m.get("mass_covered"), 2), fmt_sci(m.get("kl_decoded_vs_exact")),
            fmt(m.get("tokens_per_s"), 0), fmt_bytes(m.get("bytes")),
        ])
    return md_table(["store", "split", "top-k", "encoding", "tokens", "bytes/token", "paper layout bytes/token",
                     "smaller by", "mass covered", "KL decoded vs exact", "tokens/s", "size"], body)
