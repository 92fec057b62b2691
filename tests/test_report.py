"""The family report: the Pareto front against hand-made examples, summary rows, figures, partial trees.

The run trees here are written by hand (meta.json / metrics.json / log.jsonl with chosen numbers),
so every expected value below is worked out from the numbers in `make_run`, not from the code.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import shutil
import sys
import types
from pathlib import Path

import pytest

from famex.cli import main as famex_main
from famex.errors import FamexError
from famex.report import stage as report_stage
from famex.report.pareto import dominates, frontier, pareto_mask
from famex.report.runtree import read_tree
from famex.report.stage import ReportConfig, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MB = 1_000_000
# The keys every summary.json row must carry (issue 9, item 3), written out here rather than imported.
REQUIRED_KEYS = ("model", "kind", "objective", "format", "method", "norm_fusion", "weight_averaging", "val_loss",
                 "fewshot_avg", "recovery", "size_bytes", "bits_per_weight", "on_pareto", "path")


# ---------------------------------------------------------------- the Pareto front, by hand


def test_pareto_lower_is_better_with_ties_and_missing_points():
    # (cost, loss). Worked out by hand:
    #   0 (1, 5.0)  cheapest                         -> on
    #   1 (2, 4.0)  better loss for more cost        -> on
    #   2 (2, 4.5)  same cost as 1, worse loss       -> off (1 dominates)
    #   3 (3, 4.0)  same loss as 1, more cost        -> off (1 dominates)
    #   4 (4, 3.0)                                   -> on
    #   5 (4, 3.0)  identical to 4: neither strictly better -> on
    #   6 (5, 3.5)  costlier and worse than 4        -> off
    #   7 (None)    no cost                           -> not placed
    #   8 (NaN)     no quality                        -> not placed
    costs = [1, 2, 2, 3, 4, 4, 5, None, 6]
    losses = [5.0, 4.0, 4.5, 4.0, 3.0, 3.0, 3.5, 1.0, math.nan]
    assert pareto_mask(costs, losses, higher_is_better=False) == [True, True, False, False, True, True, False, None, None]
    assert frontier(costs, losses, higher_is_better=False) == [0, 1, 4, 5]


def test_pareto_higher_is_better():
    # (cost, accuracy): the same geometry mirrored; the point with the lowest accuracy is now the
    # worst, and a costlier point is kept only when it is more accurate.
    costs = [1, 2, 2, 3, 5]
    accs = [0.30, 0.50, 0.40, 0.50, 0.60]
    assert pareto_mask(costs, accs, higher_is_better=True) == [True, True, False, False, True]
    # Read as losses instead, the same numbers give another front: only the cheapest point and the
    # one whose "loss" (0.40) beats every cheaper point's survive.
    assert pareto_mask(costs, accs, higher_is_better=False) == [True, False, False, False, False]
    assert frontier(costs, accs, higher_is_better=True) == [0, 1, 4]


def test_dominates_is_strict():
    assert dominates((1, 2.0), (1, 3.0), higher_is_better=False)
    assert not dominates((1, 2.0), (1, 2.0), higher_is_better=False)
    assert not dominates((1, 2.0), (0.5, 3.0), higher_is_better=False)
    assert dominates((1, 0.9), (2, 0.9), higher_is_better=True)


def test_pareto_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        pareto_mask([1, 2], [1.0], higher_is_better=False)


# ---------------------------------------------------------------- a hand-made run tree


def write_stage(root: Path, name: str, stage: str, config: dict, metrics: dict | None = None,
                inputs: dict | None = None, status: str = "complete") -> Path:
    d = root / name
    d.mkdir(parents=True)
    meta = {"stage": stage, "status": status, "config": config, "famex_version": "0.1.0",
            "inputs": {k: {"path": str(v), "hash": "x"} for k, v in (inputs or {}).items()}}
    (d / "meta.json").write_text(json.dumps(meta))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def write_log(d: Path, records: list[dict]) -> None:
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run(root: Path, evals: bool = True) -> Path:
    """A demo-like family. Base models (size MB, val loss); instruct (size MB, few-shot avg):

    teacher 1000/2.90 · distill-m 400/3.00 · distill-s 100/3.20 · distill-s-ce 100/3.50
    m int4: RTN 110/3.40, GPTQ 110/3.15, QAD 110/3.10, QAD+NF 110/3.10, RTN+WA 110/3.35
    dpo-s 100/0.50 · int3 QAD 40/0.46 · int3 RTN 40/0.30 · int2 RTN 30/0.25 (recovery given: 50) · int4 RTN (no size)
    """
    root.mkdir(parents=True)
    data = write_stage(root, "data", "data", {"seq_len": 256}, {"tokens": 120000, "tokens_train": 114000, "tokens_val": 6000})
    logits = write_stage(root, "logits-train", "logits", {"top_k": 64, "encoding": "compact", "split": "train"},
                         {"bytes_per_token": 60.5, "mass_covered": 0.93, "kl_decoded_vs_exact": 1e-4,
                          "tokens": 114000, "tokens_per_s": 450.0, "bytes": 6_897_000}, inputs={"data": data})
    for name, student, obj, val in (("distill-s", "demo-apertus-s", "kd", 3.2), ("distill-s-ce", "demo-apertus-s", "ce", 3.5),
                                    ("distill-m", "demo-apertus-m", "kd", 3.0)):
        d = write_stage(root, name, "distill", {"student": student, "logits": str(logits) if obj == "kd" else "none",
                                                "kl_weight": 0.9},
                        {"train_loss": val + 0.1, "val_loss": val, "tokens": 81920, "params": 1000, "objective": obj},
                        inputs={"data": data, **({"logits": logits} if obj == "kd" else {})})
        write_log(d, [{"step": s, "loss": 5 - s * 0.1, "kl": 1.0, "ce": 6 - s * 0.1, "lr": 1e-3, "grad_norm": 1.0,
                       "tokens": s * 2048, "tokens_per_s": 1000.0, **({"val_ce": val + 1 / s} if s % 2 == 0 else {})}
                      for s in range(1, 9)])
        # a torn last line, as a killed writer leaves it
        with open(d / "log.jsonl", "a") as f:
            f.write('{"step": 9, "lo')
    sft = write_stage(root, "sft-s", "sft", {"model": str(root / "distill-s")}, {"train_loss": 1.5},
                      inputs={"model": root / "distill-s"})
    dpo = write_stage(root, "dpo-s", "dpo", {"model": str(sft)}, {"train_loss": 0.6}, inputs={"model": sft})

    quants = {
        "quantize-m-int4-rtn": ("distill-m", "int4", "rtn", False, False),
        "quantize-m-int4-gptq": ("distill-m", "int4", "gptq", False, False),
        "quantize-m-int4-qad": ("distill-m", "int4", "qad", False, False),
        "quantize-m-int4-qad-nf": ("distill-m", "int4", "qad", True, False),
        "quantize-m-int4-rtn-wa": ("distill-m", "int4", "rtn", False, True),
        "quantize-dpo-s-int3-qad": ("dpo-s", "int3", "qad", False, False),
        "quantize-dpo-s-int3-rtn": ("dpo-s", "int3", "rtn", False, False),
        "quantize-dpo-s-int2-rtn": ("dpo-s", "int2", "rtn", False, False),
        "quantize-dpo-s-int4-rtn": ("dpo-s", "int4", "rtn", False, False),
    }
    for name, (parent, fmt, method, nf, wa) in quants.items():
        d = write_stage(root, name, "quantize", {"model": str(root / parent), "format": fmt, "method": method,
                                                 "norm_fusion": nf, "weight_averaging": wa},
                        inputs={"model": root / parent})
        if name == "quantize-m-int4-gptq":  # quantization.json wins over the config
            (d / "quantization.json").write_text(json.dumps({"format_name": "int4", "method": "gptq", "norm_fusion": False}))
    if not evals:
        return root

    def ev(dirname: str, model: Path | str, **metrics):
        write_stage(root, f"eval-{dirname}", "eval", {"model": str(model)}, {"model": str(model), **metrics},
                    inputs={"model": model} if isinstance(model, Path) else {})

    ev("teacher", "default", kind="base", format="bf16", method="none", val_loss=2.9, size_bytes=1000 * MB, name="teacher")
    ev("m", root / "distill-m", val_loss=3.0, size_bytes=400 * MB, bits_per_weight=16.0)
    ev("s", root / "distill-s", val_loss=3.2, size_bytes=100 * MB, bits_per_weight=16.0)
    ev("s-ce", root / "distill-s-ce", val_loss=3.5, size_bytes=100 * MB, bits_per_weight=16.0)
    # These say nothing about kind, format or method: the lineage says it.
    ev("m-int4-rtn", root / "quantize-m-int4-rtn", val_loss=3.4, size_bytes=110 * MB, bits_per_weight=4.25)
    ev("m-int4-gptq", root / "quantize-m-int4-gptq", val_loss=3.15, size_bytes=110 * MB, bits_per_weight=4.25)
    ev("m-int4-qad", root / "quantize-m-int4-qad", val_loss=3.1, size_bytes=110 * MB, bits_per_weight=4.25)
    ev("m-int4-qad-nf", root / "quantize-m-int4-qad-nf", val_loss=3.1, size_bytes=110 * MB, bits_per_weight=4.25)
    ev("m-int4-rtn-wa", root / "quantize-m-int4-rtn-wa", val_loss=3.35, size_bytes=110 * MB, bits_per_weight=4.25)
    ev("dpo-s", dpo, val_loss=3.3, fewshot_avg=0.5, size_bytes=100 * MB)
    ev("dpo-s-int3-qad", root / "quantize-dpo-s-int3-qad", fewshot_avg=0.46, size_bytes=40 * MB)
    ev("dpo-s-int3-rtn", root / "quantize-dpo-s-int3-rtn", fewshot_avg=0.30, size_bytes=40 * MB)
    ev("dpo-s-int2-rtn", root / "quantize-dpo-s-int2-rtn", fewshot_avg=0.25, size_bytes=30 * MB, recovery=50.0)
    ev("dpo-s-int4-rtn", root / "quantize-dpo-s-int4-rtn", fewshot_avg=0.40)
    return root


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "runs" / "demo")


@pytest.fixture
def no_figures(monkeypatch):
    """Figures replaced by empty files, for tests about rows and text (drawing costs about a second each)."""
    from famex.report import plots

    def touch(*args, **kwargs):
        path = next(a for a in args if isinstance(a, Path))
        path.write_bytes(b"")
        return path

    for name in ("training_curves", "logit_stats", "ablation_bars", "pareto_plot"):
        monkeypatch.setattr(plots, name, touch)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The report of the full tree, built once (figures cost seconds) for the tests that only read it."""
    base = tmp_path_factory.mktemp("full")
    root = make_run(base / "runs" / "demo")
    return root, report(ReportConfig(run_dir=str(root), out=str(base / "report")))


