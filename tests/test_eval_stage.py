"""`famex eval` on tiny models: each number against an independent reference, every kind of model directory.

- validation loss: against a slow reference that runs every document piece of every val chunk on
  its own (no packing, no masks) and averages the next-token CE;
- a famex-quantized W4A4 directory is evaluated with its activation quantization: its loss is the
  reference loss of `load_quantized`'s model (hooks on) and not that of the same weights without;
- MLX and compressed-tensors exports are evaluated by their runtimes and agree with the famex
  model they were exported from;
- recovery / val-loss increase against a reference eval; size as deployed against a byte count
  of the stored codes and scales; identity fields against the report's own lineage inference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ApertusConfig, AutoModelForCausalLM

from famex.cli import main as cli_main
from famex.errors import FamexError
from famex.eval.stage import EvalConfig, compare, evaluate, identity
from famex.stage import Stage, read_meta
from famex.utils import atomic_write_json, read_json


# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- references (no famex eval code)


def per_document_loss(model, data_dir: Path, split: str = "val", max_chunks: int = 0, per_chunk: bool = False):
    """Mean next-token CE of the split's chunks, each document piece of a chunk run alone through ``model``
    (with ``per_chunk``, also each chunk's CE sum and token count)."""
    from famex.data.packing import TokenSplit

    ts = TokenSplit(data_dir, split)
    T = read_json(data_dir / "meta.json")["seq_len"]
    n = (ts.n_tokens - 1) // T
    n = min(n, max_chunks) if max_chunks else n
    total, count = 0.0, 0
    sums, counts = [], []
    with torch.no_grad():
        for i in range(n):
            sums.append(-total)
            counts.append(-count)
            start = i * T
            window = ts.tokens(start, start + T + 1)
            doc = ts.doc_index(np.arange(start, start + T + 1))
            a = 0
            for b in range(1, T + 2):
                if b == T + 1 or doc[b] != doc[a]:
                    piece = torch.tensor(window[a:b])
                    if len(piece) > 1:
                        logits = model(input_ids=piece[None, :-1]).logits[0].double()
                        total += float(F.cross_entropy(logits, piece[1:], reduction="sum"))
                        count += len(piece) - 1
                    a = b
            sums[-1] += total
            counts[-1] += count
    if per_chunk:
        return total / count, count, sums, counts
    return total / count, count


def stored_bytes(qdir: Path, params_total: int) -> int:
    """Bytes of a quantized directory as deployed, counted from its stored codes and scales."""
    from famex.quant import load_qparams
    from famex.quant.formats import QuantFormat

    fmt = QuantFormat.from_dict(read_json(qdir / "quantization.json")["format"])
    nbytes, quantized = 0.0, 0
    for qp in load_qparams(qdir).values():
        nbytes += qp.codes.numel() * fmt.bits / 8
        quantized += qp.codes.numel()
        for t in (qp.scale, qp.bias, qp.global_scale, qp.input_global_scale):
            if t is not None:
                nbytes += t.numel() * t.element_size()
    return int(round(nbytes + 2 * (params_total - quantized)))


# --------------------------------------------------------------------------- fixtures


def tiny_apertus(vocab: int, bos: int, eos: int):
    torch.manual_seed(0)
    config = ApertusConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, initializer_range=0.1,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=bos, eos_token_id=eos,
    )
    config.mlp_bias, config.qk_norm, config.post_norm = False, True, False
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_data, tokenizer_dir):
    """A tiny BF16 model; its int4 / NVFP4 W4A4 / NVFP4A16 quantizations; MLX and compressed-tensors exports."""
    from famex.data.packing import PackedChunks
    from famex.export.stage import ExportConfig, export
    from famex.models import load_tokenizer
    from famex.quant import quantize_model, save_quantized

    root = tmp_path_factory.mktemp("eval-models")
    tok = load_tokenizer(tokenizer_dir)
    bf16 = root / "bf16"
    tiny_apertus(len(tok), tok.bos_token_id or 0, tok.eos_token_id).save_pretrained(bf16)
    tok.save_pretrained(bf16)
    calib = [{"input_ids": PackedChunks(tiny_data, "train").batch([0, 1, 2, 3])["input_ids"]}]
    dirs = {"bf16": bf16}
    for fmt in ("int4", "nvfp4", "nvfp4a16"):
        model = AutoModelForCausalLM.from_pretrained(bf16, attn_implementation="sdpa")
        result = quantize_model(model, fmt, "rtn", calib=calib if fmt == "nvfp4" else None)
        dirs[fmt] = save_quantized(model, tok, fmt, result.qparams, "rtn", root / f"q-{fmt}", **result.info())
    dirs["mlx"] = export(ExportConfig(model=str(dirs["int4"]), to="mlx", out=str(root / "x-int4-mlx"), dtype="fp32"))
    dirs["ct"] = export(ExportConfig(model=str(dirs["nvfp4"]), to="compressed-tensors", out=str(root / "x-nvfp4-ct"),
                                     dtype="bf16"))
    return {"root": root, "data": tiny_data, **dirs}


