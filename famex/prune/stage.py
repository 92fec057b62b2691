"""`famex prune`: a smaller student cut from the teacher (depth and width), as a plain HF directory.

``famex prune --teacher default --data DATA_DIR --layers 10 --mlp 768 --kv-heads 2 --hidden 384 --out DIR``

Students initialised from the teacher (Minitron, Sheared-LLaMA; beyond the Apertus paper, whose
students start from random weights): the teacher runs once over calibration chunks of the data
directory's train split (`famex.prune.importance`), then

- depth: ``--depth influence`` keeps the ``--layers`` layers of highest block influence (1 − cos of
  a layer's input and output hidden states), ``--depth every`` keeps evenly spaced ones;
- width, ranked by activation importance: ``--mlp`` MLP channels per layer, ``--kv-heads`` KV groups
  per layer (with their query heads), ``--hidden`` hidden channels across the model.

0 (the default) keeps a dimension whole. The output has the teacher's architecture and tokenizer
(`AutoModelForCausalLM.from_pretrained` loads it without famex), fp32 weights, and
``importance.json`` with every score. ``--random-init`` writes the same shape with fresh seeded
weights instead (no calibration pass): the control that tells what the teacher's weights bring. `famex distill --student
DIR` trains either.

What this module does not do: train (distillation heals the pruned model), or iterate
prune–retrain rounds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.utils import atomic_write_json, log

CALIBRATION_TOKENS = 16384


@dataclass
class PruneConfig:
    teacher: str = "default"
    """Model to cut: 'default' (SmolLM2-135M-Instruct GGUF), a GGUF file or a model directory."""
    out: str = ""
    """Output model directory (config.json, model.safetensors, tokenizer, importance.json, meta.json)."""
    data: str = ""
    """A `famex data` directory tokenized with the teacher's tokenizer: calibration chunks from its train split."""
    layers: int = 0
    """Decoder layers to keep (0 = all)."""
    depth: Literal["influence", "every"] = "influence"
    """Which layers: the highest block influence on the calibration data, or evenly spaced (every k-th)."""
    mlp: int = 0
    """MLP channels to keep per layer, by mean |activation| into down_proj (0 = all)."""
    kv_heads: int = 0
    """KV groups to keep per layer with their query heads, by attention-output norm (0 = all)."""
    hidden: int = 0
    """Hidden channels to keep, by mean |RMSNorm output| over all norms (0 = all)."""
    calib_tokens: int = CALIBRATION_TOKENS
    """Calibration tokens (whole chunks drawn across the train split by --seed)."""
    random_init: bool = False
    """Write the pruned shape with fresh random weights (seeded) instead of the teacher's: the control."""
    seed: int = 0
    """Seed of the calibration chunk order and of --random-init."""

    def validate(self) -> None:
        if not self.out:
            raise FamexError("--out DIR is required")
        if min(self.layers, self.mlp, self.kv_heads, self.hidden) < 0:
            raise FamexError("--layers, --mlp, --kv-heads and --hidden are counts to keep (0 = all); none may be negative")
        if self.calib_tokens < 1:
            raise FamexError(f"--calib-tokens must be positive, not {self.calib_tokens}")
        if self.removes_anything() and not self.data and not self.random_init and not (self.depth == "every" and not self.width()):
            raise FamexError("--data DATA_DIR is required: importance is measured on calibration chunks "
                             "(only --depth every without width pruning needs none)")

    def width(self) -> bool:
        return bool(self.mlp or self.kv_heads or self.hidden)

    def removes_anything(self) -> bool:
        return bool(self.layers or self.width())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PruneConfig)


def main(args: argparse.Namespace) -> int:
    prune(resolve_config(PruneConfig, args))
    return 0


def check_sizes(config, cfg: PruneConfig) -> None:
    """`FamexError` when a count to keep exceeds the teacher's or breaks its head layout."""
    text = config.get_text_config()
    for flag, keep, have in (("--layers", cfg.layers, text.num_hidden_layers), ("--mlp", cfg.mlp, text.intermediate_size),
                             ("--kv-heads", cfg.kv_heads, text.num_key_value_heads), ("--hidden", cfg.hidden, text.hidden_size)):
        if keep > have:
            raise FamexError(f"{flag} {keep}: the teacher has only {have}; keep at most that many")
    if cfg.hidden and cfg.hidden % 2:
        raise FamexError(f"--hidden {cfg.hidden}: keep an even number of hidden channels")
    if cfg.hidden or cfg.kv_heads:
        # The architecture's own rules for the new sizes (Llama: hidden_size a multiple of the query
        # heads, although head_dim is written out), checked now rather than after calibration.
        import copy

        rep = text.num_attention_heads // text.num_key_value_heads
        new = copy.deepcopy(text)
        new.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        new.hidden_size = cfg.hidden or text.hidden_size
        new.num_key_value_heads = cfg.kv_heads or text.num_key_value_heads
        new.num_attention_heads = new.num_key_value_heads * rep
        try:
            getattr(new, "validate_architecture", lambda: None)()
        except ValueError as e:
            raise FamexError(f"--hidden {new.hidden_size} with {new.num_attention_heads} query heads: {text.model_type} "
                             f"refuses it ({e}); choose --hidden a multiple of {new.num_attention_heads}") from None