def by_variant(rows: list[dict]) -> dict[str, dict]:
    return {r["variant"]: r for r in rows}


def test_report_summary_rows(full):
    run_dir, out = full
    rows = json.loads((out / "summary.json").read_text())
    assert isinstance(rows, list) and len(rows) == 14
    for r in rows:
        assert set(REQUIRED_KEYS) <= set(r), r
    v = by_variant(rows)

    # Base front by hand (size, val loss): s bf16 (100, 3.2), m QAD and m QAD+NF (tied at 110, 3.1),
    # m bf16 (400, 3.0), teacher (1000, 2.9). Off: s-ce (same size as s, worse), RTN (s is smaller
    # and better), GPTQ (QAD same size, better), RTN+WA.
    on = {name for name, r in v.items() if r["on_pareto"] and r["kind"] == "base"}
    assert on == {"distill-s", "quantize-m-int4-qad", "quantize-m-int4-qad-nf", "distill-m", "teacher"}
    for name in ("distill-s-ce", "quantize-m-int4-rtn", "quantize-m-int4-gptq", "quantize-m-int4-rtn-wa"):
        assert v[name]["on_pareto"] is False, name
    # Instruct front (size, few-shot, higher is better): int2 RTN (30, .25), int3 QAD (40, .46), bf16 (100, .50).
    on = {name for name, r in v.items() if r["on_pareto"] and r["kind"] == "instruct"}
    assert on == {"quantize-dpo-s-int2-rtn", "quantize-dpo-s-int3-qad", "dpo-s"}
    assert v["quantize-dpo-s-int3-rtn"]["on_pareto"] is False
    assert v["quantize-dpo-s-int4-rtn"]["on_pareto"] is None  # no size: not placed

    # What the lineage says where eval metrics are silent.
    g = v["quantize-m-int4-gptq"]
    assert (g["model"], g["kind"], g["objective"], g["format"], g["method"], g["norm_fusion"], g["weight_averaging"]) == \
        ("distill-m", "base", "kd", "int4", "gptq", False, False)
    assert v["quantize-m-int4-qad-nf"]["norm_fusion"] is True
    assert v["quantize-m-int4-rtn-wa"]["weight_averaging"] is True
    d = v["dpo-s"]
    assert (d["model"], d["kind"], d["objective"], d["format"], d["method"]) == ("dpo-s", "instruct", "kd", "bf16", "none")
    assert v["distill-s-ce"]["objective"] == "ce"
    assert v["quantize-dpo-s-int3-qad"]["model"] == "dpo-s"
    assert v["teacher"]["objective"] is None and v["teacher"]["path"] == "default"
    assert Path(v["distill-m"]["path"]) == (run_dir / "distill-m").resolve()

    # Δ val loss against the BF16 model each was quantized from (distill-m: 3.0).
    assert v["quantize-m-int4-rtn"]["val_loss_increase"] == pytest.approx(0.40)
    assert v["quantize-m-int4-gptq"]["val_loss_increase"] == pytest.approx(0.15)
    assert v["quantize-m-int4-rtn-wa"]["val_loss_increase"] == pytest.approx(0.35)
    assert v["distill-m"]["val_loss_increase"] is None
    # Recovery: computed from dpo-s's 0.50 where eval gave none; eval's own value kept.
    assert v["quantize-dpo-s-int3-qad"]["recovery"] == pytest.approx(92.0)
    assert v["quantize-dpo-s-int3-rtn"]["recovery"] == pytest.approx(60.0)
    assert v["quantize-dpo-s-int2-rtn"]["recovery"] == 50.0

    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "report" and meta["status"] == "complete"
    assert "distill-m" in meta["inputs"] and "report" not in meta["inputs"]


