"""The cost document: the FLOPs of every stage of a recipe (planned) or of a run (done).

`famex cost` (`famex.eval.costcli`) prints it, `famex run --dry-run` prints it under the plan and
the report renders it; this module imports neither of them.

From a **recipe** (a `famex.run.recipe.Recipe`, loaded by the caller) and nothing else:
- the teacher's size from its config.json (or GGUF) when the path exists, else from
  ``[teacher] preset`` (e.g. ``"apertus-8b"``) or ``--teacher-preset``; nothing is downloaded;
- token counts from the prepared data directory when it exists (its meta.json), else from
  ``[data] max_tokens`` split by ``val_fraction``; a store covers whole chunks of ``seq_len``;
- logits = one teacher forward over the split's tokens (N·D); distill = 3·N·(iters × global
  batch × seq_len), iterations and batch from the student's config or its paper preset, N from
  `famex.models.model_info(preset, vocab_size)`; sft / dpo / qad = 3·N per training token (dpo
  adds the frozen reference's forward); GPTQ = `famex.eval.cost.gptq_cost` over its calibration
  tokens; RTN, export, eval and report cost nothing worth counting (listed as not costed);
- the teacher's own pre-training (``[teacher] pretraining_tokens``) as the reference.

From a **run directory** (``runs/<name>``): the same rows from what the stages recorded (token
counts and parameter counts in each metrics.json, quantization.json for GPTQ / QAD), and the
reference when the run directory holds a copy of its recipe (``recipe.toml``).

Both convention columns are always there (`famex.eval.cost`: N·D / 3·N·D as in the paper's Table
2, 2·N·D / 6·N·D beside); the paper's own figures stand beside ours for the rows the paper has
(the Apertus-v1.1 students, the Apertus-8B teacher's logits and pre-training).

``store`` in the document is the logit store's size: bytes/token × tokens, measured (a finished
store's metrics.json) or estimated (`store_bytes_per_token`).

What this module does not do: read recipe files or parse options (`famex.eval.costcli`), time
anything, or count evaluation forwards and the distillation trainer's periodic validation (small
next to training; not in the paper's table either).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from famex.errors import FamexError
from famex.eval.cost import (
    GPTQ_CALIBRATION_TOKENS, PAPER_FAMILY_TOTAL, PAPER_TABLE2, PRETRAIN_TOKENS_8B, family_cost, format_cost_table,
    gptq_cost, stage_cost,
)
from famex.utils import read_json

__all__ = ["recipe_cost", "run_cost", "store_bytes_per_token", "format_document", "model_info_cached"]

PAPER_TEACHER = "apertus-8b"
"""The preset whose logits and pre-training rows carry the paper's figures."""

COMPACT_BYTES_PER_TOKEN = {64: 86.3, 160: 146.3, 256: 175.7}
"""Measured compact-store bytes/token by top-k at the encoder defaults (docs/store-format.md: default teacher,
16,896 demo-corpus tokens in one shard; a full 131,072-token shard of a longer stretch of that corpus took 182.2 at k=256)."""

PAPER_BYTES_PER_ENTRY = 8
"""The paper's layout: fp32 probability + int32 id per top-k entry (before gzip; ≈1.5 KB/token after at k=256)."""

PIPELINE = ("data", "logits", "distill", "average", "sft", "dpo", "quantize", "export", "eval", "report")
"""Stage order of the table for a run directory (a recipe's plan has its own order)."""

QAD_TOKENS_DEFAULT = 100_000_000
"""`famex quantize --method qad`'s default token budget (the paper's ≈100M)."""

NOT_COSTED = {"data": "tokenizing", "prune": "one calibration forward of the teacher (small)", "export": "writing files", "eval": "evaluation forwards (small)",
              "report": "plots and tables", "average": "averaging checkpoints"}


