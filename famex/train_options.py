"""The options every training stage shares: optimizer, schedule, batch, checkpointing, logging, parallelism.

`TrainOptions` is composed into the config of each stage that trains (`famex distill`, `famex sft`,
`famex dpo`, `famex quantize --method qad`) with `famex.config.compose`, which adds its fields flat:
the same option names on the command line, the same TOML keys, the same keys in meta.json. Its
defaults are the paper's pre-training recipe (AdEMAMix + WSD); a stage states only what differs
(post-training and QAD: AdamW + cosine), once, in its ``compose(...)`` line, with a note where a
default is worked out at run time (``--lr`` from the distill run, ``--iters`` from ``--epochs``).

`DistillOptions` (which logit store, KL weight, temperature, tail) is composed the same way into
the stages that distil from a store with a CE term beside the KL (`famex distill`, `famex sft`).

What this module does not do: train (`famex.distill.trainer` reads these options), or declare the
options that mean something different per stage (``out``, ``seed``: each stage says what they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainOptions:
    """Options every training stage shares (composed into stage configs with `famex.config.compose`)."""

    global_batch: int | None = None
    """Examples per optimizer step: chunks of the data's seq_len (dpo: preference pairs)."""
    micro_batch: int = 1
    """Examples per forward/backward on one rank; the rest of the global batch is accumulated."""
    iters: int | None = None
    """Optimizer steps."""
    lr: float | None = None
    """Peak learning rate."""
    optimizer: Literal["ademamix", "adamw"] = "ademamix"
    """AdEMAMix (the paper's pre-training optimizer) or AdamW (its post-training and QAD optimizer)."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    betas: list[float] | None = None
    """Optimizer betas (AdEMAMix: β1 β2 β3, default 0.9 0.999 0.9999; AdamW: β1 β2, default 0.9 0.95)."""
    ademamix_alpha: float = 8.0
    """AdEMAMix mixing weight α of the slow EMA (warmed up over the whole run, as in the paper)."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """Learning-rate schedule: warm-up/stable/decay, cosine, or constant after warm-up."""
    warmup_fraction: float = 0.01
    """Fraction of the steps spent in linear warm-up."""
    decay_fraction: float = 0.2
    """WSD: fraction of the steps in the final decay."""
    decay_shape: Literal["linear", "cosine", "sqrt", "1-sqrt"] = "1-sqrt"
    """WSD: shape of the final decay."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the decay, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    save_every: int = 500
    """Write a checkpoint every N steps (0 = only the final model)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""
    eval_every: int = 500
    """Validate every N steps and at the end (0 = only at the end)."""
    eval_chunks: int = 0
    """Validation chunks per evaluation (0 = the whole validation split; dpo: held-out pairs)."""
    log_every: int = 10
    """Write a log line every N steps."""
    loss_chunk_tokens: int = 1024
    """Tokens per lm_head chunk in the loss (memory ≈ this × vocabulary × 4 bytes)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: replicate the model (DDP) or shard it with FSDP2 fully_shard."""
    device: str = "auto"
    """auto, cpu, cuda."""
    attn: Literal["auto", "sdpa", "flex", "flash_attention_2"] = "auto"
    """Attention kernel for packed documents: auto = flex (document BlockMask, no T×T mask) on CUDA, sdpa (dense boolean mask) on CPU."""
    prefetch: int = 2
    """Optimizer steps whose micro-batches a background thread prepares ahead (0 = none)."""


@dataclass
class DistillOptions:
    """The distillation objective's options: the teacher's stored top-k and how the loss weighs it
    (composed into `famex distill` and `famex sft`; QAD distils with KL alone and says its own)."""

    logits: str = ""
    """A `famex logits` store over the data's train split: the teacher's top-k the model distils from."""
    val_logits: str = ""
    """Optional store over the val split: validation then also reports KL to the teacher."""
    kl_weight: float = 0.9
    """Weight of the KL term; the CE term gets 1 − kl_weight (the paper's 0.9 / 0.1)."""
    temperature: float = 1.0
    """Distillation temperature (1 = the teacher's own distribution)."""
    tail: Literal["renormalize", "bucket"] = "renormalize"
    """Teacher mass outside the top-k: renormalize the top-k, or keep it as one extra bucket."""


# Options that change speed or bookkeeping, not the weights a run ends with.
TRAIN_IDENTITY_EXCLUDE = ("save_every", "keep_last", "eval_every", "eval_chunks", "log_every", "prefetch",
                          "device", "micro_batch", "loss_chunk_tokens", "attn")