def test_report_markdown_and_figures(full):
    _, out = full
    md = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    # Everything but the cost table (cost module stubbed out below) is in a full tree.
    assert set(metrics["sections"]) >= {"Pareto front", "Training curves", "Logit store", "Quantization ablation",
                                        "Weight averaging", "All evaluated models"}
    assert not any("could not be built" in why for why in metrics["skipped"].values()), metrics["skipped"]
    for name in ("pareto-base.png", "pareto-instruct.png", "training.png", "logits.png", "ablation-distill-m-base.png",
                 "ablation-dpo-s-instruct.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"]({name})" in md, name

    # The ablation row for int4 by hand: RTN +0.400, GPTQ +0.150, QAD +0.100 (bold), QAD + NF +0.100
    # (bold, tied); the best column names both. RTN + WA is not in it (weight averaging has its own table).
    int4 = next(line for line in md.splitlines() if line.startswith("| int4 | 4.25 |"))
    cells = [c.strip() for c in int4.strip("|").split("|")]
    assert cells == ["int4", "4.25", "+0.400", "+0.150", "**+0.100**", "**+0.100**", "QAD, QAD + NF"]
    # Weight averaging: RTN 3.40 -> 3.35, Δ 0.40 -> 0.35: 12.5% of the gap closed.
    assert "| distill-m | int4 | RTN | 3.400 | 3.350 | +0.400 | +0.350 | 12.5% |" in md
    # The KD student beats its CE-only twin by 0.3.
    assert "| demo-apertus-s | distill-s | 3.200 | distill-s-ce | 3.500 | -0.300 |" in md
    # The instruct ablation: recovery, best = QAD at int3.
    assert "| int3 | – | 60.0% | **92.0%** | QAD |" in md


