"""Shared fixtures: tiny corpora and models built in temp dirs, and the offline default teacher (loaded once)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FAMEX_QUIET", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "The rain in Spain stays mainly in the plain.",
    "Knowledge is power, and power corrupts.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Every cloud has a silver lining.",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` short English documents of varying length (deterministic)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 6))) + f" Document {i}." for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return path


@pytest.fixture(scope="session")
def teacher():
    """The offline default teacher (SmolLM2-135M-Instruct, GGUF) and its tokenizer."""
    from famex.models import load_teacher

    return load_teacher("default")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, teacher):
    """The default teacher's tokenizer saved as a plain HF directory (fast to load)."""
    path = tmp_path_factory.mktemp("tokenizer")
    teacher[1].save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tokenizer_dir):
    """A prepared data directory: 300 short documents, seq_len 64, 10% validation."""
    from famex.data.prepare import DataConfig, prepare

    root = tmp_path_factory.mktemp("tinydata")
    src = write_jsonl(root / "docs.jsonl", make_docs(300))
    out = root / "data"
    prepare(DataConfig(input=[str(src)], out=str(out), tokenizer=str(tokenizer_dir), seq_len=64, val_fraction=0.1, workers=1))
    return out


# Tiny causal LMs and packed calibration batches for the quantization tests.
QUANT_VOCAB = 128


def tiny_lm(arch: str = "llama", tie: bool = False, hidden: int = 64, seed: int = 0):
    """A 2-layer random Llama or Apertus of vocabulary `QUANT_VOCAB`, norms away from 1 (so norm fusion acts)."""
    import torch
    from transformers import ApertusConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    kw = dict(vocab_size=QUANT_VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tie)
    config = (ApertusConfig if arch == "apertus" else LlamaConfig)(**kw)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def packed_calib(n: int = 3, rows: int = 2, T: int = 32, seed: int = 0, labels: bool = True) -> list[dict]:
    """Packed rows of two documents: restarted positions, block-diagonal causal 4-D masks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cut = T // 3
    seg = torch.cat([torch.zeros(cut), torch.ones(T - cut)]).long()
    pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).expand(rows, T).clone()
    mask = ((seg[:, None] == seg[None, :]) & torch.tril(torch.ones(T, T, dtype=torch.bool))).expand(rows, 1, T, T).clone()
    batches = []
    for _ in range(n):
        b = {"input_ids": torch.randint(0, QUANT_VOCAB, (rows, T), generator=g), "position_ids": pos, "attention_mask": mask}
        if labels:
            b["labels"] = torch.zeros(rows, T, dtype=torch.long)
        batches.append(b)
    return batches


def logits_of(model, batches: list[dict]):
    """The model's logits over ``batches``, concatenated (no gradient)."""
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                                attention_mask=b["attention_mask"]).logits for b in batches])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core machine two spin-waiting
    OpenMP threads made tiny forwards up to 25x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; subprocesses get OMP_NUM_THREADS=1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers compiles flex attention on first use; on CPU the compile alone takes longer than
    the test, so here flex runs its exact (unfused) eager forward, with the same BlockMask."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def eager(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)
    yield