def run_eval(models, key: str, name: str | None = None, **kw) -> dict:
    out = models["root"] / f"eval-{name or key}"
    cfg = EvalConfig(model=str(models[key]), data=str(models["data"]), out=str(out), **{"speed_seq_len": 64, "speed_iters": 1, **kw})
    evaluate(cfg)
    return read_json(out / "metrics.json")


@pytest.fixture(scope="module")
def bf16_eval(models):
    return run_eval(models, "bf16", tasks=["arc_easy,winogrande"], limit=12)


# --------------------------------------------------------------------------- validation loss


def test_val_loss_equals_per_document_reference(models, bf16_eval):
    model = AutoModelForCausalLM.from_pretrained(models["bf16"], attn_implementation="sdpa").eval()
    ref, count = per_document_loss(model, models["data"])
    assert bf16_eval["val_tokens"] == count
    assert abs(bf16_eval["val_loss"] - ref) < 1e-4, (bf16_eval["val_loss"], ref)
    # --val-chunks: the first N chunks only
    few = run_eval(models, "bf16", name="bf16-3chunks", val_chunks=3, speed_iters=0)
    ref3, count3 = per_document_loss(model, models["data"], max_chunks=3)
    assert few["val_chunks"] == 3 and few["val_tokens"] == count3 and abs(few["val_loss"] - ref3) < 1e-4
    assert "tokens_per_s" not in few  # --speed-iters 0 skips the measurement


def test_val_loss_standard_error_over_chunks(models, bf16_eval):
    """val_chunks.json holds each chunk's CE sum and tokens (the per-document reference's); val_loss_se
    is the s.e. over chunks, checked against a leave-one-chunk-out jackknife of the same ratio."""
    model = AutoModelForCausalLM.from_pretrained(models["bf16"], attn_implementation="sdpa").eval()
    _, _, sums, counts = per_document_loss(model, models["data"], per_chunk=True)
    saved = read_json(models["root"] / "eval-bf16" / "val_chunks.json")
    assert saved["tokens"] == counts and np.allclose(saved["ce_sum"], sums, rtol=1e-4)
    s, c = np.array(sums), np.array(counts, dtype=float)
    n = len(s)
    loo = np.array([(s.sum() - s[i]) / (c.sum() - c[i]) for i in range(n)])
    jackknife = np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
    assert n >= 5 and bf16_eval["val_loss_se"] == pytest.approx(jackknife, rel=0.15)
    assert 0 < bf16_eval["val_loss_se"] < 0.5 * bf16_eval["val_loss"]


def test_bf16_metrics_and_stage_contract(models, bf16_eval):
    m = bf16_eval
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models["bf16"]).parameters())
    assert m["params"] == params and m["flops_per_token"] == 2 * params and "2·N" in m["flops_convention"]
    assert m["size_bytes"] == 2 * params and m["bits_per_weight"] == 16.0  # deployed as BF16
    assert m["size_on_disk_bytes"] == (models["bf16"] / "model.safetensors").stat().st_size  # saved in fp32
    assert m["tokens_per_s"] > 0
    assert {"acc_norm/arc_easy", "acc/arc_easy", "acc/winogrande", "fewshot_avg"} <= set(m)
    assert m["fewshot_avg"] == pytest.approx((m["acc_norm/arc_easy"] + m["acc/winogrande"]) / 2)
    assert m["n/arc_easy"] == 12 and m["shots/winogrande"] == 0
    assert (m["format"], m["method"], m["kind"], m["name"], m["norm_fusion"]) == ("bf16", "none", "base", "bf16", False)
    meta = read_meta(models["root"] / "eval-bf16")
    assert meta["stage"] == "eval" and meta["status"] == "complete"
    assert meta["config"]["tasks"] == ["arc_easy", "winogrande"] and set(meta["inputs"]) == {"model", "data"}
    fewshot = read_json(models["root"] / "eval-bf16" / "fewshot.json")
    assert fewshot["tasks"]["arc_easy"]["acc_norm"] == m["acc_norm/arc_easy"] and fewshot["tasks"]["winogrande"]["n"] == 12
    mtime = (models["root"] / "eval-bf16" / "metrics.json").stat().st_mtime_ns
    run_eval(models, "bf16", tasks=["arc_easy", "winogrande"], limit=12)  # the same evaluation: a no-op
    assert (models["root"] / "eval-bf16" / "metrics.json").stat().st_mtime_ns == mtime
    with pytest.raises(FamexError, match="other arguments"):
        run_eval(models, "bf16", tasks=["arc_easy"], limit=12)


