"""Size on disk counts weight files only; bits per weight and tokens/s are the plain formulas."""

from __future__ import annotations

import pytest
import torch

from famex.errors import FamexError
from famex.eval import footprint
from famex.eval.footprint import bits_per_weight, model_size, throughput


def test_model_size_counts_weight_files_only(tmp_path):
    files = {
        "model-00001-of-00002.safetensors": 1000, "model-00002-of-00002.safetensors": 500,
        "pytorch_model.bin": 70, "config.json": 300, "tokenizer.json": 9000, "training_args.bin": 40,
        ".model.safetensors.1234.tmp": 800, "weights.npz": 5,
    }
    for name, n in files.items():
        (tmp_path / name).write_bytes(b"x" * n)
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"x" * 4000)
    assert model_size(tmp_path) == 1000 + 500 + 70 + 5
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 123)
    assert model_size(gguf) == 123


def test_model_size_of_a_saved_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    m.save_pretrained(tmp_path)
    n_params = sum(p.numel() for p in m.parameters())
    # safetensors: 8-byte header length, the JSON header, then the fp32 tensors.
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert model_size(tmp_path) == header + 4 * n_params
    assert bits_per_weight(model_size(tmp_path), n_params) == pytest.approx(32 * (1 + header / (4 * n_params)))


def test_bad_model_dirs(tmp_path):
    with pytest.raises(FamexError, match="no weight files"):
        model_size(tmp_path)
    with pytest.raises(FamexError, match="not found"):
        model_size(tmp_path / "nope")
    with pytest.raises(FamexError, match="positive parameter count"):
        bits_per_weight(10, 0)


def test_bits_per_weight():
    assert bits_per_weight(1_000, 2_000) == 4.0
    assert bits_per_weight(3 * 1024, 8 * 1024) == 3.0


class CountingLM(torch.nn.Module):
    """Records the shapes it is called with; has the two attributes throughput reads."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"vocab_size": 50})()
        self.calls = []

    def forward(self, input_ids, use_cache=False):
        assert not self.training and not torch.is_grad_enabled()
        assert int(input_ids.max()) < 50
        self.calls.append(tuple(input_ids.shape))


def test_throughput_is_tokens_over_median_time(monkeypatch):
    ticks = iter([0.0, 5.0,  # warm-up, not counted
                  10.0, 12.0, 20.0, 21.0, 30.0, 34.0])  # 2 s, 1 s, 4 s -> median 2 s
    monkeypatch.setattr(footprint, "perf_counter", lambda: next(ticks))
    m = CountingLM().train()
    tps = throughput(m, seq_len=16, batch=3, iters=3, warmup=1)
    assert tps == 3 * 16 / 2.0
    assert m.calls == [(3, 16)] * 4
    assert m.training  # mode restored


def test_throughput_runs_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    assert throughput(m, seq_len=8, batch=2, iters=2) > 0
