"""Exporters without a runtime in the loop: bit layouts against the libraries' own code, bad input, the stage contract.

The runtime proofs (transformers, mlx-lm in a subprocess) are in test_export_runtimes.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import ApertusConfig, AutoModelForCausalLM, LlamaConfig

from famex.errors import FamexError
from famex.export import compressed_tensors as ct
from famex.export import mlx
from famex.export.files import ModelSource, ShardWriter, TensorReader
from famex.export.stage import ExportConfig, export
from famex.quant import dequantize, parse_format, quantize, quantize_model, save_quantized
from famex.quant.fake_quant import compute_global_scale
from famex.utils import read_json

VOCAB = 256


def _tiny(arch="apertus", layers=2, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, tie_word_embeddings=arch == "apertus")
    config = ApertusConfig(**kw) if arch == "apertus" else LlamaConfig(**kw)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


# Tiny models: one torch thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from famex.models import load_tokenizer

    return load_tokenizer("default")


def _quantized(tmp_path, tokenizer, fmt="int4", arch="apertus", name="q", layers=2, **kw):
    model = _tiny(arch, layers)
    result = quantize_model(model, fmt, "rtn", **kw)
    return save_quantized(model, tokenizer, fmt, result.qparams, "rtn", tmp_path / name, **result.info())


# --------------------------------------------------------------------------- bit layouts


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_mlx_packing_is_mlx_own(bits, group):
    """famex's codes packed by `pack_bits` are byte for byte what mx.quantize writes for the same grid (fp32)."""
    import mlx.core as mx

    w = torch.randn(8, 256)
    fmt = parse_format(f"int{bits}-g{group}-fp32")
    qp = quantize(w, fmt)
    packed = mlx.pack_bits(qp.codes, bits)
    mq, ms, mb = mx.quantize(mx.array(w.numpy()), group_size=group, bits=bits, mode="affine")
    assert np.array_equal(packed.numpy(), np.array(mq))
    assert np.array_equal(qp.scale.numpy(), np.array(ms)) and np.array_equal(qp.bias.numpy(), np.array(mb))
    assert torch.equal(mlx.unpack_bits(packed, bits, 256), qp.codes)


def test_symmetric_grid_is_exact_as_mlx_affine():
    import mlx.core as mx

    fmt = parse_format("int4-w4a16")
    w = torch.randn(16, 256)
    qp = quantize(w, fmt)
    t = mlx.mlx_tensors(qp, fmt)
    got = mx.dequantize(mx.array(t["weight"].numpy()), mx.array(t["scales"].float().numpy()), mx.array(t["biases"].float().numpy()),
                        group_size=128, bits=4, mode="affine")
    assert np.array_equal(np.array(got), dequantize(qp, fmt).numpy())
    assert t["scales"].dtype == t["biases"].dtype == torch.bfloat16  # stored as famex stored them


def _ct_decompress(tensors, scheme):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(scheme.format).decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("name", ["int4-w4a16", "int8-w8a16", "int3-g32-sym", "int2-ch-sym", "fp8", "fp8-a16"])
def test_compressed_tensors_decompressor_gives_famex_weights(name):
    """compressed-tensors' own decompressor turns the exported tensors back into famex's grid, bit for bit."""
    fmt = parse_format(name)
    w = torch.randn(32, 256) * 0.05
    qp = quantize(w, fmt)
    scheme = ct.scheme_for(fmt)
    tensors = ct.compress_module(qp, fmt, scheme)
    ref = dequantize(qp, fmt)
    # The decompressor computes in the scale's dtype: stored (bf16 for W4A16 / W8A16) it rounds the
    # grid; held in fp32, as transformers holds it in an fp32 model, it gives the grid exactly.
    stored = _ct_decompress(tensors, scheme)
    assert stored.dtype == qp.scale.dtype and torch.equal(stored, ref.to(qp.scale.dtype))
    assert torch.equal(_ct_decompress({**tensors, "weight_scale": tensors["weight_scale"].float()}, scheme), ref)
    expect = {"pack-quantized": {"weight_packed", "weight_scale", "weight_shape"}}.get(scheme.format, {"weight", "weight_scale"})
    assert set(tensors) == expect


