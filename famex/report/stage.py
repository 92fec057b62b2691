"""`famex report RUN_DIR --out REPORT_DIR`: the family report of a run tree, in Markdown with PNG plots.

Writes, into one directory built under a temporary name and renamed when complete:

- ``report.md``: the findings (each student against the teacher, KD against CE-only, teacher-initialised
  against random-init, GPTQ against RTN and QAD against GPTQ at each format: paired differences in val
  loss ± s.e., noise marked; instruct recovery with its interval), the Pareto front (paper Fig. 3: cost = size on disk or FLOPs per token; quality =
  validation loss for base models, few-shot average for instruct ones; the front listed in a
  table), training curves of distilled vs CE-only students, logit-store statistics, the
  quantization ablation (Fig. 4: Δ val loss over BF16 and few-shot recovery for every format ×
  method × norm fusion), weight averaging (Fig. 5), the cost table (Table 2, from ``famex cost``
  when this famex has it: see `run_cost`) and every evaluated model;
- the PNGs it links (``pareto-base.png``, ``pareto-instruct.png``, ``training.png``,
  ``logits.png``, ``ablation-<model>.png``);
- ``summary.json``: a list with one row per evaluated model variant: ``model``, ``kind``,
  ``objective``, ``format``, ``method``, ``norm_fusion``, ``weight_averaging``, ``val_loss``,
  ``fewshot_avg``, ``recovery``, ``size_bytes``, ``bits_per_weight``, ``on_pareto``, ``path``
  (plus ``variant``, ``source_stage``, ``reference``, ``val_loss_increase``, ``params``,
  ``flops_per_token``, ``tokens_per_s``, ``eval_dir``, and the standard errors ``val_loss_se``,
  ``val_loss_increase_se`` (paired over chunks), ``fewshot_avg_stderr``, ``recovery_se`` (delta method,
  the two models taken as independent));
- ``meta.json`` (stage contract: its inputs are the complete stage directories it read) and
  ``metrics.json`` (sections written, sections skipped and why).

A partial tree is reported as far as it goes: each section that cannot be drawn is listed at the
top of the report with the reason. The eval metrics this reads are specified in
`famex.report.runtree`. Rerunning on an unchanged tree is a no-op; on a tree that changed, the
report is rebuilt and replaces the old one (a report is a pure function of the tree).

What this module does not do: evaluate models or count FLOPs (it reads what eval and cost wrote).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from famex.config import add_config_arguments, resolve_config
from famex.errors import FamexError
from famex.eval.stats import NOISE_SE
from famex.report import plots, tables
from famex.report.runtree import COST_KEYS, QUALITY, SUMMARY_KEYS, RunTree, model_rows, read_tree, training_runs
from famex.stage import COMPLETE, Stage, read_meta
from famex.utils import atomic_dir, atomic_write_json, atomic_write_text, log

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"


@dataclass
class ReportConfig:
    run_dir: str = ""
    """The run tree to report on: a directory of stage directories (e.g. runs/demo)."""
    out: str = ""
    """Report directory (report.md, summary.json, PNGs, meta.json); default: RUN_DIR/report."""
    cost: Literal["size", "flops"] = "size"
    """Cost axis of the Pareto front: size on disk (size_bytes) or forward FLOPs per token."""
    dpi: int = 150
    """Resolution of the PNG figures."""

    def validate(self) -> None:
        if not self.run_dir:
            raise FamexError("RUN_DIR is required: the directory `famex run` wrote (e.g. runs/demo)")
        if self.dpi < 30:
            raise FamexError(f"--dpi {self.dpi} is too small to read; use 100 or more")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ReportConfig, positional=("run_dir",))


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(ReportConfig, args)
    out = report(cfg)
    print(out / REPORT_FILE)
    return 0


# ---------------------------------------------------------------- sections
#
# A section builder takes the context and returns its Markdown body, writing its figures into
# ``ctx.out`` and naming them in ``ctx.files``; it raises `Skip` with the reason when this run tree
# cannot give it.


class Skip(Exception):
    """The section cannot be drawn from this run tree; the message says why (and is printed in the report)."""


@dataclass
class Section:
    title: str
    body: str = ""
    skipped: str | None = None
    """Why the section is not in the report (None when it is)."""
    files: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9 -]", "", self.title.lower()).strip().replace(" ", "-")


@dataclass
class Context:
    tree: RunTree
    rows: list[dict[str, Any]]
    cost_key: str
    out: Path
    dpi: int
    files: list[str] = field(default_factory=list)
    """Figures written so far (file names inside ``out``)."""

    def figure(self, name: str) -> Path:
        self.files.append(name)
        return self.out / name


QUALITY_NAMES = {"val_loss": "validation loss", "fewshot_avg": "few-shot average"}
COST_NAMES = {"size_bytes": "size on disk", "flops_per_token": "forward FLOPs per token"}
NO_EVAL = "no complete `famex eval` stage in the run tree — evaluate the models (a recipe's [eval] section does)"


def _missing(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """Which metrics the rows lack, counted: ``size_bytes missing in 3, val_loss missing in 1``."""
    counts = [(k, sum(1 for r in rows if r.get(k) is None)) for k in keys]
    return ", ".join(f"{k} missing in {n}" for k, n in counts if n)


def _is_teacher(row: dict) -> bool:
    """The run's teacher: evaluated under the name `famex run` gives it, from outside the run tree or from the
    directory the run dequantized a GGUF teacher into (a `famex prune` that removed nothing)."""
    return row.get("model") == "teacher" and row.get("source_stage") in (None, "prune")


def section_pareto(ctx: Context) -> str:
    if not ctx.rows:
        raise Skip(NO_EVAL)
    cost_name = COST_NAMES[ctx.cost_key]
    parts = [f"Cost = {cost_name}; quality = validation loss for base models (lower is better) and few-shot "
             "average accuracy for instruct models (higher is better). A variant is on the front when no other "
             "variant of the same kind is at most as costly and at least as good, and strictly better in one."]
    drawn = 0
    for kind, (quality_key, higher) in QUALITY.items():
        # The teacher is every front's reference: it joins the instruct front too when it was scored few-shot.
        group = [r for r in ctx.rows if r.get("kind") == kind
                 or (_is_teacher(r) and r.get("kind") != kind and kind == "instruct" and r.get(quality_key) is not None)]
        if not group or all(_is_teacher(r) for r in group):
            continue
        placed = [r for r in group if r.get(ctx.cost_key) is not None and r.get(quality_key) is not None]
        parts.append(f"### {kind.capitalize()} models")
        if not placed:
            parts.append(f"Not drawn: {len(group)} {kind} model(s) evaluated, none with both {ctx.cost_key} and "
                         f"{quality_key} ({_missing(group, (ctx.cost_key, quality_key))}).")
            continue
        front = tables.front(placed, ctx.cost_key, quality_key, higher)
        name = f"pareto-{kind}.png"
        plots.pareto_plot(placed, front, ctx.cost_key, quality_key, higher,
                          f"{kind.capitalize()} models: {QUALITY_NAMES[quality_key]} vs {cost_name}",
                          ctx.figure(name), ctx.dpi)
        drawn += 1
        parts.append(f"![Pareto front of the {kind} models]({name})")
        left = [r for r in group if r not in placed]
        if left:
            parts.append(f"{len(left)} of {len(group)} {kind} model(s) not drawn ({_missing(left, (ctx.cost_key, quality_key))}): "
                         + ", ".join(tables.variant_label(r) for r in left) + ".")
        parts.append(f"On the front ({len(front)} of {len(placed)}), by increasing cost (# = the number on the plot):")
        parts.append(tables.frontier_table(front, ctx.cost_key, quality_key))
    if not drawn:
        raise Skip(f"no evaluated model has both {ctx.cost_key} and its quality metric (val_loss for base, "
                   f"fewshot_avg for instruct): {_missing(ctx.rows, (ctx.cost_key, 'val_loss', 'fewshot_avg'))}")
    return "\n\n".join(parts)


def section_findings(ctx: Context) -> str:
    if not ctx.rows:
        raise Skip(NO_EVAL)
    runs = training_runs(ctx.tree, ("distill",))
    prunes = {str(Path(str(p.config.get("out") or p.path)).resolve()): p.config for p in ctx.tree.of("prune")}
    teacher = next((r for r in ctx.rows if _is_teacher(r) and r.get("format") == "bf16" and r.get("val_loss") is not None), None)
    body = tables.findings_rows(ctx.rows, runs, prunes, teacher)
    recovery = tables.recovery_rows(ctx.rows)
    if not body and not recovery:
        raise Skip("no pair of evaluated models to compare (a student and the teacher, twins, or two methods at one format)")
    parts = []
    if body:
        parts.append("What this run measured, by validation loss in nats/token (lower is better). Each difference A − B "
                     "is paired over the same validation chunks, ± its standard error; \"N s.e.\" says how many standard "
                     f"errors it is from zero, and a difference under {NOISE_SE:g} s.e. is marked within noise.")
        parts.append(tables.findings_table(body))
    if recovery:
        parts.append("Instruct variants: few-shot average and recovery (% of the BF16 instruct model's average; ± s.e., "
                     "the two models taken as independent). A recovery whose 95% interval is wider than "
                     f"± {tables.RECOVERY_NOISE_POINTS:g} points is marked noise: too few items to tell methods apart.")
        parts.append(tables.md_table(["variant", "few-shot average", "recovery"], recovery))
    return "\n\n".join(parts)


def section_training(ctx: Context) -> str:
    runs = training_runs(ctx.tree, ("distill",))
    if not runs:
        raise Skip("no complete `famex distill` stage in the run tree")
    parts = []
    if any(r["records"] for r in runs):
        plots.training_curves(runs, ctx.figure("training.png"), ctx.dpi)
        parts.append("![Training curves: distilled vs CE-only](training.png)")
    else:
        parts.append("No `log.jsonl` records in the distill directories: no curves to draw.")
    parts.append(tables.training_table(runs))
    pairs = tables.twins(runs)
    if pairs:
        parts.append("Distillation against its CE-only twin (same student, same data; negative = distillation wins):")
        parts.append(tables.twins_table(pairs, ctx.rows))
    else:
        parts.append("No CE-only twin of a distilled student in this run: the baseline comparison needs both "
                     "objectives for one student (a recipe [[student]] with objective = \"ce\").")
    prunes = {str(Path(str(p.config.get("out") or p.path)).resolve()): p.config for p in ctx.tree.of("prune")}
    inits = tables.init_pairs(runs, prunes)
    if inits:
        parts.append("Students initialised from the teacher (`famex prune`) against random-init students of the same "
                     "shape, the paper's recipe (same data, same steps; negative = the teacher's weights help):")
        parts.append(tables.init_table(inits, ctx.rows))
    post = training_runs(ctx.tree, ("sft", "dpo"))
    if post:
        parts.append("Post-training runs:")
        parts.append(tables.training_table(post))
    return "\n\n".join(parts)


def section_logits(ctx: Context) -> str:
    stores = [(s.name, s.config, s.metrics) for s in ctx.tree.of("logits")]
    if not stores:
        raise Skip("no complete `famex logits` stage in the run tree")
    plots.logit_stats(stores, ctx.figure("logits.png"), ctx.dpi)
    return "\n\n".join([
        "![Logit-store statistics](logits.png)",
        tables.logits_table(stores),
        "The paper's layout stores each of the top-k entries as an fp32 probability and an int32 index "
        f"({tables.PAPER_BYTES_PER_ENTRY} bytes, before gzip): ≈2 KB per token at top-256.",
    ])


def section_ablation(ctx: Context) -> str:
    if not ctx.rows:
        raise Skip(NO_EVAL)
    grid = tables.ablation_grid(ctx.rows)
    if not grid:
        raise Skip("no quantized model (RTN / GPTQ / QAD, without weight averaging) was evaluated")
    parts = ["Each cell: validation-loss increase over the BF16 model it was quantized from (lower is better) "
             "and, where few-shot accuracy was evaluated, recovery = few-shot average / BF16 few-shot average "
             "(higher is better). NF = norm fusion. The best cells of each format are in bold."]
    shown = 0
    for (model, kind), formats in sorted(grid.items()):
        cells = [r for f in formats.values() for r in f.values()]
        has_loss = any(r.get("val_loss_increase") is not None for r in cells)
        has_rec = any(r.get("recovery") is not None for r in cells)
        parts.append(f"### {model} ({kind})")
        if not (has_loss or has_rec):
            parts.append("No BF16 evaluation of this model to compare with: Δ val loss and recovery need the "
                         "unquantized model evaluated too.")
            continue
        shown += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{kind}")
        key, ylabel = (("val_loss_increase", "val-loss increase over BF16 (nats/token)") if has_loss
                       else ("recovery", "few-shot recovery (% of BF16)"))
        name = f"ablation-{slug}.png"
        plots.ablation_bars(formats, key, ylabel, f"{model}: quantization methods by format", ctx.figure(name), ctx.dpi)
        parts.append(f"![Quantization ablation of {model}]({name})")
        parts.append(tables.ablation_table(formats))
        qad = tables.qad_recovery_table(formats)
        if qad:
            parts.append("QAD against the post-training methods at the same format (paired over the same val chunks): "
                         "the fraction of RTN's and GPTQ's gap to BF16 that QAD recovered.")
            parts.append(qad)
    if not shown:
        raise Skip("quantized models were evaluated, but none has a BF16 reference evaluated "
                   "(Δ val loss and recovery need the unquantized model's eval)")
    return "\n\n".join(parts)


def section_weight_averaging(ctx: Context) -> str:
    if not ctx.rows:
        raise Skip(NO_EVAL)
    pairs = tables.weight_averaging_pairs(ctx.rows)
    if not pairs:
        raise Skip("no model variant was evaluated both with and without weight averaging")
    return "\n\n".join([
        "Quantization with and without averaging the last checkpoints (paper: it closes up to 10% of the "
        "loss gap for RTN, ≈2% for GPTQ, ≈0% for QAD). Δ val loss is measured against each variant's own "
        "BF16 parent; gap closed = 1 − Δ(WA) / Δ(no WA).",
        tables.weight_averaging_table(pairs),
    ])


# The report reads the run's cost from the `famex cost` command module: famex.eval.cost holds the
# arithmetic and the table, the command module reads recipes and run directories.
COST_MODULE = "famex.eval.costcli"
COST_FUNCTION = "cost_document"


def run_cost(run_dir: Path) -> str:
    """The run's cost table in Markdown: the small adapter to `famex cost`; raises `Skip` when there is none.

    Calls ``famex.eval.costcli.cost_document(run_dir)``, which returns the document ``famex cost
    RUN_DIR --json`` prints (a `famex.eval.cost.family_cost` document: ``convention``, ``stages``
    [{name, kind, tokens, params, flops, flops_6nd, paper_flops?}], ``total``, ``subtotals``,
    ``reference``), and renders it with `famex.eval.cost.format_cost_table`.
    """
    if importlib.util.find_spec(COST_MODULE) is None:
        raise Skip(f"this famex has no `famex cost` yet ({COST_MODULE.replace('.', '/')}.py)")
    fn = getattr(importlib.import_module(COST_MODULE), COST_FUNCTION, None)
    if fn is None:
        raise Skip(f"{COST_MODULE} has no {COST_FUNCTION}(run_dir) function to call")
    from famex.eval.cost import format_cost_table

    try:
        doc = fn(run_dir)
    except FamexError as e:
        raise Skip(f"`famex cost` could not cost this run: {e}") from None
    if not isinstance(doc, dict) or not doc.get("stages"):
        raise Skip("`famex cost` found no stage to cost in this run")
    return format_cost_table(doc)


def section_cost(ctx: Context) -> str:
    table = run_cost(ctx.tree.root)
    return "\n\n".join(["FLOPs of each stage of this run (the paper's Table 2 conventions):", table.strip()])


def section_models(ctx: Context) -> str:
    if not ctx.rows:
        raise Skip(NO_EVAL)
    return "\n\n".join([
        f"One row per evaluated variant (also in `{SUMMARY_FILE}`). WA = weight averaging; Δ val loss is "
        "against the BF16 model the variant was quantized from; recovery in % of its few-shot average.",
        tables.summary_table(ctx.rows),
    ])


SECTIONS: list[tuple[str, Callable[[Context], str]]] = [
    ("Findings", section_findings),
    ("Pareto front", section_pareto),
    ("Training curves", section_training),
    ("Logit store", section_logits),
    ("Quantization ablation", section_ablation),
    ("Weight averaging", section_weight_averaging),
    ("Cost", section_cost),
    ("All evaluated models", section_models),
]


def build_section(title: str, builder: Callable[[Context], str], ctx: Context) -> Section:
    """Run one section builder; a section that fails on odd metrics is skipped with the error, not fatal."""
    first_file = len(ctx.files)
    try:
        body = builder(ctx)
    except Skip as e:
        return Section(title, skipped=str(e))
    except Exception as e:  # noqa: BLE001 — one bad metrics file must not cost the whole report
        log(f"famex report: warning: the {title} section failed: {type(e).__name__}: {e}")
        return Section(title, skipped=f"could not be built: {type(e).__name__}: {e}")
    return Section(title, body, files=ctx.files[first_file:])


# ---------------------------------------------------------------- the document


def render(tree: RunTree, sections: list[Section], rows: list[dict[str, Any]]) -> str:
    counts = Counter(s.stage for s in tree.stages)
    lines = [f"# Family report: {tree.root.name}", ""]
    lines.append(f"Run tree `{tree.root}`: " + (", ".join(f"{n} {stage}" for stage, n in sorted(counts.items()))
                                                 or "no complete stage") + f"; {len(rows)} evaluated model variant(s).")
    lines.append("")
    done = [s for s in sections if s.skipped is None]
    skipped = [s for s in sections if s.skipped is not None]
    if done:
        lines.append("Sections: " + ", ".join(f"[{s.title}](#{s.anchor})" for s in done) + ".")
        lines.append("")
    if skipped:
        lines.append("**Skipped sections**")
        lines.append("")
        lines += [f"- {s.title}: {s.skipped}" for s in skipped]
        lines.append("")
    left_out = [(s.path, f"status {s.status}") for s in tree.incomplete] + list(tree.unreadable)
    if left_out:
        lines.append("**Stage directories left out**")
        lines.append("")
        lines += [f"- `{p.name}`: {why}" for p, why in left_out]
        lines.append("")
    for s in done:
        lines += [f"## {s.title}", "", s.body, ""]
    return "\n".join(lines)


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for summary.json: the documented keys first, then the extras."""
    return [{**{k: r.get(k) for k in SUMMARY_KEYS}, **{k: v for k, v in r.items() if k not in SUMMARY_KEYS}}
            for r in rows]


