"""Benchmark: how much do the demo's Findings move from seed to seed?

The report's uncertainties (`famex.eval.stats.paired_se`) are within one run: the standard error of
a val-loss difference over the validation chunks, for the models that run trained. They say nothing
of how far a second run with other seeds would land. This script measures that: it replays the
stages of a recipe behind each Finding with every seed changed, and prints each Finding per seed
(difference ± its within-run s.e.), then across seeds (mean, sample s.d., and the s.d. against the
mean within-run s.e.).

Seed 0 is the finished `famex run` itself (its stage directories, which are reused, or completed
if missing). For every other seed the replayed stages are the recipe's own configs (the same code
path as `famex run`, nothing else changed) with ``seed`` set on each of them, written under
``WORK/seed-N``:

- ``logits-train``: the store order, which is the order distillation and QAD visit the chunks in;
- ``prune-p``: the calibration sample that ranks the layers; ``prune-p-rand``: the random weights;
- ``distill-*``: the CE-only twin's chunk order (the same as the store's: the twin pair stays paired);
- ``quantize-teacher-int{3,4}-gptq-nf``, ``quantize-teacher-int3-qad-nf``: the calibration sample
  (QAD starts from the same seed's GPTQ).

The data, the teacher, its val store, the RTN variants (no randomness) and the teacher's eval are
shared with the run. Each stage skips itself when complete, so a rerun (or more seeds) only does
what is new. About 10 minutes per seed on 2 CPU cores; run it in the background:

    nohup .venv/bin/python bench/seed_spread.py --run runs/demo --seeds 1 2 3 > spread.md 2> spread.log &

Options: --recipe configs/demo.toml --work bench/out/seeds --json WORK/seed_spread.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from famex.errors import FamexError
from famex.eval.stats import NOISE_SE, paired_se
from famex.run.recipe import Node, load_recipe, run_node
from famex.utils import log, read_json

#: The stages a seed changes (every one has a ``seed`` field), and the evaluations of their models.
REPLAYED = ("logits-train", "prune-p", "distill-p", "prune-p-rand", "distill-p-rand", "distill-p-rand-ce",
            "quantize-teacher-int3-gptq-nf", "quantize-teacher-int4-gptq-nf", "quantize-teacher-int3-qad-nf")

#: (label, eval node A, eval node B): the Finding is val_loss(A) − val_loss(B), as in the report.
FINDINGS = (
    ("pruned student p − teacher", "eval-distill-p", "eval-teacher"),
    ("pruned − random init (same shape)", "eval-distill-p", "eval-distill-p-rand"),
    ("KD − CE-only (random init)", "eval-distill-p-rand", "eval-distill-p-rand-ce"),
    ("GPTQ − RTN, teacher int3", "eval-quantize-teacher-int3-gptq-nf", "eval-quantize-teacher-int3-rtn-nf"),
    ("GPTQ − RTN, teacher int4", "eval-quantize-teacher-int4-gptq-nf", "eval-quantize-teacher-int4-rtn-nf"),
    ("QAD+NF − GPTQ, teacher int3", "eval-quantize-teacher-int3-qad-nf", "eval-quantize-teacher-int3-gptq-nf"),
)


def replay_plan(nodes: list[Node], run: Path, work: Path, seed: int) -> list[Node]:
    """The nodes the Findings need, in plan order; for seed > 0 the REPLAYED ones (and the evals of
    their models) moved under ``work/seed-N`` with ``seed`` set and their inputs pointed at each other."""
    by_name = {n.name: n for n in nodes}
    wanted = set(REPLAYED) | {name for _, a, b in FINDINGS for name in (a, b)}
    missing = sorted(wanted - set(by_name))
    if missing:
        raise FamexError(f"the recipe has no stage {', '.join(missing)}: this script replays configs/demo.toml's "
                         "students p / p-rand / p-rand-ce and the teacher's int3/int4 GPTQ and QAD variants")
    needed: set[str] = set()

    def need(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for dep in by_name[name].deps:
                need(dep)

    for name in wanted:
        need(name)
    plan = [n for n in nodes if n.name in needed]
    if seed == 0:
        return plan
    here = work / f"seed-{seed}"
    moved = {str(run / name): str(here / name) for name in REPLAYED}
    moved.update({str(run / n.name): str(here / n.name) for n in plan
                  if n.stage == "eval" and n.config.get("model") in moved})
    out = []
    for n in plan:
        config = {k: moved.get(v, v) if isinstance(v, str) else v for k, v in n.config.items()}
        if n.name in REPLAYED:
            config["seed"] = seed
        out.append(Node(n.name, n.stage, config, list(n.deps), dict(n.info)))
    return out


def execute(nodes: list[Node], where: str) -> None:
    for node in nodes:
        t0 = time.perf_counter()
        run_node(node, where)
        log(f"seed-spread: {where} {node.name} ready ({time.perf_counter() - t0:.0f} s)")


def findings(nodes: list[Node]) -> dict[str, dict[str, float | None]]:
    """Each Finding of one seed's plan: the difference of the two val losses and its paired s.e."""
    evals = {n.name: Path(n.config["out"]) for n in nodes if n.stage == "eval"}
    out = {}
    for label, a, b in FINDINGS:
        la, lb = (read_json(evals[x] / "metrics.json")["val_loss"] for x in (a, b))
        out[label] = {"diff": la - lb, "se": paired_se(evals[a], evals[b])}
    return out


