"""Presets match Table 1, info counts without allocating, the default teacher is a real language model."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys

import pytest
import torch

from famex.errors import FamexError
from famex.models import build_student, model_info, preset_config, resolve_model_spec


def slow_param_count(config) -> tuple[int, int]:
    """Count parameters from the shapes by hand (Apertus: no biases, xIELU has 2 learnable scalars per layer)."""
    d, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    hd = config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 2 * d * f + 2 * d + 2 * hd + 2
    emb = V * d * (1 if config.tie_word_embeddings else 2)
    return L * per_layer + d + emb, emb


@pytest.mark.parametrize("preset,table1", [
    ("apertus-v1.1-0.5b", 0.4), ("apertus-v1.1-1.5b", 1.5), ("apertus-v1.1-4b", 3.8), ("apertus-8b", 8.1),
])
def test_presets_match_table1(preset, table1):
    info = model_info(preset)
    assert info["vocab_size"] == 131072
    assert round(info["params_total"] / 1e9, 1) == table1
    expected_total, expected_emb = slow_param_count(preset_config(preset))
    assert info["params_total"] == expected_total
    assert info["params_non_embedding"] == expected_total - expected_emb
    assert info["bytes_bf16"] == 2 * expected_total


def test_table1_shapes():
    rows = {
        "apertus-v1.1-0.5b": (20, 1024, 6144, 16, 4, True), "apertus-v1.1-1.5b": (16, 2048, 12288, 32, 8, False),
        "apertus-v1.1-4b": (24, 3072, 16384, 24, 8, False), "apertus-8b": (32, 4096, 21504, 32, 8, False),
    }
    for name, (layers, d, mlp, h, kv, tied) in rows.items():
        c = preset_config(name)
        assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                c.num_key_value_heads, c.tie_word_embeddings) == (layers, d, mlp, h, kv, tied)
        assert c.model_type == "apertus" and c.hidden_act == "xielu"


def test_info_cli_json_on_meta_device():
    # An 8B model in fp32 would need 32 GB; counting it must not allocate anything like that.
    r = subprocess.run([sys.executable, "-m", "famex", "info", "--preset", "apertus-8b", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("params_total", "params_non_embedding", "layers", "d_model", "vocab_size", "bytes_bf16"):
        assert key in info
    assert info["layers"] == 32 and info["d_model"] == 4096


def test_student_takes_teacher_vocab(teacher):
    _, tok = teacher
    student = build_student("tiny-apertus", len(tok), tok)
    assert student.config.vocab_size == len(tok) == 49152
    assert student.config.eos_token_id == tok.eos_token_id
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied like the 0.5B
    a = build_student("tiny-apertus", len(tok), tok, seed=1).state_dict()
    b = build_student("tiny-apertus", len(tok), tok, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_teacher_is_a_language_model(teacher):
    model, tok = teacher
    assert model.config.vocab_size == 49152
    text = ("The history of the city goes back to Roman times, when a small settlement grew up around a bridge over "
            "the river. In the Middle Ages it became an important market town, and its cathedral was built in the "
            "twelfth century. Today it is known for its university and its museums.")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    uniform = math.log(model.config.vocab_size)  # 10.8 nats
    assert loss < 0.5 * uniform, (loss, uniform)


def test_not_a_language_model_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(FamexError, match="junk.gguf"):
        resolve_model_spec(bad)
    with pytest.raises(FamexError, match="not found"):
        resolve_model_spec(tmp_path / "missing")


def test_saved_checkpoints_are_readable_by_others(tmp_path):
    """safetensors writes owner-only files; a checkpoint other users and jobs read gets umask permissions."""
    from famex.models import build_student, save_model

    old = os.umask(0o022)
    try:
        save_model(build_student("tiny-apertus", 300), tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_resolve_device_on_cpu():
    """--device: auto is the CPU here; a CUDA device that is absent, or a name torch does not know, fails with the fix named
    (resolve_attn is tested in test_packing.py)."""
    from famex.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(FamexError, match="no CUDA device.*--device cpu"):
            resolve_device("cuda")
    with pytest.raises(FamexError, match="unknown device"):
        resolve_device("tpu7")


def test_every_model_stage_has_the_attn_option():
    from famex.distill.train import DistillConfig
    from famex.posttrain.dpo import DpoConfig
    from famex.posttrain.sft import SftConfig
    from famex.quant.stage import QuantizeConfig
    from famex.teacher.generate import LogitsConfig

    for cls in (DistillConfig, SftConfig, DpoConfig, QuantizeConfig, LogitsConfig):
        assert cls().attn == "auto", cls
