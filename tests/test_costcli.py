"""`famex cost`: Table 2 from the Apertus-v1.1 recipe, planned FLOPs of small recipes, and a finished run's FLOPs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig

from famex.cli import main as cli_main
from famex.errors import FamexError
from famex.eval.cost import gptq_cost
from famex.eval.costcli import cost_document
from famex.eval.costdoc import store_bytes_per_token
from famex.models import model_info
from famex.stage import Stage
from famex.utils import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
APERTUS = ROOT / "configs" / "apertus-v1.1.toml"
DEMO = ROOT / "configs" / "demo.toml"

TABLE2 = {  # row name in the recipe's plan: (paper figure, exponent it is printed at)
    "logits-train": (1.4, 22), "distill-0.5b": (0.2, 22), "distill-1.5b": (0.8, 22), "distill-4b": (2.0, 22),
    "apertus-8b pre-training": (3.7, 23),
}


def printed(x: float, exponent: int) -> float:
    return round(x / 10 ** exponent, 1)


def check_table2(doc: dict) -> None:
    rows = {s["name"]: s for s in doc["stages"]}
    rows[doc["reference"]["name"]] = doc["reference"]
    for name, (figure, exponent) in TABLE2.items():
        ours, paper = rows[name]["flops"], figure * 10 ** exponent
        assert rows[name]["paper_flops"] == pytest.approx(paper)
        assert printed(ours, exponent) == figure or abs(ours / paper - 1) <= 0.05, (name, ours, paper)
    # The recipe's inputs: 1.74T data tokens (val 0.05%) for the store, 800k x 512 x 4096 for the small students.
    assert rows["logits-train"]["tokens"] == (round(1.74e12 * 0.9995) - 1) // 4096 * 4096
    assert rows["distill-0.5b"]["tokens"] == 800_000 * 512 * 4096 and rows["distill-4b"]["tokens"] == 400_000 * 1024 * 4096
    assert rows["distill-1.5b"]["params"] == model_info("apertus-v1.1-1.5b", vocab_size=131072)["params_total"]
    n, d = rows["distill-4b"]["params"], rows["distill-4b"]["tokens"]
    assert rows["distill-4b"]["flops"] == pytest.approx(3 * n * d) and rows["distill-4b"]["flops_6nd"] == pytest.approx(6 * n * d)
    n, d = rows["logits-train"]["params"], rows["logits-train"]["tokens"]
    assert rows["logits-train"]["flops"] == pytest.approx(n * d) and rows["logits-train"]["flops_6nd"] == pytest.approx(2 * n * d)
    subs = {s["name"]: s for s in doc["subtotals"]}
    family = subs["logits + 0.5B + 1.5B (the paper's \"whole family\")"]
    assert family["paper_flops"] == pytest.approx(2.4e22) and abs(family["flops"] / 2.4e22 - 1) < 0.05
    everything = subs["logits + students"]
    assert everything["paper_flops"] == pytest.approx(4.4e22) and round(100 * everything["fraction_of_reference"]) == 12


def test_apertus_recipe_reproduces_table2():
    doc = cost_document(APERTUS, teacher_preset="apertus-8b")
    check_table2(doc)
    assert doc["source"]["teacher_sized_by"] == "preset apertus-8b"
    # The store: 1.74T tokens (train + val) at the compact encoding's ~176 bytes/token: ~306 TB.
    assert doc["store"]["tokens"] > 1.7e12 and 280e12 < doc["store"]["bytes"] < 330e12
    assert "estimate" in doc["store"]["source"]


def test_apertus_recipe_as_shipped(tmp_path, capsys):
    """`famex cost configs/apertus-v1.1.toml`, with no option: the recipe names the teacher's preset."""
    from famex.config import load_toml

    if "preset" not in load_toml(APERTUS)["teacher"]:
        pytest.skip("configs/apertus-v1.1.toml has no [teacher] preset yet (the recipe loader must accept the key first)")
    assert cli_main(["cost", str(APERTUS), "--json"]) == 0
    check_table2(json.loads(capsys.readouterr().out))