def test_front_table_lists_the_front_in_cost_order(full):
    _, out = full
    md = (out / "report.md").read_text()
    base = md[md.index("### Base models"):md.index("### Instruct models")]
    listed = [line.split("|")[1:3] for line in base.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [(n.strip(), v.strip()) for n, v in listed] == [
        ("1", "distill-s bf16"), ("2", "distill-m int4 QAD"), ("3", "distill-m int4 QAD + NF"), ("4", "distill-m bf16"),
        ("5", "teacher bf16")]


def test_flops_axis(run_dir, tmp_path):
    # Only two base models have FLOPs per token: the front is computed on those alone.
    for name, flops in (("eval-m", 8e8), ("eval-s", 2e8)):
        p = run_dir / name / "metrics.json"
        m = json.loads(p.read_text())
        p.write_text(json.dumps({**m, "flops_per_token": flops}))
    out = report(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "report"), cost="flops"))
    v = by_variant(json.loads((out / "summary.json").read_text()))
    assert v["distill-s"]["on_pareto"] is True and v["distill-m"]["on_pareto"] is True
    assert v["teacher"]["on_pareto"] is None
    md = (out / "report.md").read_text()
    assert "flops_per_token missing in" in md
    assert (out / "pareto-base.png").stat().st_size > 5000
    # no instruct model has FLOPs: said, not drawn
    assert "Not drawn: 5 instruct model(s) evaluated" in md


