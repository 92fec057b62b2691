"""Proof by the real runtimes: every export is loaded and run by transformers (compressed-tensors, hf) or
mlx-lm (mlx) in a subprocess that never imports famex, and compared with famex's fake-quant model.

Bounds and why:
- compressed-tensors int / FP8 (weight-only and FP8 W8A8): transformers decompresses to exactly
  famex's fp32 grid and fake-quantizes FP8 activations with the same fp32 operations, so the
  logits agree to float noise: max abs diff ≤ 1e-3 against famex's model whose unquantized
  tensors are rounded to the export dtype (bf16, as deployed).
- compressed-tensors NVFP4 (A16 and W4A4): compressed-tensors 0.20's NVFP4 decompressor always
  produces bf16 weights, so transformers runs these checkpoints in bf16 only. The runner loads in
  bf16 (the runtime as shipped; its logits are reported) and then casts the loaded modules to fp32:
  that computes with compressed-tensors' own decompressed weights and its own activation
  quantizer, and must match famex's model with every parameter rounded to bf16 to ≤ 1e-3. W4A4 is
  no looser than weight-only because the NVFP4 activation quantizers agree bit for bit in fp32.
- mlx: top-1 agreement ≥ 99% over 512 positions and the same 20 greedy tokens from
  ``mlx_lm.generate.generate_step`` (the greedy loop, KV cache included, that ``mlx_lm.generate``
  runs; called directly so that an EOS cannot end it early); the max abs logit diff is reported. fp32 exports compute
  famex's grid exactly (scales are widened to fp32, exactly); bf16 exports compute in bf16, and
  MLX's CPU quantized_matmul in bf16 loses far more than a bf16 matmul would (7% vs 0.6% relative
  error at K=1536), so bf16 exports are held to looser top-1 bounds here (tiny 80%, teacher 85%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ApertusConfig, AutoModelForCausalLM, LlamaConfig

from famex.export.stage import ExportConfig, export
from famex.quant import load_quantized, parse_format, quantize_model, save_quantized
from famex.utils import read_json

VOCAB = 1024
NEW_TOKENS = 20
POSITIONS = 512

# --------------------------------------------------------------------------- runtimes (no famex inside)

TRANSFORMERS_RUNNER = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForCausalLM
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for job in jobs:
        load_dtype = torch.bfloat16 if job["bf16_only"] else torch.float32
        model = AutoModelForCausalLM.from_pretrained(job["path"], dtype=load_dtype, attn_implementation="sdpa").eval()
        ids = torch.tensor([job["ids"]])
        with torch.no_grad():
            first = model(ids).logits[0].float().numpy()  # the runtime as shipped (decompresses on first call)
        if job["bf16_only"]:
            torch.nn.Module.float(model)  # its decompressed modules, computing in fp32
        model.generation_config.eos_token_id = None  # exactly NEW greedy tokens
        with torch.no_grad():
            logits = model(ids).logits[0].float().numpy()
            out = model.generate(torch.tensor([job["prompt"]]), do_sample=False, max_new_tokens=job["new"], pad_token_id=0)
        np.save(job["prefix"] + ".logits.npy", logits)
        np.save(job["prefix"] + ".first.npy", first)
        layer = model.model.layers[0].self_attn.q_proj
        results[job["path"]] = {"greedy": out[0, len(job["prompt"]):].tolist(), "q_proj": type(layer).__name__,
                                "status": str(getattr(layer, "quantization_status", None)),
                                "config_dtype": str(model.config.dtype)}
    results["famex_imported"] = "famex" in sys.modules
    json.dump(results, open(sys.argv[2], "w"))
''')

MLX_RUNNER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for job in jobs:
        model, tokenizer = load(job["path"])
        logits = model(mx.array([job["ids"]]))[0].astype(mx.float32)
        np.save(job["prefix"] + ".logits.npy", np.array(logits))
        tokens = [int(t) for t, _ in generate_step(mx.array(job["prompt"]), model, max_tokens=job["new"])]
        layer = model.model.layers[0].self_attn.q_proj
        results[job["path"]] = {"greedy": tokens, "q_proj": type(layer).__name__,
                                "bits": getattr(layer, "bits", None), "group_size": getattr(layer, "group_size", None),
                                "embed": type(model.model.embed_tokens).__name__}
    results["famex_imported"] = "famex" in sys.modules
    json.dump(results, open(sys.argv[2], "w"))
''')


def run_runtime(script: str, jobs: list[dict], workdir: Path) -> dict:
    """Run a runtime script over ``jobs`` in a fresh interpreter (isolated: no famex on its path)."""
    (workdir / "runner.py").write_text(script)
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(workdir / "runner.py"), str(workdir / "jobs.json"), str(workdir / "out.json")],
                          capture_output=True, text=True, env=env, cwd=workdir, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((workdir / "out.json").read_text())
    assert results.pop("famex_imported") is False
    return results


# --------------------------------------------------------------------------- famex side


def tiny_model(arch: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """Width 128 (every group size 16..128 divides every input), sharp logits (a larger init)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, tie_word_embeddings=arch == "apertus", initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "apertus":
        config = ApertusConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        config.mlp_bias, config.qk_norm, config.post_norm = False, True, False
    else:
        config = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def quantized_dir(model, tokenizer, fmt: str, out: Path, **kw) -> Path:
    calib = None
    if parse_format(fmt).activations == "nvfp4":
        g = torch.Generator().manual_seed(1)
        calib = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 64), generator=g)}]
    result = quantize_model(model, fmt, "rtn", calib=calib, **kw)
    return save_quantized(model, tokenizer, fmt, result.qparams, "rtn", out, **result.info())


