"""Student presets: the Apertus-v1.1 shapes of Table 1 and tiny shapes for tests and the demo.

A preset is a row of data (`Preset`), turned into a `transformers.ApertusConfig` by
`preset_config`. Real presets keep Apertus' own defaults (xIELU, QK-norm, llama3 RoPE); every
preset takes the teacher's vocabulary and special-token ids, because students must share the
teacher's tokenizer for logit distillation to mean anything.

What this module does not do: allocate weights (see `famex.models.build_student`) or load teachers.
"""

from __future__ import annotations

from dataclasses import dataclass

from famex.errors import FamexError


@dataclass(frozen=True)
class Preset:
    name: str
    layers: int
    d_model: int
    mlp: int
    heads: int
    kv_heads: int
    tied: bool
    vocab_size: int = 131072
    """Vocabulary of the real Apertus family; replaced by the teacher's when building a student."""
    real: bool = True
    """Real family shapes keep Apertus' long-context RoPE; tiny ones use plain RoPE."""
    lr: float | None = None
    """Paper's peak learning rate for this size (None: not a paper student)."""
    global_batch: int | None = None
    """Paper's global batch in sequences of 4096 tokens."""
    iters: int | None = None
    """Paper's number of optimizer steps."""
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("apertus-v1.1-0.5b", 20, 1024, 6144, 16, 4, True, lr=6e-4, global_batch=512, iters=800_000,
               description="Apertus-v1.1 0.5B student (Table 1)"),
        Preset("apertus-v1.1-1.5b", 16, 2048, 12288, 32, 8, False, lr=3e-4, global_batch=512, iters=800_000,
               description="Apertus-v1.1 1.5B student (Table 1)"),
        Preset("apertus-v1.1-4b", 24, 3072, 16384, 24, 8, False, lr=2e-4, global_batch=1024, iters=400_000,
               description="Apertus-v1.1 4B student (Table 1)"),
        Preset("apertus-8b", 32, 4096, 21504, 32, 8, False,
               description="Apertus-8B teacher shape (Table 1)"),
        Preset("tiny-apertus", 2, 64, 256, 4, 2, True, real=False,
               description="2-layer test model (seconds to train)"),
        Preset("demo-apertus-s", 4, 256, 1024, 4, 2, True, real=False,
               description="small demo student"),
        Preset("demo-apertus-m", 6, 384, 1536, 6, 2, True, real=False,
               description="larger demo student"),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise FamexError(
            f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)} "
            "(or pass a model directory instead)"
        ) from None


def preset_config(preset: Preset | str, vocab_size: int | None = None, special_tokens: dict | None = None):
    """The `ApertusConfig` of a preset, with the teacher's vocabulary and special-token ids."""
    from transformers import ApertusConfig

    p = get_preset(preset) if isinstance(preset, str) else preset
    kwargs = dict(
        vocab_size=vocab_size or p.vocab_size,
        hidden_size=p.d_model,
        intermediate_size=p.mlp,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        tie_word_embeddings=p.tied,
        head_dim=p.d_model // p.heads,
    )
    if not p.real:
        kwargs.update(max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    for key, value in (special_tokens or {}).items():
        kwargs[key] = value
    config = ApertusConfig(**kwargs)
    # mlx-lm's Apertus reader needs these fields spelled out in config.json.
    config.mlp_bias = False
    config.qk_norm = True
    config.post_norm = False
    return config