def test_partial_tree_lists_skipped_sections(tmp_path):
    root = make_run(tmp_path / "run", evals=False)
    for d in root.iterdir():  # keep data, one distill, the logits; drop the rest
        if d.name not in ("data", "distill-s", "logits-train", "distill-m"):
            shutil.rmtree(d)
    meta = json.loads((root / "distill-m" / "meta.json").read_text())
    (root / "distill-m" / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    broken = root / "eval-broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (root / "notes").mkdir()  # no meta.json: not a stage, ignored

    out = report(ReportConfig(run_dir=str(root), out=str(tmp_path / "report")))
    md = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["skipped"]) == {"Findings", "Pareto front", "Quantization ablation", "Weight averaging",
                                       "All evaluated models"}
    assert all(why and "could not be built" not in why for why in metrics["skipped"].values())
    assert "**Skipped sections**" in md
    assert "- Pareto front: no complete `famex eval` stage" in md
    assert "- `distill-m`: status running" in md
    assert "- `eval-broken`: meta.json:" in md
    assert metrics["sections"] == ["Training curves", "Logit store", "Cost"]
    assert "No CE-only twin" in md
    assert json.loads((out / "summary.json").read_text()) == []


def test_garbage_metrics_do_not_stop_the_report(run_dir, tmp_path, monkeypatch):
    write_stage(run_dir, "eval-garbage", "eval", {}, {"model": 5, "val_loss": "low", "size_bytes": None, "kind": "base"})
    with open(run_dir / "distill-s" / "log.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 10, "tokens": 30000, "ce": "oops", "val_ce": None}) + "\n")
    from famex.report import plots

    def broken(*args, **kwargs):
        raise ValueError("a store with odd metrics")

    monkeypatch.setattr(plots, "logit_stats", broken)
    out = report(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "report")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"]["Logit store"] == "could not be built: ValueError: a store with odd metrics"
    assert {"Pareto front", "Training curves"} <= set(metrics["sections"]) and metrics["models"] == 15
    v = by_variant(json.loads((out / "summary.json").read_text()))
    assert v["eval-garbage"]["val_loss"] is None and v["eval-garbage"]["on_pareto"] is None


def test_quantized_without_bf16_reference_is_skipped_with_reason(tmp_path, no_figures):
    root = make_run(tmp_path / "run")
    for name in ("eval-m", "eval-dpo-s"):
        shutil.rmtree(root / name)
    out = report(ReportConfig(run_dir=str(root), out=str(tmp_path / "report")))
    metrics = json.loads((out / "metrics.json").read_text())
    # The int2 RTN eval gave its own recovery, so the instruct ablation still has something to show.
    assert "Quantization ablation" in metrics["sections"]
    md = (out / "report.md").read_text()
    assert "### distill-m (base)\n\nNo BF16 evaluation of this model" in md


def test_moved_tree_keeps_its_lineage(run_dir, tmp_path, no_figures):
    # Recorded paths point at the old location; stage directories are found by name instead.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(str(run_dir), str(moved))
    out = report(ReportConfig(run_dir=str(moved), out=str(tmp_path / "report")))
    v = by_variant(json.loads((out / "summary.json").read_text()))
    assert v["quantize-m-int4-gptq"]["val_loss_increase"] == pytest.approx(0.15)
    assert v["dpo-s"]["kind"] == "instruct"
    assert Path(v["distill-m"]["path"]) == (moved / "distill-m").resolve()


def test_averaging_stage_and_export_lineage(run_dir, tmp_path, no_figures):
    # An averaging stage reads checkpoints inside distill-m; an export re-packs a quantized model.
    ckpts = [run_dir / "distill-m" / "checkpoints" / f"step-{i}" for i in (20, 40)]
    avg = write_stage(run_dir, "average-m", "average", {"checkpoints": [str(c) for c in ckpts]},
                      inputs={f"checkpoint{i}": c for i, c in enumerate(ckpts)})
    q = write_stage(run_dir, "quantize-avg-m-int4-rtn", "quantize", {"model": str(avg), "format": "int4", "method": "rtn",
                                                                      "norm_fusion": False}, inputs={"model": avg})
    exp = write_stage(run_dir, "export-m-int4-qad", "export", {"model": str(run_dir / "quantize-m-int4-qad")},
                      inputs={"model": run_dir / "quantize-m-int4-qad"})
    for name, model, val in (("avg-m", avg, 2.98), ("avg-m-int4-rtn", q, 3.30), ("export-m-int4-qad", exp, 3.12)):
        write_stage(run_dir, f"eval-{name}", "eval", {"model": str(model)},
                    {"model": str(model), "val_loss": val, "size_bytes": 110 * MB}, inputs={"model": model})
    out = report(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "report")))
    v = by_variant(json.loads((out / "summary.json").read_text()))
    a = v["average-m"]
    assert (a["model"], a["format"], a["weight_averaging"]) == ("distill-m", "bf16", True)
    r = v["quantize-avg-m-int4-rtn"]
    assert (r["model"], r["weight_averaging"]) == ("distill-m", True)
    assert r["val_loss_increase"] == pytest.approx(3.30 - 2.98)  # against the averaged model it was made from
    e = v["export-m-int4-qad"]
    assert (e["model"], e["format"], e["method"], e["source_stage"]) == ("distill-m", "int4", "qad", "export")
    assert e["val_loss_increase"] == pytest.approx(0.12)
    md = (out / "report.md").read_text()
    # The ablation shows the quantized model's QAD (+0.100), not the export's (+0.120) ...
    assert "| int4 | 4.25 | +0.400 | +0.150 | **+0.100** | **+0.100** | QAD, QAD + NF |" in md
    # ... and the weight-averaging table pairs both averaged variants with their plain twins.
    assert "| distill-m | bf16 | — | 3.000 | 2.980 |" in md
    assert "| distill-m | int4 | RTN | 3.400 | 3.300 | +0.400 | +0.320 | 20.0% |" in md


