"""The shared training options: composed into every training stage, and invisible to users.

``tests/data/recipe_configs_v0.json`` holds the resolved configs (what meta.json records) of one
node per stage kind and method of both shipped recipes, written by famex before `TrainOptions`
existed (commit 8e59347, where each stage config inherited from ``TrainConfig`` and redeclared
the fields whose defaults differ). The demo recipe of that time is kept as ``tests/data/demo_v0.toml``
(the shipped demo has changed since). The configs resolved now must be those, and a stage directory
whose meta.json famex wrote then must still be complete with the same arguments (not re-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from famex.config import add_config_arguments, compose, config_defaults, config_dict, config_from_dict, field_docs, resolve_config
from famex.stage import COMPLETE, Stage
from famex.train_options import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((Path(__file__).parent / "data" / "recipe_configs_v0.json").read_text())
TRAINING_STAGES = ("distill", "sft", "dpo", "quantize")
# The recipe files GOLDEN was written from, where the shipped one has changed since.
RECIPE_FILES = {"configs/demo.toml": Path(__file__).parent / "data" / "demo_v0.toml"}


def stage_config(stage: str) -> type:
    from famex.run.recipe import _module

    return _module(stage).CONFIG


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """The recipes planned over run directories an older famex began: there, the demo's data stage was made
    with the GGUF teacher itself as tokenizer, so the plan keeps reading the GGUF (no teacher/ directory)."""
    import os

    from famex.run.recipe import load_recipe

    here = tmp_path_factory.mktemp("old-runs")
    for name, nodes in GOLDEN.items():
        if "data" in nodes:
            old = here / nodes["data"]["config"]["out"]
            old.mkdir(parents=True)
            (old / "meta.json").write_text(json.dumps({"stage": "data", "status": COMPLETE, "config": nodes["data"]["config"]}))
    cwd = os.getcwd()
    os.chdir(here)  # the recipes' run directories are relative (runs/demo)
    try:
        return {name: load_recipe(RECIPE_FILES.get(name, ROOT / name)) for name in GOLDEN}
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("recipe_name", sorted(GOLDEN))
def test_recipes_resolve_to_the_configs_older_famex_recorded(recipes, recipe_name):
    nodes = {n.name: n for n in recipes[recipe_name].nodes}
    for name, old in GOLDEN[recipe_name].items():
        node = nodes[name]
        assert node.stage == old["stage"]
        cfg = config_from_dict(stage_config(node.stage), node.config, recipe_name)
        got, defaults = config_dict(cfg), config_defaults(cfg)
        # Options added since (e.g. `famex data --shard`) at their defaults: what the old config meant.
        added = {k for k in set(got) - set(old["config"]) if k in defaults and got[k] == defaults[k]}
        assert {k: v for k, v in got.items() if k not in added} == old["config"], name


def test_a_stage_older_famex_finished_is_not_rerun(tmp_path):
    """meta.json of a complete stage, as famex wrote it before: the same options now find it complete."""
    for name, old in GOLDEN["configs/demo.toml"].items():
        out = tmp_path / name
        out.mkdir()
        meta = {"stage": old["stage"], "status": COMPLETE, "config": old["config"], "inputs": {},
                "famex_version": "0.1.0", "started": "2026-12-05T12:00:00+0000", "finished": "2026-12-05T12:01:00+0000"}
        (out / "meta.json").write_text(json.dumps(meta))
        cls = stage_config(old["stage"])
        options = {k: v for k, v in old["config"].items() if k != "out"}
        cfg = config_from_dict(cls, {**options, "out": str(out)})
        stage = Stage(out, old["stage"], cfg, inputs={})
        assert stage.differences({**meta, "config": {**old["config"], "out": str(out)}}) == []
        assert stage.begin() is True, name  # complete with these arguments: nothing to do


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_training_stage_composes_the_shared_options(stage):
    cls = stage_config(stage)
    assert TrainOptions in cls.__composed__
    names = {f.name for f in dataclasses.fields(cls)}
    assert {f.name for f in dataclasses.fields(TrainOptions)} <= names
    docs = field_docs(cls)
    for f in dataclasses.fields(TrainOptions):
        assert docs[f.name] == field_docs(TrainOptions)[f.name]  # one docstring, wherever composed


def test_each_stage_states_the_papers_defaults():
    """Pre-training: AdEMAMix + WSD; post-training and QAD: AdamW + cosine (DESIGN.md)."""
    got = {s: {k: getattr(stage_config(s)(), k) for k in ("optimizer", "schedule", "weight_decay", "warmup_fraction",
                                                            "global_batch", "micro_batch", "lr")}
           for s in TRAINING_STAGES}
    assert got == {
        "distill": dict(optimizer="ademamix", schedule="wsd", weight_decay=0.1, warmup_fraction=0.01, global_batch=None,
                        micro_batch=1, lr=None),
        "sft": dict(optimizer="adamw", schedule="cosine", weight_decay=0.1, warmup_fraction=0.03, global_batch=64,
                    micro_batch=1, lr=None),
        "dpo": dict(optimizer="adamw", schedule="cosine", weight_decay=0.0, warmup_fraction=0.1, global_batch=32,
                    micro_batch=4, lr=5e-7),
        "quantize": dict(optimizer="adamw", schedule="cosine", weight_decay=0.0, warmup_fraction=0.01, global_batch=None,
                         micro_batch=1, lr=None),
    }


# ---------------------------------------------------------------- compose itself


@dataclass
class Shared:
    steps: int = 10
    """Optimizer steps."""
    rate: float | None = None
    """Peak rate."""
    tags: list[str] | None = None
    """Free tags."""


@dataclass
@compose(Shared, steps=3, tags=["a"], notes={"rate": "default: worked out at run time", "steps": "fewer here"}, help_prefix="x: ")
class Composed:
    out: str = ""
    """Where it goes."""


def test_compose_adds_the_fields_flat_with_the_stage_defaults(tmp_path):
    assert [f.name for f in dataclasses.fields(Composed)] == ["out", "steps", "rate", "tags"]
    cfg = Composed(out="o", rate=0.5)  # constructor keywords as if declared here
    assert (cfg.steps, cfg.rate, cfg.tags) == (3, 0.5, ["a"])
    assert Composed().tags is not Composed().tags  # a list default is copied, not shared
    assert config_dict(cfg) == {"out": "o", "steps": 3, "rate": 0.5, "tags": ["a"]}
    assert Shared().steps == 10  # the options class keeps its own defaults
    assert field_docs(Composed) == {"out": "Where it goes.", "steps": "Optimizer steps.", "rate": "Peak rate.",
                                    "tags": "Free tags."}
    toml = tmp_path / "c.toml"
    toml.write_text("steps = 7\n")
    p = argparse.ArgumentParser()
    add_config_arguments(p, Composed)
    help_text = " ".join(p.format_help().split())
    assert "x: Optimizer steps. (default: 3; fewer here)" in help_text
    assert "x: Peak rate. (default: worked out at run time)" in help_text
    cfg = resolve_config(Composed, p.parse_args(["--config", str(toml), "--rate", "2"]))
    assert (cfg.steps, cfg.rate) == (7, 2.0)


def test_compose_refuses_a_redeclared_or_unknown_option():
    with pytest.raises(TypeError, match="declares steps, which Shared has"):
        @compose(Shared)
        class Twice:
            steps: int = 4
    with pytest.raises(TypeError, match="no such option stepz"):
        compose(Shared, stepz=1)