def report(cfg: ReportConfig) -> Path:
    """Run the `famex report` stage described by ``cfg``; returns the report directory."""
    root = Path(cfg.run_dir)
    if not root.is_dir():
        raise FamexError(f"run directory not found: {root} — give the directory `famex run` wrote (e.g. runs/demo)")
    if not cfg.out:
        cfg = dataclasses.replace(cfg, out=str(root / "report"))  # meta.json records the resolved path
    out = Path(cfg.out)
    old = read_meta(out) if out.is_dir() else None
    if old is not None and old.get("stage") != "report":
        raise FamexError(f"{out} holds the output of `famex {old.get('stage')}`, not a report; choose another --out")
    if old is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FamexError(f"{out} exists and is not a report directory; choose another --out or remove it")
    tree = read_tree(root)
    if not (tree.stages or tree.incomplete or tree.unreadable):
        raise FamexError(f"no stage directories (subdirectories with a meta.json) in {root} — is it a run directory?")
    stage = Stage(out, "report", cfg, {s.name: s.path for s in tree.stages})
    if old is not None and old.get("status") == COMPLETE and not stage.differences(old):
        log(f"famex report: {out} is already up to date with this run tree; nothing to do")
        return out

    cost_key = COST_KEYS[cfg.cost]
    rows = model_rows(tree, cost_key)
    with atomic_dir(out) as tmp:
        # The whole directory appears at once when complete; meta.json inside it follows the
        # stage contract (running while built, complete at the end).
        stage.out = tmp
        stage.begin()
        ctx = Context(tree, rows, cost_key, tmp, cfg.dpi)
        sections = [build_section(title, builder, ctx) for title, builder in SECTIONS]
        atomic_write_json(tmp / SUMMARY_FILE, summary_rows(rows))
        atomic_write_text(tmp / REPORT_FILE, render(tree, sections, rows))
        stage.finish({
            "models": len(rows),
            "on_pareto": sum(1 for r in rows if r.get("on_pareto")),
            "sections": [s.title for s in sections if s.skipped is None],
            "skipped": {s.title: s.skipped for s in sections if s.skipped is not None},
            "figures": [f for s in sections for f in s.files],
            "stages": dict(Counter(s.stage for s in tree.stages)),
        })
    stage.out = out
    skipped = [s.title for s in sections if s.skipped is not None]
    log(f"famex report: {out / REPORT_FILE} ({len(rows)} models" + (f"; skipped: {', '.join(skipped)}" if skipped else "") + ")")
    return out


# The uniform stage interface `famex run` uses: a config class and a function that runs it.
CONFIG = ReportConfig
run = report
