"""Exporters: turn a famex model directory into a checkpoint a runtime deploys.

- `compressed_tensors`: quantized → compressed-tensors (vLLM; transformers with compressed-tensors).
- `mlx`: quantized (affine / symmetric int) → MLX (mlx-lm), with mixed-precision recipes.
- `hf`: unquantized → a plain dense (BF16) Hugging Face checkpoint.
- `files`: reading a model directory tensor by tensor, writing shards, copying tokenizer files.
- `stage`: the ``famex export`` stage (checks every format/target pair before writing anything).

The exporters never quantize: they write the codes and scales `famex.quant` stored, bit for bit.
"""
