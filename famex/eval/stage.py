"""`famex eval`: validation loss, few-shot accuracy, size and speed of any model famex makes, into metrics.json.

``famex eval --model DIR --data DATA_DIR --tasks arc_easy,hellaswag [--shots N] [--limit N]
[--reference BF16_EVAL_DIR] --out OUT``

The model is loaded as it is deployed (`famex.eval.runtime`): a BF16 directory or the GGUF
teacher; a ``famex quantize`` directory with its activation quantization (FP8 per token, NVFP4
W4A4) in every forward; a compressed-tensors export through transformers; an MLX export through
mlx-lm. Then, each only when asked for:

- ``val_loss``: mean next-token CE (nats/token) over the packed chunks of the data directory's val
  split, documents masked from each other (`famex.distill.train.validate_chunks`, the trainer's
  own validation); ``--val-chunks`` limits the chunks;
- few-shot: `famex.eval.fewshot.evaluate_fewshot` flattened by `flat_metrics` (``acc/<task>``,
  ``acc_norm/<task>``, ``fewshot_avg``) and, given ``--reference`` (the BF16 model's eval
  directory or metrics.json), ``recovery`` (macro, in %) and ``recovery/<task>``;
- always: ``params`` (all parameters, embeddings included, tied ones once), ``size_bytes`` as
  deployed and ``bits_per_weight`` per quantized weight (`famex.eval.runtime.deployed_size` says
  how each kind is sized), ``flops_per_token`` = 2·N (a forward pass, multiply and add counted
  separately; the paper's Table 2 counts N), ``tokens_per_s`` of one forward pass;
- the identity fields the report reads (`famex.report.runtree`): ``model``, ``name``, ``kind``,
  ``objective``, ``format``, ``method``, ``norm_fusion``, ``weight_averaging``, found by following
  the model's ``meta.json`` inputs up its lineage (`identity`).

What this module does not do: generation tasks, chat-templated evaluation, or comparing models
(the report does that from the metrics.json files).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.eval.stats import VAL_CHUNKS_FILE, ratio_se
from famex.stage import Stage, read_meta
from famex.utils import atomic_write_json, log, progress, read_json

FLOPS_CONVENTION = "2·N per token (one forward pass, N = all parameters incl. embeddings; the paper's Table 2 counts N)"


@dataclass
class EvalConfig:
    model: str = ""
    """Model to evaluate: a model directory (BF16, famex quantize output, compressed-tensors or MLX export), a GGUF file, or 'default'."""
    out: str = ""
    """Output directory: meta.json and metrics.json."""
    data: str = ""
    """A `famex data` directory: validation loss on its val split (empty: no validation loss)."""
    tasks: list[str] = field(default_factory=list)
    """Few-shot tasks, comma- or space-separated (arc_easy, arc_challenge, hellaswag, winogrande, mmlu, piqa, ...); empty: none."""
    shots: int | None = None
    """Few-shot examples per prompt; default: each task's own (0; MMLU 5)."""
    limit: int | None = None
    """Score only the first N items of each task (of each subject for mmlu)."""
    reference: str = ""
    """The BF16 model's eval directory (or its metrics.json): adds recovery (percent of its few-shot scores) and val_loss_increase."""
    val_chunks: int = 0
    """Validation chunks to score (0 = the whole val split)."""
    val_split: str = "val"
    """Split of the data directory to compute the validation loss on."""
    tokenizer: str = ""
    """Tokenizer directory for a model saved without one (e.g. the data directory's tokenizer/)."""
    name: str = ""
    """Display name of the family member in the report (default: found from the model's lineage)."""
    batch_size: int = 8
    """Few-shot rows (and validation chunks / 2) per forward; speed and memory only."""
    engine: Literal["famex", "hflm"] = "famex"
    """Few-shot model loop: famex's (packs the choices of a question into one row) or lm-eval's HFLM."""
    seed: int = 1234
    """Seed of lm-eval's few-shot example sampler (lm-eval's default)."""
    speed_seq_len: int = 512
    """Sequence length of the throughput measurement (capped at the model's context)."""
    speed_iters: int = 3
    """Timed forward passes for tokens_per_s (their median); 0 skips the measurement."""
    device: str = "auto"
    """Where the model runs (validation, few-shot, speed): auto = CUDA when present, cpu, cuda[:N]; MLX exports run in mlx."""
    attn: Literal["auto", "sdpa", "flex", "flash_attention_2"] = "auto"
    """Attention implementation of the transformers models: auto = flex (a document block mask) on CUDA, sdpa on the CPU; flash_attention_2 where flash-attn is installed."""

    def validate(self) -> None:
        if not self.model:
            raise FamexError("--model is required (a model directory, a .gguf file, or 'default')")
        if not self.out:
            raise FamexError("--out DIR is required")
        if self.val_chunks < 0 or self.speed_iters < 0 or self.batch_size < 1 or self.speed_seq_len < 1:
            raise FamexError("--val-chunks and --speed-iters must be >= 0, --batch-size and --speed-seq-len >= 1")
        if self.reference and not self.task_list() and not self.data:
            raise FamexError("--reference is compared on few-shot scores or val loss: give --tasks and/or --data too")
        self.tasks = self.task_list()  # one spelling in meta.json: "a,b" and "a b" are the same evaluation

    def task_list(self) -> list[str]:
        return [t for item in self.tasks for t in (p.strip() for p in str(item).split(",")) if t]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(EvalConfig, args)
    evaluate(cfg)
    return 0