# --------------------------------------------------------------------------- quantized models


def test_quantized_dir_is_evaluated_with_its_activation_quantization(models):
    from famex.quant import load_quantized
    from famex.quant.model import detach_activation_quant

    w4a4 = run_eval(models, "nvfp4")
    w4a16 = run_eval(models, "nvfp4a16")
    model, info = load_quantized(models["nvfp4"])
    assert info["activation_modules"]  # the hooks are there to be applied
    with_act, _ = per_document_loss(model, models["data"])
    detach_activation_quant(model)
    weights_only, _ = per_document_loss(model, models["data"])
    print(f"W4A4 {w4a4['val_loss']:.6f} (reference {with_act:.6f}); same weights without activation quant {weights_only:.6f}; "
          f"NVFP4A16 dir {w4a16['val_loss']:.6f}")
    assert abs(w4a4["val_loss"] - with_act) < 1e-4
    assert abs(with_act - weights_only) > 1e-3  # the activation quantization is visible ...
    assert abs(w4a4["val_loss"] - weights_only) > 1e-3  # ... and the eval applied it
    assert abs(w4a16["val_loss"] - weights_only) < 1e-4  # same weight grid, no activation quantization
    assert w4a4["activation_quantization"] == "nvfp4" and w4a16["activation_quantization"] == "none"
    assert (w4a4["format"], w4a4["method"], w4a4["model_kind"]) == ("nvfp4", "rtn", "famex-quantized")


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_quantized_size_as_deployed(models, fmt):
    m = run_eval(models, fmt, speed_iters=0)
    assert m["size_bytes"] == stored_bytes(models[fmt], m["params"])
    # the directory holds fp32 dequantized weights; deployed, the quantized blocks shrink below BF16
    assert m["size_on_disk_bytes"] >= 4 * m["params"] and m["size_bytes"] < 2 * m["params"]
    expected_bpw = {"int4": 4 + 2 * 16 / 64, "nvfp4": None}[fmt]  # int4: bf16 scale + bias per group of 64
    if expected_bpw:
        assert m["bits_per_weight"] == pytest.approx(expected_bpw)
    else:  # nvfp4: 4 + 8/16 bits, plus fp32 global scales (weight and input) per module
        assert 4.5 < m["bits_per_weight"] < 4.6


def test_mlx_export_is_evaluated_by_mlx_lm(models):
    from famex.eval.footprint import model_size

    source = run_eval(models, "int4", name="int4-fewshot", tasks=["arc_easy"], limit=6, speed_iters=0)
    mlx = run_eval(models, "mlx", tasks=["arc_easy"], limit=6)
    assert mlx["model_kind"] == "mlx"
    # fp32 export of the int4 grid: MLX computes the same model as famex's fake quantization
    assert abs(mlx["val_loss"] - source["val_loss"]) < 1e-4 and mlx["val_tokens"] == source["val_tokens"]
    assert mlx["acc_norm/arc_easy"] == source["acc_norm/arc_easy"] and mlx["acc/arc_easy"] == source["acc/arc_easy"]
    assert mlx["size_bytes"] == model_size(models["mlx"])
    assert mlx["bits_per_weight"] == read_json(models["mlx"] / "metrics.json")["bits_per_weight_quantized"]
    # identity through the export's meta.json to the quantized directory it was made from
    assert (mlx["format"], mlx["method"], mlx["name"]) == ("int4", "rtn", "q-int4")
    assert mlx["tokens_per_s"] > 0


