"""`famex quantize`: RTN, GPTQ or QAD of a model directory into a quantized-model directory.

- ``--method rtn|gptq``: `famex.quant.model.quantize_model` (optionally with norm fusion). GPTQ,
  and NVFP4 W4A4's static activation scales, calibrate on ``--calib-tokens`` tokens of packed
  chunks of a `famex data` directory (``--calib``), cross-document attention masked as in
  training. GPTQ defaults to activation order with static groups (measured best at every format
  on the 135M teacher, bench/RESULTS.md).
- ``--method qad``: quantization-aware distillation (`famex.quant.qad`) against a `famex logits`
  store over ``--data``'s train split, through the shared trainer (checkpoints, exact resume,
  torchrun DDP, log.jsonl), from an RTN or GPTQ start (``--init``).

The output directory is the `famex.quant.checkpoint` layout at its top level (config.json,
model.safetensors with the on-grid weights, tokenizer, quantization.json, qparams.safetensors),
which `famex export` and `famex eval` read, plus meta.json / metrics.json (and for QAD
checkpoints/ and log.jsonl). Refused before anything is written: an unknown format (the valid
names are listed), a model already quantized, group sizes the model's shapes cannot take, and
calibration data, logit stores or data made with another tokenizer than the model's.

What this module does not do: the maths (`famex.quant.*`), training (`famex.distill.trainer`),
or export.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from famex.config import add_config_arguments, compose, resolve_config
from famex.errors import FamexError
from famex.quant.formats import QuantFormat, parse_format
from famex.train_options import TRAIN_IDENTITY_EXCLUDE, TrainOptions
from famex.utils import log

METHODS = ("rtn", "gptq", "qad")
CALIBRATION_TOKENS = 128 * 2048
"""GPTQ's usual calibration budget (128 sequences of 2048 tokens), also `famex.eval.cost`'s assumption."""
CALIBRATION_ROWS = 4
"""Chunks per calibration forward (memory only: GPTQ sums its Hessians over all of them)."""


# The paper's QAD optimizer: AdamW with a cosine schedule.
@dataclass
@compose(TrainOptions, help_prefix="qad: ", optimizer="adamw", schedule="cosine", weight_decay=0.0, notes={
    "weight_decay": "decay would pull latent weights off the grid the start chose",
    "lr": "default: a tenth of the peak LR the model was trained with, from its meta.json",
    "global_batch": "default: the global batch the model was trained with, from its meta.json",
    "iters": "default: --tokens / (global batch × sequence length)",
})
class QuantizeConfig:
    """`famex quantize` options; the training options (composed `TrainOptions`) apply to ``--method qad`` only."""

    model: str = ""
    """The model to quantize: a model directory (famex distill / sft / dpo / average output), a .gguf file or 'default'."""
    format: str = ""
    """Target format: a preset (int2 int3 int4 int5 int6 int8 int4-w4a16 int8-w8a16 fp8 nvfp4 nvfp4a16) or a parametric name (int3-g128, int4-ch-sym)."""
    method: str = ""
    """rtn (round to nearest), gptq, or qad (quantization-aware distillation; needs --logits and --data)."""
    norm_fusion: bool = False
    """Equalize the input-column norms of q/k/v and up (gate/up) into the preceding RMSNorms first."""
    calib: str = ""
    """rtn / gptq: a famex data directory whose train chunks calibrate GPTQ and NVFP4 W4A4 activation scales (qad uses --data)."""
    calib_tokens: int = CALIBRATION_TOKENS
    """Calibration tokens (whole chunks, drawn across the train split by --seed); all of the split if it is smaller."""
    embeddings: bool = False
    """rtn / gptq: quantize the token embeddings too (RTN, the format's grid; MLX exports them as QuantizedEmbedding)."""
    lm_head: bool = False
    """rtn / gptq: quantize an untied lm_head too (a tied one is the embedding: --embeddings)."""
    act_order: bool = True
    """GPTQ: quantize columns in decreasing Hessian-diagonal order (static groups keep the stored layout)."""
    damp: float = 0.01
    """GPTQ: dampening added to the Hessian diagonal, relative to its mean."""
    logits: str = ""
    """qad: the teacher's `famex logits` store over --data's train split (the unquantized model itself or a larger family member)."""
    val_logits: str = ""
    """qad: optional store over --data's val split: validation then reports KL to the teacher too."""
    data: str = ""
    """qad: the famex data directory the store was made from (train split trains, val split validates)."""
    init: Literal["rtn", "gptq"] = "rtn"
    """qad: the quantization QAD starts from."""
    init_from: str = ""
    """qad with --init gptq: a finished `famex quantize --method gptq` directory of the same --model, format, norm fusion and calibration to start from instead of running GPTQ again (its `famex eval` is the start's validation)."""
    tokens: int = 100_000_000
    """qad: training tokens (the paper's ≈100M; --iters, when given, wins)."""
    tail: Literal["renormalize", "bucket"] = "bucket"
    """qad: teacher mass outside the stored top-k: one extra outcome (bucket), or renormalize the top-k (see famex.quant.qad)."""
    learn_scales: bool = False
    """qad: train the scales (and MLX biases) too, with the LSQ gradient, instead of keeping the start's."""
    out: str = ""
    """Output directory: the quantized model (config.json, model.safetensors, quantization.json, qparams.safetensors), meta.json, metrics.json; qad adds checkpoints/ and log.jsonl."""
    seed: int = 0
    """Seed of the calibration sample (which chunks calibrate GPTQ and NVFP4 activation scales)."""

    def validate(self) -> None:
        if not self.out:
            raise FamexError("--out DIR is required")
        if not self.model:
            raise FamexError("--model DIR is required (a model directory, a .gguf file or 'default')")
        if not self.format:
            raise FamexError("--format NAME is required; " + _format_list())
        if self.method not in METHODS:
            raise FamexError(f"--method must be one of {', '.join(METHODS)}" + (f", not {self.method!r}" if self.method else ""))
        parse_format(self.format)
        if self.method == "qad":
            missing = [o for o, v in (("--logits STORE_DIR", self.logits), ("--data DATA_DIR", self.data)) if not v]
            if missing:
                raise FamexError(f"--method qad needs {' and '.join(missing)}: QAD distils from a famex logits store over a famex data directory")
            if self.calib:
                raise FamexError("--calib is for rtn / gptq; QAD calibrates its start on --data")
            if self.embeddings or self.lm_head:
                raise FamexError("--embeddings / --lm-head are for rtn / gptq: QAD keeps the embeddings and lm_head in "
                                 "high precision (quantize them afterwards is not supported either)")
            if self.tokens < 1:
                raise FamexError(f"--tokens must be positive, not {self.tokens}")
        elif self.logits or self.data or self.val_logits or self.init_from:
            raise FamexError(f"--logits / --val-logits / --data / --init-from are for --method qad; {self.method} calibrates on "
                             "--calib DATA_DIR")
        if self.calib_tokens < 1:
            raise FamexError(f"--calib-tokens must be positive, not {self.calib_tokens}")


def _format_list() -> str:
    from famex.quant.formats import format_names

    return "presets: " + ", ".join(format_names()) + " (or parametric names such as int3-g128, int4-ch-sym)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, QuantizeConfig)


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(QuantizeConfig, args)
    quantize_stage(cfg)
    return 0


# --------------------------------------------------------------------------- checks shared with QAD


def resolve_format(cfg: QuantizeConfig) -> QuantFormat:
    return parse_format(cfg.format)


def check_model(spec: str):
    """The `ModelSpec` of ``--model``, refusing a model that is already quantized."""
    from famex.models import resolve_model_spec
    from famex.quant.checkpoint import is_quantized
    from famex.quant.model import QUANT_MARKER
    from famex.utils import read_json

    ms = resolve_model_spec(spec)
    if ms.kind == "hf":
        config = read_json(ms.path / "config.json")
        mark = config.get(QUANT_MARKER)
        if is_quantized(ms.path) or mark:
            what = f" ({mark.get('format')} by {mark.get('method')})" if isinstance(mark, dict) else ""
            raise FamexError(
                f"{ms.path} is already quantized{what}; quantize the unquantized model instead — quantizing twice compounds the error"
            )
        if config.get("quantization_config") or config.get("quantization"):
            raise FamexError(f"{ms.path} holds an exported or otherwise quantized checkpoint; quantize an unquantized (bf16/fp32) model")
    return ms


def check_shapes(spec, fmt: QuantFormat) -> None:
    """`FamexError` when a target linear's input features do not fit the format's groups, checked on the meta device."""
    from transformers import AutoModelForCausalLM

    from famex.models import _config_from_dir
    from famex.quant.model import _check_groups, target_modules

    config = _config_from_dir(spec.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _check_groups(skeleton, target_modules(skeleton), fmt)


def has_split(chunks, split: str) -> bool:
    s = chunks.data.meta["splits"].get(split)
    return bool(s and s["tokens"] > chunks.seq_len)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def check_tokenizer(spec, chunks, store_dir: str = ""):
    """The tokenizer to save with the output; `FamexError` if the model's differs from the data's (or the store's).

    A model directory without tokenizer files takes the data's (then only the vocabulary sizes
    can be compared, which `quantize_model` and the QAD stage do).
    """
    from famex.data.prepare import tokenizer_hash
    from famex.models import load_tokenizer

    if spec.kind == "hf" and not _has_tokenizer(spec.path):
        return load_tokenizer(chunks.data.dir / "tokenizer")
    tokenizer = load_tokenizer(spec)
    mine = tokenizer_hash(tokenizer)
    if store_dir:
        from famex.utils import read_json

        manifest = Path(store_dir) / "manifest.json"
        theirs = read_json(manifest).get("tokenizer_hash") if manifest.is_file() else None
        if theirs and theirs != mine:
            raise FamexError(
                f"logit store {store_dir} was made with another tokenizer than the model {spec.path} — the teacher and the "
                "model must share one tokenizer; make the store with `famex logits` over data tokenized with the model's tokenizer"
            )
    if mine != chunks.tokenizer_hash:
        raise FamexError(
            f"{chunks.data.dir} was tokenized with another tokenizer than the model {spec.path} (tokenizer hash "
            f"{chunks.tokenizer_hash[:12]} vs {mine[:12]}) — prepare it with the model's: famex data --tokenizer {spec.path} ..."
        )
    return tokenizer


def needs_calibration(fmt: QuantFormat, method: str) -> bool:
    return method == "gptq" or fmt.activations == "nvfp4"


def calibration_batches(chunks, tokens: int, seed: int = 0, rows: int = CALIBRATION_ROWS) -> list[dict[str, torch.Tensor]]:
    """``tokens`` worth of whole chunks, drawn across the split in the seeded chunk order, as model inputs.

    Each batch holds ``input_ids``, restarted ``position_ids`` and the block-diagonal causal
    ``attention_mask`` of packed documents (what `quantize_model` takes).
    """
    from famex.data.packing import chunk_permutation, collate, model_inputs

    n = min(len(chunks), max(1, math.ceil(tokens / chunks.seq_len)))
    if n == 0:
        raise FamexError(f"{chunks.data.dir}: the {chunks.split} split holds no complete chunk of {chunks.seq_len} tokens to calibrate on")
    if n < math.ceil(tokens / chunks.seq_len):
        log(f"quantize: calibrating on all {n * chunks.seq_len} tokens of {chunks.data.dir} ({tokens} asked)")
    order = chunk_permutation(len(chunks), seed)[:n]
    return [model_inputs(collate([chunks[int(i)] for i in order[j:j + rows]]), "sdpa") for j in range(0, n, rows)]


def gptq_options(cfg: QuantizeConfig) -> dict[str, Any]:
    return {"act_order": cfg.act_order, "damp": cfg.damp}


def _training_meta(spec) -> dict[str, Any]:
    from famex.stage import read_meta

    if spec.kind != "hf":
        return {}
    meta = read_meta(spec.path) or {}
    return meta if meta.get("stage") in ("distill", "sft", "dpo") else {}


def qad_batch_and_lr(cfg: QuantizeConfig, spec) -> tuple[int, float]:
    """Global batch and peak LR of QAD: explicit, else from the run that trained the model (the paper keeps its batch)."""
    meta = _training_meta(spec)
    batch = cfg.global_batch or meta.get("global_batch") or (meta.get("config") or {}).get("global_batch")
    peak = meta.get("lr") or (meta.get("config") or {}).get("lr")
    lr = cfg.lr or (float(peak) / 10 if peak else None)
    missing = [o for o, v in (("--global-batch", batch), ("--lr", lr)) if not v]
    if missing:
        raise FamexError(f"{' and '.join(missing)} required: {cfg.model} is not a famex training output whose meta.json gives them")
    return int(batch), float(lr)


# --------------------------------------------------------------------------- output


def write_quantized(out: Path, model, tokenizer, fmt: QuantFormat, qparams, method: str, info: dict[str, Any]) -> None:
    """`save_quantized` into the top level of ``out``, next to meta.json / checkpoints/ (which it would replace)."""
    from famex.quant.checkpoint import save_quantized

    tmp = out / ".quantized.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_quantized(model, tokenizer, fmt, qparams, method, tmp, **info)
    # Files move one by one; meta.json turns complete only after the last, so a crash in between
    # leaves a stage that reruns, never one that looks finished.
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def size_metrics(model, fmt: QuantFormat, qparams) -> dict[str, Any]:
    """Quantized parameters and their average stored bits per weight (scales included)."""
    n = sum(qp.codes.numel() for qp in qparams.values())
    bits = sum(qp.codes.numel() * fmt.bits_per_weight(qp.codes.shape[1]) for qp in qparams.values())
    return {"params_quantized": n, "bits_per_weight": bits / n if n else None}


# --------------------------------------------------------------------------- RTN / GPTQ


def quantize_stage(cfg: QuantizeConfig) -> Path:
    """Run the `famex quantize` stage; returns the output directory."""
    if cfg.method == "qad":
        return _quantize_qad(cfg)
    return _quantize_ptq(cfg)


def _quantize_ptq(cfg: QuantizeConfig) -> Path:
    from famex.data.packing import PackedChunks
    from famex.models import load_model, load_tokenizer
    from famex.quant.model import quantize_model
    from famex.stage import Stage, require_complete

    fmt = resolve_format(cfg)
    out = Path(cfg.out)
    spec = check_model(cfg.model)
    check_shapes(spec, fmt)
    chunks = None
    if cfg.calib:
        require_complete(cfg.calib, "data", "calibration data directory")
        chunks = PackedChunks(cfg.calib, "train")
        tokenizer = check_tokenizer(spec, chunks)
    elif needs_calibration(fmt, cfg.method):
        why = "GPTQ collects input Hessians" if cfg.method == "gptq" else f"{fmt.name} calibrates static activation scales"
        raise FamexError(f"--calib DATA_DIR is required: {why} on packed chunks of a famex data directory")
    elif spec.kind == "hf" and not _has_tokenizer(spec.path):
        tokenizer = None
        log(f"quantize: {spec.path} has no tokenizer files; the output will have none either")
    else:
        tokenizer = load_tokenizer(spec)
    inputs = {"model": str(spec.path), "calib": cfg.calib or None}
    stage = Stage(out, "quantize", cfg, inputs, identity_exclude=TRAIN_IDENTITY_EXCLUDE)
    if stage.begin():
        return out
    try:
        model = load_model(spec)
        calib = calibration_batches(chunks, cfg.calib_tokens, cfg.seed) if chunks is not None and needs_calibration(fmt, cfg.method) else None
        if chunks is not None and model.config.vocab_size != chunks.vocab_size:
            raise FamexError(f"vocab size mismatch: model {cfg.model} has {model.config.vocab_size}, calibration data "
                             f"{chunks.vocab_size} — calibrate on data tokenized with the model's tokenizer")
        kw = gptq_options(cfg) if cfg.method == "gptq" else {}
        from famex.models import resolve_device

        # RTN / GPTQ: each decoder block on the device in turn (auto = CUDA when present), the model on the CPU.
        result = quantize_model(model, fmt, cfg.method, calib, norm_fusion=cfg.norm_fusion, embeddings=cfg.embeddings,
                                lm_head=cfg.lm_head, device=resolve_device(cfg.device), **kw)
        write_quantized(out, model, tokenizer, fmt, result.qparams, cfg.method, result.info())
        metrics = {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds, "calib_tokens": result.calib_tokens,
                   **size_metrics(model, fmt, result.qparams)}
        stage.finish(metrics)
    except BaseException as e:
        stage.fail(e)
        raise
    return out


# --------------------------------------------------------------------------- QAD


def _quantize_qad(cfg: QuantizeConfig) -> Path:
    """The ``famex quantize --method qad`` stage (single process or torchrun DDP); returns ``cfg.out``."""
    from famex.data.packing import PackedChunks
    from famex.distill.train import DistillTask, open_store, validate_chunks
    from famex.distill.trainer import begin_on_ranks, checkpoint_dirs, setup_distributed, stage_on_ranks, train
    from famex.models import load_model
    from famex.quant.qad import attach_fake_quant, check_ste, init_quantization, placeholder_qparams, snap_to_grid
    from famex.stage import Stage, read_meta, require_complete

    fmt = resolve_format(cfg)
    check_ste(fmt)
    d = setup_distributed(cfg.device)
    if d.world > 1 and cfg.parallel == "fsdp":
        raise FamexError("QAD runs under DDP (--parallel ddp): the trainer's FSDP gather does not know the fake-quant "
                         "parametrizations yet")
    out = Path(cfg.out)
    spec = check_model(cfg.model)
    check_shapes(spec, fmt)
    require_complete(cfg.data, "data", "data directory")
    chunks = PackedChunks(cfg.data, "train")
    val = PackedChunks(cfg.data, "val") if has_split(chunks, "val") else None
    tokenizer = check_tokenizer(spec, chunks, store_dir=cfg.logits)
    store = open_store(cfg.logits, chunks, "logit store")
    val_store = open_store(cfg.val_logits, val, "validation logit store") if (cfg.val_logits and val) else None
    global_batch, lr = qad_batch_and_lr(cfg, spec)
    iters = int(cfg.iters or max(1, math.ceil(cfg.tokens / (global_batch * chunks.seq_len))))

    if cfg.init_from:
        check_init_from(cfg, spec, fmt)
    inputs = {"model": str(spec.path), "data": cfg.data, "logits": cfg.logits, "val_logits": cfg.val_logits or None,
              "init_from": cfg.init_from or None}
    stage = Stage(out, "quantize", cfg, inputs, identity_exclude=TRAIN_IDENTITY_EXCLUDE)
    old = read_meta(out) or {}
    extra = {"iters": iters, "lr": lr, "global_batch": global_batch}
    if old.get("start"):
        extra["start"] = old["start"]  # the RTN / GPTQ start's validation, measured once by the first attempt
    done = begin_on_ranks(stage, d, extra)
    if done:
        return out
    with stage_on_ranks(stage, d) as finish:
        model = load_model(cfg.init_from or spec)  # the start's on-grid (and norm-fused) weights, or the model's own
        if model.config.vocab_size != chunks.vocab_size:
            raise FamexError(f"vocab size mismatch: model {cfg.model} has {model.config.vocab_size}, data {chunks.vocab_size} — "
                             "the model must share the teacher's tokenizer")
        if checkpoint_dirs(out):
            # The checkpoint holds latent weights, norms and scales: shapes are all the start must supply.
            qparams, act = placeholder_qparams(model, fmt)
            calib_tokens = int((old.get("start") or {}).get("calib_tokens", 0))
        elif cfg.init_from:
            qparams, act, calib_tokens = start_from(model, cfg.init_from, fmt, cfg.norm_fusion)
        else:
            calib = calibration_batches(chunks, cfg.calib_tokens, cfg.seed) if needs_calibration(fmt, cfg.init) else None
            start = init_quantization(model, fmt, cfg.init, calib, cfg.norm_fusion, **gptq_options(cfg))
            qparams, act, calib_tokens = start.qparams, start.activation_modules, start.calib_tokens
        attach_fake_quant(model, fmt, qparams, act, cfg.learn_scales)
        task = DistillTask(chunks, store, kl_weight=1.0, tail=cfg.tail, val_chunks=val, val_store=val_store)
        if d.main and "start" not in stage.meta and not checkpoint_dirs(out):
            start_val = {"calib_tokens": calib_tokens}
            if cfg.init_from:
                start_val["from"] = cfg.init_from  # measured there (famex eval of that directory), not again here
            elif val is not None:
                start_val.update(validate_chunks(model, val, val_store, 0, 1, cfg.eval_chunks, tail=cfg.tail))
            stage.update(start=start_val)
        result = train(model, task, cfg, iters=iters, lr=lr, global_batch=global_batch, d=d,
                       tokens_per_sequence=chunks.seq_len, save_model=lambda m, p: None)
        if d.main:
            final = result.model
            qparams = snap_to_grid(final)
            act_names = getattr(final, "famex_qad_activation_modules", [])
            start_val = stage.meta.get("start", {})
            info = {
                "norm_fusion": cfg.norm_fusion, "activation_modules": act_names, "init": cfg.init,
                "learn_scales": cfg.learn_scales, "tokens": result.metrics.get("tokens"), "steps": iters,
                "calib_tokens": int(start_val.get("calib_tokens", 0)), "teacher_logits": cfg.logits,
            }
            write_quantized(out, final, tokenizer, fmt, qparams, "qad", info)
            metrics = dict(result.metrics)
            metrics.update({f"start_val_{k}": v for k, v in start_val.items() if k in ("ce", "kl")})
            metrics.update(size_metrics(final, fmt, qparams))
            finish(metrics)
    return out


def check_init_from(cfg: QuantizeConfig, spec, fmt) -> None:
    """Refuse an ``--init-from`` directory that is not the start this QAD would compute itself: a finished
    `famex quantize --method gptq` of the same model, format, norm fusion and calibration."""
    from famex.quant.checkpoint import is_quantized, read_info
    from famex.stage import require_complete

    if cfg.init != "gptq":
        raise FamexError("--init-from is for --init gptq: an RTN start takes seconds here and keeps the full-precision "
                         "latent weights QAD trains, which an RTN directory no longer holds (drop --init-from)")
    meta = require_complete(cfg.init_from, "quantize", "--init-from")
    if not is_quantized(cfg.init_from):
        raise FamexError(f"--init-from {cfg.init_from} holds no quantized model (quantization.json / qparams.safetensors)")
    info = read_info(cfg.init_from)
    made = meta.get("config", {})
    source = ((meta.get("inputs") or {}).get("model") or {}).get("path")
    wanted = {"method": cfg.init, "format": fmt.name, "norm_fusion": cfg.norm_fusion, "model": str(spec.path)}
    have = {"method": info.get("method"), "format": info.get("format_name"), "norm_fusion": info.get("norm_fusion"),
            "model": source}
    # GPTQ's result depends on its calibration sample: the same data's train split, tokens, seed and options.
    wanted.update(calib=str(Path(cfg.data).resolve()), calib_tokens=cfg.calib_tokens, seed=cfg.seed,
                  act_order=cfg.act_order, damp=cfg.damp)
    have.update(calib=str(Path(made.get("calib") or "").resolve()), calib_tokens=made.get("calib_tokens"),
                seed=made.get("seed"), act_order=made.get("act_order"), damp=made.get("damp"))
    if made.get("embeddings") or made.get("lm_head"):
        have["embeddings / lm_head"], wanted["embeddings / lm_head"] = True, False
    differ = [f"{k} {have[k]!r} (QAD wants {wanted[k]!r})" for k in wanted if have.get(k) != wanted[k]]
    if differ:
        raise FamexError(f"--init-from {cfg.init_from} is not the start this QAD asks for: " + "; ".join(differ)
                         + " — quantize with the same options first, or drop --init-from to quantize here")


def start_from(model, path: str, fmt, norm_fusion: bool) -> tuple[dict, list[str], int]:
    """QAD's start read from a quantized directory (``model`` loaded from it): its qparams, the modules whose
    inputs the format quantizes and its calibration tokens; the latent weights are its on-grid weights."""
    from famex.quant.checkpoint import load_qparams, read_info
    from famex.quant.model import QUANT_MARKER

    info = read_info(path)
    qparams = load_qparams(path)
    setattr(model.config, QUANT_MARKER, {"format": fmt.name, "method": "qad", "norm_fusion": norm_fusion})
    return qparams, list(info.get("activation_modules", [])), int(info.get("calib_tokens") or 0)


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = QuantizeConfig
run = quantize_stage