# ---------------------------------------------------------------- lineage: what the model is


@dataclass(frozen=True)
class _Link:
    path: Path
    meta: dict[str, Any]

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage"))


def _stage_dir(path: Path) -> Path | None:
    """The stage directory holding ``path``: itself, or the nearest parent with a meta.json (a checkpoint
    inside a distill directory belongs to that distill stage)."""
    if not path.exists():
        return None
    path = path.resolve()
    for p in [path, *path.parents][:4]:
        if (p / "meta.json").is_file():
            return p
    return None


def lineage(model: str | Path) -> tuple[list[_Link], Path | None]:
    """The stages the model descends from, nearest first, following ``meta.json`` inputs; and where it stopped.

    The parent of a stage is its ``model`` / ``student`` input (else ``config.model`` / ``config.student``
    when that is a directory; else, for a weight-averaging stage, its first input that is a model
    stage). The walk stops at a directory without meta.json (returned as the second value: e.g. a
    quantized directory made outside a run), at an incomplete stage, and at cycles.
    """
    from famex.report.runtree import MODEL_STAGES, PARENT_KEYS

    chain: list[_Link] = []
    start = Path(str(model))
    here = _stage_dir(start)
    tail = None if here is not None or not start.exists() else start.resolve()
    while here is not None and all(link.path != here for link in chain):
        meta = read_meta(here)
        if not meta or meta.get("status") != "complete":
            break
        chain.append(_Link(here, meta))
        inputs = meta.get("inputs") if isinstance(meta.get("inputs"), dict) else {}
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        parent = None
        for key in PARENT_KEYS:
            entry = inputs.get(key)
            if isinstance(entry, dict) and entry.get("path"):
                parent = entry["path"]
                break
            if isinstance(config.get(key), str) and config[key] and Path(config[key]).is_dir():
                parent = config[key]
                break
        if parent is None:
            for _, entry in sorted(inputs.items()):
                p = entry.get("path") if isinstance(entry, dict) else None
                d = _stage_dir(Path(p)) if p else None
                m = read_meta(d) if d else None
                if m and m.get("stage") in MODEL_STAGES:
                    parent = p
                    break
        here = _stage_dir(Path(parent)) if parent else None
        if parent and here is None and Path(parent).exists():
            tail = Path(parent).resolve()
    return chain, tail


