"""Reading a run tree: which stages it holds, how models descend from each other, one row per evaluated model.

A run tree is ``RUN_DIR/<stage>-<variant>/``, each subdirectory a stage directory (DESIGN.md). Stages
are recognised by their ``meta.json`` (``stage``, ``status``), never by directory names. Only
complete stages feed the report; running / failed ones and unreadable directories are listed so
the report can say what it left out.

**The eval metrics the report reads** (``eval`` stage, ``metrics.json``; every key may be missing,
and what is missing is inferred from the model's lineage where that is possible, else left out of
the report with a stated reason):

=================== ==========================================================================
``model``           the evaluated model directory (else the eval config's ``model``)
``name``            optional display name of the family member (else inferred, see below)
``kind``            ``"base"`` | ``"instruct"`` (else: instruct when an sft/dpo stage is an ancestor)
``objective``       ``"kd"`` | ``"ce"`` pre-training objective (else: the distill ancestor's)
``format``          ``"bf16"`` for unquantized models, else the format name (``int4``, ``fp8``, ...)
``method``          ``"none"`` | ``"rtn"`` | ``"gptq"`` | ``"qad"``
``norm_fusion``     bool
``weight_averaging`` bool: the model (or its BF16 parent) averages the last checkpoints
``val_loss``        mean next-token CE on the val split, nats/token
``acc/<task>``      few-shot accuracy, fraction in [0, 1]
``acc_norm/<task>`` length-normalized accuracy, fraction in [0, 1]
``fewshot_avg``     macro average over tasks (acc_norm where defined, else acc), fraction in [0, 1]
``recovery``        fewshot_avg / the BF16 reference's fewshot_avg, in percent
``size_bytes``      size of the model as deployed in its format (weights + scales), bytes
``bits_per_weight`` average stored bits per quantized weight (scales included)
``params``          parameter count
``flops_per_token`` forward FLOPs per token (state the convention in ``flops_convention``)
``tokens_per_s``    forward throughput
=================== ==========================================================================

Lineage: the evaluated directory is located in the tree (a path inside a stage directory, e.g. a
checkpoint, belongs to that stage), then its model input is followed (``inputs.model``,
``inputs.student``, else ``config.model``) up to a directory outside the tree. The family member
(``model`` in a row) is the nearest ancestor that is not a quantize / export / average / eval stage;
the BF16 reference of a quantized model is the model its quantize stage read. A model with an
``average`` stage among its ancestors counts as weight-averaged.

What this module does not do: draw, format tables, or write anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from famex.eval.stats import paired_se
from famex.report.pareto import pareto_mask
from famex.utils import read_json

COMPLETE = "complete"
QUANT_STAGES = ("quantize",)
# Stages that make a variant of a model, not a new family member (weight averaging included: the
# averaged checkpoints are the same student).
PASS_THROUGH = ("quantize", "export", "eval", "average")
POST_TRAINING = ("sft", "dpo")
MODEL_STAGES = ("distill", "sft", "dpo", "quantize", "export", "average")
PARENT_KEYS = ("model", "student")
SUMMARY_KEYS = (
    "model", "kind", "objective", "format", "method", "norm_fusion", "weight_averaging", "val_loss",
    "fewshot_avg", "recovery", "size_bytes", "bits_per_weight", "on_pareto", "path",
)
# Where the Pareto front reads cost from, and how quality is judged per kind of model.
COST_KEYS = {"size": "size_bytes", "flops": "flops_per_token"}
QUALITY = {"base": ("val_loss", False), "instruct": ("fewshot_avg", True)}


@dataclass(frozen=True)
class StageDir:
    """One stage directory of the tree: its meta.json and (possibly empty) metrics.json."""

    path: Path
    meta: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage"))

    @property
    def status(self) -> str:
        return str(self.meta.get("status"))

    @property
    def config(self) -> dict[str, Any]:
        c = self.meta.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def inputs(self) -> dict[str, Any]:
        i = self.meta.get("inputs")
        return i if isinstance(i, dict) else {}


@dataclass
class RunTree:
    root: Path
    stages: list[StageDir]
    """Complete stage directories, sorted by name."""
    incomplete: list[StageDir] = field(default_factory=list)
    """Stage directories whose status is not complete (running, failed)."""
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    """Directories with a meta.json or metrics.json that could not be read, and why."""

    def of(self, *stages: str) -> list[StageDir]:
        return [s for s in self.stages if s.stage in stages]

    def locate(self, path: str | Path | None) -> tuple[StageDir, Path] | None:
        """The stage directory holding ``path`` and the path's remainder inside it, if any."""
        if not path:
            return None
        p = Path(path)
        resolved = p.resolve() if p.exists() else None
        by_name = {s.name: s for s in self.stages}
        if resolved is not None:
            for s in self.stages:
                sp = s.path.resolve()
                if resolved == sp or sp in resolved.parents:
                    return s, resolved.relative_to(sp)
        # A tree that was moved or copied keeps its recorded (old) paths: match the stage
        # directory by name, from the end so a run nested in another run finds the inner one.
        parts = p.parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] in by_name:
                return by_name[parts[i]], Path(*parts[i + 1:]) if i + 1 < len(parts) else Path()
        return None

    def normalize(self, path: str | Path | None) -> str | None:
        """One spelling per model directory: the located path in this tree, else the path as given."""
        if not path:
            return None
        hit = self.locate(path)
        if hit is None:
            p = Path(path)
            return str(p.resolve()) if p.exists() else str(path)
        s, rest = hit
        return str((s.path / rest).resolve())

    def parent_path(self, s: StageDir) -> str | None:
        """The model directory a stage read, as recorded: its ``model`` / ``student`` input, else the
        first input inside a model-making stage of the tree (checkpoints read by an averaging stage)."""
        for key in PARENT_KEYS:
            entry = s.inputs.get(key)
            if isinstance(entry, dict) and entry.get("path"):
                return str(entry["path"])
        for key in PARENT_KEYS:
            value = s.config.get(key)
            if isinstance(value, str) and value and self.locate(value) is not None:
                return value
        for _, entry in sorted(s.inputs.items()):
            path = entry.get("path") if isinstance(entry, dict) else None
            hit = self.locate(path)
            if hit is not None and hit[0].stage in MODEL_STAGES:
                return str(path)
        return None

    def lineage(self, s: StageDir) -> list[StageDir]:
        """``s`` and the stages its model descends from, nearest first (stops at cycles)."""
        chain = [s]
        while True:
            hit = self.locate(self.parent_path(chain[-1]))
            if hit is None or hit[0] in chain:
                return chain
            chain.append(hit[0])