def test_absent_teacher_needs_a_preset(tmp_path):
    text = APERTUS.read_text()
    with pytest.raises(FamexError, match=r"not here.*preset = \"apertus-8b\".*--teacher-preset"):
        cost_document(_write(tmp_path / "r.toml", re.sub(r"(?m)^preset\s*=\s*\"apertus-8b\".*\n", "", text)))
    with pytest.raises(FamexError, match="unknown teacher preset"):
        cost_document(APERTUS, teacher_preset="apertus-9b")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(path)
    return path


def test_small_recipe_by_hand(tmp_path, tiny_teacher, capsys):
    recipe = _write(tmp_path / "small.toml", f"""
[run]
name = "small"
out = "{tmp_path / 'run'}"
[teacher]
model = "{tiny_teacher}"
pretraining_tokens = 1e9
[data]
input = ["{tmp_path / 'docs.jsonl'}"]
max_tokens = 100000
seq_len = 128
val_fraction = 0.1
[logits]
top_k = 64
val = true
[distill]
iters = 10
global_batch = 4
[[student]]
name = "a"
preset = "tiny-apertus"
[[student]]
name = "b"
preset = "tiny-apertus"
objective = "ce"
iters = 20
""")
    doc = cost_document(recipe)
    rows = {s["name"]: s for s in doc["stages"]}
    teacher = model_info(str(tiny_teacher))["params_total"]
    student = model_info("tiny-apertus", vocab_size=512)["params_total"]  # students take the teacher's vocabulary
    assert rows["logits-train"]["flops"] == teacher * ((90_000 - 1) // 128 * 128)
    assert rows["logits-val"]["flops"] == teacher * ((10_000 - 1) // 128 * 128)
    assert rows["distill-a"]["flops"] == 3 * student * 10 * 4 * 128
    assert rows["distill-b"]["flops"] == 3 * student * 20 * 4 * 128 and rows["distill-b"]["flops_6nd"] == 6 * student * 20 * 4 * 128
    assert all("paper_flops" not in r for r in rows.values())
    assert doc["reference"]["flops"] == 3 * teacher * 10**9
    assert doc["total"]["flops"] == sum(r["flops"] for r in rows.values())
    assert doc["store"]["bytes_per_token"] == pytest.approx(store_bytes_per_token(64)) == pytest.approx(86.3)
    assert [n for n, _ in doc["not_costed"]] == ["data", "report"]
    # --json: the documented shape
    assert cli_main(["cost", str(recipe), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "N·D" in out["convention"] and all({"name", "tokens", "params", "flops", "flops_6nd"} <= set(s) for s in out["stages"])
    # the table
    assert cli_main(["cost", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| stage |") and "| distill-a | train |" in text and "Logit store:" in text


def test_store_size_estimate():
    assert store_bytes_per_token(256) == pytest.approx(175.7)
    assert store_bytes_per_token(160) == pytest.approx(146.3)
    assert 86.3 < store_bytes_per_token(140) < 146.3
    assert store_bytes_per_token(32) == pytest.approx(43.15)
    assert store_bytes_per_token(256, "paper") == 2048  # fp32 + int32 per entry, the paper's ≈2 KB/token


def test_demo_recipe_plans(tmp_path):
    text = DEMO.read_text().replace('out = "runs/demo"', f'out = "{tmp_path / "demo"}"')  # not prepared: planned counts
    doc = cost_document(_write(tmp_path / "demo.toml", text))
    rows = {s["name"]: s for s in doc["stages"]}
    assert set(rows) >= {"logits-train", "logits-val", "quantize-teacher-int4-gptq-nf", "quantize-teacher-int4-qad-nf"}
    assert rows["logits-train"]["tokens"] == (72_000 - 1) // 256 * 256  # [data] max_tokens 80000, val_fraction 0.1
    assert rows["logits-train"]["params"] == 134_515_008  # the GGUF teacher, read from its header
    assert rows["quantize-teacher-int4-qad-nf"]["params"] == 134_515_008  # the teacher is quantized too
    assert rows["quantize-teacher-int4-qad-nf"]["tokens"] == 6 * 4 * 256
    # Students cut from the teacher have no size until famex prune ran: said, not guessed.
    assert "famex prune ran" in dict(doc["not_costed"])["distill-p"]
    assert doc["source"]["tokens"].startswith("[data] max_tokens")


# --------------------------------------------------------------------------- a finished run


def _stage(path: Path, stage: str, config: dict, inputs: dict | None = None, metrics: dict | None = None,
           complete: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    st = Stage(path, stage, config, inputs or {})
    st.begin()
    if complete:
        st.finish(metrics or {})
    return path


@pytest.fixture
def run_dir(tmp_path, tiny_teacher):
    root = tmp_path / "run"
    _stage(root / "data", "data", {}, metrics={"tokens": 10_000})
    _stage(root / "logits-train", "logits", {"teacher": str(tiny_teacher), "split": "train"},
           metrics={"tokens": 8_192, "bytes": 819_200, "bytes_per_token": 100.0})
    _stage(root / "logits-val", "logits", {"teacher": str(tiny_teacher), "split": "val"},
           metrics={"tokens": 1_024, "bytes": 204_800, "bytes_per_token": 200.0})
    _stage(root / "distill-a", "distill", {"student": "tiny-apertus"}, metrics={"tokens": 51_200, "params": 40_000})
    _stage(root / "sft-a", "sft", {}, metrics={"tokens": 3_000, "params": 40_000})
    _stage(root / "dpo-a", "dpo", {}, metrics={"tokens": 2_000, "params": 40_000})
    q = _stage(root / "quantize-a-gptq", "quantize", {"method": "gptq"})
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(q)
    atomic_write_json(q / "quantization.json", {"method": "gptq", "calib_tokens": 4_096})
    _stage(root / "quantize-a-rtn", "quantize", {"method": "rtn"})
    _stage(root / "export-a", "export", {"to": "mlx"})
    _stage(root / "distill-b", "distill", {"student": "tiny-apertus"}, complete=False)
    (root / "recipe.toml").write_text(f'[teacher]\nmodel = "{tiny_teacher}"\npretraining_tokens = 1e9\n')
    return root


def test_run_directory(run_dir, tiny_teacher):
    doc = cost_document(run_dir)
    rows = {s["name"]: s for s in doc["stages"]}
    teacher = model_info(str(tiny_teacher))["params_total"]
    assert rows["logits-train"]["flops"] == teacher * 8_192 and rows["logits-val"]["flops"] == teacher * 1_024
    assert rows["distill-a"]["flops"] == 3 * 40_000 * 51_200
    assert rows["sft-a"]["flops"] == 3 * 40_000 * 3_000
    assert rows["dpo-a"]["flops"] == 4 * 40_000 * 2_000 and rows["dpo-a"]["flops_6nd"] == 8 * 40_000 * 2_000  # + reference forward
    expected = gptq_cost("quantize-a-gptq", model_info(str(run_dir / "quantize-a-gptq")), 4_096)
    assert rows["quantize-a-gptq"]["flops"] == expected["flops"]
    assert doc["reference"]["flops"] == 3 * teacher * 10**9
    assert doc["store"] == {"tokens": 9_216, "bytes": 1_024_000, "bytes_per_token": pytest.approx(1_024_000 / 9_216),
                            "source": "measured: metrics.json of the logits stages"}
    assert dict(doc["not_costed"]) == {"data": "tokenizing", "quantize-a-rtn": "RTN (no data pass)", "export-a": "writing files"}
    assert doc["source"]["incomplete"] == ["distill-b"]
    subs = {s["name"]: s for s in doc["subtotals"]}
    assert subs["logits + students"]["flops"] == rows["logits-train"]["flops"] + rows["logits-val"]["flops"] + rows["distill-a"]["flops"]
    assert subs["all stages"]["flops"] == doc["total"]["flops"]


def test_report_renders_the_run_cost(run_dir):
    """The report's adapter calls cost_document(run_dir) and renders it with format_cost_table."""
    from famex.report.stage import run_cost

    table = run_cost(run_dir)
    assert "| distill-a | train |" in table and "| dpo-a | dpo |" in table and "(reference)" in table


def test_nothing_to_cost(tmp_path):
    _stage(tmp_path / "run" / "data", "data", {})
    with pytest.raises(FamexError, match="nothing to cost"):
        cost_document(tmp_path / "run")
    with pytest.raises(FamexError, match="not found"):
        cost_document(tmp_path / "missing")


def test_recipe_over_prepared_data(tiny_data, tiny_teacher, tmp_path):
    """Prepared data: token counts from its meta.json, the students' vocabulary from its tokenizer; a loaded
    Recipe (famex run --dry-run --out ...) is costed where it points."""
    from famex.run.recipe import load_recipe
    from famex.utils import read_json

    recipe = _write(tmp_path / "r.toml", f"""
[teacher]
model = "{tiny_teacher}"
[data]
input = ["unused.jsonl"]
seq_len = 64
[distill]
iters = 5
global_batch = 2
[[student]]
name = "a"
preset = "tiny-apertus"
""")
    doc = cost_document(load_recipe(recipe, out=str(tiny_data.parent)))
    rows = {s["name"]: s for s in doc["stages"]}
    splits = read_json(tiny_data / "meta.json")["splits"]
    assert rows["logits-train"]["tokens"] == (splits["train"]["tokens"] - 1) // 64 * 64
    assert rows["distill-a"]["params"] == model_info("tiny-apertus", vocab_size=49152)["params_total"]
    assert doc["source"]["tokens"].startswith("prepared data") and doc["reference"] is None
    with pytest.raises(FamexError, match="max_tokens is not set"):
        cost_document(recipe)  # not prepared where the recipe itself points, and no max_tokens


def test_planned_post_training_and_quantization(tiny_teacher, tmp_path):
    """Nodes the recipe loader will plan (sft, quantize, eval), costed from their configs."""
    from famex.run.recipe import Node, Recipe

    out = tmp_path / "run"
    distill_out = str(out / "distill-a")
    nodes = [
        Node("data", "data", {"out": str(out / "data"), "max_tokens": 50_000, "seq_len": 128, "val_fraction": 0.0}),
        Node("logits-train", "logits", {"out": str(out / "logits-train"), "split": "train", "top_k": 256}),
        Node("distill-a", "distill", {"student": "tiny-apertus", "iters": 10, "global_batch": 4, "out": distill_out}),
        Node("sft-a", "sft", {"model": distill_out, "out": str(out / "sft-a")}),  # chat data not prepared: unknown
        Node("quantize-a-int4-gptq", "quantize", {"model": distill_out, "method": "gptq", "calib_tokens": 2048}),
        Node("quantize-a-int4-qad", "quantize", {"model": distill_out, "method": "qad", "tokens": 30_000}),
        Node("quantize-a-int4-qad-iters", "quantize", {"model": distill_out, "method": "qad", "iters": 3, "global_batch": 2}),
        Node("quantize-a-int4-rtn", "quantize", {"model": distill_out, "method": "rtn"}),
        Node("eval-a", "eval", {"model": distill_out}),
    ]
    raw = {"teacher": {"model": str(tiny_teacher)}}
    doc = cost_document(Recipe(tmp_path / "r.toml", raw, "r", out, None, nodes))
    rows = {s["name"]: s for s in doc["stages"]}
    info = model_info("tiny-apertus", vocab_size=512)
    n = info["params_total"]
    assert rows["quantize-a-int4-gptq"]["flops"] == gptq_cost("x", info, 2048)["flops"]
    assert rows["quantize-a-int4-qad"]["flops"] == 3 * n * 30_000
    assert rows["quantize-a-int4-qad-iters"]["flops"] == 3 * n * 3 * 2 * 128
    reasons = dict(doc["not_costed"])
    assert reasons["quantize-a-int4-rtn"] == "RTN (no data pass)" and "not known" in reasons["sft-a"]
    assert set(reasons) == {"data", "sft-a", "quantize-a-int4-rtn", "eval-a"}
    assert doc["store"]["bytes_per_token"] == pytest.approx(store_bytes_per_token(256)) == pytest.approx(175.7)