def test_cost_section_calls_famex_cost(run_dir, tmp_path, monkeypatch, no_figures):
    from famex.eval.cost import family_cost, format_cost_table, stage_cost

    doc = family_cost([stage_cost("logits-train", 135_000_000, 114_000, "forward"),
                       stage_cost("distill-s", 1000, 81920, "train")])
    seen = []
    fake = types.ModuleType("fake_costcli")
    fake.__spec__ = importlib.machinery.ModuleSpec("fake_costcli", None)
    fake.cost_document = lambda path: seen.append(Path(path)) or doc
    monkeypatch.setitem(sys.modules, "fake_costcli", fake)
    monkeypatch.setattr(report_stage, "COST_MODULE", "fake_costcli")
    ctx = report_stage.Context(read_tree(run_dir), [], "size_bytes", tmp_path, 100)

    def cost_section():
        return report_stage.build_section("Cost", report_stage.section_cost, ctx)

    sec = cost_section()
    assert seen == [run_dir] and sec.skipped is None
    assert format_cost_table(doc).strip() in sec.body
    # logits: 1.35E8 params x 114,000 tokens forward = 1.54E13 under the paper's convention
    assert "1.54E13" in sec.body

    monkeypatch.setattr(report_stage, "COST_MODULE", "famex.eval.no_such_module")
    assert cost_section().skipped == "this famex has no `famex cost` yet (famex/eval/no_such_module.py)"

    def refuses(path):
        raise FamexError("no teacher parameter count in the run")

    fake.cost_document = refuses
    monkeypatch.setattr(report_stage, "COST_MODULE", "fake_costcli")
    assert cost_section().skipped == "`famex cost` could not cost this run: no teacher parameter count in the run"
    # and in the report: the skipped section is listed with its reason
    out = report(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "refused")))
    assert "- Cost: `famex cost` could not cost this run: no teacher parameter count" in (out / "report.md").read_text()


def test_rerun_is_a_noop_until_the_tree_changes(run_dir, tmp_path, capsys, no_figures):
    out = tmp_path / "report"
    assert famex_main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    first = json.loads((out / "meta.json").read_text())
    report(ReportConfig(run_dir=str(run_dir), out=str(out)))
    assert json.loads((out / "meta.json").read_text()) == first  # untouched
    shutil.rmtree(run_dir / "eval-teacher")
    report(ReportConfig(run_dir=str(run_dir), out=str(out)))
    rows = json.loads((out / "summary.json").read_text())
    assert "teacher" not in by_variant(rows) and len(rows) == 13


def test_default_out_inside_the_run_is_not_read_back(run_dir, no_figures):
    out = report(ReportConfig(run_dir=str(run_dir)))
    assert out == run_dir / "report"
    assert "report" not in {s.stage for s in read_tree(run_dir).stages}
    again = report(ReportConfig(run_dir=str(run_dir), dpi=100))  # another config: rebuilt in place
    assert json.loads((again / "meta.json").read_text())["config"]["dpi"] == 100