@pytest.mark.parametrize("name", ["nvfp4a16", "nvfp4"])
def test_compressed_tensors_nvfp4_tensors(name):
    """NVFP4: packed nibbles, e4m3 scales, fp32 global (and input global) scales; the decompressor's bf16 weights are famex's rounded."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    fmt = parse_format(name)
    w = torch.randn(32, 256) * 0.05
    qp = quantize(w, fmt, global_scale=compute_global_scale(w))
    qp.input_global_scale = torch.tensor([123.0]) if fmt.activations == "nvfp4" else None
    scheme = ct.scheme_for(fmt)
    t = ct.compress_module(qp, fmt, scheme)
    assert t["weight_packed"].dtype == torch.uint8 and t["weight_packed"].shape == (32, 128)
    assert t["weight_scale"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (32, 16)
    assert torch.equal(t["weight_global_scale"], qp.global_scale)
    assert ("input_global_scale" in t) == (fmt.activations == "nvfp4")
    ref = dequantize(qp, fmt)
    # compressed-tensors' decompressor computes in bf16 (its fixed choice in 0.20) ...
    assert torch.equal(_ct_decompress(t, scheme), ref.bfloat16())
    # ... and its unpacking in fp32 with the stored scales is famex's grid exactly
    values = unpack_fp4_from_uint8(t["weight_packed"], 32, 256, dtype=torch.float32).reshape(32, 16, 16)
    eff = t["weight_scale"].float() / t["weight_global_scale"]
    assert torch.equal((values * eff.unsqueeze(-1)).reshape(32, 256), ref)


def test_compressed_tensors_quantization_config(tmp_path, tokenizer):
    q = _quantized(tmp_path, tokenizer, "nvfp4a16", arch="llama")
    out = tmp_path / "x"
    export(ExportConfig(model=str(q), to="compressed-tensors", out=str(out)))
    config = read_json(out / "config.json")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["weights"]["group_size"] == 16 and group["input_activations"] is None
    assert "famex_quantization" not in config and config["dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert "lm_head.weight" in keys and "model.layers.0.self_attn.q_proj.weight_packed" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


# --------------------------------------------------------------------------- mlx config and mixed recipes


def test_mlx_config_spells_out_what_mlx_lm_reads():
    apertus = ApertusConfig(vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, head_dim=32).to_dict()
    assert "rope_theta" not in apertus  # transformers 5 keeps it in rope_parameters
    c = mlx.mlx_config(apertus, {"group_size": 64, "bits": 4, "mode": "affine"})
    assert c["rope_theta"] == apertus["rope_parameters"]["rope_theta"]
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_scaling"]["factor"] == 8.0
    assert (c["mlp_bias"], c["attention_bias"], c["qk_norm"], c["post_norm"]) == (False, False, True, False)
    assert c["quantization"] == c["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    llama = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}).to_dict()
    c = mlx.mlx_config(llama, None)
    assert c["rope_theta"] == 100000.0 and "rope_scaling" not in c and "quantization" not in c
    bad = dict(apertus, head_dim=64)
    with pytest.raises(FamexError, match="head_dim"):
        mlx.mlx_config(bad, None)


def test_mixed_recipes_choose_like_mlx_lm():
    names = [f"model.layers.{i}.{m}" for i in range(16) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    names += ["model.embed_tokens", "lm_head"]
    chosen = mlx.mixed_modules("mlx-lm", names, 16)
    # mlx_lm.convert.mixed_quant_predicate with 16 layers: more bits in blocks 0, 1, 4, 7, 10, 13, 14, 15
    blocks = {0, 1, 4, 7, 10, 13, 14, 15}
    assert chosen == {f"model.layers.{i}.{m}" for i in blocks for m in ("self_attn.v_proj", "mlp.down_proj")} | {"lm_head"}
    edges = mlx.mixed_modules("edges", names, 16)
    assert edges == {n for n in names if n.startswith(("model.layers.0.", "model.layers.15."))} | {"model.embed_tokens", "lm_head"}
    with pytest.raises(FamexError, match="mixed recipe"):
        mlx.mixed_modules("mixed_3_6", names, 16)


def test_mixed_export_takes_modules_from_the_high_bit_directory(tmp_path, tokenizer):
    low = _quantized(tmp_path, tokenizer, "int3", arch="llama", name="low", layers=4)
    high = _quantized(tmp_path, tokenizer, "int6-g32", arch="llama", name="high", layers=4, lm_head=True)
    out = tmp_path / "x"
    export(ExportConfig(model=str(low), to="mlx", out=str(out), mixed="mlx-lm", mixed_from=str(high)))
    quant = read_json(out / "config.json")["quantization"]
    overrides = {k for k, v in quant.items() if isinstance(v, dict)}
    assert overrides == {"lm_head", "model.layers.2.self_attn.v_proj", "model.layers.2.mlp.down_proj",
                         "model.layers.3.self_attn.v_proj", "model.layers.3.mlp.down_proj"}
    assert quant["lm_head"] == {"group_size": 32, "bits": 6, "mode": "affine"} and quant["bits"] == 3
    metrics = read_json(out / "metrics.json")
    assert metrics["modules_per_format"] == {"int3": 4 * 7 - 4, "int6-g32": 5}
    other = _quantized(tmp_path, tokenizer, "int6", arch="llama", name="other-seed", layers=4)
    _reseed(other)
    with pytest.raises(FamexError, match="not quantized from one model"):
        export(ExportConfig(model=str(low), to="mlx", out=str(tmp_path / "y"), mixed="edges", mixed_from=str(other)))


def _reseed(qdir):
    """Change a tensor no quantization touches, as a model trained differently would."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(qdir / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, str(qdir / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt,to,why", [
    ("int4", "compressed-tensors", "asymmetric"),
    ("int4-afp8", "compressed-tensors", "activations"),
    ("nvfp4a16", "mlx", "NVFP4"),
    ("fp8", "mlx", "FP8"),
    ("int4-g16", "mlx", "groups of 32, 64 or 128"),
    ("int4-ch-sym", "mlx", "per channel"),
    ("int4", "hf", "--dequantize"),
])
def test_unsupported_pairs_fail_before_writing(tmp_path, tokenizer, fmt, to, why):
    q = _quantized(tmp_path, tokenizer, fmt, arch="llama")
    out = tmp_path / "out"
    with pytest.raises(FamexError, match=why) as e:
        export(ExportConfig(model=str(q), to=to, out=str(out)))
    message = str(e.value)  # names the target's supported formats, then lists the other targets
    assert "other targets:" in message and all(f"{t}:" in message for t in ("compressed-tensors", "mlx", "hf") if t != to)
    assert to == "hf" or "Supported:" in message
    assert not out.exists()


