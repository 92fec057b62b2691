"""Export a plain Hugging Face checkpoint (BF16 by default): the release format of unquantized models.

An unquantized model directory is rewritten with its tensors in ``dtype`` (tied lm_head left
out), its config (``dtype`` set) and its tokenizer / generation files; a GGUF file (the default
teacher) is dequantized by transformers and saved the same way.

A quantized-model directory is refused unless ``dequantize`` is asked for: its dense copy is
larger than every deployable export and, in BF16, no longer on its quantization grid (an int4
value with a bf16 scale needs 12 significant bits), so it would silently stop being the model
famex evaluated. With ``dequantize`` the on-grid weights are written as they are (exactly in
fp32), and config.json keeps famex's quantization marker so that ``famex quantize`` refuses to
quantize them a second time. What this module does not do: write any quantized format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from famex.errors import FamexError
from famex.export.files import DTYPES, ModelSource, ShardWriter, cast_dense, copy_side_files, export_config, write_json
from famex.quant.model import QUANT_MARKER

__all__ = ["check", "export_hf", "export_hf_gguf"]


def check(source: ModelSource, dtype: str = "bf16", dequantize: bool = False) -> None:
    """`FamexError` for a quantized ``source`` unless ``dequantize`` (see the module docstring)."""
    if source.quantized and not dequantize:
        raise FamexError(
            f"{source.path} is quantized ({source.fmt.name}); --to hf would write its weights dense and, in {dtype}, "
            "off the quantization grid. Export it with --to compressed-tensors or --to mlx, export the unquantized "
            "model instead, or pass --dequantize to write the dense copy anyway (exact with --dtype fp32)"
        )


def export_hf(source: ModelSource, out: Path, dtype: str = "bf16", dequantize: bool = False,
              max_shard_bytes: int = 5 * 10**9) -> dict[str, Any]:
    """Write ``source`` as a dense checkpoint in ``dtype`` into the empty directory ``out``."""
    check(source, dtype, dequantize)
    writer = ShardWriter(out, max_shard_bytes)
    params = 0
    for key in source.dense_keys([]):
        t = source.tensors.get(key)
        writer.add(key, cast_dense(t, dtype))
        params += t.numel()
    writer.close()
    config = export_config(source, dtype)
    if source.quantized:
        config[QUANT_MARKER] = source.config.get(QUANT_MARKER) or {"format": source.fmt.name}
    write_json(out / "config.json", config)
    copy_side_files([source.path], out)
    return {"params_quantized": 0, "params_dense": params, "bytes_quantized": 0, "tensor_bytes": writer.tensor_bytes}


def export_hf_gguf(spec: str, out: Path, dtype: str = "bf16") -> dict[str, Any]:
    """Load a GGUF model (``default`` = the offline teacher) through transformers and save it dense in ``dtype``."""
    from famex.models import load_model, load_tokenizer, resolve_model_spec

    ms = resolve_model_spec(spec)
    model = load_model(ms, dtype=DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(ms).save_pretrained(out)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tensor_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"params_quantized": 0, "params_dense": params, "bytes_quantized": 0, "tensor_bytes": tensor_bytes}