def test_bad_input(tmp_path, run_dir):
    with pytest.raises(FamexError, match="run directory not found"):
        report(ReportConfig(run_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FamexError, match="no stage directories"):
        report(ReportConfig(run_dir=str(tmp_path / "empty")))
    with pytest.raises(FamexError, match="not a report"):
        report(ReportConfig(run_dir=str(run_dir), out=str(run_dir / "distill-s")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(FamexError, match="not a report directory"):
        report(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "other")))


def test_teacher_scored_few_shot_joins_the_instruct_front(tmp_path, no_figures):
    root = make_run(tmp_path / "runs" / "demo")
    meta = json.loads((root / "eval-teacher" / "metrics.json").read_text())
    meta["fewshot_avg"] = 0.7  # better than every instruct student, and the largest
    (root / "eval-teacher" / "metrics.json").write_text(json.dumps(meta))
    out = report(ReportConfig(run_dir=str(root), out=str(tmp_path / "report")))
    md = (out / "report.md").read_text()
    instruct = md[md.index("### Instruct models"):md.index("## Training curves")]
    assert "teacher bf16" in instruct
    # Without a few-shot score the teacher stays off the instruct front (it is only on the base one).
    meta.pop("fewshot_avg")
    (root / "eval-teacher" / "metrics.json").write_text(json.dumps(meta))
    out = report(ReportConfig(run_dir=str(root), out=str(tmp_path / "report2")))
    md = (out / "report.md").read_text()
    assert "teacher bf16" not in md[md.index("### Instruct models"):md.index("## Training curves")]


def test_paired_differences_carry_their_standard_error_and_noise_marks(tmp_path):
    """Two evaluations of the same chunks: the s.e. of their val-loss difference is paired over chunks
    (slow reference: per-chunk differences with numpy); identical models are within noise, a model
    worse on every chunk by far more than the spread is not."""
    import numpy as np

    from famex.eval.stats import paired_se, within_noise
    from famex.report.tables import fmt_diff
    from famex.utils import atomic_write_json

    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(200, 256, size=40)]
    base = rng.normal(3.0, 0.4, size=40) * tokens
    worse = base + rng.normal(0.05, 0.01, size=40) * tokens
    for name, sums in (("a", base), ("b", base.copy()), ("c", worse)):
        (tmp_path / name).mkdir()
        atomic_write_json(tmp_path / name / "val_chunks.json", {"ce_sum": [float(x) for x in sums], "tokens": tokens})
    d = (worse - base)
    t = np.array(tokens, float)
    ratio = d.sum() / t.sum()
    ref = np.sqrt(len(d) / (len(d) - 1) * ((d - ratio * t) ** 2).sum()) / t.sum()
    se = paired_se(str(tmp_path / "c"), str(tmp_path / "a"))
    assert se == pytest.approx(ref, rel=1e-9) and 0 < se < 0.01  # far below the unpaired spread of 0.4 / sqrt(40)
    assert within_noise(ratio, se) is False and "s.e.)" in fmt_diff(ratio, se)
    assert paired_se(str(tmp_path / "b"), str(tmp_path / "a")) == 0.0
    assert within_noise(0.0, 1e-3) is True and "within noise" in fmt_diff(0.0005, 1e-3)
    assert paired_se(str(tmp_path / "a"), str(tmp_path / "missing")) is None and within_noise(0.1, None) is None


def test_pareto_plot_draws_each_points_standard_error(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from famex.report.plots import pareto_plot

    bars = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, **kw: bars.append((x, y, kw["yerr"])) or real(self, x, y, **kw))
    rows = [{"model": "s", "format": "bf16", "size_bytes": 4e6, "val_loss": 3.2, "val_loss_se": 0.05},
            {"model": "s", "format": "int4", "size_bytes": 1e6, "val_loss": 3.4, "val_loss_se": 0.06},
            {"model": "t", "format": "bf16", "size_bytes": 9e6, "val_loss": 3.0}]  # no s.e.: no bar
    path = pareto_plot(rows, rows[:2], "size_bytes", "val_loss", False, "front", tmp_path / "p.png")
    assert path.is_file() and sorted(b[2] for b in bars) == [0.05, 0.06]


