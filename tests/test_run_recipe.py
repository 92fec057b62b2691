"""`famex run`: a tiny recipe end to end, killed and resumed, and malformed recipes refused up front.

The tiny family: a 2-layer random Llama teacher with the default tokenizer (so it has SmolLM2's
chat template), a few thousand tokens of prose, two tiny Apertus students (KD and a CE twin), SFT
and DPO for one, RTN / GPTQ / QAD (+ norm fusion) at int4 and fp8, MLX and compressed-tensors
exports, evaluation (val loss; few-shot ARC-Easy on 4 items for the instruct models) and the report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_docs, write_jsonl
from famex.errors import FamexError
from famex.run.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir):
    """Teacher directory, corpus, chat records and preference pairs."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("recipe-assets")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    write_jsonl(root / "docs.jsonl", make_docs(160, seed=5))
    questions = [f"What is {a} plus {b}?" for a in range(6) for b in range(5)]
    with open(root / "chat.jsonl", "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": f"It is {i % 6 + i // 6}."}]}) + "\n")
    with open(root / "prefs.jsonl", "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"prompt": q, "chosen": f"It is {i % 6 + i // 6}.", "rejected": "I do not know."}) + "\n")
    return root


def recipe_text(a: Path, **overrides: str) -> str:
    sections = {
        "run": 'name = "tiny"',
        "teacher": f'model = "{a / "teacher"}"',
        "data": f'input = ["{a / "docs.jsonl"}"]\nseq_len = 64\nval_fraction = 0.15\nworkers = 1',
        "logits": "top_k = 8\nval = true\nworkers = 1\ntokens_per_shard = 1024",
        "distill": "global_batch = 4\nmicro_batch = 2\niters = 6\nlr = 2e-3\nsave_every = 2\neval_every = 3\nlog_every = 1\nprefetch = 0",
        "student": 'name = "a"\npreset = "tiny-apertus"\n\n[[student]]\nname = "a-ce"\npreset = "tiny-apertus"\nobjective = "ce"',
        "chat": f'input = ["{a / "chat.jsonl"}"]\nseq_len = 64\nval_fraction = 0.2\nlogits = true\nworkers = 1',
        "sft": 'students = ["a"]\nglobal_batch = 4\nmicro_batch = 2\niters = 3\nlr = 1e-3\nprefetch = 0',
        "dpo": f'data = ["{a / "prefs.jsonl"}"]\nglobal_batch = 4\nmicro_batch = 2\niters = 2\nlr = 1e-4\nval_fraction = 0.2',
        "quantize": ("calib_tokens = 512\n\n[quantize.qad]\niters = 3\nmicro_batch = 2\nsave_every = 1\neval_every = 0\nprefetch = 0"
                     '\n\n[[quantize.matrix]]\nmodels = ["a"]\nformats = ["int4", "fp8"]\nmethods = ["rtn", "gptq"]\nnorm_fusion = [false, true]'
                     '\n\n[[quantize.matrix]]\nmodels = ["a", "a:instruct"]\nformats = ["int4"]\nmethods = ["qad"]\nnorm_fusion = [true]'),
        "export": 'methods = ["gptq", "qad"]\nnorm_fusion = [true]\ndtype = "fp32"',
        "eval": 'tasks = ["arc_easy"]\nlimit = 4\nshots = 0\nval_chunks = 4\nspeed_iters = 1\nfewshot = "instruct"',
        "report": "",
    }
    sections.update(overrides)
    parts = []
    for name, body in sections.items():
        if body is None:
            continue
        parts.append(f"[[{name}]]\n{body}" if name == "student" else f"[{name}]\n{body}")
    return "\n\n".join(parts) + "\n"


def write_recipe(path: Path, assets: Path, **overrides) -> Path:
    path.write_text(recipe_text(assets, **overrides))
    return path


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FAMEX_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "famex", *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def weights(run: Path) -> dict[str, bytes]:
    """Every file that holds what the run made (weights, quantized weights, stores, exports), by relative path."""
    keep = (".safetensors", ".fxl", ".bin", ".npy")
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.suffix in keep and "checkpoints" not in p.parts and "report" not in p.parts}


def eval_figures(run: Path) -> dict[str, tuple]:
    out = {}
    for m in sorted(run.glob("eval-*/metrics.json")):
        metrics = json.loads(m.read_text())
        out[m.parent.name] = (metrics.get("val_loss"), metrics.get("fewshot_avg"))
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, assets):
    """One uninterrupted `famex run` of the tiny recipe."""
    root = tmp_path_factory.mktemp("recipe-ref")
    recipe = write_recipe(root / "tiny.toml", assets)
    proc = run_cli("run", str(recipe), "--out", str(root / "run"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "run", proc


def test_tiny_recipe_runs_end_to_end(reference_run):
    run, proc = reference_run
    assert f"report: {run / 'report' / 'report.md'}" in proc.stdout
    for name in ("data", "logits-train", "logits-val", "distill-a", "distill-a-ce", "data-chat", "logits-chat", "sft-a",
                 "dpo-a", "quantize-a-int4-gptq-nf", "quantize-a-fp8-rtn", "quantize-a-int4-qad-nf",
                 "quantize-a-instruct-int4-qad-nf", "export-a-int4-qad-nf", "export-a-fp8-gptq-nf", "eval-teacher",
                 "eval-quantize-a-instruct-int4-qad-nf", "report"):
        meta = json.loads((run / name / "meta.json").read_text())
        assert meta["status"] == "complete", name
    # The exports are the runtimes' formats; the quantized evals are paired with their BF16 source.
    assert json.loads((run / "export-a-int4-qad-nf" / "config.json").read_text())["quantization"]["bits"] == 4
    ct = json.loads((run / "export-a-fp8-gptq-nf" / "config.json").read_text())["quantization_config"]
    assert ct["quant_method"] == "compressed-tensors"
    q = json.loads((run / "eval-quantize-a-instruct-int4-qad-nf" / "metrics.json").read_text())
    ref = json.loads((run / "eval-dpo-a" / "metrics.json").read_text())
    assert q["fewshot_avg"] is not None
    if ref["fewshot_avg"]:
        assert q["recovery"] == pytest.approx(100 * q["fewshot_avg"] / ref["fewshot_avg"], rel=1e-6)
    base = json.loads((run / "eval-quantize-a-int4-rtn" / "metrics.json").read_text())
    assert "fewshot_avg" not in base or base["fewshot_avg"] is None  # base models: validation loss only
    summary = json.loads((run / "report" / "summary.json").read_text())
    models = {r["variant"] for r in summary}
    assert {"distill-a", "dpo-a", "quantize-a-int4-qad-nf", "quantize-a-instruct-int4-qad-nf"} <= models
    assert (run / "recipe.toml").read_text() == (run.parent / "tiny.toml").read_text()
    # A second run finds everything complete and does nothing.
    t0 = time.perf_counter()
    again = run_cli("run", str(run.parent / "tiny.toml"), "--out", str(run), "--only", "data", "logits", "distill", "quantize")
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow  # SIGKILL + resume, ~15-75 s on 2 cores: `make test-slow`
def test_killed_run_resumes_to_identical_outputs(assets, reference_run):
    # Same recipe file, same run directory as the uninterrupted run (stores and quantized files
    # record where their inputs were): the uninterrupted run moves aside and the killed one takes its place.
    run, _ = reference_run
    recipe = run.parent / "tiny.toml"
    ref = run.parent / "uninterrupted"
    run.rename(ref)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FAMEX_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "famex", "run", str(recipe), "--out", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill it inside a training stage, after its first checkpoint: the stage must resume from it.
    first_ckpt = run / "distill-a" / "checkpoints" / "step-00000002"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not first_ckpt.is_dir():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert json.loads((run / "distill-a" / "meta.json").read_text())["status"] == "running"
    assert not (run / "report").exists()
    done = run_cli("run", str(recipe), "--out", str(run), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((run / "distill-a" / "meta.json").read_text())["status"] == "complete"
    got, want = weights(run), weights(ref)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files differ from the uninterrupted run: {differ}"
    assert eval_figures(run) == eval_figures(ref)


@pytest.mark.parametrize("override, message", [
    ({"distil": "iters = 3"}, "unknown section [distil] (did you mean [distill]?)"),
    ({"teacher": None}, "[teacher] model is missing"),
    ({"distill": "iterz = 3"}, "iterz"),
    ({"sft": 'students = ["b"]'}, "[sft] students names 'b'"),
    ({"quantize": '[[quantize.matrix]]\nmodels = ["a"]\nformats = ["int7"]\nmethods = ["rtn"]'}, "formats"),
    ({"quantize": '[[quantize.matrix]]\nmodels = ["z:instruct"]\nformats = ["int4"]\nmethods = ["rtn"]'}, "models names 'z:instruct'"),
    ({"quantize": '[[quantize.matrix]]\nmodels = ["a"]\nformats = ["int4"]\nmethods = ["awq"]'}, "methods must be among rtn, gptq, qad"),
    ({"export": 'targets = {int4 = "gguf"}'}, "[export] targets.int4"),
])
def test_malformed_recipes_fail_before_any_work_naming_the_field(tmp_path, assets, override, message):
    recipe = write_recipe(tmp_path / "bad.toml", assets, **override)
    with pytest.raises(FamexError) as e:
        load_recipe(recipe, out=str(tmp_path / "run"))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_inconsistent_vocabularies_are_refused(tmp_path, assets):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    student = 'name = "a"\nmodel = "' + str(other) + '"'
    recipe = write_recipe(tmp_path / "bad.toml", assets, student=student)
    with pytest.raises(FamexError, match=r"\[\[student\]\] 'a' model .* vocabulary of 1,000"):
        load_recipe(recipe)
    chat = recipe_text(assets).replace("logits = true\nworkers = 1", f'logits = true\nworkers = 1\nteacher = "{other}"')
    (tmp_path / "bad2.toml").write_text(chat)
    with pytest.raises(FamexError, match=r"\[chat\] teacher .* vocabulary of 1,000"):
        load_recipe(tmp_path / "bad2.toml")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert proc.returncode != 0 and "vocabulary of 1,000" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_plan_and_costs_without_running(tmp_path, assets):
    recipe = write_recipe(tmp_path / "tiny.toml", assets)
    proc = run_cli("run", str(recipe), "--dry-run", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantize-a-instruct-int4-qad-nf" in proc.stdout and "export-a-int4-qad-nf" in proc.stdout
    assert "No cost table" in proc.stdout and "max_tokens" in proc.stdout  # the corpus is not tokenized yet
    sized = recipe_text(assets).replace("workers = 1", "workers = 1\nmax_tokens = 20000", 1)
    (tmp_path / "sized.toml").write_text(sized)
    proc = run_cli("run", str(tmp_path / "sized.toml"), "--dry-run", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| distill-a | train |" in proc.stdout and "| quantize-a-int4-qad-nf | train |" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_a_gguf_teacher_is_dequantized_once_into_a_directory_every_stage_reads(tmp_path, assets):
    """The default (GGUF) teacher becomes <run>/teacher (famex prune with nothing removed) before anything else;
    data, logits, pruning, the chat data, the teacher's quantization and its evaluation read that directory."""
    students = 'name = "p"\nprune = { layers = 1, calib_tokens = 256 }'
    quantize = 'calib_tokens = 512\n\n[[quantize.matrix]]\nmodels = ["teacher"]\nformats = ["int4"]\nmethods = ["rtn"]'
    chat = "demo_chat = true\nseq_len = 64\nlogits = true"
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", assets, teacher='model = "default"', student=students,
                                      quantize=quantize, chat=chat, sft="students = [\"p\"]", dpo=None, export=None),
                         out=str(tmp_path / "run"))
    nodes = {n.name: n for n in recipe.nodes}
    teacher = str(tmp_path / "run" / "teacher")
    assert recipe.nodes[0].name == "teacher" and recipe.nodes[0].stage == "prune"
    assert nodes["teacher"].config == {"teacher": "default", "out": teacher}  # nothing removed: the teacher's weights
    uses = {"data": "tokenizer", "logits-train": "teacher", "logits-val": "teacher", "prune-p": "teacher",
            "data-chat": "tokenizer", "logits-chat": "teacher", "quantize-teacher-int4-rtn": "model", "eval-teacher": "model"}
    for name, key in uses.items():
        assert nodes[name].config[key] == teacher and "teacher" in nodes[name].deps, name
    directory = load_recipe(write_recipe(tmp_path / "d.toml", assets, student=students, quantize=quantize, chat=None,
                                         sft=None, dpo=None, export=None), out=str(tmp_path / "run2"))
    assert "teacher" not in {n.name for n in directory.nodes}  # a model directory is read as it is


@pytest.mark.slow  # a prune and a distillation run, ~1 min on 2 cores: `make test-slow`
def test_a_student_pruned_from_the_teacher_is_cut_then_distilled(tmp_path, assets):
    """[[student]] prune = {...}: famex run cuts it from the teacher (famex prune), then distils that directory."""
    from transformers import AutoConfig

    from famex.stage import read_meta

    recipe = write_recipe(tmp_path / "pruned.toml", assets,
                          student='name = "p"\nprune = { layers = 1, mlp = 32, calib_tokens = 256 }',
                          chat=None, sft=None, dpo=None, quantize=None, export=None, eval=None, report=None)
    dry = run_cli("run", str(recipe), "--dry-run", "--out", str(tmp_path / "run"))
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.index("prune-p") < dry.stdout.index("distill-p")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "run"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    assert read_meta(run / "prune-p")["stage"] == "prune" and read_meta(run / "prune-p")["status"] == "complete"
    distill = read_meta(run / "distill-p")
    assert distill["status"] == "complete" and distill["config"]["student"] == str(run / "prune-p")
    cfg = AutoConfig.from_pretrained(run / "distill-p")
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.intermediate_size) == ("llama", 1, 32)  # the teacher's architecture, cut
    bad = write_recipe(tmp_path / "bad.toml", assets, student='name = "p"\npreset = "tiny-apertus"\nprune = { layers = 1 }',
                       chat=None, sft=None, dpo=None, quantize=None, export=None, eval=None, report=None)
    proc = run_cli("run", str(bad), "--dry-run", "--out", str(tmp_path / "bad"))
    assert proc.returncode != 0 and "replaces preset / model" in proc.stderr


def test_twins_share_one_prune_stage_and_the_teacher_is_quantized_against_its_own_eval(tmp_path, assets):
    """Students with the same prune options (a CE twin) share one prune stage, a random-init one gets its
    own; "teacher" in a quantize matrix quantizes the teacher itself (QAD from the teacher's own store)
    and evaluates each variant as "teacher" against the teacher's evaluation."""
    shape = "layers = 1, mlp = 64, calib_tokens = 256"
    students = (f'name = "p"\nprune = {{ {shape} }}\n\n[[student]]\nname = "p-ce"\nobjective = "ce"\nprune = {{ {shape} }}'
                f'\n\n[[student]]\nname = "p-rand"\nprune = {{ {shape}, random_init = true }}')
    quantize = ("calib_tokens = 512\n\n[[quantize.matrix]]\nmodels = [\"teacher\", \"p\"]\nformats = [\"int4\"]"
                "\nmethods = [\"rtn\", \"gptq\", \"qad\"]\nnorm_fusion = [true]")
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", assets, student=students, quantize=quantize, chat=None, sft=None,
                                      dpo=None, export=None), out=str(tmp_path / "run"))
    nodes = {n.name: n for n in recipe.nodes}
    run = tmp_path / "run"
    assert sorted(n for n in nodes if n.startswith("prune-")) == ["prune-p", "prune-p-rand"]
    assert nodes["distill-p-ce"].config["student"] == nodes["distill-p"].config["student"] == str(run / "prune-p")
    assert "prune-p" in nodes["distill-p-ce"].deps and nodes["prune-p-rand"].config["random_init"] is True
    assert "order_seed" not in nodes["distill-p-ce"].config  # store and twin share seed 0: nothing to say
    teacher = str(assets / "teacher")
    for method in ("rtn", "gptq", "qad"):
        q = nodes[f"quantize-teacher-int4-{method}-nf"]
        assert q.config["model"] == teacher and not any(d.startswith("distill") for d in q.deps)
        ev = nodes[f"eval-quantize-teacher-int4-{method}-nf"]
        assert ev.config["name"] == "teacher" and ev.config["reference"] == str(run / "eval-teacher")
        assert "eval-teacher" in ev.deps
    qad = nodes["quantize-teacher-int4-qad-nf"]
    assert qad.config["logits"] == str(run / "logits-train") and "logits-train" in qad.deps
    assert "init_from" not in qad.config  # an RTN start (the default) keeps full-precision latents: computed in the stage
    # A GPTQ start with the same calibration is read from the GPTQ stage's output instead of being computed again.
    gptq_start = quantize.replace("calib_tokens = 512", "calib_tokens = 512\n\n[quantize.qad]\ninit = \"gptq\"")
    nodes = {n.name: n for n in load_recipe(write_recipe(tmp_path / "g.toml", assets, student=students, quantize=gptq_start,
                                                         chat=None, sft=None, dpo=None, export=None), out=str(run)).nodes}
    for model in ("teacher", "p"):
        qad, gptq = nodes[f"quantize-{model}-int4-qad-nf"], nodes[f"quantize-{model}-int4-gptq-nf"]
        assert qad.config["init_from"] == gptq.config["out"] and gptq.name in qad.deps
    other = gptq_start.replace('init = "gptq"', 'init = "gptq"\ncalib_tokens = 1024')
    nodes = {n.name: n for n in load_recipe(write_recipe(tmp_path / "o.toml", assets, student=students, quantize=other,
                                                         chat=None, sft=None, dpo=None, export=None), out=str(run)).nodes}
    assert "init_from" not in nodes["quantize-p-int4-qad-nf"].config  # another calibration: not the same start
    assert nodes["quantize-p-int4-rtn-nf"].config["model"] == str(run / "distill-p")
    with pytest.raises(FamexError, match="names the teacher"):
        load_recipe(write_recipe(tmp_path / "bad.toml", assets, student='name = "teacher"\npreset = "tiny-apertus"'))
    # A pruned width the format's group does not divide is refused when the run is planned, not hours into it.
    narrow = students.replace("mlp = 64", "mlp = 96")
    with pytest.raises(FamexError, match=r"'p' is pruned to mlp = 96, which is no multiple of the group size 64 of int4; use int4-g32"):
        load_recipe(write_recipe(tmp_path / "narrow.toml", assets, student=narrow, quantize=quantize, chat=None, sft=None,
                                 dpo=None, export=None), out=str(tmp_path / "run2"))


def test_a_ce_twin_visits_the_chunks_in_the_stores_order(tmp_path, assets):
    """A store made with another seed fixes the KD students' chunk order; the CE-only twin gets that
    order (order_seed), keeping its own seed for its initialisation."""
    logits = "top_k = 8\nval = true\nworkers = 1\ntokens_per_shard = 1024\nseed = 5"
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", assets, logits=logits, chat=None, sft=None, dpo=None,
                                      quantize=None, export=None), out=str(tmp_path / "run"))
    nodes = {n.name: n for n in recipe.nodes}
    assert nodes["logits-train"].config["seed"] == 5
    twin = nodes["distill-a-ce"].config
    assert twin["order_seed"] == 5 and twin.get("seed", 0) == 0 and "order_seed" not in nodes["distill-a"].config
