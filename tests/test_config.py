"""Typed stage configs: docstrings become help, TOML < CLI, unknown keys name the closest valid key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from famex.config import add_config_arguments, config_dict, field_docs, resolve_config
from famex.errors import FamexError


@dataclass
class ToyConfig:
    learning_rate: float = 6e-4
    """Peak learning rate."""
    iters: int = 10
    """Optimizer steps."""
    name: str = "x"
    """A name."""
    tags: list[str] = field(default_factory=list)
    """Free tags."""
    fused: bool = True
    """Fuse norms."""
    shape: Literal["linear", "cosine"] = "linear"
    """Decay shape."""
    limit: int | None = None
    """Optional limit."""


def parse(argv, cls=ToyConfig):
    p = argparse.ArgumentParser()
    add_config_arguments(p, cls)
    return resolve_config(cls, p.parse_args(argv))


def test_field_docs_are_read_from_source():
    assert field_docs(ToyConfig) == {
        "learning_rate": "Peak learning rate.", "iters": "Optimizer steps.", "name": "A name.", "tags": "Free tags.",
        "fused": "Fuse norms.", "shape": "Decay shape.", "limit": "Optional limit.",
    }


def test_defaults_toml_and_cli_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('learning_rate = 1e-3\niters = 5\ntags = ["a", "b"]\nfused = false\n')
    cfg = parse([])
    assert cfg == ToyConfig()
    cfg = parse(["--config", str(toml)])
    assert (cfg.learning_rate, cfg.iters, cfg.tags, cfg.fused) == (1e-3, 5, ["a", "b"], False)
    cfg = parse(["--config", str(toml), "--iters", "7", "--fused", "--shape", "cosine", "--limit", "3"])
    assert (cfg.learning_rate, cfg.iters, cfg.fused, cfg.shape, cfg.limit) == (1e-3, 7, True, "cosine", 3)
    assert config_dict(cfg)["tags"] == ["a", "b"]


def test_unknown_toml_key_names_the_closest(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("learning_rte = 1e-3\n")
    with pytest.raises(FamexError, match=r"unknown key 'learning_rte'; did you mean 'learning_rate'"):
        parse(["--config", str(toml)])


def test_bad_types_are_named(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('iters = "many"\n')
    with pytest.raises(FamexError, match="iters must be int"):
        parse(["--config", str(toml)])
    toml.write_text('shape = "square"\n')
    with pytest.raises(FamexError, match="shape must be one of linear, cosine"):
        parse(["--config", str(toml)])


def test_help_text_carries_docstring_and_default(capsys):
    p = argparse.ArgumentParser()
    add_config_arguments(p, ToyConfig)
    help_text = p.format_help()
    assert "Peak learning rate. (default: 0.0006)" in help_text
    assert "--no-fused" in help_text