def test_compressed_tensors_export_is_evaluated_by_transformers(models):
    from famex.quant import load_quantized

    ct = run_eval(models, "ct", speed_iters=0)
    assert ct["model_kind"] == "compressed-tensors" and ct["runtime/loaded_dtype"] == "bfloat16"
    # compressed-tensors' NVFP4 weights come out in bf16: famex's W4A4 model with every tensor rounded to bf16
    model, _ = load_quantized(models["nvfp4"])
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.bfloat16().float())
    ref, _ = per_document_loss(model, models["data"])
    assert abs(ct["val_loss"] - ref) < 1e-3, (ct["val_loss"], ref)
    assert (ct["format"], ct["method"]) == ("nvfp4", "rtn")


# --------------------------------------------------------------------------- reference and recovery


def test_recovery_arithmetic():
    mine = {"acc_norm/arc_easy": 0.5, "acc/arc_easy": 0.55, "acc/winogrande": 0.6, "val_loss": 3.0}
    ref = {"acc_norm/arc_easy": 0.6, "acc/winogrande": 0.6, "acc/piqa": 0.9, "val_loss": 2.5}
    out = compare(mine, ref)
    assert out["recovery"] == pytest.approx(100 * (0.5 + 0.6) / (0.6 + 0.6))  # ratio of macro averages, common tasks
    assert out["recovery/arc_easy"] == pytest.approx(100 * 0.5 / 0.6) and out["recovery/winogrande"] == pytest.approx(100)
    assert out["val_loss_increase"] == pytest.approx(0.5)
    with pytest.raises(FamexError, match="no few-shot scores"):
        compare(mine, {"val_loss": 2.5})


def test_reference_eval_gives_recovery(models, bf16_eval, tmp_path):
    q = run_eval(models, "int4", name="int4-ref", tasks=["arc_easy,winogrande"], limit=12, speed_iters=0,
                 reference=str(models["root"] / "eval-bf16"))
    common = (q["acc_norm/arc_easy"] + q["acc/winogrande"]) / (bf16_eval["acc_norm/arc_easy"] + bf16_eval["acc/winogrande"])
    assert q["recovery"] == pytest.approx(100 * common)
    assert q["val_loss_increase"] == pytest.approx(q["val_loss"] - bf16_eval["val_loss"])
    # a metrics.json file works as well; a model directory is refused
    shutil.copy(models["root"] / "eval-bf16" / "metrics.json", tmp_path / "ref.json")
    q2 = run_eval(models, "int4", name="int4-ref-file", tasks=["arc_easy,winogrande"], limit=12, speed_iters=0,
                  reference=str(tmp_path / "ref.json"))
    assert q2["recovery"] == pytest.approx(q["recovery"])
    with pytest.raises(FamexError, match="metrics.json"):
        run_eval(models, "int4", name="int4-bad-ref", tasks=["arc_easy"], limit=2, reference=str(models["int4"]))


# --------------------------------------------------------------------------- identity from the run tree