def read_tree(root: str | Path) -> RunTree:
    """Every stage directory directly below ``root``, read from its meta.json (and metrics.json)."""
    root = Path(root)
    tree = RunTree(root, [])
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            continue
        try:
            meta = _read_object(meta_path)
        except ValueError as e:
            tree.unreadable.append((d, f"meta.json: {e}"))
            continue
        if meta.get("stage") == "report":
            continue
        if meta.get("status") != COMPLETE:
            tree.incomplete.append(StageDir(d, meta))
            continue
        metrics: dict[str, Any] = {}
        if (d / "metrics.json").is_file():
            try:
                metrics = _read_object(d / "metrics.json")
            except ValueError as e:
                tree.unreadable.append((d, f"metrics.json: {e}"))
                continue
        tree.stages.append(StageDir(d, meta, metrics))
    return tree


def _read_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a training ``log.jsonl``; a torn or malformed line (a run killed mid-write) is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def objective_of(s: StageDir | None) -> str | None:
    """``kd`` or ``ce`` for a distill stage: its metrics say, else whether it read a logit store."""
    if s is None:
        return None
    if s.metrics.get("objective") in ("kd", "ce"):
        return s.metrics["objective"]
    logits = s.config.get("logits")
    if logits is None:
        return None
    return "ce" if logits in ("none", "") else "kd"


def _quant_info(s: StageDir) -> dict[str, Any]:
    """What a quantize stage made: quantization.json where the model dir has one, else its config."""
    info: dict[str, Any] = {}
    try:
        q = _read_object(s.path / "quantization.json")
    except ValueError:
        q = {}
    cfg = s.config
    fmt = q.get("format_name") or cfg.get("format")
    info["format"] = fmt if isinstance(fmt, str) else None
    info["method"] = q.get("method") or cfg.get("method")
    nf = q.get("norm_fusion", cfg.get("norm_fusion"))
    info["norm_fusion"] = bool(nf) if nf is not None else None
    wa = q.get("weight_averaging", cfg.get("weight_averaging"))
    if wa is not None:
        info["weight_averaging"] = bool(wa)
    return info