def format_document(doc: dict[str, Any]) -> str:
    """The cost table (Markdown), the logit store's size and what was not costed."""
    text = format_cost_table(doc)
    store = doc.get("store")
    if store:
        text += (f"\nLogit store: {store['tokens']:,} tokens × {store['bytes_per_token']:.0f} bytes/token = "
                 f"{_bytes(store['bytes'])} ({store['source']}).\n")
    if doc.get("not_costed"):
        by_reason: dict[str, list[str]] = {}
        for name, why in doc["not_costed"]:
            by_reason.setdefault(why, []).append(name)
        text += "Not costed: " + "; ".join(
            f"{why}: {', '.join(names) if len(names) <= 3 else f'{len(names)} stages ({names[0]}, …)'}"
            for why, names in by_reason.items()) + ".\n"
    return text


def _bytes(n: float) -> str:
    for scale, unit in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- shared pieces


def store_bytes_per_token(top_k: int, encoding: str = "compact") -> float:
    """Estimated logit-store bytes per token: compact interpolated between measured top-k points, paper 8·k."""
    if encoding == "paper":
        return float(PAPER_BYTES_PER_ENTRY * top_k)
    ks = sorted(COMPACT_BYTES_PER_TOKEN)
    if top_k <= ks[0]:
        return COMPACT_BYTES_PER_TOKEN[ks[0]] * top_k / ks[0]
    for lo, hi in zip(ks, ks[1:]):
        if top_k <= hi:
            a, b = COMPACT_BYTES_PER_TOKEN[lo], COMPACT_BYTES_PER_TOKEN[hi]
            return a + (b - a) * (top_k - lo) / (hi - lo)
    lo, hi = ks[-2], ks[-1]
    slope = (COMPACT_BYTES_PER_TOKEN[hi] - COMPACT_BYTES_PER_TOKEN[lo]) / (hi - lo)
    return COMPACT_BYTES_PER_TOKEN[hi] + slope * (top_k - hi)


def model_info_cached(spec: str, vocab_size: int | None = None) -> dict[str, Any]:
    """`famex.models.model_info` of a preset (at ``vocab_size``) or a model; cached: a GGUF header takes seconds."""
    return dict(_cached_info(str(spec), vocab_size))


@functools.lru_cache(maxsize=64)
def _cached_info(spec: str, vocab_size: int | None) -> dict[str, Any]:
    from famex.models import PRESETS, model_info

    if spec in PRESETS:
        return model_info(spec, vocab_size=vocab_size)
    return model_info(spec)