def _quant_record(path: Path) -> dict[str, Any]:
    from famex.quant.checkpoint import QUANTIZATION_JSON

    p = path / QUANTIZATION_JSON
    return read_json(p) if p.is_file() else {}


def _export_format(kind: str, runtime: dict[str, Any]) -> str | None:
    """A format name for an export that no famex quantize record describes."""
    if kind == "mlx" and runtime.get("mlx_bits"):
        group = runtime.get("mlx_group_size")
        return f"int{runtime['mlx_bits']}" + ("" if group in (None, 64) else f"-g{group}")
    if kind == "compressed-tensors":
        return runtime.get("compressed_tensors_format")
    return None


def identity(model: str | Path, kind: str, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """``name``, ``kind`` (base/instruct), ``objective``, ``format``, ``method``, ``norm_fusion``,
    ``weight_averaging`` of a model, from its lineage (`lineage`) and its quantization record.

    The rules are the report's (`famex.report.runtree.eval_row`): instruct when an sft/dpo stage is
    an ancestor; the objective of the nearest distill ancestor; format/method/norm fusion from the
    nearest quantization.json (the model's own, or its quantize ancestor's for an export); the name
    of the nearest ancestor that is not a quantize/export/eval/average stage (a model outside any
    run tree: its directory or file name).
    """
    from famex.report.runtree import PASS_THROUGH, POST_TRAINING, StageDir, objective_of

    runtime = runtime or {}
    chain, tail = lineage(model)
    stage_dirs = [StageDir(link.path, link.meta, _metrics(link.path)) for link in chain]
    distill = next((s for s in stage_dirs if s.stage == "distill"), None)
    member = next((s for s in stage_dirs if s.stage not in PASS_THROUGH), None)
    quant: dict[str, Any] = {}
    path = Path(str(model))
    candidates = ([path] if path.is_dir() else []) + [s.path for s in stage_dirs] + ([tail] if tail and tail.is_dir() else [])
    for p in candidates:
        quant = _quant_record(p)
        if quant:
            break
    out: dict[str, Any] = {
        "kind": "instruct" if any(s.stage in POST_TRAINING for s in stage_dirs) else "base",
        "objective": objective_of(distill),
        "weight_averaging": any(s.stage == "average" for s in stage_dirs) or bool(quant.get("weight_averaging")),
    }
    if quant:
        out.update(format=quant.get("format_name"), method=quant.get("method"), norm_fusion=bool(quant.get("norm_fusion")))
    elif kind in ("mlx", "compressed-tensors") and _export_format(kind, runtime):
        out.update(format=_export_format(kind, runtime), method=None, norm_fusion=None)
    else:
        out.update(format="bf16", method="none", norm_fusion=False)
    if member is not None:
        out["name"] = member.name
    elif tail is not None and stage_dirs:  # an export (or eval) of a model made outside a run tree
        out["name"] = tail.name
    elif str(model) == "default" or path.suffix == ".gguf":
        from famex.models import resolve_model_spec

        out["name"] = resolve_model_spec(str(model)).path.stem
    else:
        out["name"] = path.resolve().name if path.exists() else path.name
    return out


def _metrics(path: Path) -> dict[str, Any]:
    p = path / "metrics.json"
    try:
        return read_json(p) if p.is_file() else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------- measurements


def validation_loss(model, data_dir: str | Path, split: str = "val", max_chunks: int = 0) -> dict[str, Any]:
    """Mean next-token CE over the packed chunks of a split, documents masked from each other.

    Returns ``val_loss`` (nats/token), ``val_loss_se`` (its standard error over chunks, `ratio_se`),
    ``val_tokens`` (labelled tokens scored), ``val_chunks``, and the per-chunk CE sums and token
    counts (the eval stage writes them to val_chunks.json, for paired comparisons of two models on
    the same chunks). One chunk per forward: the figures do not depend on a batch size.
    """
    from famex.data.packing import PackedChunks

    chunks = PackedChunks(data_dir, split)
    if len(chunks) == 0:
        raise FamexError(
            f"{data_dir}: the {split} split holds no complete chunk of {chunks.seq_len} tokens "
            f"({chunks.data.n_tokens} tokens) — prepare the data with a larger --val-fraction or a smaller --seq-len"
        )
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    if vocab < chunks.vocab_size:
        raise FamexError(
            f"vocab size mismatch: model {vocab}, data {data_dir} {chunks.vocab_size} — evaluate on data made with the model's tokenizer"
        )
    head = model.get_output_embeddings()
    if getattr(head, "_forward_pre_hooks", None):
        # validate_chunks multiplies by the head's weight directly; an input quantizer on the head would be skipped.
        raise FamexError("the model quantizes the output layer's input, which the packed validation loss cannot apply; "
                         "quantize without activation quantization on lm_head")
    n = len(chunks) if not max_chunks else min(max_chunks, len(chunks))
    was_training = model.training
    model.eval()
    sums, counts = [], []
    try:
        import torch

        from famex.data.packing import collate
        from famex.distill.train import packed_loss

        device = next(model.parameters()).device
        with torch.no_grad():
            for i in progress(range(n), desc="val loss", unit="chunk", leave=False):
                batch = {k: v.to(device) for k, v in collate([chunks[i]]).items()}
                out = packed_loss(model, batch, 1024, kl_weight=0.0)
                sums.append(float(out.ce_sum))
                counts.append(int(out.count))
    finally:
        model.train(was_training)
    tokens = sum(counts)
    if tokens == 0:
        raise FamexError(f"{data_dir}: the {split} split's first {n} chunk(s) hold no token to predict (all labels masked)")
    return {"val_loss": sum(sums) / tokens, "val_loss_se": ratio_se(sums, counts), "val_tokens": tokens, "val_chunks": n,
            "val_chunk_ce_sums": sums, "val_chunk_tokens": counts}


def read_reference(path: str | Path) -> dict[str, Any]:
    """The metrics of a reference evaluation: an eval directory's metrics.json, or the file itself."""
    p = Path(path)
    if p.is_dir():
        meta = read_meta(p)
        if meta is not None and meta.get("stage") != "eval":
            raise FamexError(f"--reference {p} is a `famex {meta.get('stage')}` directory; pass the eval directory "
                             "of the BF16 model (famex eval --model BF16_DIR --out DIR) or its metrics.json")
        p = p / "metrics.json"
    if not p.is_file():
        raise FamexError(f"--reference: {p} not found; pass the BF16 model's eval directory or its metrics.json")
    try:
        metrics = read_json(p)
    except ValueError as e:
        raise FamexError(f"--reference {p}: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise FamexError(f"--reference {p}: expected a JSON object of metrics")
    return metrics


def compare(metrics: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``recovery`` (% of the reference's macro few-shot average over the tasks both have),
    ``recovery/<task>`` and ``val_loss_increase``, for whatever both sides measured."""
    from famex.eval.fewshot import recovery

    out: dict[str, Any] = {}
    has_fewshot = any(k.startswith(("acc/", "acc_norm/")) for k in metrics)
    if has_fewshot:
        if not any(k.startswith(("acc/", "acc_norm/")) for k in reference):
            raise FamexError("the reference has no few-shot scores; evaluate the BF16 model with the same --tasks first")
        rec = recovery(metrics, reference)
        uneven = [t for t in rec["tasks"] if metrics.get(f"n/{t}") != reference.get(f"n/{t}")]
        if uneven:
            log(f"famex eval: warning: the reference scored other numbers of items on {', '.join(uneven)} "
                "(another --limit?); recovery compares different item sets")
        out["recovery"] = rec["macro"]
        if rec.get("macro_se") is not None:
            out["recovery_se"] = rec["macro_se"]
        out.update({f"recovery/{t}": v for t, v in rec["tasks"].items()})
    if metrics.get("val_loss") is not None and isinstance(reference.get("val_loss"), (int, float)):
        out["val_loss_increase"] = metrics["val_loss"] - reference["val_loss"]
    return out


def _max_positions(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def _load_tokenizer(ev, tokenizer_dir: str):
    from famex.export.files import has_tokenizer
    from famex.models import load_tokenizer

    if tokenizer_dir:
        if not has_tokenizer(tokenizer_dir):
            raise FamexError(f"--tokenizer {tokenizer_dir} holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.json)")
        return load_tokenizer(tokenizer_dir)
    if ev.kind == "gguf":
        return load_tokenizer(ev.path)
    if not has_tokenizer(ev.path):
        raise FamexError(
            f"{ev.path} has no tokenizer files, which few-shot scoring needs; pass --tokenizer DIR "
            "(the teacher's tokenizer, e.g. the data directory's tokenizer/)"
        )
    return load_tokenizer(ev.path)


# ---------------------------------------------------------------- the stage


def evaluate(cfg: EvalConfig) -> Path:
    """Run the `famex eval` stage; returns the output directory (metrics.json inside)."""
    from famex.eval.fewshot import resolve_tasks
    from famex.eval.runtime import detect_kind

    from famex.models import resolve_device

    cfg.validate()
    from famex.models import resolve_attn

    resolve_attn(cfg.attn, resolve_device(cfg.device))  # a missing CUDA device or kernel fails before any loading
    tasks = resolve_tasks(cfg.tasks) if cfg.tasks else []  # bad names fail before any loading
    kind = detect_kind(cfg.model)
    reference = read_reference(cfg.reference) if cfg.reference else None
    if cfg.data:
        from famex.stage import require_complete

        meta = require_complete(cfg.data, "data", "data directory")
        split = meta.get("splits", {}).get(cfg.val_split)
        if split is None:
            raise FamexError(f"{cfg.data} has no {cfg.val_split!r} split (it has {', '.join(meta.get('splits', {}))})")
        if not split.get("tokens"):
            raise FamexError(f"{cfg.data}: the {cfg.val_split} split is empty — prepare the data with --val-fraction > 0")
    model_input = None if kind == "gguf" and cfg.model == "default" else cfg.model
    inputs = {"model": model_input, "data": cfg.data or None, "reference": cfg.reference or None,
              "tokenizer": cfg.tokenizer or None}
    stage = Stage(cfg.out, "eval", cfg, inputs, identity_exclude=("batch_size", "speed_seq_len", "speed_iters", "device", "attn"))
    if stage.begin():
        return Path(cfg.out)
    try:
        metrics, fewshot = _measure(cfg, tasks, reference)
        if fewshot is not None:  # per-task details (MMLU subjects, shots, splits) beside the flat metrics
            atomic_write_json(Path(cfg.out) / "fewshot.json", fewshot)
    except BaseException as e:
        stage.fail(e)
        raise
    stage.finish(metrics)
    _summary(metrics, cfg.out)
    return Path(cfg.out)


def _set_attn(model, attn: str, device) -> str:
    """Switch a transformers model to the ``--attn`` implementation; returns the one it runs with."""
    from famex.models import resolve_attn

    impl = resolve_attn(attn, device)
    if impl != model.config._attn_implementation:
        model.set_attn_implementation(impl)
    return model.config._attn_implementation


def _measure(cfg: EvalConfig, tasks: list[str], reference: dict[str, Any] | None) -> tuple[dict[str, Any], dict | None]:
    from famex.eval.footprint import throughput
    from famex.eval.runtime import architecture_params, deployed_size, open_model

    from famex.models import resolve_device

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ev = open_model(cfg.model)
    attn = None
    if ev.kind != "mlx":
        ev.model.to(device)
        attn = _set_attn(ev.model, cfg.attn, device)
    tokenizer = _load_tokenizer(ev, cfg.tokenizer) if tasks else None
    vocab = ev.config.get_text_config().vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise FamexError(f"the tokenizer has {len(tokenizer)} tokens but {cfg.model}'s vocabulary is {vocab}: "
                         "the tokenizer does not belong to this model (pass the right one with --tokenizer)")
    params = architecture_params(ev.config)
    metrics: dict[str, Any] = {
        "model": str(ev.path) if cfg.model != "default" else "default",
        "model_kind": ev.kind,
        **identity(cfg.model, ev.kind, ev.runtime),
        "params": params,
        "flops_per_token": 2 * params,
        "flops_convention": FLOPS_CONVENTION,
        "device": "mlx" if ev.kind == "mlx" else device.type,
        "attn": attn or "mlx",
        **{f"runtime/{k}": v for k, v in ev.runtime.items()},
    }
    if ev.quant is not None:
        metrics["activation_quantization"] = ev.quant["format"].activations
    if cfg.name:
        metrics["name"] = cfg.name
    metrics.update(deployed_size(ev, params))
    log(f"famex eval: {metrics['name']} ({ev.kind}, {metrics['format']}, {params / 1e6:.1f}M parameters, "
        f"{metrics['size_bytes'] / 2**20:.1f} MiB as deployed)")
    if cfg.data:
        t = time.perf_counter()
        val = validation_loss(ev.model, cfg.data, cfg.val_split, cfg.val_chunks)
        per_chunk = {"ce_sum": val.pop("val_chunk_ce_sums"), "tokens": val.pop("val_chunk_tokens")}
        atomic_write_json(Path(cfg.out) / VAL_CHUNKS_FILE, per_chunk)  # what paired comparisons read (report)
        metrics.update(val)
        metrics["val_seconds"] = time.perf_counter() - t
        se = f" ± {metrics['val_loss_se']:.4f} (s.e. over chunks)" if metrics["val_loss_se"] is not None else ""
        log(f"famex eval: val loss {metrics['val_loss']:.4f}{se} over {metrics['val_tokens']} tokens "
            f"({metrics['val_chunks']} chunks)")
    results = None
    if tasks:
        from famex.eval.fewshot import evaluate_fewshot, flat_metrics

        results = evaluate_fewshot(ev.model, tokenizer, tasks, shots=cfg.shots, limit=cfg.limit,
                                   batch_size=cfg.batch_size, seed=cfg.seed, engine=cfg.engine)
        metrics.update(flat_metrics(results))
        for name, entry in results["tasks"].items():
            metrics[f"shots/{name}"] = entry["shots"]
            metrics[f"metric/{name}"] = entry["metric"]
        metrics.update(limit=cfg.limit, lm_eval_version=results["lm_eval_version"])
    if reference is not None:
        metrics.update(compare(metrics, reference))
        metrics["reference"] = str(Path(cfg.reference).resolve())
    if cfg.speed_iters:
        seq = min(cfg.speed_seq_len, _max_positions(ev.config) or cfg.speed_seq_len)
        metrics["tokens_per_s"] = throughput(ev.model, seq_len=seq, iters=cfg.speed_iters)
        metrics["speed_seq_len"] = seq
    metrics["seconds"] = time.perf_counter() - t0
    return metrics, results


def _summary(metrics: dict[str, Any], out: str) -> None:
    parts = [f"{metrics['name']} [{metrics['format']}]"]
    for key, fmt in (("val_loss", "val loss {:.4f}"), ("fewshot_avg", "few-shot avg {:.4f}"), ("recovery", "recovery {:.1f}%"),
                     ("bits_per_weight", "{:.2f} bits/weight"), ("tokens_per_s", "{:.0f} tokens/s")):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not math.isnan(v):
            parts.append(fmt.format(v))
    log("famex eval: " + ", ".join(parts) + f" → {Path(out) / 'metrics.json'}")


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = EvalConfig
run = evaluate