def eval_row(tree: RunTree, ev: StageDir) -> dict[str, Any]:
    """One summary row for an eval stage: its metrics, gaps filled from the evaluated model's lineage."""
    m = ev.metrics
    inputs_model = ev.inputs.get("model")
    candidates = (m.get("model"), ev.config.get("model"), inputs_model.get("path") if isinstance(inputs_model, dict) else None)
    model_path = next((c for c in candidates if isinstance(c, str) and c), None)
    hit = tree.locate(model_path)
    chain = tree.lineage(hit[0]) if hit else []
    quant = next((s for s in chain if s.stage in QUANT_STAGES), None)
    member = next((s for s in chain if s.stage not in PASS_THROUGH), None)
    distill = next((s for s in chain if s.stage == "distill"), None)

    inferred: dict[str, Any] = {
        "kind": "instruct" if any(s.stage in POST_TRAINING for s in chain) else "base",
        "objective": objective_of(distill),
        "format": "bf16", "method": "none", "norm_fusion": False,
        "weight_averaging": any(s.stage == "average" for s in chain),
    }
    reference = None
    if quant is not None:
        q = _quant_info(quant)
        inferred.update({k: v for k, v in q.items() if v is not None})
        inferred["weight_averaging"] = bool(q.get("weight_averaging")) or inferred["weight_averaging"]
        reference = tree.normalize(tree.parent_path(quant))
    if m.get("name"):
        name = str(m["name"])
    elif member is not None:
        name = member.name
    elif model_path:
        name = Path(str(model_path)).name or str(model_path)
    else:
        name = ev.name

    row: dict[str, Any] = {"model": name}
    for key in ("kind", "objective", "format", "method", "norm_fusion", "weight_averaging"):
        row[key] = m[key] if m.get(key) is not None else inferred.get(key)
    for key in ("val_loss", "val_loss_se", "fewshot_avg", "fewshot_avg_stderr", "recovery", "recovery_se", "size_bytes", "bits_per_weight",
                "params", "flops_per_token", "tokens_per_s"):
        row[key] = _number(m.get(key))
    row["on_pareto"] = None
    row["path"] = tree.normalize(model_path)
    # Beyond the required keys: what the report needs to pair variants with their references.
    row["variant"] = (hit[0].name + (f"/{hit[1].as_posix()}" if hit[1].parts else "")) if hit else name
    row["source_stage"] = hit[0].stage if hit else None
    row["reference"] = reference
    row["val_loss_increase"] = None
    row["val_loss_increase_se"] = None
    row["eval_dir"] = str(ev.path)
    return row


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else v


def attach_references(rows: list[dict[str, Any]]) -> None:
    """Fill ``val_loss_increase`` and (where eval did not) ``recovery`` from each row's BF16 reference.

    The reference is the BF16 row evaluating the model the quantize stage read; without one in the
    tree, the single BF16 row of the same family member, kind and weight averaging, if there is one.
    """
    bf16 = [r for r in rows if r.get("format") == "bf16"]
    by_path = {r["path"]: r for r in bf16 if r.get("path")}
    for r in rows:
        if r.get("format") == "bf16":
            continue
        ref = by_path.get(r.get("reference"))
        if ref is None:
            same = [b for b in bf16 if (b["model"], b["kind"], b["weight_averaging"]) ==
                    (r["model"], r["kind"], r["weight_averaging"])]
            ref = same[0] if len(same) == 1 else None
        if ref is None:
            continue
        r["reference"] = ref.get("path")
        if r.get("val_loss") is not None and ref.get("val_loss") is not None:
            r["val_loss_increase"] = r["val_loss"] - ref["val_loss"]
            r["val_loss_increase_se"] = paired_se(r.get("eval_dir"), ref.get("eval_dir"))
        if r.get("recovery") is None and r.get("fewshot_avg") is not None and ref.get("fewshot_avg"):
            a, b = r["fewshot_avg"], ref["fewshot_avg"]
            r["recovery"] = 100.0 * a / b
            sa, sb = r.get("fewshot_avg_stderr"), ref.get("fewshot_avg_stderr")
            if sa is not None and sb is not None:  # delta method, as famex eval computes it
                r["recovery_se"] = 100.0 * math.sqrt(sa ** 2 + (a / b * sb) ** 2) / b


def mark_pareto(rows: list[dict[str, Any]], cost_key: str) -> None:
    """Set ``on_pareto`` per kind (base: val_loss, lower is better; instruct: fewshot_avg, higher)."""
    for kind, (quality_key, higher) in QUALITY.items():
        group = [r for r in rows if r.get("kind") == kind]
        mask = pareto_mask([r.get(cost_key) for r in group], [r.get(quality_key) for r in group], higher)
        for r, m in zip(group, mask):
            r["on_pareto"] = m


def model_rows(tree: RunTree, cost_key: str = "size_bytes") -> list[dict[str, Any]]:
    """The summary rows of every complete eval stage, with references and Pareto membership."""
    rows = [eval_row(tree, ev) for ev in tree.of("eval")]
    attach_references(rows)
    mark_pareto(rows, cost_key)
    methods = {m: i for i, m in enumerate(("none", "rtn", "gptq", "qad"))}
    return sorted(rows, key=lambda r: (str(r["kind"]), str(r["model"]), r["format"] != "bf16", str(r["format"]),
                                       methods.get(r["method"], len(methods)), str(r["method"]), bool(r["norm_fusion"]),
                                       bool(r["weight_averaging"]), str(r["path"])))


def training_runs(tree: RunTree, stages: Iterable[str] = ("distill",)) -> list[dict[str, Any]]:
    """Each complete training stage with its log records, objective and final metrics."""
    runs = []
    for s in tree.of(*stages):
        runs.append({
            "name": s.name, "stage": s.stage, "student": s.config.get("student") or s.config.get("model"),
            "objective": objective_of(s) if s.stage == "distill" else s.stage,
            "records": read_log(s.path / "log.jsonl"), "metrics": s.metrics, "path": str(s.path),
        })
    return runs