def plan_from(importance, config, cfg: PruneConfig):
    """The `PrunePlan` that the config's counts and the measured importance choose."""
    import torch

    from famex.prune.importance import keep_layers, top_indices
    from famex.prune.slicing import full_plan

    text = config.get_text_config()
    plan = full_plan(config)
    # Without importance (--random-init: only the shape matters) the first channels and evenly spaced layers.
    depth = cfg.depth if importance is not None else "every"
    layers = keep_layers(importance, text.num_hidden_layers, cfg.layers or text.num_hidden_layers, depth)
    mlp = [plan.mlp[0]] * len(layers)
    groups = [plan.groups[0]] * len(layers)
    if cfg.mlp and cfg.mlp < text.intermediate_size:
        mlp = (list(top_indices(importance.mlp[layers], cfg.mlp)) if importance is not None
               else [torch.arange(cfg.mlp)] * len(layers))
    if cfg.kv_heads and cfg.kv_heads < text.num_key_value_heads:
        groups = (list(top_indices(importance.group_scores(text.num_key_value_heads)[layers], cfg.kv_heads))
                  if importance is not None else [torch.arange(cfg.kv_heads)] * len(layers))
    hidden = plan.hidden
    if cfg.hidden and cfg.hidden < text.hidden_size:
        hidden = top_indices(importance.hidden, cfg.hidden) if importance is not None else torch.arange(cfg.hidden)
    plan.layers, plan.mlp, plan.groups, plan.hidden = layers, mlp, groups, torch.as_tensor(hidden)
    return plan


def prune(cfg: PruneConfig) -> Path:
    """Run the `famex prune` stage; returns the output model directory."""
    import torch

    from famex.models import load_teacher, resolve_model_spec, save_model
    from famex.prune.importance import measure_importance
    from famex.prune.slicing import pruned_model
    from famex.stage import Stage, require_complete

    cfg.validate()
    spec = resolve_model_spec(cfg.teacher)
    chunks = None
    if cfg.data:
        from famex.data.packing import PackedChunks

        require_complete(cfg.data, "data", "calibration data directory")
        chunks = PackedChunks(cfg.data, "train")
    out = Path(cfg.out)
    inputs = {"teacher": None if cfg.teacher == "default" else str(spec.path), "data": cfg.data or None}
    stage = Stage(out, "prune", cfg, inputs)
    if stage.begin():
        return out
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_teacher(cfg.teacher)
        check_sizes(model.config, cfg)
        if chunks is not None:
            from famex.quant.stage import calibration_batches

            if chunks.vocab_size > model.config.vocab_size:
                raise FamexError(f"vocab size mismatch: teacher {model.config.vocab_size}, data {cfg.data} {chunks.vocab_size} — "
                                 "calibrate on data tokenized with the teacher's tokenizer")
        importance = None
        if cfg.removes_anything() and chunks is not None and not cfg.random_init:  # random weights: the shape alone
            batches = calibration_batches(chunks, cfg.calib_tokens, cfg.seed)
            importance = measure_importance(model, batches)
        plan = plan_from(importance, model.config, cfg)
        student = pruned_model(model, plan)
        if cfg.random_init:
            from transformers import AutoModelForCausalLM

            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                student = AutoModelForCausalLM.from_config(student.config, dtype=torch.float32, attn_implementation="sdpa")
        save_model(student, out, tokenizer)
        record: dict[str, Any] = {"kept_layers": plan.layers, "teacher_layers": model.config.num_hidden_layers,
                                  "random_init": cfg.random_init}
        if importance is not None:
            record["importance"] = importance.as_dict()
            record["kept_mlp"] = [m.tolist() for m in plan.mlp]
            record["kept_kv_groups"] = [g.tolist() for g in plan.groups]
            record["kept_hidden"] = plan.hidden.tolist()
        atomic_write_json(out / "importance.json", record)
        params = sum(p.numel() for p in student.parameters())
        teacher_params = sum(p.numel() for p in model.parameters())
        metrics = {"params": params, "teacher_params": teacher_params, "params_fraction": params / teacher_params,
                   "layers": len(plan.layers), "calib_tokens": importance.tokens if importance else 0,
                   "seconds": time.perf_counter() - t0}
        log(f"famex prune: {teacher_params / 1e6:.1f}M → {params / 1e6:.1f}M parameters "
            f"(layers {plan.layers}){' with random weights' if cfg.random_init else ''} → {out}")
    except BaseException as e:
        stage.fail(e)
        raise
    stage.finish(metrics)
    return out


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = PruneConfig
run = prune