def _teacher(spec: str, preset: str | None, where: str) -> tuple[dict[str, Any], str | None]:
    """The teacher's model_info and the preset it was sized by (None when read from its own files)."""
    from famex.models import PRESETS

    here = spec == "default" or Path(spec).exists()
    if here:
        try:
            return model_info_cached(spec), None
        except (OSError, ValueError) as e:
            if not preset:
                raise FamexError(f"{where}: could not read the teacher {spec}'s config ({e})") from None
    if not preset:
        raise FamexError(
            f"{where}: the teacher {spec} is not here, so its size is unknown — add `preset = \"apertus-8b\"` "
            "(or another famex preset, famex info --list) under [teacher], or pass --teacher-preset"
        )
    if preset not in PRESETS:
        raise FamexError(f"{where}: unknown teacher preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return model_info_cached(preset), preset


def _is_paper_teacher(info: dict[str, Any], preset: str | None) -> bool:
    if preset == PAPER_TEACHER:
        return True
    ref = model_info_cached(PAPER_TEACHER)
    return all(info.get(k) == ref[k] for k in ("layers", "d_model", "mlp", "heads", "kv_heads", "vocab_size"))


def _subtotals(stages: list[dict[str, Any]], students: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Named sums: logits + students, the paper's "whole family" where its students are there, all stages."""
    logits = [s["name"] for s in stages if s.get("stage") == "logits"]
    distill = [s["name"] for s in stages if s.get("stage") == "distill"]
    subtotals: dict[str, list[str]] = {}
    paper: dict[str, float] = {}
    by_preset = {preset: name for name, preset in students.items()}
    small = ["apertus-v1.1-0.5b", "apertus-v1.1-1.5b"]
    train_logits = [n for n in logits if n.endswith("train")] or logits
    if all(p in by_preset for p in small) and any(s.get("paper_flops") for s in stages if s["name"] in train_logits):
        label = "logits + 0.5B + 1.5B (the paper's \"whole family\")"
        subtotals[label] = train_logits + [by_preset[p] for p in small]
        paper[label] = PAPER_FAMILY_TOTAL
    if logits or distill:
        label = "logits + students"
        subtotals[label] = logits + distill
        figures = [s.get("paper_flops") for s in stages if s["name"] in train_logits + distill]
        if figures and all(figures):
            paper[label] = sum(figures)
    if len(stages) > len(logits) + len(distill):
        subtotals["all stages"] = [s["name"] for s in stages]
    return subtotals, paper


def _document(stages, reference, students, source: dict[str, Any], store, not_costed) -> dict[str, Any]:
    if not stages:
        raise FamexError(f"nothing to cost in {source['path']}: no logits, distill, post-training or quantization stage")
    subtotals, paper = _subtotals(stages, students)
    doc = family_cost(stages, reference=reference, subtotals=subtotals, paper_subtotals=paper)
    doc.update(source=source, store=store, not_costed=not_costed)
    return doc


# ---------------------------------------------------------------- recipes


def _split_tokens(data_cfg: dict[str, Any], where: str) -> tuple[dict[str, int], str]:
    """Tokens per split of the recipe's data: prepared (meta.json) or planned (max_tokens × split)."""
    from famex.data.prepare import DataConfig
    from famex.stage import is_complete, read_meta

    out = data_cfg.get("out")
    if out and is_complete(out, "data"):
        splits = read_meta(out).get("splits", {})
        return {name: int(s.get("tokens", 0)) for name, s in splits.items()}, f"prepared data ({out})"
    max_tokens = data_cfg.get("max_tokens")
    if max_tokens is None:
        raise FamexError(f"{where}: the data is not prepared and [data] max_tokens is not set, so the token count "
                         "is unknown — set max_tokens, or run `famex run --only data` first")
    val = float(data_cfg.get("val_fraction", DataConfig.val_fraction))
    total = int(max_tokens)
    return {"train": round(total * (1 - val)), "val": round(total * val)}, f"[data] max_tokens = {total:,}"


def _chunk_tokens(tokens: int, seq_len: int) -> int:
    """Tokens of the whole chunks a split packs into (each chunk needs one token beyond itself)."""
    return max(0, (tokens - 1) // seq_len) * seq_len


def _schedule(config: dict[str, Any], student: str, where: str) -> tuple[int, int]:
    from famex.models import PRESETS

    preset = PRESETS.get(student)
    iters = config.get("iters") or (preset.iters if preset else None)
    batch = config.get("global_batch") or (preset.global_batch if preset else None)
    if not iters or not batch:
        raise FamexError(f"{where}: set iters and global_batch for {student} (it is not a paper preset with defaults)")
    return int(iters), int(batch)


def recipe_cost(recipe, teacher_preset: str | None = None) -> dict[str, Any]:
    """The cost document of a loaded `famex.run.recipe.Recipe`'s plan; nothing is run or downloaded."""
    from famex.data.prepare import DataConfig

    path = recipe.path
    where = str(path)
    teacher_cfg = recipe.raw.get("teacher", {})
    preset = teacher_preset or teacher_cfg.get("preset")
    teacher, sized_by = _teacher(str(teacher_cfg["model"]), preset, where)
    paper_teacher = _is_paper_teacher(teacher, sized_by)
    nodes = {n.name: n for n in recipe.nodes}
    data_cfg = nodes["data"].config if "data" in nodes else {}
    seq_len = int(data_cfg.get("seq_len", DataConfig.seq_len))
    tokens, tokens_source = _split_tokens(data_cfg, where)
    vocab = teacher["vocab_size"]
    data_out = data_cfg.get("out")
    if data_out and (Path(data_out) / "meta.json").is_file():
        vocab = read_json(Path(data_out) / "meta.json").get("tokenizer", {}).get("vocab_size", vocab)

    stages: list[dict[str, Any]] = []
    students: dict[str, str] = {}
    infos_by_out: dict[str, dict[str, Any]] = {str(teacher_cfg["model"]): teacher}  # the teacher is quantized too
    # (also as the directory a GGUF teacher is dequantized into: the same model)
    infos_by_out.update({n.config["out"]: teacher for n in recipe.nodes if n.info.get("converts")})
    not_costed: list[tuple[str, str]] = []
    store = None
    for node in recipe.nodes:
        cfg = node.config
        if node.stage == "logits":
            split = cfg.get("split", "train")
            main_data = cfg.get("data") in (None, data_out)
            if main_data:
                node_tokens, node_seq = tokens, seq_len
            else:  # another data directory (the chat data): its own size, when the recipe or its meta.json gives it
                other = next((n.config for n in recipe.nodes if n.stage == "data" and n.config.get("out") == cfg.get("data")), {})
                try:
                    node_tokens, _ = _split_tokens(other, where)
                except FamexError:
                    not_costed.append((node.name, "its data's token count is not known from the recipe"))
                    continue
                node_seq = int(other.get("seq_len", DataConfig.seq_len))
            d = _chunk_tokens(node_tokens.get(split, 0), int(cfg.get("seq_len") or node_seq))
            paper = PAPER_TABLE2["logits"] if paper_teacher and split == "train" and main_data else None
            row = stage_cost(node.name, teacher["params_total"], d, "forward", paper)
            stages.append({**row, "stage": "logits"})
            store = _add_store(store, cfg, d)
        elif node.stage == "distill" and any(n.stage == "prune" and n.config["out"] == str(cfg["student"]) for n in recipe.nodes) \
                and not Path(str(cfg["student"]), "config.json").is_file():
            not_costed.append((node.name, "a student pruned from the teacher: its size is known once famex prune ran"))
        elif node.stage == "distill":
            student = str(cfg["student"])
            info = model_info_cached(student, vocab)
            iters, batch = _schedule(cfg, student, f"{where} ({node.name})")
            paper = PAPER_TABLE2.get(student) if student in PAPER_TABLE2 else None
            row = stage_cost(node.name, info["params_total"], iters * batch * seq_len, "train", paper)
            stages.append({**row, "stage": "distill"})
            students[node.name] = student
            infos_by_out[cfg["out"]] = info
        elif node.stage in ("sft", "dpo", "quantize"):
            row = _planned_training(node, infos_by_out, seq_len, where)
            infos_by_out[str(cfg.get("out", node.name))] = infos_by_out.get(str(cfg.get("model", "")), {})
            if row is None:
                not_costed.append((node.name, "its model or token count is not known from the recipe"))
            elif row:
                stages.append(row)
            else:
                not_costed.append((node.name, "RTN (no data pass)"))
        elif node.info.get("converts"):
            not_costed.append((node.name, "dequantizing the GGUF teacher once (no forward pass)"))
        else:
            not_costed.append((node.name, NOT_COSTED.get(node.stage, "not a compute stage")))
    reference = _reference(teacher_cfg.get("pretraining_tokens"), teacher, paper_teacher, sized_by, teacher_cfg["model"])
    source = {"kind": "recipe", "path": str(path), "tokens": tokens_source, "seq_len": seq_len,
              "teacher": str(teacher_cfg["model"]), "teacher_sized_by": f"preset {sized_by}" if sized_by else "its config"}
    return _document(stages, reference, students, source, store, not_costed)


def _planned_training(node, infos_by_out: dict[str, dict[str, Any]], seq_len: int, where: str) -> dict[str, Any] | None:
    """A planned sft / dpo / quantize node's row; None when its tokens are unknown, {} when it costs nothing."""
    cfg = node.config
    info = infos_by_out.get(str(cfg.get("model", "")))
    if not info:
        return None
    method = cfg.get("method", "rtn") if node.stage == "quantize" else node.stage
    seq = int(cfg.get("seq_len") or seq_len)
    if method == "rtn":
        return {}
    if method == "gptq":
        return {**gptq_cost(node.name, info, int(cfg.get("calib_tokens") or GPTQ_CALIBRATION_TOKENS)), "stage": "quantize"}
    # Training stages: --iters (× global batch × seq_len) wins over a token budget (QAD's --tokens, ≈100M).
    if cfg.get("iters") and cfg.get("global_batch"):
        tokens = int(cfg["iters"]) * int(cfg["global_batch"]) * seq
    else:
        tokens = cfg.get("tokens") or node.info.get("tokens") or (QAD_TOKENS_DEFAULT if method == "qad" else None)
    if not tokens:
        return None
    return _training_row(node.name, node.stage, info["params_total"], int(tokens))


def _training_row(name: str, stage: str, params: int, tokens: int) -> dict[str, Any]:
    row = {**stage_cost(name, params, tokens, "train"), "stage": stage}
    if stage == "dpo":  # the frozen reference model's forward over the same tokens
        row["flops"] += float(params * tokens)
        row["flops_6nd"] += float(2 * params * tokens)
        row["kind"] = "dpo"
    return row


def _add_store(store: dict[str, Any] | None, cfg: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Accumulate the logit store's size: measured where the store is finished, else estimated."""
    from famex.stage import is_complete

    out = cfg.get("out")
    top_k, encoding = int(cfg.get("top_k", 256)), str(cfg.get("encoding", "compact"))
    if out and is_complete(out, "logits") and (Path(out) / "metrics.json").is_file():
        m = read_json(Path(out) / "metrics.json")
        bpt, tokens = float(m["bytes_per_token"]), int(m["tokens"])
        source = f"measured: {out}/metrics.json"
    else:
        bpt = store_bytes_per_token(top_k, encoding)
        source = (f"estimate: {encoding} encoding at top-k {top_k}, "
                  + ("8 bytes per entry (fp32 + int32), before gzip" if encoding == "paper"
                     else "interpolated from bench-measured bytes/token (≈86 at k=64, ≈176 at k=256)"))
    if store is None:
        return {"tokens": tokens, "bytes": bpt * tokens, "bytes_per_token": bpt, "source": source}
    total = store["tokens"] + tokens
    nbytes = store["bytes"] + bpt * tokens
    sources = store["source"] if store["source"] == source else f"{store['source']}; {source}"
    return {"tokens": total, "bytes": nbytes, "bytes_per_token": nbytes / max(total, 1), "source": sources}


def _reference(pretraining_tokens, teacher: dict[str, Any], paper_teacher: bool, sized_by: str | None,
               teacher_spec: str) -> dict[str, Any] | None:
    if not pretraining_tokens:
        return None
    tokens = int(float(pretraining_tokens))
    name = f"{sized_by or Path(str(teacher_spec)).name} pre-training"
    if paper_teacher:
        name = "apertus-8b pre-training"
    paper = PAPER_TABLE2["apertus-8b pre-training"] if paper_teacher and tokens == PRETRAIN_TOKENS_8B else None
    return stage_cost(name, teacher["params_total"], tokens, "train", paper)


# ---------------------------------------------------------------- run directories


def run_cost(run_dir: str | Path, teacher_preset: str | None = None) -> dict[str, Any]:
    """The cost document of a run directory, from what its complete stages recorded."""
    from famex.report.runtree import read_tree

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FamexError(f"run directory not found: {run_dir}")
    tree = read_tree(run_dir)
    stages: list[dict[str, Any]] = []
    students: dict[str, str] = {}
    not_costed: list[tuple[str, str]] = []
    store = None
    teacher: dict[str, Any] | None = None
    sized_by: str | None = None
    recipe_teacher = _recipe_teacher(run_dir)
    for s in sorted(tree.stages, key=lambda s: (PIPELINE.index(s.stage) if s.stage in PIPELINE else len(PIPELINE), s.name)):
        m, cfg = s.metrics, s.config
        if s.stage == "logits":
            tokens = m.get("tokens")
            if tokens is None:
                not_costed.append((s.name, "its metrics.json has no token count"))
                continue
            if teacher is None:
                spec = str(cfg.get("teacher", recipe_teacher.get("model", "default")))
                teacher, sized_by = _teacher(spec, teacher_preset or recipe_teacher.get("preset"), str(s.path))
            paper = PAPER_TABLE2["logits"] if _is_paper_teacher(teacher, sized_by) and cfg.get("split") == "train" else None
            stages.append({**stage_cost(s.name, teacher["params_total"], int(tokens), "forward", paper), "stage": "logits"})
            store = _measured_store(store, s)
        elif s.stage in ("distill", "sft", "dpo"):
            tokens = m.get("tokens")
            if tokens is None:
                not_costed.append((s.name, "its metrics.json has no token count"))
                continue
            params = m.get("params") or model_info_cached(str(s.path))["params_total"]
            row = _training_row(s.name, s.stage, int(params), int(tokens))
            if s.stage == "distill":
                student = str(cfg.get("student", ""))
                if student in PAPER_TABLE2:
                    row["paper_flops"] = PAPER_TABLE2[student]
                students[s.name] = student
            stages.append(row)
        elif s.stage == "quantize":
            row = _run_quantize_row(s)
            if row is None:
                method = s.config.get("method")
                not_costed.append((s.name, "RTN (no data pass)" if method == "rtn" else f"{method}: its token count was not recorded"))
            else:
                stages.append(row)
        else:
            not_costed.append((s.name, NOT_COSTED.get(s.stage, "not a compute stage")))
    reference = None
    if recipe_teacher.get("pretraining_tokens"):
        if teacher is None:
            teacher, sized_by = _teacher(str(recipe_teacher.get("model", "default")),
                                         teacher_preset or recipe_teacher.get("preset"), str(run_dir))
        reference = _reference(recipe_teacher["pretraining_tokens"], teacher, _is_paper_teacher(teacher, sized_by),
                               sized_by, recipe_teacher.get("model", "teacher"))
    source = {"kind": "run", "path": str(run_dir), "tokens": "metrics.json of each stage",
              "incomplete": [s.name for s in tree.incomplete]}
    return _document(stages, reference, students, source, store, not_costed)


def _recipe_teacher(run_dir: Path) -> dict[str, Any]:
    """[teacher] of the recipe copy a run directory may hold (recipe.toml), else {}."""
    from famex.config import load_toml

    p = run_dir / "recipe.toml"
    return dict(load_toml(p).get("teacher", {})) if p.is_file() else {}


def _measured_store(store: dict[str, Any] | None, s) -> dict[str, Any] | None:
    m = s.metrics
    if m.get("bytes") is None or not m.get("tokens"):
        return store
    tokens, nbytes = int(m["tokens"]), float(m["bytes"])
    if store is not None:
        tokens, nbytes = tokens + store["tokens"], nbytes + store["bytes"]
    return {"tokens": tokens, "bytes": nbytes, "bytes_per_token": nbytes / tokens,
            "source": "measured: metrics.json of the logits stages"}


def _run_quantize_row(s) -> dict[str, Any] | None:
    """A finished quantize stage: GPTQ from its calibration tokens, QAD from its training tokens, RTN: None."""
    from famex.quant.checkpoint import QUANTIZATION_JSON

    q = read_json(s.path / QUANTIZATION_JSON) if (s.path / QUANTIZATION_JSON).is_file() else {}
    method = q.get("method") or s.config.get("method")
    if method == "gptq":
        calib = int(q.get("calib_tokens") or s.metrics.get("calib_tokens") or GPTQ_CALIBRATION_TOKENS)
        return {**gptq_cost(s.name, model_info_cached(str(s.path)), calib), "stage": "quantize"}
    if method == "qad":
        tokens = s.metrics.get("tokens") or q.get("tokens")
        if not tokens:
            return None
        return {**_training_row(s.name, "quantize", model_info_cached(str(s.path))["params_total"], int(tokens)), "kind": "train"}
    return None