def _stage(path: Path, stage: str, config: dict, inputs: dict, metrics: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    st = Stage(path, stage, config, inputs)
    st.begin()
    st.finish(metrics or {})
    return path


@pytest.fixture
def run_tree(tmp_path, tiny_data):
    root = tmp_path / "run"
    store = tmp_path / "store"
    store.mkdir()
    d = {}
    d["distill-s"] = _stage(root / "distill-s", "distill", {"student": "tiny-apertus", "logits": str(store)},
                            {"data": tiny_data, "logits": store}, {"objective": "kd"})
    (root / "distill-s" / "checkpoints" / "step-20").mkdir(parents=True)
    d["distill-c"] = _stage(root / "distill-c", "distill", {"student": "tiny-apertus", "logits": "none"}, {"data": tiny_data})
    d["sft-s"] = _stage(root / "sft-s", "sft", {"model": str(d["distill-s"])}, {"model": d["distill-s"]})
    d["average-s"] = _stage(root / "average-s", "average", {}, {"checkpoints": d["distill-s"]})
    d["quantize-s-int4-gptq-nf"] = _stage(root / "quantize-s-int4-gptq-nf", "quantize", {"model": str(d["sft-s"])},
                                          {"model": d["sft-s"]})
    atomic_write_json(d["quantize-s-int4-gptq-nf"] / "quantization.json",
                      {"format_name": "int4", "method": "gptq", "norm_fusion": True})
    d["export-s-int4"] = _stage(root / "export-s-int4", "export", {"model": str(d["quantize-s-int4-gptq-nf"]), "to": "mlx"},
                                {"model": d["quantize-s-int4-gptq-nf"]})
    d["quantize-a-fp8-qad"] = _stage(root / "quantize-a-fp8-qad", "quantize", {"model": str(d["average-s"])},
                                     {"model": d["average-s"]})
    atomic_write_json(d["quantize-a-fp8-qad"] / "quantization.json", {"format_name": "fp8", "method": "qad", "norm_fusion": False})
    d["checkpoint"] = root / "distill-s" / "checkpoints" / "step-20"
    return root, d


EXPECTED = {  # name, kind, objective, format, method, norm_fusion, weight_averaging
    "distill-s": ("distill-s", "base", "kd", "bf16", "none", False, False),
    "checkpoint": ("distill-s", "base", "kd", "bf16", "none", False, False),
    "distill-c": ("distill-c", "base", "ce", "bf16", "none", False, False),
    "sft-s": ("sft-s", "instruct", "kd", "bf16", "none", False, False),
    "average-s": ("distill-s", "base", "kd", "bf16", "none", False, True),
    "quantize-s-int4-gptq-nf": ("sft-s", "instruct", "kd", "int4", "gptq", True, False),
    "export-s-int4": ("sft-s", "instruct", "kd", "int4", "gptq", True, False),
    "quantize-a-fp8-qad": ("distill-s", "base", "kd", "fp8", "qad", False, True),
}
KEYS = ("name", "kind", "objective", "format", "method", "norm_fusion", "weight_averaging")


def test_identity_fields_from_lineage(run_tree):
    root, d = run_tree
    for key, expected in EXPECTED.items():
        kind = "mlx" if key.startswith("export") else "hf"
        got = identity(d[key], kind)
        assert tuple(got[k] for k in KEYS) == expected, key


def test_identity_agrees_with_the_report(run_tree):
    """The report infers the same fields from the tree when metrics.json leaves them out."""
    from famex.report.runtree import eval_row, read_tree

    root, d = run_tree
    for key in EXPECTED:
        _stage(root / f"eval-{key}", "eval", {"model": str(d[key])}, {"model": d[key]})
    tree = read_tree(root)
    for ev in tree.of("eval"):
        key = ev.name[len("eval-"):]
        row = eval_row(tree, ev)
        mine = identity(d[key], "mlx" if key.startswith("export") else "hf")
        assert {k: row["model" if k == "name" else k] for k in KEYS} == {k: mine[k] for k in KEYS}, key


# --------------------------------------------------------------------------- bad input and other models


def test_bad_input(models, tmp_path, tokenizer_dir, capsys):
    from conftest import make_docs, write_jsonl
    from famex.data.prepare import DataConfig, prepare

    with pytest.raises(SystemExit) as e:  # every option's help text formats
        cli_main(["eval", "--help"])
    assert e.value.code == 0 and "--reference" in capsys.readouterr().out

    out = str(tmp_path / "e")
    rc = cli_main(["eval", "--model", str(models["bf16"]), "--tasks", "arc_easy,hellaswagg", "--out", out, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown few-shot task(s) 'hellaswagg'" in err and "arc_challenge" in err and "mmlu" in err
    assert not Path(out).exists()  # refused before anything was written

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(models["bf16"] / f, bare / f)
    with pytest.raises(FamexError, match="has no tokenizer files.*--tokenizer"):
        evaluate(EvalConfig(model=str(bare), tasks=["arc_easy"], limit=2, out=str(tmp_path / "e2"), speed_iters=0))
    # with --tokenizer it scores
    evaluate(EvalConfig(model=str(bare), tasks=["arc_easy"], limit=2, tokenizer=str(tokenizer_dir),
                        out=str(tmp_path / "e3"), speed_iters=0))
    assert read_json(tmp_path / "e3" / "metrics.json")["n/arc_easy"] == 2

    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    noval = tmp_path / "data-noval"
    prepare(DataConfig(input=[str(src)], out=str(noval), tokenizer=str(tokenizer_dir), seq_len=64, val_fraction=0.0, workers=1))
    with pytest.raises(FamexError, match="val split is empty.*--val-fraction"):
        evaluate(EvalConfig(model=str(models["bf16"]), data=str(noval), out=str(tmp_path / "e4")))
    with pytest.raises(FamexError, match="no 'test' split"):
        evaluate(EvalConfig(model=str(models["bf16"]), data=str(models["data"]), val_split="test", out=str(tmp_path / "e5")))
    with pytest.raises(FamexError, match="model not found"):
        evaluate(EvalConfig(model=str(tmp_path / "nothing"), out=str(tmp_path / "e6")))


def test_default_gguf_teacher(tiny_data, tmp_path, teacher, monkeypatch):
    import famex.models
    from famex.models import default_teacher_path

    # The session's teacher instead of a second 10-30 s GGUF load (famex.models' loader has its own tests).
    loaded = []
    monkeypatch.setattr(famex.models, "load_model", lambda spec, **kw: loaded.append(spec) or teacher[0])
    out = tmp_path / "eval-teacher"
    evaluate(EvalConfig(model="default", data=str(tiny_data), val_chunks=2, speed_iters=0, out=str(out)))
    m = read_json(out / "metrics.json")
    assert [ms.path for ms in loaded] == [default_teacher_path()]
    assert (m["model"], m["model_kind"], m["format"], m["method"]) == ("default", "gguf", "bf16", "none")
    assert m["name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert m["params"] == 134_515_008 and m["size_bytes"] == 2 * m["params"]
    assert m["size_on_disk_bytes"] == default_teacher_path().stat().st_size
    ref, _ = per_document_loss(teacher[0], tiny_data, max_chunks=2)
    assert abs(m["val_loss"] - ref) < 1e-4


def test_eval_refuses_a_missing_cuda_device_before_loading(tmp_path):
    import torch

    from famex.eval.stage import EvalConfig, evaluate

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = EvalConfig(model=str(tmp_path / "not-loaded"), out=str(tmp_path / "ev"), device="cuda", speed_iters=0)
    cfg.validate()
    with pytest.raises(FamexError, match="no CUDA device is available; use --device cpu"):
        evaluate(cfg)


def test_eval_attn_flex_scores_as_sdpa_does(models, bf16_eval, eager_flex):
    """--attn flex: validation reaches attention as a document BlockMask (no T×T tensor) and few-shot
    rows run one continuation each; both give the per-document reference's loss and sdpa's scores,
    for the BF16 model and for a famex-quantized one (its fake-quant hooks stay in place)."""
    model = AutoModelForCausalLM.from_pretrained(models["bf16"], attn_implementation="sdpa").eval()
    ref, _ = per_document_loss(model, models["data"])
    flex = run_eval(models, "bf16", name="bf16-flex", attn="flex", tasks=["arc_easy,winogrande"], limit=12)
    assert (bf16_eval["attn"], flex["attn"]) == ("sdpa", "flex_attention")
    assert abs(flex["val_loss"] - ref) < 1e-4, (flex["val_loss"], ref)
    sdpa_chunks = read_json(models["root"] / "eval-bf16" / "val_chunks.json")
    flex_chunks = read_json(models["root"] / "eval-bf16-flex" / "val_chunks.json")
    assert np.allclose(flex_chunks["ce_sum"], sdpa_chunks["ce_sum"], rtol=1e-5)
    for key in ("acc_norm/arc_easy", "acc/winogrande"):
        assert flex[key] == bf16_eval[key], key
    q_sdpa = run_eval(models, "int4", name="int4-sdpa", speed_iters=0)
    q_flex = run_eval(models, "int4", name="int4-flex", attn="flex", speed_iters=0)
    assert q_flex["attn"] == "flex_attention" and q_flex["val_loss"] != bf16_eval["val_loss"]
    assert abs(q_flex["val_loss"] - q_sdpa["val_loss"]) < 1e-5


def test_eval_refuses_an_attention_kernel_it_cannot_run_before_loading(tmp_path):
    from famex.eval.stage import EvalConfig, evaluate

    cfg = EvalConfig(model=str(tmp_path / "not-loaded"), out=str(tmp_path / "ev"), device="cpu",
                     attn="flash_attention_2", speed_iters=0)
    cfg.validate()
    with pytest.raises(FamexError, match="flash_attention_2"):
        evaluate(cfg)
    assert not (tmp_path / "ev").exists()