def test_pruned_vs_random_init_twins_and_qad_recovery_carry_paired_errors(tmp_path, no_figures):
    """A family with a student pruned from the teacher, its random-init twin of the same shape and its
    CE-only twin (sharing the prune stage), each evaluated on the same chunks, plus RTN / GPTQ / QAD of
    the teacher at int4: the report pairs them and prints each difference ± its paired s.e. (reference:
    the ratio estimator on per-chunk differences, computed here with numpy) and QAD's recovered fraction."""
    import numpy as np

    from famex.utils import atomic_write_json

    root = tmp_path / "runs" / "demo"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(200, 256, size=30)]
    t = np.array(tokens, float)
    base = rng.normal(4.0, 0.3, size=30) * t

    def ev(dirname: str, model: Path | str, shift: float, **metrics) -> np.ndarray:
        sums = base + rng.normal(shift, 0.02, size=30) * t
        d = write_stage(root, f"eval-{dirname}", "eval", {"model": str(model)},
                        {"model": str(model), "val_loss": float(sums.sum() / t.sum()), **metrics},
                        inputs={"model": model} if isinstance(model, Path) else {})
        atomic_write_json(d / "val_chunks.json", {"ce_sum": [float(x) for x in sums], "tokens": tokens})
        return sums

    # The teacher as `famex run` now holds a GGUF one: dequantized into the tree by a prune that removes nothing.
    teacher = write_stage(root, "teacher", "prune", {"teacher": "default", "out": str(root / "teacher")})
    shape = {"teacher": str(teacher), "layers": 4, "mlp": 512}
    pruned = write_stage(root, "prune-p", "prune", {**shape, "out": str(root / "prune-p")})
    rand = write_stage(root, "prune-p-rand", "prune", {**shape, "random_init": True, "out": str(root / "prune-p-rand")})
    for name, student, obj in (("distill-p", pruned, "kd"), ("distill-p-ce", pruned, "ce"), ("distill-p-rand", rand, "kd")):
        write_stage(root, name, "distill", {"student": str(student), "logits": "x" if obj == "kd" else "none"},
                    {"val_loss": 9.0, "params": 1000, "objective": obj}, inputs={"model": student})
    for fmt_name, method in (("int4", "rtn"), ("int4", "gptq"), ("int4", "qad")):
        write_stage(root, f"quantize-teacher-{fmt_name}-{method}", "quantize",
                    {"model": str(teacher), "format": fmt_name, "method": method, "norm_fusion": True}, inputs={"model": teacher})
    sums = {"teacher": ev("teacher", teacher, 0.0, name="teacher"),
            "p": ev("p", root / "distill-p", 0.5), "p-ce": ev("p-ce", root / "distill-p-ce", 0.8),
            "p-rand": ev("p-rand", root / "distill-p-rand", 2.0)}
    for method, shift in (("rtn", 0.30), ("gptq", 0.10), ("qad", 0.04)):
        sums[method] = ev(f"teacher-int4-{method}", root / f"quantize-teacher-int4-{method}", shift, name="teacher")
    text = report(ReportConfig(run_dir=str(root), out=str(tmp_path / "report"))).joinpath("report.md").read_text()

    def diff(a: str, b: str) -> str:
        d = sums[a] - sums[b]
        r = d.sum() / t.sum()
        se = np.sqrt(len(d) / (len(d) - 1) * ((d - r * t) ** 2).sum()) / t.sum()
        return f"{r:+.3f} ± {se:.3f} ({abs(r) / se:.0f} s.e.)"

    training = text[text.index("## Training curves"):]
    init_line = next(line for line in training.splitlines() if "| distill-p-rand |" in line and "| distill-p |" in line)
    assert "| KD |" in init_line and "| distill-p |" in init_line and diff("p", "p-rand") in init_line
    twin_line = next(line for line in training.splitlines() if "| distill-p-ce |" in line and "| distill-p |" in line)
    assert twin_line.startswith("| prune-p | distill-p |") and diff("p", "p-ce") in twin_line
    qad_line = next(line for line in text.splitlines() if line.startswith("| int4 | yes |"))
    gap = {m: (sums[m] - sums["teacher"]).sum() / t.sum() for m in ("rtn", "gptq", "qad")}
    assert diff("qad", "rtn") in qad_line and diff("qad", "gptq") in qad_line
    assert f"{100 * (gap['rtn'] - gap['qad']) / gap['rtn']:.1f}%" in qad_line
    assert f"{100 * (gap['gptq'] - gap['qad']) / gap['gptq']:.1f}%" in qad_line
    assert "### teacher (base)" in text  # the teacher's own ablation

    # The findings at the top: every claim of the run as one paired difference, noise marked.
    findings = text[text.index("## Findings"):text.index("## Training curves")]

    def row(label: str) -> str:
        return next(line for line in findings.splitlines() if line.startswith(f"| {label} |"))

    assert diff("p", "teacher") in row("student − teacher") and "| distill-p | 4." in row("student − teacher")
    assert diff("p", "p-ce") in row("KD − CE-only") and diff("p", "p-rand") in row("from the teacher − random init")
    assert diff("gptq", "rtn") in row("GPTQ − RTN + NF, teacher int4")
    qad = row("QAD − GPTQ + NF, teacher int4")
    assert diff("qad", "gptq") in qad and f"recovers {100 * (gap['gptq'] - gap['qad']) / gap['gptq']:.1f}% of GPTQ's gap" in qad
    # The tree's dequantized directory is the teacher (for the fronts), its quantized variants are not.
    from famex.report.stage import _is_teacher

    rows = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert sorted(r["variant"] for r in rows if _is_teacher(r)) == ["teacher"]