def test_other_bad_input(tmp_path, tokenizer):
    plain = tmp_path / "plain"
    _tiny("llama").save_pretrained(plain)
    with pytest.raises(FamexError, match="not quantized"):
        export(ExportConfig(model=str(plain), to="compressed-tensors", out=str(tmp_path / "a")))
    with pytest.raises(FamexError, match="--tokenizer"):
        export(ExportConfig(model=str(plain), to="hf", out=str(tmp_path / "a")))
    q = _quantized(tmp_path, tokenizer, "int4-w4a16", arch="llama", embeddings=True)
    with pytest.raises(FamexError, match="embeddings"):
        export(ExportConfig(model=str(q), to="compressed-tensors", out=str(tmp_path / "a")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FamexError, match="not a famex export directory"):
        export(ExportConfig(model=str(plain), to="hf", out=str(busy), tokenizer=str(q)))
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(FamexError, match="GGUF"):
        export(ExportConfig(model="default", to="mlx", out=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()
    # --tokenizer fills in what the model directory lacks
    export(ExportConfig(model=str(plain), to="hf", out=str(tmp_path / "b"), tokenizer=str(q)))
    assert (tmp_path / "b" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- the stage


def test_stage_contract_metrics_and_rerun(tmp_path, tokenizer):
    q = _quantized(tmp_path, tokenizer, "int4")
    out = tmp_path / "x"
    cfg = ExportConfig(model=str(q), to="mlx", out=str(out))
    export(cfg)
    meta = read_json(out / "meta.json")
    assert meta["stage"] == "export" and meta["status"] == "complete" and meta["config"]["to"] == "mlx"
    assert meta["inputs"]["model"]["path"] == str(q)
    m = read_json(out / "metrics.json")
    assert m["format"] == "int4" and m["target"] == "mlx"
    assert m["size_bytes"] > m["tensor_bytes"] > 0
    assert m["bits_per_weight_quantized"] == pytest.approx(4 + 2 * 16 / 64)  # bf16 scale + bias per 64 weights
    source = ModelSource.open(q)
    assert m["params"] == sum(source.tensors.get(k).numel() for k in source.dense_keys([]))
    assert m["bits_per_weight"] == pytest.approx(8 * m["tensor_bytes"] / m["params"])
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    export(cfg)  # complete with the same arguments: nothing to do
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(FamexError, match="other arguments"):
        export(ExportConfig(model=str(q), to="mlx", out=str(out), dtype="fp32"))


def test_interrupted_export_never_looks_complete(tmp_path, tokenizer, monkeypatch):
    q = _quantized(tmp_path, tokenizer, "fp8")
    out = tmp_path / "x"

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "close", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ExportConfig(model=str(q), to="compressed-tensors", out=str(out)))
    assert read_json(out / "meta.json")["status"] == "failed"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]  # nothing half-written in OUT
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]  # nor beside it
    monkeypatch.undo()
    export(ExportConfig(model=str(q), to="compressed-tensors", out=str(out)))
    assert read_json(out / "meta.json")["status"] == "complete" and (out / "model.safetensors").is_file()


def test_shards_and_index(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    for k, v in tensors.items():
        writer.add(k, v)
    names = writer.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and set(index["weight_map"]) == set(tensors)
    reader = TensorReader(tmp_path)
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


def test_hf_dequantize_is_exact_in_fp32_and_keeps_the_marker(tmp_path, tokenizer):
    q = _quantized(tmp_path, tokenizer, "int3-g32", arch="llama")
    out = tmp_path / "x"
    export(ExportConfig(model=str(q), to="hf", out=str(out), dtype="fp32", dequantize=True))
    config = read_json(out / "config.json")
    assert config["famex_quantization"]["format"] == "int3-g32"  # famex quantize refuses it
    source = ModelSource.open(q)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name in source.modules:
            assert torch.equal(f.get_tensor(f"{name}.weight"), dequantize(source.qparams(name), source.fmt))


def test_unquantized_model_to_mlx_is_a_plain_mlx_checkpoint(tmp_path, tokenizer):
    plain = tmp_path / "plain"
    _tiny("apertus").save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    out = tmp_path / "x"
    export(ExportConfig(model=str(plain), to="mlx", out=str(out)))
    config = read_json(out / "config.json")
    assert "quantization" not in config and config["qk_norm"] is True and config["rope_theta"] > 0
    assert read_json(out / "metrics.json")["params_quantized"] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: mlx-lm ties it to the embedding


@pytest.mark.slow
def test_default_teacher_gguf_to_hf(tmp_path):
    """The GGUF teacher as a plain BF16 checkpoint that transformers loads (no GGUF reader needed)."""
    from famex.models import load_teacher

    out = tmp_path / "teacher-hf"
    export(ExportConfig(model="default", to="hf", out=str(out)))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref, tok = load_teacher("default")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # bf16 weights vs the fp32 dequantized GGUF
    assert read_json(out / "config.json").get("quantization_config") is None
    assert read_json(out / "metrics.json")["size_bytes"] < 2.2 * sum(p.numel() for p in ref.parameters())


# --------------------------------------------------------------------------- --device


def test_packing_allocates_on_the_codes_device():
    """pack_bits / unpack_bits build their words on the device of their input (no CPU tensors mixed in:
    on the meta device any CPU allocation would fail), so `--device cuda` packs on the GPU."""
    codes = torch.zeros(4, 64, dtype=torch.uint8, device="meta")
    packed = mlx.pack_bits(codes, 3)
    assert packed.device.type == "meta" and packed.shape == (4, 6) and packed.dtype == torch.uint32
    assert mlx.unpack_bits(packed, 3, 64).device.type == "meta"


@pytest.mark.parametrize("fmt,to", [("int4", "mlx"), ("fp8", "compressed-tensors")])
def test_export_device_runs_each_module_there_and_writes_the_same_files(tmp_path, tokenizer, monkeypatch, fmt, to):
    q = _quantized(tmp_path, tokenizer, fmt)
    export(ExportConfig(model=str(q), to=to, out=str(tmp_path / "default")))
    seen = []
    original = ModelSource.qparams

    def spy(self, name, device=None):
        qp = original(self, name, device)
        seen.append((str(device), qp.codes.device.type, qp.scale.device.type))
        return qp

    monkeypatch.setattr(ModelSource, "qparams", spy)
    export(ExportConfig(model=str(q), to=to, out=str(tmp_path / "on-cpu"), device="cpu"))
    assert len(seen) == len(ModelSource.open(q).modules) and set(seen) == {("cpu", "cpu", "cpu")}
    a = safe_open(str(tmp_path / "default" / "model.safetensors"), "pt")
    b = safe_open(str(tmp_path / "on-cpu" / "model.safetensors"), "pt")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get_tensor(k).reshape(-1).view(torch.uint8), b.get_tensor(k).reshape(-1).view(torch.uint8))
               for k in a.keys())


def test_export_refuses_a_missing_cuda_device_before_writing(tmp_path, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    q = _quantized(tmp_path, tokenizer, "int4")
    with pytest.raises(FamexError, match="no CUDA device is available; use --device cpu"):
        export(ExportConfig(model=str(q), to="mlx", out=str(tmp_path / "x"), device="cuda"))
    assert not (tmp_path / "x").exists()