def spread(per_seed: dict[int, dict[str, dict[str, float | None]]]) -> list[dict[str, Any]]:
    """Across seeds, per Finding: mean, sample s.d., mean within-run s.e., their ratio, the smallest
    |diff| / s.e. of any seed, and the mean's t = mean / (s.d. / √n)."""
    rows = []
    for label, _, _ in FINDINGS:
        diffs = [per_seed[s][label]["diff"] for s in sorted(per_seed)]
        ses = [per_seed[s][label]["se"] for s in sorted(per_seed) if per_seed[s][label]["se"]]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else None
        mean_se = statistics.fmean(ses) if ses else None
        mean = statistics.fmean(diffs)
        rows.append({
            "finding": label, "seeds": len(diffs), "mean": mean, "sd": sd, "mean_se": mean_se,
            "sd_over_se": sd / mean_se if sd is not None and mean_se else None,
            "min_z": min((abs(per_seed[s][label]["diff"]) / per_seed[s][label]["se"]
                          for s in per_seed if per_seed[s][label]["se"]), default=None),
            "t_mean": mean / (sd / math.sqrt(len(diffs))) if sd else None,
        })
    return rows


def fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:+.{digits}f}" if digits == 3 else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="configs/demo.toml")
    ap.add_argument("--run", default="runs/demo", help="the finished famex run of the recipe (seed 0)")
    ap.add_argument("--work", default="bench/out/seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds besides the run's own 0")
    ap.add_argument("--json", help="where the figures go (default WORK/seed_spread.json)")
    args = ap.parse_args()
    run, work = Path(args.run).resolve(), Path(args.work).resolve()
    nodes = load_recipe(args.recipe, out=str(run)).nodes
    per_seed = {}
    t0 = time.perf_counter()
    for seed in [0] + [s for s in args.seeds if s != 0]:
        plan = replay_plan(nodes, run, work, seed)
        execute(plan, f"seed {seed}")
        per_seed[seed] = findings(plan)
        log(f"seed-spread: seed {seed} done ({(time.perf_counter() - t0) / 60:.1f} min so far)")
    rows = spread(per_seed)
    target = Path(args.json) if args.json else work / "seed_spread.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"per_seed": per_seed, "spread": rows}, indent=2))
    tmp.replace(target)

    seeds = sorted(per_seed)
    print(f"Findings of {args.recipe} per seed (A − B val loss, nats/token ± paired s.e. within the run; "
          f"seed 0 = {args.run})\n")
    print("| finding | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---:|" * len(seeds))
    for label, _, _ in FINDINGS:
        cells = [f"{fmt(per_seed[s][label]['diff'])} ± {fmt(per_seed[s][label]['se'], 4)}" for s in seeds]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nAcross the {len(seeds)} seeds (s.d. = sample standard deviation of the difference; s.e. = the mean "
          f"within-run paired s.e.; min z = the smallest |diff| / s.e. of any seed, within noise below {NOISE_SE:g}):\n")
    print("| finding | mean | s.d. across seeds | mean s.e. within a run | s.d. / s.e. | min z | t of the mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['finding']} | {fmt(r['mean'])} | {fmt(r['sd'], 4)} | {fmt(r['mean_se'], 4)} | "
              f"{fmt(r['sd_over_se'], 2)} | {fmt(r['min_z'], 1)} | {fmt(r['t_mean'], 1)} |")
    print(f"\nfigures: {target} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
