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