def reference(qdir: Path, dtype: str, round_quantized: bool) -> torch.nn.Module:
    """famex's fake-quant model as the export holds it: unquantized tensors rounded to the export's dtype."""
    model, info = load_quantized(qdir)
    quantized = {f"{m}.weight" for m in info["modules"]}
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point() and (round_quantized or key not in quantized):
                t.copy_(t.to(target).float())
    return model


def famex_run(model, ids: list[int], prompt: list[int], new: int = NEW_TOKENS) -> tuple[np.ndarray, list[int]]:
    """Logits on ``ids`` and ``new`` greedy tokens after ``prompt`` (full recompute, no cache, no EOS stop)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        seq = list(prompt)
        for _ in range(new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return logits, seq[len(prompt):]


# --------------------------------------------------------------------------- tiny models, every format

CT_CASES = [  # (arch, famex format): W4A16, W8A16, FP8 W8A8, NVFP4A16, NVFP4 W4A4
    ("apertus", "int4-w4a16"),
    ("llama", "int8-w8a16"),
    ("llama", "fp8"),
    ("llama", "nvfp4a16"),
    ("apertus", "nvfp4"),
]
MLX_CASES = [  # (arch, format, dtype, extra); the mixed cases below add int2, int6 and group 32
    ("apertus", "int4", "fp32", {}),
    ("apertus", "int3-g128", "fp32", {"embeddings": True}),  # tied: the quantized embedding is also the lm_head
    ("llama", "int5", "fp32", {"lm_head": True}),
    ("llama", "int8-g128", "fp32", {"embeddings": True, "lm_head": True}),
    ("apertus", "int4-w4a16", "fp32", {}),  # a symmetric grid, written as MLX affine
    ("llama", "int4", "bf16", {}),
]
MIXED_CASES = {  # key: (arch, low format, recipe, high format, high's extra)
    "mixed-apertus-edges": ("apertus", "int3", "edges", "int6-g32", {"embeddings": True}),
    "mixed-llama-mlx-lm": ("llama", "int2-g32", "mlx-lm", "int6", {"lm_head": True}),
}


# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from famex.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """Quantized tiny Apertus (tied) / Llama (untied) models, their exports, and one run of each runtime."""
    root = tmp_path_factory.mktemp("export-runtimes")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (POSITIONS,), generator=g).tolist()
    prompt = ids[:6]
    cases = {}

    def add(key, arch, fmt, to, dtype, extra=None, mixed=None):
        layers = 4 if mixed else 2  # mixed recipes need blocks between the first and the last
        q = quantized_dir(tiny_model(arch, layers), tokenizer, fmt, root / f"q-{key}", **(extra or {}))
        out = root / f"x-{key}"
        cfg = ExportConfig(model=str(q), to=to, out=str(out), dtype=dtype)
        if mixed:
            high = quantized_dir(tiny_model(arch, layers), tokenizer, mixed[0], root / f"q-{key}-high", **mixed[2])
            cfg.mixed_from, cfg.mixed = str(high), mixed[1]
        export(cfg)
        cases[key] = dict(arch=arch, fmt=fmt, to=to, dtype=dtype, q=q, out=out, high=cfg.mixed_from or None,
                          recipe=cfg.mixed, extra=extra or {})

    for arch, fmt in CT_CASES:
        add(f"ct-{arch}-{fmt}", arch, fmt, "compressed-tensors", "bf16")
    for arch, fmt, dtype, extra in MLX_CASES:
        add(f"mlx-{arch}-{fmt}-{dtype}-{'-'.join(extra) or 'blocks'}", arch, fmt, "mlx", dtype, extra)
    for key, (arch, low, recipe, high, extra) in MIXED_CASES.items():
        add(key, arch, low, "mlx", "fp32", mixed=(high, recipe, extra))
    # hf: an unquantized model in bf16, and a quantized one dequantized (exactly, in fp32)
    plain = root / "plain"
    tiny_model("llama").save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    export(ExportConfig(model=str(plain), to="hf", out=str(root / "x-hf-plain"), dtype="bf16"))
    cases["hf-plain"] = dict(fmt=None, to="compressed-tensors", out=root / "x-hf-plain", src=plain)
    export(ExportConfig(model=str(cases["ct-apertus-int4-w4a16"]["q"]), to="hf", out=str(root / "x-hf-dequantized"),
                        dtype="fp32", dequantize=True))
    cases["hf-dequantized"] = dict(fmt=None, to="compressed-tensors", out=root / "x-hf-dequantized",
                                   q=cases["ct-apertus-int4-w4a16"]["q"])


    def jobs(to):
        return [{"path": str(c["out"]), "ids": ids, "prompt": prompt, "new": NEW_TOKENS, "prefix": str(c["out"]),
                 "bf16_only": c["fmt"] is not None and parse_format(c["fmt"]).kind == "fp4"}
                for c in cases.values() if c["to"] == to]

    wd_ct, wd_mlx = root / "run-ct", root / "run-mlx"
    wd_ct.mkdir(), wd_mlx.mkdir()
    runs = run_runtime(TRANSFORMERS_RUNNER, jobs("compressed-tensors"), wd_ct)
    runs.update(run_runtime(MLX_RUNNER, jobs("mlx"), wd_mlx))
    return {"cases": cases, "runs": runs, "ids": ids, "prompt": prompt}


def _mixed_reference(case) -> torch.nn.Module:
    """The low-bit model with the recipe's modules taken from the high-bit quantization of the same model.

    Returns the model and the quantized modules taken from the high-bit directory.
    """
    from famex.export.files import ModelSource
    from famex.export.mlx import plan

    base = reference(case["q"], case["dtype"], False)
    high, info = load_quantized(case["high"])
    routes = plan(ModelSource.open(case["q"]), ModelSource.open(case["high"]), case["recipe"])
    taken = [m for m, src in routes.items() if src.path == Path(case["high"])]
    with torch.no_grad():
        for m in taken:
            for name, t in high.get_submodule(m).state_dict().items():
                base.get_submodule(m).state_dict()[name].copy_(t)
    return base, sorted(set(taken) & set(info["modules"]))


@pytest.mark.parametrize("arch,fmt", CT_CASES, ids=[f"{a}-{f}" for a, f in CT_CASES])
def test_transformers_runs_compressed_tensors_exports_as_famex_computes_them(tiny, arch, fmt):
    case = tiny["cases"][f"ct-{arch}-{fmt}"]
    run = tiny["runs"][str(case["out"])]
    nvfp4 = parse_format(fmt).kind == "fp4"
    ref = reference(case["q"], "bf16", round_quantized=nvfp4)
    logits, greedy = famex_run(ref, tiny["ids"], tiny["prompt"])
    got = np.load(f"{case['out']}.logits.npy")
    diff = float(np.abs(got - logits).max())
    print(f"{arch} {fmt}: max |logit diff| {diff:.2e} (logits up to {np.abs(logits).max():.1f})")
    assert run["status"] == "QuantizationStatus.DECOMPRESSED"  # the compressed-tensors path ran, not a dense load
    assert diff <= 1e-3
    assert run["greedy"] == greedy
    if nvfp4:  # the runtime as shipped (bf16 end to end): reported, and still the same model
        shipped = np.load(f"{case['out']}.first.npy")
        agree = float((shipped.argmax(-1) == logits.argmax(-1)).mean())
        # Reported, not asserted: on a random model's flat logits, bf16 rounding before a discontinuous
        # activation quantizer moves argmaxes; the teacher test checks this path on a real model.
        print(f"  bf16 runtime: max |logit diff| {np.abs(shipped - logits).max():.2e}, top-1 agreement {agree:.3f}")


@pytest.mark.parametrize("arch,fmt,dtype,extra", MLX_CASES, ids=[f"{a}-{f}-{d}-{'-'.join(e) or 'blocks'}" for a, f, d, e in MLX_CASES])
def test_mlx_lm_runs_mlx_exports_as_famex_computes_them(tiny, arch, fmt, dtype, extra):
    case = tiny["cases"][f"mlx-{arch}-{fmt}-{dtype}-{'-'.join(extra) or 'blocks'}"]
    run = tiny["runs"][str(case["out"])]
    ref = reference(case["q"], dtype, round_quantized=False)
    _check_mlx(case, run, ref, tiny)
    f = parse_format(fmt)
    assert run["q_proj"] == "QuantizedLinear" and (run["bits"], run["group_size"]) == (f.bits, f.group_size)
    assert run["embed"] == ("QuantizedEmbedding" if extra.get("embeddings") or (arch == "apertus" and extra.get("lm_head")) else "Embedding")


@pytest.mark.parametrize("key", list(MIXED_CASES))
def test_mlx_lm_runs_mixed_precision_exports(tiny, key):
    case = tiny["cases"][key]
    ref, taken = _mixed_reference(case)
    _check_mlx(case, tiny["runs"][str(case["out"])], ref, tiny)
    high = parse_format(MIXED_CASES[key][3])
    overrides = {k: v for k, v in read_json(case["out"] / "config.json")["quantization"].items() if isinstance(v, dict)}
    assert set(overrides) == set(taken) and all((v["bits"], v["group_size"]) == (high.bits, high.group_size) for v in overrides.values())


def _check_mlx(case, run, ref, tiny):
    logits, greedy = famex_run(ref, tiny["ids"], tiny["prompt"])
    got = np.load(f"{case['out']}.logits.npy")
    agree = float((got.argmax(-1) == logits.argmax(-1)).mean())
    diff = float(np.abs(got - logits).max())
    print(f"{case['out'].name}: top-1 agreement {agree:.4f} over {len(logits)} positions, max |logit diff| {diff:.2e}")
    if case["dtype"] == "fp32":
        assert agree >= 0.99 and diff <= 1e-3
        assert run["greedy"] == greedy
    else:
        # MLX computes a bf16 export in bf16 end to end; a random model's flat logits then swap
        # near-ties (a wrong grid or packing gives ~0). The teacher test holds bf16 to 99%.
        assert agree >= 0.8


def test_transformers_loads_hf_exports(tiny):
    """A plain BF16 export is the model rounded to bf16; a --dequantize fp32 export is the fake-quant model exactly."""
    plain = tiny["cases"]["hf-plain"]
    ref = AutoModelForCausalLM.from_pretrained(plain["src"], dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            t.copy_(t.bfloat16().float())
    for case, model in ((plain, ref), (tiny["cases"]["hf-dequantized"], load_quantized(tiny["cases"]["hf-dequantized"]["q"])[0])):
        logits, greedy = famex_run(model, tiny["ids"], tiny["prompt"])
        run = tiny["runs"][str(case["out"])]
        assert run["status"] == "None"  # a dense checkpoint: no quantization machinery
        assert float(np.abs(np.load(f"{case['out']}.logits.npy") - logits).max()) <= 1e-4
        assert run["greedy"] == greedy
    assert read_json(plain["out"] / "config.json")["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- the Llama-architecture default teacher

TEACHER_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. "
)


@pytest.fixture(scope="module")
def teacher_exports(tmp_path_factory, tokenizer):
    """The default teacher quantized at a few formats (each quantization reloads it: quantize_model works in place)."""
    from famex.models import load_teacher

    root = tmp_path_factory.mktemp("export-teacher")
    ids = tokenizer(TEACHER_TEXT * 16)["input_ids"][:POSITIONS]
    assert len(ids) == POSITIONS
    prompt = tokenizer("The capital of France is")["input_ids"]
    cases = {}
    for fmt, to, dtypes in (("int4", "mlx", ("fp32", "bf16")), ("fp8", "compressed-tensors", ("bf16",)),
                            ("nvfp4a16", "compressed-tensors", ("bf16",)), ("int4-w4a16-g64", "compressed-tensors", ("bf16",))):
        model, tok = load_teacher("default")
        q = quantized_dir(model, tok, fmt, root / f"q-{fmt}")
        for dtype in dtypes:
            out = root / f"x-{fmt}-{dtype}"
            export(ExportConfig(model=str(q), to=to, out=str(out), dtype=dtype))
            cases[(fmt, dtype)] = dict(fmt=fmt, to=to, dtype=dtype, q=q, out=out)
    return {"cases": cases, "ids": ids, "prompt": prompt, "root": root}


@pytest.mark.slow
def test_teacher_compressed_tensors_exports_in_transformers(teacher_exports):
    t = teacher_exports
    cases = [c for c in t["cases"].values() if c["to"] == "compressed-tensors"]
    jobs = [{"path": str(c["out"]), "ids": t["ids"], "prompt": t["prompt"], "new": NEW_TOKENS, "prefix": str(c["out"]),
             "bf16_only": parse_format(c["fmt"]).kind == "fp4"} for c in cases]
    wd = t["root"] / "run-ct"
    wd.mkdir()
    runs = run_runtime(TRANSFORMERS_RUNNER, jobs, wd)
    for c in cases:
        nvfp4 = parse_format(c["fmt"]).kind == "fp4"
        logits, greedy = famex_run(reference(c["q"], "bf16", round_quantized=nvfp4), t["ids"], t["prompt"])
        got = np.load(f"{c['out']}.logits.npy")
        diff = float(np.abs(got - logits).max())
        print(f"teacher {c['fmt']}: max |logit diff| {diff:.2e}; greedy {runs[str(c['out'])]['greedy']}")
        assert diff <= 1e-3 and runs[str(c["out"])]["greedy"] == greedy
        if nvfp4:  # bf16 end to end, as transformers ships it, against famex in fp32
            exact, _ = famex_run(load_quantized(c["q"])[0], t["ids"], t["prompt"], new=0)
            shipped = np.load(f"{c['out']}.first.npy")
            agree = float((shipped.argmax(-1) == exact.argmax(-1)).mean())
            print(f"  bf16 runtime vs famex fp32: top-1 agreement {agree:.4f}, max |logit diff| {np.abs(shipped - exact).max():.2e}")
            assert agree >= 0.95


@pytest.mark.slow
def test_teacher_mlx_exports_in_mlx_lm(teacher_exports):
    """The int4 teacher in mlx-lm: fp32 on 512 positions, bf16 on 64, and 20 greedy tokens (MLX on CPU: minutes)."""
    t = teacher_exports
    cases = [c for c in t["cases"].values() if c["to"] == "mlx"]
    # MLX's CPU kernels are ~10x slower in bf16 than in fp32: the bf16 export is checked on 64 positions.
    n = {"fp32": POSITIONS, "bf16": 64}
    jobs = [{"path": str(c["out"]), "ids": t["ids"][:n[c["dtype"]]], "prompt": t["prompt"], "new": NEW_TOKENS, "prefix": str(c["out"])}
            for c in cases]
    wd = t["root"] / "run-mlx"
    wd.mkdir()
    runs = run_runtime(MLX_RUNNER, jobs, wd)
    exact, exact_greedy = famex_run(load_quantized(cases[0]["q"])[0], t["ids"], t["prompt"])
    for c in cases:
        logits, greedy = (exact, exact_greedy) if c["dtype"] == "fp32" else famex_run(reference(c["q"], c["dtype"], False), t["ids"], t["prompt"])
        got = np.load(f"{c['out']}.logits.npy")
        logits = logits[: len(got)]
        agree = float((got.argmax(-1) == logits.argmax(-1)).mean())
        print(f"teacher int4 mlx {c['dtype']}: top-1 agreement {agree:.4f} over {len(got)} positions, "
              f"max |logit diff| {np.abs(got - logits).max():.2e}; greedy {runs[str(c['out'])]['greedy']}")
        if c["dtype"] == "fp32":
            assert agree >= 0.99
            assert runs[str(c["out"])]["greedy"] == greedy
        else:
            # MLX's CPU quantized_matmul in bf16 is far less accurate than a bf16 dense matmul (measured:
            # 7% vs 0.6% relative error at K=1536; torch in bf16 keeps 98% top-1 here), so the bf16 export
            # is held to a looser bound on Linux; Apple GPUs run other kernels.
            assert agree >= 0.85
